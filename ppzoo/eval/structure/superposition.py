"""Optimal rigid superposition (Kabsch 1976) and RMSD, in NumPy, for one or many weighted point sets at once.

`kabsch` finds the rotation R and translation t minimizing sum_i w_i |R x_i + t - y_i|^2. The batched form
takes a stack of weight vectors [S, L] over the same two point sets, so the superposition searches of
TM-score and GDT try every seed fragment in one vectorized pass instead of a Python loop.
"""
import numpy as np


def kabsch(mobile, target, weights=None):
    """Rotation [..., 3, 3] and translation [..., 3] that superpose `mobile` [L, 3] onto `target` [L, 3].

    `weights` is None (all points), [L], or [S, L] for S superpositions at once (leading dims of the result).
    Apply as `mobile @ R.T + t`. Weights need not be normalized; each row needs a positive sum.
    """
    x = np.asarray(mobile, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    total = w.sum(-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("kabsch needs at least one point with positive weight in every weight vector")
    cx = (w @ x) / total  # [..., 3]
    cy = (w @ y) / total
    # Weighted covariance H = sum_i w_i (x_i - cx)(y_i - cy)^T, expanded so the batch never builds [S, L, 3].
    h = np.einsum("...l,li,lj->...ij", w, x, y) - total[..., None] * cx[..., :, None] * cy[..., None, :]
    u, _, vt = np.linalg.svd(h)
    # A reflection would fit better when det(V U^T) < 0; flip the axis of the smallest singular value.
    d = np.sign(np.linalg.det(np.swapaxes(vt, -1, -2) @ np.swapaxes(u, -1, -2)))
    d = np.where(d == 0, 1.0, d)
    fix = np.ones(u.shape[:-2] + (3,))
    fix[..., 2] = d
    rotation = np.swapaxes(vt, -1, -2) @ (fix[..., :, None] * np.swapaxes(u, -1, -2))
    translation = cy - np.einsum("...ij,...j->...i", rotation, cx)
    return rotation, translation


def apply_transform(points, rotation, translation):
    """points [L, 3] under one ([3, 3], [3]) or S ([S, 3, 3], [S, 3]) transforms -> [L, 3] or [S, L, 3]."""
    points = np.asarray(points, dtype=np.float64)
    return np.einsum("...ij,lj->...li", rotation, points) + np.asarray(translation)[..., None, :]


def rmsd(a, b):
    """Root-mean-square deviation of two point sets [L, 3] as they are (no superposition)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean(np.sum(diff * diff, axis=-1))))


def superposed_rmsd(mobile, target):
    """RMSD after the optimal superposition of `mobile` onto `target` (both [L, 3], L >= 1)."""
    rotation, translation = kabsch(mobile, target)
    return rmsd(apply_transform(mobile, rotation, translation), target)
