"""Tensor-parallel (Megatron-style) layers that models use whatever the model-parallel size is.

Each layer picks one of three implementations from its `mp_group`:
- single: no group or a group of one process. Exactly plain nn.Linear / nn.Embedding / F.cross_entropy, with
  no extra ops, so mp=1 models pay nothing for being written tensor-parallel.
- fleet: more than one process on GPU with NCCL. Delegates to paddle.distributed.fleet.meta_parallel, whose
  fused GPU kernels are faster.
- collective: more than one process otherwise (CPU with gloo). fleet's layers need GPU kernels
  (c_identity, c_softmax_with_cross_entropy), so the Megatron collectives are written here as PyLayers over
  the plain all_reduce / all_gather that gloo provides.

Every parameter carries `mp_split_axis`: the axis along which it is split across the model-parallel group
(None: replicated). `shard_state_dict` and `gather_state_dict` use it to convert between a rank's shards
and the full (mp=1) layout, so checkpoints are always written in the full layout.

Weight layouts follow Paddle: Linear weights are [in_features, out_features], Embedding weights
[num_embeddings, dim]. A column-parallel weight is split along its output axis (1) and its bias along 0;
a row-parallel weight along its input axis (0), its bias replicated; a vocab-parallel embedding along 0.

Initialization draws the full weight from the global RNG on every rank and keeps the local slice, so with
the same seed an mp=N model equals the mp=1 model (at the price of one full-size temporary per layer while
it is built).
"""
import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from paddle import nn
from paddle.autograd import PyLayer

from ppzoo.distributed.env import fleet_tensor_parallel_applies
from ppzoo.errors import CheckpointError, ConfigError

SINGLE = "single"
FLEET = "fleet"
COLLECTIVE = "collective"

# Seed for fleet's model-parallel RNG stream, which fleet's layers require to exist when they are built.
# Our weights are overwritten after construction, so it only matters to fleet's own dropout.
_FLEET_RNG_BASE_SEED = 2_000_003


# ---------------------------------------------------------------------------------------------------------
# Choosing the implementation


def mp_size_of(mp_group) -> int:
    return 1 if mp_group is None else mp_group.nranks


def mp_rank_of(mp_group) -> int:
    return 0 if mp_group is None else mp_group.rank


def tensor_parallel_mode(mp_group) -> str:
    size = mp_size_of(mp_group)
    if size == 1:
        return SINGLE
    device = "gpu" if paddle.get_device().startswith("gpu") else "cpu"
    if fleet_tensor_parallel_applies(size, device, mp_group.backend.lower()):
        return FLEET
    return COLLECTIVE


def _check_divisible(what: str, length: int, mp_size: int):
    if length % mp_size:
        raise ConfigError(f"{what} ({length}) must be divisible by the model-parallel degree ({mp_size}).")


# ---------------------------------------------------------------------------------------------------------
# Collectives (no-ops without a group, so the collective code path can also run in one process)


def _all_reduce(tensor, mp_group, op=dist.ReduceOp.SUM):
    if mp_size_of(mp_group) > 1:
        dist.all_reduce(tensor, op=op, group=mp_group)
    return tensor


def all_gather_along_axis(tensor, axis: int, mp_group):
    """Concatenate every rank's `tensor` along `axis` (in rank order); `tensor` itself without a group."""
    if mp_size_of(mp_group) == 1:
        return tensor
    parts = []
    dist.all_gather(parts, tensor.contiguous(), group=mp_group)
    return paddle.concat(parts, axis=axis)


def _local_split(tensor, axis: int, mp_group):
    """This rank's equal share of `tensor` along `axis`."""
    size = mp_size_of(mp_group)
    if size == 1:
        return tensor
    return paddle.split(tensor, size, axis=axis)[mp_rank_of(mp_group)].contiguous()


