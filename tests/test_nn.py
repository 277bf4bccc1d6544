"""The CPU-fast building blocks against their plain-autograd references (forward and gradients)."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

import ppzoo  # noqa: F401
from ppzoo.nn import norm as norm_module
from ppzoo.nn.attention import attention, attention_heads_first, packed_causal_mask, repeat_kv
from ppzoo.nn.mlp import swiglu
from ppzoo.nn.norm import RMSNorm, rms_norm_reference
from ppzoo.nn.rope import apply_rope, apply_rope_reference, expand_for_heads, rope_cos_sin, rotary_tables


def grads_of(fn, *inputs, weight=None):
    for x in inputs:
        x.clear_gradient()
    out = fn(*inputs)
    w = weight if weight is not None else paddle.to_tensor(np.random.default_rng(0).normal(size=out.shape).astype("float32"))
    (out * w).sum().backward()
    return out.numpy(), [x.grad.numpy().copy() for x in inputs]


def leaf(shape, scale=1.0, seed=0):
    t = paddle.to_tensor((np.random.default_rng(seed).normal(size=shape) * scale).astype("float32"))
    t.stop_gradient = False
    return t


@pytest.mark.parametrize("fused", [True, False])
def test_rms_norm_matches_reference(monkeypatch, fused):
    if fused:
        assert norm_module.use_fused_rms_norm(paddle.zeros([1], "float32")), "the CPU build registers the fused forward"
    monkeypatch.setattr(norm_module, "use_fused_rms_norm", lambda x: fused)
    layer = RMSNorm(16, eps=1e-5)
    layer.weight.set_value(paddle.to_tensor(np.linspace(0.5, 1.5, 16).astype("float32")))
    x = leaf([3, 5, 16], scale=3.0)
    out, (gx, gw) = grads_of(lambda x, w: layer(x), x, layer.weight)
    ref, (rx, rw) = grads_of(lambda x, w: rms_norm_reference(x, w, 1e-5), x, layer.weight)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(gx, rx, atol=1e-5)
    np.testing.assert_allclose(gw, rw, atol=1e-4)


def test_rope_matches_rotate_half_reference():
    b, s, h, d = 2, 7, 3, 8
    cos, sin = rope_cos_sin(paddle.arange(s).unsqueeze(0).expand([b, s]), d, theta=500.0)
    c, sn = expand_for_heads(cos, h, paddle.float32), expand_for_heads(sin, h, paddle.float32)
    x = leaf([b, s, h, d])
    out, (g,) = grads_of(lambda x: apply_rope(x, c, sn), x)
    ref, (r,) = grads_of(lambda x: apply_rope_reference(x, c, sn), x)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    np.testing.assert_allclose(g, r, atol=1e-6)


def test_rope_is_a_relative_encoding():
    """<rope(q, m), rope(k, n)> depends only on m - n: the identity RoPE is built on."""
    d = 16
    q, k = np.random.default_rng(1).normal(size=(2, d)).astype("float32")

    def rotated(vec, pos):
        cos, sin = rope_cos_sin(paddle.to_tensor([[pos]]), d)
        v = paddle.to_tensor(vec.reshape(1, 1, 1, d))
        return apply_rope(v, expand_for_heads(cos, 1, paddle.float32), expand_for_heads(sin, 1, paddle.float32)).numpy().ravel()

    assert abs(rotated(q, 5) @ rotated(k, 2) - rotated(q, 13) @ rotated(k, 10)) < 1e-4


def test_swiglu_matches_paddle():
    gate, up = leaf([4, 6, 32], scale=4.0, seed=2), leaf([4, 6, 32], seed=3)
    out, grads = grads_of(swiglu, gate, up)
    ref, ref_grads = grads_of(F.swiglu, gate, up)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_attention_matches_sdpa_and_masks_documents():
    b, s, h, d = 2, 12, 2, 8
    q, k, v = (leaf([b, s, h, d], seed=i) for i in range(3))
    ours = attention(q, k, v).numpy()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # Two documents in a row: the second one's outputs equal attending over it alone.
    doc_ids = paddle.to_tensor([[0] * 5 + [1] * 7] * b, dtype="int32")
    packed = attention(q, k, v, additive_mask=packed_causal_mask(doc_ids)).numpy()
    alone = attention(q[:, 5:], k[:, 5:], v[:, 5:]).numpy()
    np.testing.assert_allclose(packed[:, 5:], alone, atol=1e-5)


def test_rope_as_one_matrix_per_row_matches_the_tables():
    """A decode step (one position per row) rotates with one [d, d] matrix per row; same result as the
    cos/sin tables, with the query scale folded in."""
    b, h, d = 3, 4, 8
    positions = paddle.to_tensor([[0], [5], [77]])
    cos, sin = rope_cos_sin(positions, d, theta=500.0)
    q_tables, k_tables = rotary_tables(cos, sin, h, 2, paddle.float32, q_scale=0.25)
    assert q_tables.matrix is not None and k_tables.matrix is not None
    q, k = leaf([b, 1, h, d], seed=4), leaf([b, 1, 2, d], seed=5)
    want_q = apply_rope_reference(q, expand_for_heads(cos, h, paddle.float32), expand_for_heads(sin, h, paddle.float32))
    want_k = apply_rope_reference(k, expand_for_heads(cos, 2, paddle.float32), expand_for_heads(sin, 2, paddle.float32))
    np.testing.assert_allclose(q_tables.rotate(q).numpy(), 0.25 * want_q.numpy(), atol=1e-6)
    np.testing.assert_allclose(k_tables.rotate(k).numpy(), want_k.numpy(), atol=1e-6)


@pytest.mark.parametrize("s", [1, 5])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_heads", [1, 4])
def test_attention_over_head_major_keys_matches_attention(s, kv_heads, mask_heads):
    """attention_heads_first (k/v [b, kv_heads, sk, d], grouped heads not repeated) against attention() on
    repeated, position-major k/v, with a padding-style mask per row."""
    b, h, d, sk = 2, 4, 8, 9
    q = leaf([b, s, h, d], seed=6)
    k, v = leaf([b, sk, kv_heads, d], seed=7), leaf([b, sk, kv_heads, d], seed=8)
    allowed = np.tril(np.ones((s, sk), dtype=bool), k=sk - s)[None].repeat(b, 0)
    allowed[1, :, :3] = False  # row 1: three padding keys
    mask = np.where(allowed, 0.0, -np.inf).astype(np.float32)[:, None]
    mask = paddle.to_tensor(np.repeat(mask, mask_heads, axis=1))
    n_rep = h // kv_heads
    want = attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), additive_mask=mask).numpy()
    got = attention_heads_first(q, k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3]), mask).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
