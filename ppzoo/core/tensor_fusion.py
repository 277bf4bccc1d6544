"""Tensor fusion: the trainable parameters packed into a few contiguous buffers for the optimizer.

A model like AlphaFold2 has thousands of small parameter tensors (HelixFold counts about 4,600), and an
optimizer step launches its update kernels once per tensor. Here every parameter becomes a view into one
flat buffer per group (dtype, and whether weight decay applies), so the optimizer updates each group with
one kernel per state. AdamW's update is elementwise, so the fused update equals the unfused one.

The model keeps its parameters (forward, backward, gradient clipping, checkpoints see the same tensors):
they share memory with the buffers. Before each step the per-parameter gradients are concatenated into the
buffers' gradients. One difference from the unfused optimizer: a parameter that received no gradient in a
step is updated with a zero gradient (its moments decay), where the unfused optimizer would skip it.

Selected by `Optimizer.tensor_fusion: true`.
"""
import paddle

from ppzoo.errors import ConfigError


class FusedParameters:
    """Trainable parameters grouped by `group_of(param)` (a short string), each group packed into one flat
    buffer parameter named `tensor_fusion.<group>`; the original parameters become views into it."""

    def __init__(self, parameters, group_of):
        self.groups = {}  # group name -> list of parameters, in model order
        for param in parameters:
            if param.stop_gradient:
                continue
            self.groups.setdefault(f"{group_of(param)}.{param.dtype}".replace("paddle.", ""), []).append(param)
        self.buffers = {}
        self.offsets = {}  # group name -> [(param, start, end)]
        for name, params in self.groups.items():
            total = sum(int(p.size) for p in params)
            # A constant initializer draws no random numbers: the run's random stream stays the unfused one's.
            # Parameter names are unique per process; state_dict() uses the stable `tensor_fusion.<group>`.
            buffer = paddle.create_parameter([total], params[0].dtype,
                                             name=paddle.utils.unique_name.generate(f"tensor_fusion.{name}"),
                                             default_initializer=paddle.nn.initializer.Constant(0.0))
            buffer.fused_group = name  # lets the optimizer builder tell the groups apart (e.g. weight decay)
            spans, start = [], 0
            for p in params:
                spans.append((p, start, start + int(p.size)))
                start += int(p.size)
            self.buffers[name], self.offsets[name] = buffer, spans
            self._share(name)

    @paddle.no_grad()
    def _share(self, name):
        """Copy the parameters' values into the buffer and make each parameter a view of its span."""
        buffer = self.buffers[name]
        for param, start, end in self.offsets[name]:
            buffer[start:end] = param.reshape([-1])
        for param, start, end in self.offsets[name]:
            buffer._slice(start, end)._share_buffer_to(param)

    def _views_intact(self, name):
        base, itemsize = self.buffers[name].data_ptr(), self.buffers[name].element_size()
        return all(p.data_ptr() == base + start * itemsize for p, start, _ in self.offsets[name])

    def ensure_shared(self):
        """Re-pack a group whose parameters no longer view the buffer (e.g. a loader gave a parameter new
        memory instead of copying into it): their current values win."""
        for name in self.buffers:
            if not self._views_intact(name):
                self._share(name)

    @paddle.no_grad()
    def gather_grads(self):
        """Each buffer's gradient = its parameters' gradients, flattened and concatenated (zeros where a
        parameter has none)."""
        for name, buffer in self.buffers.items():
            pieces = [p.grad.reshape([-1]) if p.grad is not None else paddle.zeros([end - start], dtype=p.dtype)
                      for p, start, end in self.offsets[name]]
            buffer.grad = paddle.concat(pieces)

    def parameters(self):
        return list(self.buffers.values())


class TensorFusionOptimizer:
    """An optimizer over FusedParameters' buffers that behaves, for the Engine, like one over the model's
    parameters: step() gathers the gradients first, clear_grad() clears both. Everything else (get_lr,
    state_dict, set_state_dict, ...) is the inner optimizer's."""

    def __init__(self, inner, fused):
        self.inner, self.fused = inner, fused

    def step(self):
        self.fused.ensure_shared()
        self.fused.gather_grads()
        self.inner.step()

    def clear_grad(self, set_to_zero=True):
        self.inner.clear_grad(set_to_zero=set_to_zero)
        for params in self.fused.groups.values():
            for param in params:
                param.clear_gradient(set_to_zero)

    def stable_names(self):
        """{buffer's process-unique name: tensor_fusion.<group>}"""
        return {buffer.name: f"tensor_fusion.{group}" for group, buffer in self.fused.buffers.items()}

    def state_dict(self):
        return _rename_state(self.inner.state_dict(), self.stable_names())

    def set_state_dict(self, state_dict):
        return self.inner.set_state_dict(_rename_state(state_dict, {v: k for k, v in self.stable_names().items()}))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _rename_state(state, names):
    """Optimizer state with the parameter-name prefix of each key (`<name>_moment1_0`) replaced by names[name]."""
    by_length = sorted(names, key=len, reverse=True)
    renamed = {}
    for key, value in state.items():
        if key == "master_weights" and isinstance(value, dict):
            value = {names.get(k, k): v for k, v in value.items()}
        else:
            old = next((name for name in by_length if key.startswith(name + "_")), None)
            if old is not None:
                key = names[old] + key[len(old):]
        renamed[key] = value
    return renamed


def fuse_optimizer(build, parameters, group_of, paddle_clip=False):
    """build(buffers) -> a Paddle optimizer over the fused buffers (each buffer's `fused_group` starts with
    its group_of value), wrapped so the Engine drives it like an optimizer over `parameters`."""
    if paddle_clip:
        raise ConfigError(
            "Optimizer.tensor_fusion is set, but this run uses fleet's GPU hybrid optimizer (mp, pp or sharding "
            "degree above 1), which does its own parameter fusion and clipping. Set Optimizer.tensor_fusion "
            "to false for hybrid-parallel runs."
        )
    fused = FusedParameters(parameters, group_of)
    return TensorFusionOptimizer(build(fused.parameters()), fused)
