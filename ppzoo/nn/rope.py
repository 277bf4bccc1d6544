"""Rotary position embeddings (RoPE), in the rotate-half layout LLaMA checkpoints use.

Long-context knobs: `theta` (raise it to stretch wavelengths, as ChuXin's 1M recipe does) and
`position_scale` (position interpolation: positions are multiplied by it, e.g. 0.25 squeezes 4x longer
sequences into the trained range).

`fused_rotary_position_embedding` is not registered on CPU, so rotation is a PyLayer with its backward
written out (the rotation is orthogonal: the gradient is the inverse rotation of the incoming gradient),
which halves the kernels autograd would run. `apply_rope_reference` is the autograd version for tests.
"""
import paddle
from paddle.autograd import PyLayer


def rope_cos_sin(positions, head_dim, theta=10000.0, position_scale=1.0):
    """cos, sin of shape [*positions.shape, head_dim] for integer `positions` (any shape)."""
    inv_freq = 1.0 / (theta ** (paddle.arange(0, head_dim, 2, dtype="float32") / head_dim))
    angles = positions.astype("float32").unsqueeze(-1) * position_scale * inv_freq
    angles = paddle.concat([angles, angles], axis=-1)
    return paddle.cos(angles), paddle.sin(angles)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the last axis."""
    x1, x2 = paddle.split(x, 2, axis=-1)
    return paddle.concat([-x2, x1], axis=-1)


def _unrotate_half(x):
    """The inverse of rotate_half: [y1, y2] -> [y2, -y1]."""
    y1, y2 = paddle.split(x, 2, axis=-1)
    return paddle.concat([y2, -y1], axis=-1)


def apply_rope_reference(x, cos, sin):
    cos = cos.unsqueeze(2).astype(x.dtype)
    sin = sin.unsqueeze(2).astype(x.dtype)
    return x * cos + rotate_half(x) * sin


class _RopeFunction(PyLayer):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensor()
        return grad_out * cos + _unrotate_half(grad_out * sin)


def expand_for_heads(table, num_heads, dtype):
    """[batch, seq, head_dim] -> [batch, seq, heads, head_dim], materialised once per forward and shared by
    every layer: Paddle's CPU kernels broadcast a middle axis about 4x slower than same-shape operands."""
    b, s, d = table.shape
    return table.astype(dtype).unsqueeze(2).expand([b, s, num_heads, d])


def apply_rope(x, cos, sin):
    """x: [batch, seq, heads, head_dim]; cos/sin: the same shape (see expand_for_heads), no gradient."""
    return _RopeFunction.apply(x, cos, sin)
