"""Structure similarity scores of a predicted chain against a native one, over corresponding CA atoms.

All functions take `pred` and `native` as [L, 3] arrays of paired points (residue i of the prediction
corresponds to residue i of the native) plus, where the score is normalized by the native chain, the native
length `n_native` (residues of the native with a CA; pairs missing from the alignment count as failures).

- TM-score (Zhang & Skolnick 2004): max over superpositions of 1/L_N sum_i 1 / (1 + (d_i / d0)^2), with
  d0 = 1.24 (L_N - 15)^(1/3) - 1.8 (0.5 at least, and 0.5 for L_N <= 21). The maximum is searched as TM-align
  does: superpose on seed fragments of length L, L/2, L/4, ... (down to 4) at every start, then repeatedly
  re-superpose on the pairs closer than d0_search + 1 (d0 clamped to [4.5, 8]) for up to 20 rounds.
- GDT-TS and GDT-HA (Zemla 2003): the mean over distance cutoffs (1, 2, 4, 8 A; HA: 0.5, 1, 2, 4 A) of the
  largest fraction of native residues within the cutoff under one superposition, searched like LGA from the
  same seed fragments, re-superposing on the residues within the cutoff until the set stops changing.
- lDDT-Ca (Mariani et al. 2013): superposition-free; the fraction of native CA-CA distances under 15 A whose
  predicted counterpart is within 0.5, 1, 2 and 4 A, averaged over the four thresholds; a distance whose
  residue the prediction lacks counts as not preserved. (The Paddle version in the HelixFold model computes
  the same quantity on tensors for its pLDDT loss; this one is for scoring files, without a framework.)
- RMSD over all pairs after the Kabsch superposition.
"""
import numpy as np

from ppzoo.eval.structure.superposition import apply_transform, kabsch

GDT_TS_CUTOFFS = (1.0, 2.0, 4.0, 8.0)
GDT_HA_CUTOFFS = (0.5, 1.0, 2.0, 4.0)
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
LDDT_RADIUS = 15.0
SEED_ROUNDS = 20  # re-superposition rounds per seed (TM-align's n_it)
MIN_SEED = 4  # shortest seed fragment (TM-align's L_ini_min)
MAX_SEED_LEVELS = 6  # fragment lengths L, L/2, ... (TM-align's n_init_max)


def tm_d0(n_native):
    """TM-score's distance scale d0 for a native of n_native residues (TM-align's rule for short chains)."""
    if n_native <= 21:
        return 0.5
    return max(0.5, 1.24 * (n_native - 15) ** (1.0 / 3.0) - 1.8)


def seed_masks(n_pairs):
    """[S, n_pairs] 0/1 masks: the contiguous fragments every superposition search starts from."""
    shortest = min(MIN_SEED, n_pairs)
    lengths = []
    for level in range(MAX_SEED_LEVELS - 1):
        length = int(n_pairs / 2 ** level)
        if length <= shortest:
            break
        lengths.append(length)
    lengths.append(shortest)
    starts = [(length, start) for length in lengths for start in range(n_pairs - length + 1)]
    masks = np.zeros((len(starts), n_pairs))
    for row, (length, start) in enumerate(starts):
        masks[row, start:start + length] = 1.0
    return masks


def _distances(pred, native, masks):
    """Distances [S, L] of every pair after superposing on each mask's pairs."""
    rotation, translation = kabsch(pred, native, masks)
    moved = apply_transform(pred, rotation, translation)
    return np.sqrt(np.sum((moved - native[None]) ** 2, axis=-1))


def _within(distances, cutoff, minimum=3):
    """Pairs closer than `cutoff` per row. A row with fewer than `minimum` such pairs widens its cutoff in steps
    of 0.5 A until it has them (TM-align's rule), so the next superposition stays defined."""
    selected = distances < cutoff
    short = selected.sum(-1) < min(minimum, distances.shape[-1])
    if np.any(short):
        kth = np.sort(distances[short], axis=-1)[:, min(minimum, distances.shape[-1]) - 1]
        steps = np.maximum(np.floor((kth - cutoff) / 0.5) + 1, 0)
        selected[short] = distances[short] < (cutoff + 0.5 * steps)[:, None]
    return selected.astype(np.float64)