class _CopyToModelParallel(PyLayer):
    """Input of a column-parallel layer: every rank uses the whole input, so the input's gradient is the sum
    of the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x, mp_group):
        ctx.mp_group = mp_group
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.mp_group)


def copy_to_model_parallel(x, mp_group):
    """Identity in forward; in backward, the sum of the ranks' gradients. For a replicated tensor that each
    rank multiplies with its own shard of a weight outside the layers below (e.g. a tied lm head)."""
    mode = tensor_parallel_mode(mp_group)
    if mode == SINGLE:
        return x
    if mode == FLEET:
        from paddle.distributed.fleet.layers.mpu import mp_ops

        return mp_ops._c_identity(x, group=mp_group)
    return _CopyToModelParallel.apply(x, mp_group)


class _ReduceFromModelParallel(PyLayer):
    """Output of a row-parallel layer: the sum of the ranks' partial products; its gradient reaches every
    rank whole."""

    @staticmethod
    def forward(ctx, x, mp_group):
        return _all_reduce(x.clone(), mp_group)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GatherFromModelParallel(PyLayer):
    """Concatenate the ranks' last-axis shards; each rank keeps the gradient of its own shard."""

    @staticmethod
    def forward(ctx, x, mp_group):
        ctx.mp_group = mp_group
        return all_gather_along_axis(x, -1, mp_group)

    @staticmethod
    def backward(ctx, grad):
        return _local_split(grad, -1, ctx.mp_group)


class _ScatterToModelParallel(PyLayer):
    """Keep this rank's last-axis shard of a replicated tensor; the gradient is reassembled from all ranks."""

    @staticmethod
    def forward(ctx, x, mp_group):
        ctx.mp_group = mp_group
        return _local_split(x, -1, mp_group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_along_axis(grad, -1, ctx.mp_group)


# ---------------------------------------------------------------------------------------------------------
# Parameters


def _mark_split(param, split_axis, mp_size: int):
    if param is None:
        return
    param.mp_split_axis = split_axis
    # fleet's hybrid wrappers read is_distributed: they skip such parameters when broadcasting replicated
    # weights across the model-parallel group, and add up their per-rank squared gradients in the global
    # gradient norm (replicated parameters are counted once).
    param.is_distributed = split_axis is not None and mp_size > 1


def _take_shard(value, axis: int, mp_rank: int, mp_size: int):
    """Rank `mp_rank`'s equal slice of a numpy array or paddle Tensor along `axis`."""
    length = value.shape[axis]
    shard = length // mp_size
    index = [slice(None)] * len(value.shape)
    index[axis] = slice(mp_rank * shard, (mp_rank + 1) * shard)
    # A copy, so the shard does not keep the full array alive.
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value[tuple(index)])
    with paddle.no_grad():
        return value[tuple(index)].clone()


def _create_shard_parameter(layer, full_shape, split_axis, mp_group, is_bias=False):
    """Draw the full parameter with Paddle's default initializer and keep this rank's slice.

    Drawing the full tensor on every rank keeps the global RNG in step with an mp=1 run and makes the shards
    of one rank differ from the others' (equal shards would never break their symmetry in training).
    """
    full = layer.create_parameter(shape=full_shape, is_bias=is_bias)
    mp_size = mp_size_of(mp_group)
    if split_axis is None or mp_size == 1:
        return full
    local = _take_shard(full, split_axis, mp_rank_of(mp_group), mp_size)
    param = layer.create_parameter(
        shape=local.shape, is_bias=is_bias, default_initializer=nn.initializer.Constant(0.0)
    )
    param.set_value(local)
    return param


def _ensure_fleet_rng_state(mp_group):
    from paddle.distributed.fleet.layers.mpu.random import MODEL_PARALLEL_RNG
    from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

    tracker = get_rng_state_tracker()
    if MODEL_PARALLEL_RNG not in tracker.get_states_tracker():
        tracker.add(MODEL_PARALLEL_RNG, _FLEET_RNG_BASE_SEED + mp_rank_of(mp_group))


