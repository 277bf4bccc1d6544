"""Rotary position embeddings (RoPE), in the rotate-half layout LLaMA checkpoints use.

Long-context knobs: `theta` (raise it to stretch wavelengths, as ChuXin's 1M recipe does) and
`position_scale` (position interpolation: positions are multiplied by it, e.g. 0.25 squeezes 4x longer
sequences into the trained range).

`fused_rotary_position_embedding` is not registered on CPU, so rotation is a PyLayer with its backward
written out (the rotation is orthogonal: the gradient is the inverse rotation of the incoming gradient),
which halves the kernels autograd would run. `apply_rope_reference` is the autograd version for tests
(with cos/sin already at x's shape).
"""
import numpy as np
import paddle
from paddle.autograd import PyLayer


def rope_cos_sin(positions, head_dim, theta=10000.0, position_scale=1.0):
    """cos, sin of shape [*positions.shape, head_dim] for integer `positions` (any shape)."""
    inv_freq = 1.0 / (theta ** (paddle.arange(0, head_dim, 2, dtype="float32") / head_dim))
    angles = positions.astype("float32").unsqueeze(-1) * position_scale * inv_freq
    angles = paddle.concat([angles, angles], axis=-1)
    return paddle.cos(angles), paddle.sin(angles)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the last axis (the reference formulation)."""
    x1, x2 = paddle.split(x, 2, axis=-1)
    return paddle.concat([-x2, x1], axis=-1)


def apply_rope_reference(x, cos, sin):
    return x * cos + rotate_half(x) * sin


_ROTATIONS = {}


def rotation_matrix(head_dim, dtype):
    """R with x @ R == rotate_half(x). On CPU a [*, d] x [d, d] matmul is several times faster than the
    split + concat of rotate_half (Paddle's split copies strided halves)."""
    key = (head_dim, str(dtype))
    if key not in _ROTATIONS:
        half = head_dim // 2
        r = np.zeros((head_dim, head_dim), dtype=np.float32)
        r[np.arange(half) + half, np.arange(half)] = -1.0  # first half of the output is -x2
        r[np.arange(half), np.arange(half) + half] = 1.0  # second half is x1
        _ROTATIONS[key] = paddle.to_tensor(r).astype(dtype)
    return _ROTATIONS[key]


class _RopeFunction(PyLayer):
    @staticmethod
    def forward(ctx, x, cos, sin):
        rot = rotation_matrix(x.shape[-1], x.dtype)
        ctx.save_for_backward(cos, sin, rot)
        return x * cos + paddle.matmul(x, rot) * sin

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin, rot = ctx.saved_tensor()
        # The incoming gradient is usually a strided view (the transpose into attention's head-major layout);
        # elementwise kernels on strided views are several times slower on CPU than one copy.
        grad_out = grad_out.contiguous()
        # The rotation is orthogonal: the gradient through x @ R is g @ R^T.
        return grad_out * cos + paddle.matmul(grad_out * sin, rot, transpose_y=True)


def expand_for_heads(table, num_heads, dtype):
    """[batch, seq, head_dim] -> [batch, seq, heads, head_dim], materialised once per forward and shared by
    every layer: Paddle's CPU kernels broadcast a middle axis about 4x slower than same-shape operands."""
    b, s, d = table.shape
    return table.astype(dtype).unsqueeze(2).expand([b, s, num_heads, d])


def apply_rope(x, cos, sin):
    """x: [batch, seq, heads, head_dim]; cos/sin: the same shape (see expand_for_heads), no gradient."""
    return _RopeFunction.apply(x, cos, sin)