def tm_score(pred, native, n_native=None):
    """TM-score of paired CA points (see module doc) normalized by n_native (default: the number of pairs).

    Returns (score, rotation [3, 3], translation [3]) of the best superposition found (pred @ R.T + t).
    """
    pred = np.asarray(pred, dtype=np.float64)
    native = np.asarray(native, dtype=np.float64)
    n_native = len(native) if n_native is None else n_native
    if len(pred) == 0:
        return 0.0, np.eye(3), np.zeros(3)
    d0 = tm_d0(n_native)
    d0_search = min(max(d0, 4.5), 8.0)
    best = (-1.0, None)
    masks = seed_masks(len(pred))
    if len(pred) < 3:  # too few pairs to define a rotation beyond the trivial one
        masks = np.ones((1, len(pred)))
    cutoff = d0_search - 1.0  # TM-align selects the first extension tighter than the later ones
    for _ in range(SEED_ROUNDS + 1):
        rotation, translation = kabsch(pred, native, masks)
        moved = apply_transform(pred, rotation, translation)
        dist = np.sqrt(np.sum((moved - native[None]) ** 2, axis=-1))
        scores = np.sum(1.0 / (1.0 + (dist / d0) ** 2), axis=-1) / n_native
        top = int(np.argmax(scores))
        if scores[top] > best[0]:
            best = (float(scores[top]), (rotation[top], translation[top]))
        new_masks = _within(dist, cutoff)
        cutoff = d0_search + 1.0
        changed = np.any(new_masks != masks, axis=-1)  # a seed whose set is stable would repeat its score
        if not np.any(changed):
            break
        masks = new_masks[changed]
    return best[0], best[1][0], best[1][1]


def gdt(pred, native, cutoffs=GDT_TS_CUTOFFS, n_native=None):
    """GDT over `cutoffs`: (mean fraction, {cutoff: fraction}) of native residues within each cutoff."""
    pred = np.asarray(pred, dtype=np.float64)
    native = np.asarray(native, dtype=np.float64)
    n_native = len(native) if n_native is None else n_native
    if len(pred) < 3:
        return 0.0, {c: 0.0 for c in cutoffs}
    seeds = seed_masks(len(pred))
    fractions = {}
    for cutoff in cutoffs:
        masks, best = seeds, 0.0
        for _ in range(SEED_ROUNDS + 1):
            dist = _distances(pred, native, masks)
            best = max(best, float(np.max(np.sum(dist <= cutoff, axis=-1))) / n_native)
            new_masks = _within(dist, cutoff)
            changed = np.any(new_masks != masks, axis=-1)
            if not np.any(changed):
                break
            masks = new_masks[changed]
        fractions[cutoff] = best
    return float(np.mean(list(fractions.values()))), fractions


def lddt_ca(pred, native, pred_mask=None, native_mask=None, per_residue=False):
    """lDDT-Ca of paired CA points [L, 3]; masks [L] mark which side has the residue (default: both).

    Returns the global score (pairs pooled), or with per_residue=True the score of each residue [L] (NaN
    where the native residue has no CA neighbour within the radius).
    """
    pred = np.asarray(pred, dtype=np.float64)
    native = np.asarray(native, dtype=np.float64)
    n = len(native)
    pred_mask = np.ones(n) if pred_mask is None else np.asarray(pred_mask, dtype=np.float64)
    native_mask = np.ones(n) if native_mask is None else np.asarray(native_mask, dtype=np.float64)
    d_native = np.sqrt(np.sum((native[:, None] - native[None]) ** 2, axis=-1))
    d_pred = np.sqrt(np.sum((pred[:, None] - pred[None]) ** 2, axis=-1))
    scored = (d_native < LDDT_RADIUS) * native_mask[:, None] * native_mask[None] * (1.0 - np.eye(n))
    both_predicted = pred_mask[:, None] * pred_mask[None]
    error = np.abs(d_native - d_pred)
    preserved = sum((error < t) for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS) * both_predicted
    if per_residue:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sum(scored * preserved, axis=-1) / np.sum(scored, axis=-1)
    total = np.sum(scored)
    return float(np.sum(scored * preserved) / total) if total > 0 else 0.0
