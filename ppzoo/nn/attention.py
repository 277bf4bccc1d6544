"""Causal self-attention helpers: masks for packed documents and the attention kernel choice."""
import paddle
import paddle.nn.functional as F


def packed_causal_mask(doc_ids):
    """Additive mask [batch, 1, seq, seq]: 0 where a token may attend (earlier or same position, same
    document), -inf elsewhere. `doc_ids` [batch, seq] numbers the packed documents of each row, so
    documents packed into one row never see each other (a block-diagonal causal mask)."""
    seq = doc_ids.shape[1]
    causal = paddle.tril(paddle.ones([seq, seq], dtype="bool"))
    allowed = (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)) & causal
    neg = paddle.full([], float("-inf"), dtype="float32")
    return paddle.where(allowed, paddle.zeros([], dtype="float32"), neg).unsqueeze(1)


# Shapes below are written with 0 ("this axis as in the input") and -1 wherever an axis is the batch or a
# sequence length: in a traced (exported) program those are dynamic, and every explicit dynamic entry costs
# shape-computing ops at run time (tiny ChuXin's exported program had ~220 such ops next to ~220 real ones).


def repeat_kv(x, n_rep):
    """[b, s, kv_heads, d] -> [b, s, kv_heads * n_rep, d] for grouped-query attention."""
    if n_rep == 1:
        return x
    kvh, d = x.shape[2], x.shape[3]
    return x.unsqueeze(3).expand([-1, -1, -1, n_rep, -1]).reshape([0, 0, kvh * n_rep, d])


def _is_one(dim):
    """Whether a shape entry is statically 1 (a traced program's dynamic entries are not ints)."""
    return isinstance(dim, int) and dim == 1


def heads_first(x):
    """[b, s, h, d] -> [b, h, s, d], contiguous. For s == 1 the two layouts hold the same memory order, so a
    reshape (no copy) does it."""
    if _is_one(x.shape[1]):
        return x.reshape([0, x.shape[2], 1, x.shape[3]])
    # Transposes are strided views in Paddle; elementwise kernels (and their gradients, e.g. RoPE's) on
    # strided tensors are several times slower on CPU than one explicit copy, so copy once here.
    return x.transpose([0, 2, 1, 3]).contiguous()


def positions_first(x):
    """[b, h, s, d] -> [b, s, h, d], contiguous (a reshape when s == 1, as in heads_first)."""
    if _is_one(x.shape[2]):
        return x.reshape([0, 1, x.shape[1], x.shape[3]])
    return x.transpose([0, 2, 1, 3]).contiguous()


def _softmax(scores, dtype):
    """Softmax over the keys in float32 (astype is skipped when nothing changes: it always runs an op)."""
    if scores.dtype != paddle.float32:
        return F.softmax(scores.astype("float32"), axis=-1).astype(dtype)
    return F.softmax(scores, axis=-1)


def attention(q, k, v, additive_mask=None, causal=True, scale=None):
    """q [b, sq, h, d], k/v [b, sk, h, d] -> [b, sq, h, d].

    `additive_mask` [b or 1, 1 or h, sq, sk] (0 / -inf) replaces the plain causal mask when given (packed
    documents, padding, or a KV cache where queries sit at the end of the keys). `scale` multiplies the
    scores (default 1/sqrt(d); 1.0 when the caller has already scaled q, e.g. through its RoPE tables).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qt, kt, vt = heads_first(q), heads_first(k), heads_first(v)
    if scale != 1.0:
        qt = qt * scale
    scores = paddle.matmul(qt, kt, transpose_y=True)
    if additive_mask is not None:
        scores = scores + additive_mask
    elif causal and q.shape[1] > 1:
        sq, sk = q.shape[1], k.shape[1]
        allowed = paddle.tril(paddle.ones([sq, sk], dtype="bool"), diagonal=sk - sq)
        scores = paddle.where(allowed, scores, paddle.full([], float("-inf"), dtype=scores.dtype))
    return positions_first(paddle.matmul(_softmax(scores, q.dtype), vt))


def attention_heads_first(q, k, v, additive_mask, scale=None):
    """Attention over keys/values kept head-major, as a KV cache can store them: q [b, s, h, d], k/v
    [b, kv_heads, sk, d] with kv_heads dividing h (grouped-query attention) -> [b, s, h, d].

    Nothing the size of the keys is copied: no transpose of k/v (they are already head-major), and grouped
    heads are not repeated: the n_rep query heads sharing a key head are stacked as extra query rows,
    q -> [b, kv_heads, n_rep * s, d], which is one matmul with that key head. `additive_mask` [b or 1,
    1 or h, s, sk] is required (a cache decides which of its keys exist); scaling as in attention().
    """
    s, h, d = q.shape[1], q.shape[2], q.shape[3]
    kv_heads = k.shape[1]
    n_rep = h // kv_heads
    scale = d ** -0.5 if scale is None else scale
    # [b, h, s, d] -> [b, kv_heads, n_rep * s, d]: head j = kv head j // n_rep, so a reshape groups them
    # (for s == 1 a single reshape of q does both steps).
    qt = q.reshape([0, kv_heads, n_rep, d]) if _is_one(s) else heads_first(q).reshape([0, kv_heads, -1, d])
    if scale != 1.0:
        qt = qt * scale
    scores = paddle.matmul(qt, k, transpose_y=True)  # [b, kv_heads, n_rep * s, sk]
    mask = additive_mask
    if n_rep > 1 and mask.shape[1] == h:
        mask = mask.reshape([0, kv_heads, -1, 0])  # the same grouping as qt
    elif n_rep > 1 and not _is_one(s):
        mask = mask.tile([1, 1, n_rep, 1])  # one head: the same [s, sk] mask for each stacked query head
    probs = _softmax(scores + mask, q.dtype)
    out = paddle.matmul(probs, v)  # [b, kv_heads, n_rep * s, d]
    if _is_one(s):
        return out.reshape([0, 1, h, d])  # the same memory order
    return positions_first(out.reshape([0, h, -1, d]))