def _adopt_fleet_layer(layer, fleet_layer, params):
    """Use `fleet_layer` for forward while its parameters appear under `layer`'s own names.

    The fleet layer is stored unregistered, so state_dict keys are the same in every mode (weight, bias);
    both layers hold the same Parameter objects, and Paddle's dtype/device conversions act on them in place.
    """
    layer.__dict__["_fleet_layer"] = fleet_layer
    for name, value in params.items():
        if value is None:
            setattr(layer, name, None)
            continue
        fleet_param = getattr(fleet_layer, name)
        fleet_param.set_value(value)
        setattr(layer, name, fleet_param)


# ---------------------------------------------------------------------------------------------------------
# Layers


def _linear(x, weight, bias=None):
    """x @ weight (+ bias): F.linear's result without its per-call cost. F.linear reads a global flag
    (paddle.get_flags) on every call, which costs more than a small product itself: 14.2 vs 5.6 us for
    [1, 1, 256] x [256, 256] on one CPU thread, about 0.25 ms of tiny ChuXin's 4 ms batch-1 decode step (29
    linears a step). Same kernels in training (matmul and its gradient)."""
    out = paddle.matmul(x, weight)
    return out if bias is None else out + bias


class ColumnParallelLinear(nn.Layer):
    """y = x W + b with W [in_features, out_features] split along out_features.

    The output is this rank's out_features shard unless gather_output=True.
    """

    def __init__(self, in_features, out_features, has_bias=False, gather_output=False, mp_group=None):
        super().__init__()
        self.mp_group = mp_group
        self.mode = tensor_parallel_mode(mp_group)
        mp_size = mp_size_of(mp_group)
        _check_divisible("ColumnParallelLinear out_features", out_features, mp_size)
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output

        weight = _create_shard_parameter(self, [in_features, out_features], 1, mp_group)
        bias = _create_shard_parameter(self, [out_features], 0, mp_group, is_bias=True) if has_bias else None
        if self.mode == FLEET:
            from paddle.distributed.fleet import meta_parallel

            _ensure_fleet_rng_state(mp_group)
            fleet_layer = meta_parallel.ColumnParallelLinear(
                in_features, out_features, has_bias=has_bias, gather_output=gather_output, mp_group=mp_group
            )
            _adopt_fleet_layer(self, fleet_layer, {"weight": weight, "bias": bias})
        else:
            self.weight = weight
            self.bias = bias
        _mark_split(self.weight, 1, mp_size)
        _mark_split(self.bias, 0, mp_size)

    def forward(self, x):
        if self.mode == SINGLE:
            return _linear(x, self.weight, self.bias)
        if self.mode == FLEET:
            return self._fleet_layer(x)
        x = _CopyToModelParallel.apply(x, self.mp_group)
        out = _linear(x, self.weight, self.bias)
        if self.gather_output:
            out = _GatherFromModelParallel.apply(out, self.mp_group)
        return out


class RowParallelLinear(nn.Layer):
    """y = x W + b with W [in_features, out_features] split along in_features; the output is whole.

    With input_is_parallel=True, x is already this rank's in_features shard (a column-parallel output).
    """

    def __init__(self, in_features, out_features, has_bias=False, input_is_parallel=True, mp_group=None):
        super().__init__()
        self.mp_group = mp_group
        self.mode = tensor_parallel_mode(mp_group)
        mp_size = mp_size_of(mp_group)
        _check_divisible("RowParallelLinear in_features", in_features, mp_size)
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel

        weight = _create_shard_parameter(self, [in_features, out_features], 0, mp_group)
        # The bias is added once to the summed output, so every rank holds all of it.
        bias = _create_shard_parameter(self, [out_features], None, mp_group, is_bias=True) if has_bias else None
        if self.mode == FLEET:
            from paddle.distributed.fleet import meta_parallel

            _ensure_fleet_rng_state(mp_group)
            fleet_layer = meta_parallel.RowParallelLinear(
                in_features, out_features, has_bias=has_bias, input_is_parallel=input_is_parallel,
                mp_group=mp_group,
            )
            _adopt_fleet_layer(self, fleet_layer, {"weight": weight, "bias": bias})
        else:
            self.weight = weight
            self.bias = bias
        _mark_split(self.weight, 0, mp_size)
        _mark_split(self.bias, None, mp_size)

    def forward(self, x):
        if self.mode == SINGLE:
            return _linear(x, self.weight, self.bias)
        if self.mode == FLEET:
            return self._fleet_layer(x)
        if not self.input_is_parallel:
            x = _ScatterToModelParallel.apply(x, self.mp_group)
        out = _ReduceFromModelParallel.apply(_linear(x, self.weight), self.mp_group)
        if self.bias is not None:
            out = out + self.bias
        return out


