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


def repeat_kv(x, n_rep):
    """[b, s, kv_heads, d] -> [b, s, kv_heads * n_rep, d] for grouped-query attention."""
    if n_rep == 1:
        return x
    b, s, kvh, d = x.shape
    return x.unsqueeze(3).expand([b, s, kvh, n_rep, d]).reshape([b, s, kvh * n_rep, d])


def attention(q, k, v, additive_mask=None, causal=True):
    """q [b, sq, h, d], k/v [b, sk, h, d] -> [b, sq, h, d].

    `additive_mask` [b or 1, 1, sq, sk] (0 / -inf) replaces the plain causal mask when given (packed
    documents, padding, or a KV cache where queries sit at the end of the keys).
    """
    scale = q.shape[-1] ** -0.5
    # Transposes are strided views in Paddle; elementwise kernels (and their gradients, e.g. RoPE's) on
    # strided tensors are several times slower on CPU than one explicit copy, so copy once here.
    qt = q.transpose([0, 2, 1, 3]).contiguous()
    kt = k.transpose([0, 2, 1, 3]).contiguous()
    vt = v.transpose([0, 2, 1, 3]).contiguous()
    scores = paddle.matmul(qt * scale, kt, transpose_y=True)
    if additive_mask is not None:
        scores = scores + additive_mask
    elif causal and q.shape[1] > 1:
        sq, sk = q.shape[1], k.shape[1]
        allowed = paddle.tril(paddle.ones([sq, sk], dtype="bool"), diagonal=sk - sq)
        scores = paddle.where(allowed, scores, paddle.full([], float("-inf"), dtype=scores.dtype))
    probs = F.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
    return paddle.matmul(probs, vt).transpose([0, 2, 1, 3]).contiguous()
