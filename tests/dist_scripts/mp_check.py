"""Run a tiny tensor-parallel model at mp=2 and write its outputs and gradients in the full (mp=1) layout.

Launched by tests/test_tensor_parallel.py as
    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_scripts/mp_check.py OUT_PREFIX
Rank 0 writes OUT_PREFIX.npz; the test recomputes the same model with plain paddle layers in one process.
The model and its inputs are defined here (make_problem) so that both sides build exactly the same one.

Model: vocab-parallel embedding -> column-parallel linear -> gelu -> row-parallel linear (+ residual)
-> column-parallel lm head (local vocabulary shard) -> parallel cross entropy. An auxiliary branch
(column-parallel with gather_output=True -> row-parallel with input_is_parallel=False) adds
mean(aux ** 2) to the loss, so the remaining collectives are checked in forward and backward too.
"""
import sys

import numpy as np

VOCAB, HIDDEN, FFN, AUX = 16, 8, 12, 6
BATCH, SEQ = 2, 5
IGNORE_INDEX = -100


def make_problem():
    """Full-layout weights (Paddle layouts: Linear [in, out], Embedding [vocab, dim]), ids and labels."""
    rng = np.random.default_rng(20240601)

    def normal(*shape):
        return (0.5 * rng.standard_normal(shape)).astype("float32")

    weights = {
        "embed.weight": normal(VOCAB, HIDDEN),
        "up.weight": normal(HIDDEN, FFN),
        "up.bias": normal(FFN),
        "down.weight": normal(FFN, HIDDEN),
        "down.bias": normal(HIDDEN),
        "head.weight": normal(HIDDEN, VOCAB),
        "aux_up.weight": normal(HIDDEN, AUX),
        "aux_up.bias": normal(AUX),
        "aux_down.weight": normal(AUX, HIDDEN),
    }
    ids = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype("int64")
    labels = rng.integers(0, VOCAB, size=(BATCH, SEQ)).astype("int64")
    labels[0, 1] = IGNORE_INDEX
    labels[1, 3] = IGNORE_INDEX
    return weights, ids, labels


def build_model(mp_group):
    import paddle.nn.functional as F
    from paddle import nn

    from ppzoo.distributed.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class TinyTensorParallelModel(nn.Layer):
        def __init__(self):
            super().__init__()
            self.embed = VocabParallelEmbedding(VOCAB, HIDDEN, mp_group=mp_group)
            self.up = ColumnParallelLinear(HIDDEN, FFN, has_bias=True, mp_group=mp_group)
            self.down = RowParallelLinear(FFN, HIDDEN, has_bias=True, input_is_parallel=True, mp_group=mp_group)
            self.head = ColumnParallelLinear(HIDDEN, VOCAB, gather_output=False, mp_group=mp_group)
            self.aux_up = ColumnParallelLinear(HIDDEN, AUX, has_bias=True, gather_output=True, mp_group=mp_group)
            self.aux_down = RowParallelLinear(AUX, HIDDEN, input_is_parallel=False, mp_group=mp_group)

        def forward(self, ids):
            h = self.embed(ids)
            h2 = self.down(F.gelu(self.up(h))) + h
            aux = self.aux_down(self.aux_up(h))
            return self.head(h2), aux

    return TinyTensorParallelModel()


def main(out_prefix):
    import paddle

    from ppzoo.config.schema import DistributedConfig
    from ppzoo.distributed.env import init_parallel_env
    from ppzoo.distributed.tensor_parallel import (
        all_gather_along_axis,
        gather_state_dict,
        mean_over_tokens,
        parallel_cross_entropy,
        shard_state_dict,
        tensor_parallel_mode,
    )

    paddle.set_device("cpu")
    env = init_parallel_env(DistributedConfig(mp_degree=2), "cpu")
    group = env.mp_group
    print(f"rank {env.rank}: mp_rank {env.mp_rank}/{env.mp_size}, group backend {group.backend}, "
          f"mode {tensor_parallel_mode(group)}", flush=True)

    weights, ids, labels = make_problem()
    model = build_model(group)
    model.set_state_dict(shard_state_dict(weights, model, env.mp_rank, env.mp_size))

    ids_t, labels_t = paddle.to_tensor(ids), paddle.to_tensor(labels)
    local_logits, aux = model(ids_t)
    per_token = parallel_cross_entropy(local_logits, labels_t, ignore_index=IGNORE_INDEX, mp_group=group)
    loss = mean_over_tokens(per_token, labels_t, ignore_index=IGNORE_INDEX)
    total = loss + (aux * aux).mean()
    total.backward()

    results = {
        "logits": all_gather_along_axis(local_logits.detach(), -1, group).numpy(),
        "per_token_loss": per_token.numpy(),
        "loss": loss.numpy(),
        "aux": aux.numpy(),
        "total": total.numpy(),
    }
    for name, param in model.named_parameters():
        axis = param.mp_split_axis
        grad = param.grad if axis is None else all_gather_along_axis(param.grad, axis, group)
        results["grad/" + name] = grad.numpy()
    for name, value in gather_state_dict(model, group).items():
        results["state/" + name] = value.numpy()

    if env.rank == 0:
        np.savez(out_prefix + ".npz", **results)
    print(f"rank {env.rank}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
