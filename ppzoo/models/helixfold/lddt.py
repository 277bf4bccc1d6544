"""lDDT (local Distance Difference Test, Mariani et al. 2013) in Paddle, as AlphaFold2 computes it.

For each residue, every true inter-atom distance shorter than the inclusion radius (15 A) to another
resolved atom is compared with the same distance in the prediction; the score is the fraction of these
differences below 0.5, 1, 2 and 4 A, averaged over the four thresholds. It needs no superposition. This is
the variant AF2 trains pLDDT against: one atom per residue (CA), all other residues in the radius scored
(including sequence neighbours), and no stereochemistry checks.
"""
import paddle

from ppzoo.data.protein import residue_constants as rc

THRESHOLDS = (0.5, 1.0, 2.0, 4.0)


def lddt(predicted_points, true_points, true_points_mask, cutoff=15.0, per_residue=False, eps=1e-10):
    """predicted_points, true_points [B, N, 3]; true_points_mask [B, N]. Returns lDDT [B] (or [B, N])."""
    mask = true_points_mask.astype(true_points.dtype)

    def distances(points):
        diff = points.unsqueeze(-2) - points.unsqueeze(-3)
        return paddle.sqrt(eps + paddle.sum(diff * diff, axis=-1))

    dist_true, dist_pred = distances(true_points), distances(predicted_points)
    n = true_points.shape[-2]
    scored = ((dist_true < cutoff).astype(mask.dtype) * mask.unsqueeze(-1) * mask.unsqueeze(-2)
              * (1.0 - paddle.eye(n, dtype=mask.dtype)))
    error = paddle.abs(dist_true - dist_pred)
    score = sum((error < t).astype(mask.dtype) for t in THRESHOLDS) / len(THRESHOLDS)
    axes = [-1] if per_residue else [-2, -1]
    return (eps + paddle.sum(scored * score, axis=axes)) / (eps + paddle.sum(scored, axis=axes))


def lddt_ca(predicted_atom37, true_atom37, true_atom37_mask, cutoff=15.0, per_residue=False):
    """lDDT-Ca from atom37 positions [B, N, 37, 3] and the true atom37 mask [B, N, 37]."""
    ca = rc.atom_order["CA"]
    return lddt(predicted_atom37[..., ca, :], true_atom37[..., ca, :], true_atom37_mask[..., ca],
                cutoff=cutoff, per_residue=per_residue)
