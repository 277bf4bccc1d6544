"""Rotary position embeddings (RoPE), in the rotate-half layout LLaMA checkpoints use.

Long-context knobs: `theta` (raise it to stretch wavelengths, as ChuXin's 1M recipe does) and
`position_scale` (position interpolation: positions are multiplied by it, e.g. 0.25 squeezes 4x longer
sequences into the trained range).

`fused_rotary_position_embedding` is not registered on CPU, so rotation is a PyLayer with its backward
written out (the rotation is orthogonal: the gradient is the inverse rotation of the incoming gradient),
which halves the kernels autograd would run. `apply_rope_reference` is the autograd version for tests
(with cos/sin already at x's shape). A decode step (one position per row) rotates with one matrix per
row instead (see rotary_tables).
"""
import numpy as np
import paddle
from paddle.autograd import PyLayer


def rope_cos_sin(positions, head_dim, theta=10000.0, position_scale=1.0):
    """cos, sin of shape [*positions.shape, head_dim] for integer `positions` (any shape)."""
    angles = positions.astype("float32").unsqueeze(-1)
    if position_scale != 1.0:
        angles = angles * position_scale
    angles = angles * frequencies(head_dim, theta)
    return paddle.cos(angles), paddle.sin(angles)


def _frequencies(head_dim, theta):
    inv_freq = 1.0 / (theta ** (paddle.arange(0, head_dim, 2, dtype="float32") / head_dim))
    return paddle.concat([inv_freq, inv_freq])


_FREQUENCIES = {}


@paddle.jit.not_to_static  # plain Python while tracing (dy2static cannot rewrite the memo's global)
def frequencies(head_dim, theta):
    """The [head_dim] float32 angular frequencies theta^(-2i / head_dim), each twice (rotate-half pairs
    dimension i with i + head_dim / 2). Memoised in eager mode: the five ops building it (Paddle's arange
    alone is ~20 us) ran in every forward, about 40 us of a 4 ms decode step. A traced program builds it
    in the graph (a memoised eager tensor must not leak into a program, nor a traced value into eager use)."""
    if not paddle.in_dynamic_mode():
        return _frequencies(head_dim, theta)
    key = (head_dim, float(theta))
    if key not in _FREQUENCIES:
        _FREQUENCIES[key] = _frequencies(head_dim, theta)
    return _FREQUENCIES[key]


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
    def forward(ctx, x, cos, sin, rot):
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
    return as_dtype(table, dtype).unsqueeze(2).expand([-1, -1, num_heads, -1])


def as_dtype(x, dtype):
    """x in `dtype` (a paddle dtype or its name), without an op when it already is (astype always runs one)."""
    if isinstance(dtype, str):
        dtype = getattr(paddle, dtype)
    return x if x.dtype == dtype else x.astype(dtype)


def apply_rope(x, cos, sin, rot=None):
    """x: [batch, seq, heads, head_dim]; cos/sin: the same shape (see expand_for_heads), no gradient; `rot`:
    rotation_matrix(head_dim, x.dtype), looked up when not given."""
    if rot is None:
        rot = rotation_matrix(x.shape[-1], x.dtype)
    if not paddle.is_grad_enabled():  # forward only (generation): no PyLayer bookkeeping (~6 us a call)
        return x * cos + paddle.matmul(x, rot) * sin
    return _RopeFunction.apply(x, cos, sin, rot)


def rotation_per_row(cos, sin, dtype):
    """cos/sin [batch, 1, head_dim] (one position per row) -> [batch, 1, head_dim, head_dim] matrices M
    with x @ M == x * cos + rotate_half(x) * sin for x [batch, 1, heads, head_dim]:
    M[i, j] = (i == j) cos[j] + R[i, j] sin[j].

    R (rotation_matrix) has one entry per column j, -1 or +1 in row (j + d/2) mod d, so R diag(sin) is
    diag(sign * sin) with its rows rolled by d/2. Built that way from diagonal matrices rather than as
    I * cos + R * sin: Paddle's CPU kernels broadcast [d, d] against [b, 1, 1, d] slowly (measured, d = 64,
    one thread: 55 -> 18 us at batch 1, 354 -> 51 us at batch 8)."""
    d = cos.shape[-1]
    diagonal = paddle.diag_embed(cos)
    off_diagonal = paddle.roll(paddle.diag_embed(sin * _half_signs(d)), d // 2, axis=-2)
    return as_dtype(diagonal + off_diagonal, dtype)


def _half_signs(size):
    """[-1] * (size / 2) + [+1] * (size / 2): the signs of rotate_half ([x1, x2] -> [-x2, x1]), memoised."""
    key = ("signs", size)
    if key not in _ROTATIONS:
        _ROTATIONS[key] = paddle.to_tensor(np.repeat(np.array([-1.0, 1.0], dtype=np.float32), size // 2))
    return _ROTATIONS[key]


class RotaryTables:
    """What RoPE needs to rotate one forward's queries or keys ([b, s, heads, head_dim]): either cos and sin
    at that full shape (for the PyLayer above) or, for one position per row, the rotation as one matrix
    per row ([b, 1, head_dim, head_dim], see rotation_per_row). Built by rotary_tables."""

    def __init__(self, cos=None, sin=None, rot=None, matrix=None):
        self.cos, self.sin, self.rot, self.matrix = cos, sin, rot, matrix

    def rotate(self, x):
        if self.matrix is None:
            return apply_rope(x, self.cos, self.sin, self.rot)
        return paddle.matmul(x, self.matrix)  # [b, 1, heads, d] @ [b, 1, d, d]


def rotary_tables(cos, sin, q_heads, k_heads, dtype, q_scale=1.0):
    """(query tables, key tables) for one forward, shared by every layer, from cos/sin [b, s, head_dim].
    `q_scale` is folded into the query tables (attention's 1/sqrt(head_dim): saves a multiply of q in
    every layer, forward and backward).

    Several positions per row: cos and sin materialised at the head shape (see expand_for_heads). One
    position per row (a decode step; the length must be a static 1, so a traced program with a dynamic
    length takes the general path): the rotation as one matrix per row, so rotating q or k is one batched
    matmul instead of the PyLayer's four ops (measured on tiny ChuXin's batch-1 decode step: RoPE went
    from 8 ops and 2 PyLayer calls per layer to 2 matmuls)."""
    s = cos.shape[1]
    if isinstance(s, int) and s == 1:
        matrix = rotation_per_row(cos, sin, dtype)
        return RotaryTables(matrix=matrix * q_scale if q_scale != 1.0 else matrix), RotaryTables(matrix=matrix)
    # Looked up once per forward: a traced program holds each lookup as a constant it rebuilds every run.
    rot = rotation_matrix(cos.shape[-1], dtype)
    k_tables = RotaryTables(expand_for_heads(cos, k_heads, dtype), expand_for_heads(sin, k_heads, dtype), rot)
    if q_scale != 1.0:
        cos, sin = cos * q_scale, sin * q_scale
    elif q_heads == k_heads:
        return k_tables, k_tables
    return RotaryTables(expand_for_heads(cos, q_heads, dtype), expand_for_heads(sin, q_heads, dtype), rot), k_tables