class VocabParallelEmbedding(nn.Layer):
    """Embedding with weight [num_embeddings, dim]; rank r holds rows [r*V/mp, (r+1)*V/mp)."""

    def __init__(self, num_embeddings, dim, mp_group=None):
        super().__init__()
        self.mp_group = mp_group
        self.mode = tensor_parallel_mode(mp_group)
        mp_size = mp_size_of(mp_group)
        _check_divisible("VocabParallelEmbedding num_embeddings", num_embeddings, mp_size)
        self.num_embeddings = num_embeddings
        self.dim = dim
        self.rows_per_rank = num_embeddings // mp_size
        self.vocab_start = mp_rank_of(mp_group) * self.rows_per_rank

        weight = _create_shard_parameter(self, [num_embeddings, dim], 0, mp_group)
        if self.mode == FLEET:
            from paddle.distributed.fleet import meta_parallel

            _ensure_fleet_rng_state(mp_group)
            fleet_layer = meta_parallel.VocabParallelEmbedding(num_embeddings, dim, mp_group=mp_group)
            _adopt_fleet_layer(self, fleet_layer, {"weight": weight})
        else:
            self.weight = weight
        _mark_split(self.weight, 0, mp_size)

    def forward(self, ids):
        if self.mode == SINGLE:
            return F.embedding(ids, self.weight)
        if self.mode == FLEET:
            return self._fleet_layer(ids)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.rows_per_rank)
        # Ids of other ranks look up local row 0 and are zeroed below, which also keeps their gradient
        # off that row.
        local_ids = paddle.where(outside, paddle.zeros_like(ids), ids - self.vocab_start)
        looked_up = F.embedding(local_ids, self.weight)
        looked_up = looked_up * paddle.logical_not(outside).unsqueeze(-1).astype(looked_up.dtype)
        return _ReduceFromModelParallel.apply(looked_up, self.mp_group)


# ---------------------------------------------------------------------------------------------------------
# Loss


