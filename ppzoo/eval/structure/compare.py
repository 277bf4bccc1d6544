"""Score a predicted structure file against a native one: residue correspondence, then every metric.

Residues correspond by author numbering when the two chains agree on it (every residue number they share
names the same residue type, and they share at least half of the native's residues), which is the case for a
prediction of a target whose native numbering the features kept. Otherwise they correspond by a global
sequence alignment (Biopython's PairwiseAligner, BLOSUM62, gap open -10 / extend -0.5, free end gaps), which
handles renumbered chains, missing native residues and insertion codes. Only residues with a CA on both sides
are paired; TM-score, GDT and lDDT are normalized by the native residues that have a CA, so native residues
the prediction lacks count against it.
"""
import numpy as np

from ppzoo.data.protein import residue_constants as rc
from ppzoo.data.protein.structure import read_chain
from ppzoo.errors import DataError
from ppzoo.eval.structure.scores import GDT_HA_CUTOFFS, GDT_TS_CUTOFFS, gdt, lddt_ca, tm_score
from ppzoo.eval.structure.superposition import superposed_rmsd

CA = rc.atom_order["CA"]
MIN_PAIRS = 3


def _ca_residues(protein):
    """Indices of the residues that have a CA atom."""
    return np.flatnonzero(protein.atom_mask[:, CA] > 0)


def correspond_by_number(pred, native):
    """(pred indices, native indices) paired by residue number, or None when the numbering disagrees."""
    pred_at = {int(n): i for i, n in enumerate(pred.residue_index)}
    pairs = [(pred_at[int(n)], j) for j, n in enumerate(native.residue_index) if int(n) in pred_at]
    if len(pairs) < max(MIN_PAIRS, len(native) / 2):
        return None
    if any(pred.aatype[i] != native.aatype[j] for i, j in pairs):
        return None
    return np.array([i for i, _ in pairs]), np.array([j for _, j in pairs])


def correspond_by_sequence(pred, native):
    """(pred indices, native indices) of the residues a global sequence alignment puts in the same column."""
    from Bio import Align
    from Bio.Align import substitution_matrices

    aligner = Align.PairwiseAligner()
    aligner.mode = "global"
    aligner.substitution_matrix = substitution_matrices.load("BLOSUM62")
    aligner.open_gap_score, aligner.extend_gap_score = -10.0, -0.5  # internal gaps
    aligner.end_gap_score = 0.0  # then the end gaps: a prediction may cover more of the target than the native
    alignment = aligner.align(pred.sequence, native.sequence)[0]
    pred_idx, native_idx = [], []
    for (p0, p1), (n0, n1) in zip(*alignment.aligned):
        pred_idx.extend(range(p0, p1))
        native_idx.extend(range(n0, n1))
    return np.array(pred_idx, dtype=np.int64), np.array(native_idx, dtype=np.int64)


def correspond(pred, native):
    """Paired residue indices and how they were found: (pred_idx, native_idx, 'numbering' | 'sequence')."""
    by_number = correspond_by_number(pred, native)
    if by_number is not None:
        return (*by_number, "numbering")
    return (*correspond_by_sequence(pred, native), "sequence")


def score_proteins(pred, native):
    """Every metric of a predicted Protein against a native Protein (one chain each) as a dict."""
    pred_idx, native_idx, method = correspond(pred, native)
    has_ca = (pred.atom_mask[pred_idx, CA] > 0) & (native.atom_mask[native_idx, CA] > 0)
    pred_idx, native_idx = pred_idx[has_ca], native_idx[has_ca]
    native_ca = _ca_residues(native)
    n_native = len(native_ca)
    if len(pred_idx) < MIN_PAIRS:
        raise DataError(
            f"Only {len(pred_idx)} residues of the prediction ({pred.name}, chain {pred.chain_id}, "
            f"{len(pred)} residues) correspond to the native ({native.name}, chain {native.chain_id}, "
            f"{len(native)} residues) by {method}: is this the right native chain? Choose it with --chain."
        )
    p = pred.atom_positions[pred_idx, CA]
    q = native.atom_positions[native_idx, CA]
    tm, _, _ = tm_score(p, q, n_native=n_native)
    gdt_ts, ts_fractions = gdt(p, q, GDT_TS_CUTOFFS, n_native=n_native)
    gdt_ha, ha_fractions = gdt(p, q, GDT_HA_CUTOFFS, n_native=n_native)
    # lDDT over all native residues with a CA; the ones without a predicted partner are not preserved.
    pred_full = np.zeros((len(native), 3))
    pred_present = np.zeros(len(native))
    pred_full[native_idx] = p
    pred_present[native_idx] = 1.0
    lddt = lddt_ca(pred_full[native_ca], native.atom_positions[native_ca, CA], pred_present[native_ca])
    identity = float(np.mean(pred.aatype[pred_idx] == native.aatype[native_idx]))
    return {
        "tm_score": tm, "gdt_ts": gdt_ts, "gdt_ha": gdt_ha, "lddt_ca": lddt,
        "rmsd": superposed_rmsd(p, q),
        "aligned_residues": int(len(pred_idx)), "native_residues": int(n_native), "predicted_residues": len(pred),
        "sequence_identity": identity, "correspondence": method,
        "gdt_ts_fractions": {str(k): v for k, v in ts_fractions.items()},
        "gdt_ha_fractions": {str(k): v for k, v in ha_fractions.items()},
    }


def score_files(pred_path, native_path, chain=None, pred_chain=None):
    """Read the predicted and native structures (PDB or mmCIF, optionally .gz) and score one chain of each.

    `chain` picks the native chain and `pred_chain` the predicted one (default: the first protein chain).
    """
    pred = read_chain(pred_path, pred_chain)
    native = read_chain(native_path, chain)
    result = score_proteins(pred, native)
    return {"pred": str(pred_path), "native": str(native_path), "pred_chain": pred.chain_id,
            "native_chain": native.chain_id, **result}
