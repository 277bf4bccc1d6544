"""CCT's token-level preference loss.

A linear head r maps each hidden state to a score. For an original sequence t and its erroneous copy t',
with I the first position where they differ and M the longer length,

    L_token = 1 / (M - I) * sum_{i = I}^{M - 1} max(0, margin - r(h_{t_i}) + r(h_{t'_i}))

(margin 1 in the paper): from the first difference on, every position of the original should score at least
a margin above the same position of the erroneous copy. The shorter sequence is padded to M, its padding
positions keep being scored (the paper compares positions up to the longer length). Averaged over pairs.
"""
import paddle
import paddle.nn.functional as F


def token_hinge_loss(chosen_scores, rejected_scores, span, margin=1.0):
    """chosen_scores, rejected_scores: [N, L] scores r(h); span: [N, 2] int (I, M). Returns the mean loss."""
    length = chosen_scores.shape[1]
    positions = paddle.arange(length, dtype="int64").unsqueeze(0)
    start, end = span[:, 0:1], span[:, 1:2]
    inside = ((positions >= start) & (positions < end)).astype(chosen_scores.dtype)
    hinge = F.relu(margin - chosen_scores + rejected_scores) * inside
    count = paddle.clip((end - start).astype(chosen_scores.dtype), min=1.0).squeeze(-1)
    return (hinge.sum(axis=-1) / count).mean()


def ranking_accuracy(chosen_scores, rejected_scores, span):
    """Fraction of pairs whose original has the higher summed score over its compared span."""
    length = chosen_scores.shape[1]
    positions = paddle.arange(length, dtype="int64").unsqueeze(0)
    inside = ((positions >= span[:, 0:1]) & (positions < span[:, 1:2])).astype(chosen_scores.dtype)
    margin = ((chosen_scores - rejected_scores) * inside).sum(axis=-1)
    return (margin > 0).astype("float32").mean()