class _VocabParallelCrossEntropy(PyLayer):
    """Cross entropy over logits whose last axis is this rank's equal shard of the vocabulary.

    Computed in float32 with the global max subtracted, so large logits do not overflow exp.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, mp_group):
        local_vocab = logits.shape[-1]
        vocab_start = mp_rank_of(mp_group) * local_vocab
        logits32 = logits.astype("float32")

        global_max = _all_reduce(logits32.max(axis=-1, keepdim=True), mp_group, op=dist.ReduceOp.MAX)
        shifted = logits32 - global_max
        exp = paddle.exp(shifted)
        sum_exp = _all_reduce(exp.sum(axis=-1, keepdim=True), mp_group)

        # The target logit lives on exactly one rank; the others contribute 0 to the sum.
        label_elsewhere = (labels < vocab_start) | (labels >= vocab_start + local_vocab)
        local_labels = paddle.where(label_elsewhere, paddle.zeros_like(labels), labels - vocab_start)
        target = paddle.take_along_axis(shifted, local_labels.unsqueeze(-1), axis=-1).squeeze(-1)
        target = paddle.where(label_elsewhere, paddle.zeros_like(target), target)
        target = _all_reduce(target, mp_group)

        ignored = labels == ignore_index
        loss = paddle.log(sum_exp.squeeze(-1)) - target
        loss = paddle.where(ignored, paddle.zeros_like(loss), loss)

        ctx.input_dtype = logits.dtype
        ctx.save_for_backward(exp / sum_exp, local_labels, label_elsewhere, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, label_elsewhere, ignored = ctx.saved_tensor()
        # d loss / d logits = softmax - one_hot(label), restricted to this rank's vocabulary shard.
        target_here = paddle.logical_not(label_elsewhere).astype(softmax.dtype)
        one_hot = F.one_hot(local_labels, softmax.shape[-1]) * target_here.unsqueeze(-1)
        token_weight = grad_loss.astype(softmax.dtype) * paddle.logical_not(ignored).astype(softmax.dtype)
        grad_logits = (softmax - one_hot) * token_weight.unsqueeze(-1)
        return grad_logits.astype(ctx.input_dtype), None


def parallel_cross_entropy(logits, labels, ignore_index=-100, mp_group=None):
    """Per-token cross entropy, shaped like `labels`; 0 where labels == ignore_index.

    `logits` [..., V/mp] is this rank's vocabulary shard (a ColumnParallelLinear output with
    gather_output=False); labels [...] hold global vocabulary ids (a trailing axis of 1 is accepted).
    """
    if len(labels.shape) == len(logits.shape):
        labels = labels.squeeze(-1)
    mode = tensor_parallel_mode(mp_group)
    if mode == SINGLE:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if mode == FLEET:
        from paddle.distributed.fleet import meta_parallel

        loss_fn = meta_parallel.ParallelCrossEntropy(mp_group=mp_group, ignore_index=ignore_index)
        return loss_fn(logits, labels).squeeze(-1)
    return _VocabParallelCrossEntropy.apply(logits, labels, ignore_index, mp_group)


def mean_over_tokens(per_token_loss, labels, ignore_index=-100):
    """The mean over tokens whose label is not ignore_index (0 when every token is ignored).

    Not always F.cross_entropy(..., reduction="mean"): Paddle 3.3 divides by the non-ignored count only when
    ignore_index >= 0, and by all tokens for a negative ignore_index such as the default -100.
    """
    if len(labels.shape) > len(per_token_loss.shape):
        labels = labels.squeeze(-1)
    counted = (labels != ignore_index).astype(per_token_loss.dtype).sum()
    return per_token_loss.sum() / paddle.clip(counted, min=1.0)


# ---------------------------------------------------------------------------------------------------------
# State dicts in the full (mp=1) layout


def _split_axes(model):
    return {name: getattr(param, "mp_split_axis", None) for name, param in model.named_parameters()}


def shard_state_dict(full_state_dict, model, mp_rank, mp_size):
    """This rank's part of a full-layout state dict (numpy arrays or paddle Tensors), for model.set_state_dict.

    Entries of parameters with an mp_split_axis are sliced; everything else is passed through.
    """
    if mp_size == 1:
        return dict(full_state_dict)
    split_axes = _split_axes(model)
    sharded = {}
    for name, value in full_state_dict.items():
        axis = split_axes.get(name)
        if axis is None:
            sharded[name] = value
            continue
        length = value.shape[axis]
        if length % mp_size:
            raise CheckpointError(
                f"Cannot split checkpoint entry {name!r} of shape {list(value.shape)} along axis {axis} into "
                f"{mp_size} model-parallel shards: {length} is not divisible by {mp_size}."
            )
        sharded[name] = _take_shard(value, axis, mp_rank, mp_size)
    return sharded


def gather_state_dict(model, mp_group):
    """The model's state dict in the full (mp=1) layout, as paddle Tensors, on every rank of mp_group.

    Every rank of the group must call it (it runs collectives).
    """
    split_axes = _split_axes(model)
    full = {}
    with paddle.no_grad():
        for name, value in model.state_dict().items():
            axis = split_axes.get(name)
            full[name] = value if axis is None else all_gather_along_axis(value, axis, mp_group)
    return full
