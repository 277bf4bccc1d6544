"""Building blocks of the Evoformer, template and extra MSA stacks.

Shapes: an MSA-like tensor is [B, R, Q, C] (R rows attended independently, Q positions along a row); the
pair representation is [B, N, N, C]. Attention masks are 1 for real positions and 0 for padding.

Two of HelixFold's optimizations live here, each beside its plain path:
- the gated attention runs as paddle.incubate's fused_gate_attention (one kernel for its ~14 small ops)
  where this Paddle build registers that kernel for the device (GPU); the parameters are laid out the way
  the kernel reads them, so both paths use the same weights;
- `chunk_size` splits attention and the MLPs along the row axis ("subbatching"): every row is computed
  independently, so the result is the same and only the peak memory is lower.
"""
import math

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.nn.kernels import has_kernel

MASK_BIAS = 1e9  # added as -MASK_BIAS to the logits of padded keys


def _initializer(init, fan_in):
    """AF2's initializations: 'linear' (LeCun normal), 'relu' (He normal), 'final' (zeros, so a residual
    branch starts as the identity), 'gating' (zeros; its bias starts at 1, so gates start open)."""
    if init in ("final", "gating"):
        return nn.initializer.Constant(0.0)
    scale = 2.0 if init == "relu" else 1.0
    # A normal truncated at 2 standard deviations has 0.8796 of the untruncated standard deviation.
    std = math.sqrt(scale / fan_in) / 0.87962566103423978
    return nn.initializer.TruncatedNormal(mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class Linear(nn.Layer):
    """x [..., in] -> [..., out] with AF2's initializations (see _initializer)."""

    def __init__(self, in_dim, out_dim, init="linear", bias=True):
        super().__init__()
        self.weight = self.create_parameter([in_dim, out_dim], default_initializer=_initializer(init, in_dim))
        self.bias = None
        if bias:
            start = 1.0 if init == "gating" else 0.0
            self.bias = self.create_parameter([out_dim], is_bias=True,
                                              default_initializer=nn.initializer.Constant(start))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def shared_dropout(x, rate, shared_axis, training):
    """Dropout whose mask is shared along `shared_axis` (AF2's row-wise / column-wise dropout: a whole row of
    an update is kept or dropped together)."""
    if not training or rate == 0.0:
        return x
    shape = list(x.shape)
    shape[shared_axis] = 1
    keep = paddle.bernoulli(paddle.full(shape, 1.0 - rate, dtype=x.dtype))
    return x * keep / (1.0 - rate)


def chunked(fn, tensors, chunk_size, axis=1):
    """fn(*tensors) computed over slices of `axis` at most chunk_size long and concatenated.

    Every tensor in `tensors` is sliced along `axis` (None entries are passed through whole); fn must treat
    the slices independently, so the result equals fn(*tensors)."""
    length = next(t.shape[axis] for t in tensors if t is not None)
    if chunk_size is None or length <= chunk_size:
        return fn(*tensors)
    pieces = []
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        args = [None if t is None else paddle.slice(t, [axis], [start], [end]) for t in tensors]
        pieces.append(fn(*args))
    return paddle.concat(pieces, axis=axis)


def fused_gate_attention_available():
    """Whether Paddle registers the fused gated attention kernel for the current device (GPU builds do)."""
    return has_kernel("fused_gate_attention")


class GatedAttention(nn.Layer):
    """Multi-head attention with a sigmoid gate on each head's output and optional additive bias per head
    (AF2 Algorithms 7, 8, 13, 14 and the template pointwise attention).

    forward(q_data [B, R, Q, Cq], m_data [B, R, K, Cm], mask [B, R, K], bias [B, H, Q, K] or None)
    -> [B, R, Q, out_dim]; the bias (e.g. projected from the pair) is shared by the R rows.

    Weights are stored as the fused kernel reads them: query/key/value/gating [C, H, D], output [H, D, O].
    """

    def __init__(self, q_dim, m_dim, num_heads, head_dim, out_dim, gating=True, fuse=True, chunk_size=None):
        super().__init__()
        self.num_heads, self.head_dim, self.gating = num_heads, head_dim, gating
        self.chunk_size = chunk_size
        self.fuse = fuse
        hd = [num_heads, head_dim]
        self.query_w = self.create_parameter([q_dim, *hd], default_initializer=_initializer("linear", q_dim))
        self.key_w = self.create_parameter([m_dim, *hd], default_initializer=_initializer("linear", m_dim))
        self.value_w = self.create_parameter([m_dim, *hd], default_initializer=_initializer("linear", m_dim))
        if gating:
            self.gating_w = self.create_parameter([q_dim, *hd], default_initializer=nn.initializer.Constant(0.0))
            self.gating_b = self.create_parameter(hd, is_bias=True, default_initializer=nn.initializer.Constant(1.0))
        self.output_w = self.create_parameter([*hd, out_dim], default_initializer=nn.initializer.Constant(0.0))
        self.output_b = self.create_parameter([out_dim], is_bias=True, default_initializer=nn.initializer.Constant(0.0))

    def uses_fused_kernel(self, q_data, m_data):
        # The kernel does self-attention only (one input for queries, keys and values) and needs a gate.
        return self.fuse and self.gating and q_data is m_data and fused_gate_attention_available()

    def forward(self, q_data, m_data, mask, bias=None):
        mask_bias = (mask.astype(q_data.dtype) - 1.0) * MASK_BIAS  # [B, R, K]
        if self.uses_fused_kernel(q_data, m_data):
            return chunked(lambda x, mb: self._fused(x, mb, bias), [q_data, mask_bias], self.chunk_size)
        if q_data is m_data:
            return chunked(lambda x, mb: self.attend(x, x, mb, bias), [q_data, mask_bias], self.chunk_size)
        return chunked(lambda q, m, mb: self.attend(q, m, mb, bias), [q_data, m_data, mask_bias], self.chunk_size)

    def attend(self, q_data, m_data, mask_bias, bias):
        """The plain path: q_data [B, R, Q, Cq], m_data [B, R, K, Cm], mask_bias [B, R, K]."""
        h, d = self.num_heads, self.head_dim
        q = paddle.matmul(q_data, self.query_w.reshape([0, h * d])) * (d ** -0.5)
        k = paddle.matmul(m_data, self.key_w.reshape([0, h * d]))
        v = paddle.matmul(m_data, self.value_w.reshape([0, h * d]))
        # [B, R, L, H*D] -> [B, R, H, L, D]
        q, k, v = (t.reshape([0, 0, 0, h, d]).transpose([0, 1, 3, 2, 4]) for t in (q, k, v))
        logits = paddle.matmul(q, k, transpose_y=True) + mask_bias.unsqueeze([2, 3])  # [B, R, H, Q, K]
        if bias is not None:
            logits = logits + bias.unsqueeze(1)
        weights = F.softmax(logits, axis=-1)
        out = paddle.matmul(weights, v).transpose([0, 1, 3, 2, 4])  # [B, R, Q, H, D]
        if self.gating:
            gate = paddle.matmul(q_data, self.gating_w.reshape([0, h * d])) + self.gating_b.reshape([-1])
            out = out * F.sigmoid(gate).reshape([0, 0, 0, h, d])
        out = out.reshape([0, 0, 0, h * d])
        return paddle.matmul(out, self.output_w.reshape([h * d, -1])) + self.output_b

    def _fused(self, q_data, mask_bias, bias):
        from paddle.incubate.nn.functional import fused_gate_attention

        return fused_gate_attention(
            query=q_data, key=q_data, query_weight=self.query_w, key_weight=self.key_w, value_weight=self.value_w,
            gate_linear_weight=self.gating_w, gate_linear_bias=self.gating_b, out_linear_weight=self.output_w,
            out_linear_bias=self.output_b, nonbatched_bias=None if bias is None else bias.unsqueeze(1),
            attn_mask=mask_bias.unsqueeze([2, 3]), has_gating=True, merge_qkv=False,
        )


class GlobalAttention(nn.Layer):
    """AF2 Algorithm 19 (extra MSA column global attention): per column one query, the masked mean over the
    sequences, attends over the sequences with single-head keys and values; each sequence gets its own gate.

    forward(x [B, R, K, C], mask [B, R, K]) -> [B, R, K, C], R the columns and K the sequences."""

    def __init__(self, dim, num_heads, head_dim, chunk_size=None):
        super().__init__()
        self.num_heads, self.head_dim, self.chunk_size = num_heads, head_dim, chunk_size
        self.query = Linear(dim, num_heads * head_dim, bias=False)
        self.key = Linear(dim, head_dim, bias=False)
        self.value = Linear(dim, head_dim, bias=False)
        self.gate = Linear(dim, num_heads * head_dim, init="gating")
        self.output = Linear(num_heads * head_dim, dim, init="final")

    def forward(self, x, mask):
        return chunked(self._attend, [x, mask], self.chunk_size)

    def _attend(self, x, mask):
        h, d = self.num_heads, self.head_dim
        mask = mask.astype(x.dtype)
        mean = (x * mask.unsqueeze(-1)).sum(axis=2) / (mask.sum(axis=2, keepdim=True) + 1e-10)  # [B, R, C]
        q = self.query(mean).reshape([0, 0, h, d]) * (d ** -0.5)  # [B, R, H, D]
        k, v = self.key(x), self.value(x)  # [B, R, K, D]
        logits = paddle.matmul(q, k, transpose_y=True) + ((mask - 1.0) * MASK_BIAS).unsqueeze(2)  # [B, R, H, K]
        weights = F.softmax(logits, axis=-1)
        avg = paddle.matmul(weights, v)  # [B, R, H, D]
        gate = F.sigmoid(self.gate(x)).reshape([0, 0, 0, h, d])  # [B, R, K, H, D]
        out = (gate * avg.unsqueeze(2)).reshape([0, 0, 0, h * d])
        return self.output(out)


class Transition(nn.Layer):
    """LayerNorm, widen by `factor` with ReLU, project back (AF2 Algorithms 9 and 15); over chunk_size rows
    at a time when set."""

    def __init__(self, dim, factor, chunk_size=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.hidden = Linear(dim, dim * factor, init="relu")
        self.output = Linear(dim * factor, dim, init="final")
        self.chunk_size = chunk_size

    def forward(self, x):
        return chunked(lambda t: self.output(F.relu(self.hidden(self.norm(t)))), [x], self.chunk_size)


def one_hot(indices, depth, dtype="float32"):
    return F.one_hot(indices.astype("int64"), depth).astype(dtype)


def distance_bins(positions, min_bin, max_bin, num_bins):
    """One-hot of the pairwise distances of positions [B, N, 3] in num_bins bins whose lower edges are
    equally spaced from min_bin to max_bin (the last bin is open above; distances below min_bin fall in no
    bin), as AF2's recycling and template distograms -> [B, N, N, bins]."""
    lower = paddle.to_tensor(np.linspace(min_bin, max_bin, num_bins).astype("float32")) ** 2
    upper = paddle.concat([lower[1:], paddle.to_tensor([1e8], dtype="float32")])
    diff = positions.unsqueeze(2) - positions.unsqueeze(1)
    dist2 = (diff * diff).sum(axis=-1, keepdim=True)
    return ((dist2 > lower) & (dist2 < upper)).astype(positions.dtype)
