"""Raw (unprocessed) protein features: what a sequence, an MSA, templates and a known structure contribute.

Every source is turned into one plain dict of numpy arrays over the query's N residues, in `restypes`
order (20 = unknown, 21 = alignment gap):

    aatype int64 [N]; residue_index int64 [N]; between_segment_residues int64 [N]; sequence str;
    msa int64 [S, N] (row 0 is the query); deletion_matrix float32 [S, N];
    template_aatype int64 [T, N]; template_all_atom_positions float32 [T, N, 37, 3];
    template_all_atom_masks float32 [T, N, 37];
    and, when the structure is known: all_atom_positions float32 [N, 37, 3]; all_atom_mask float32 [N, 37];
    resolution float.

`ppzoo.data.protein.pipeline` turns such a dict into model features.

Pickles are code, not data: unpickling a file can run anything its author chose. **User input is never
unpickled.** `load_user_input` accepts only FASTA, PDB/mmCIF (optionally .gz) and .npz (read with
allow_pickle=False). AlphaFold2's own feature pickles are read only by `load_trusted_feature_pickle`, for
files that ship with the project's data, and even then through an unpickler that can rebuild numpy arrays and
nothing else; `save_features_npz` converts such a file to .npz, which is the format to hand to users.
"""
import os
import pickle

import numpy as np

from ppzoo.data.protein import residue_constants as rc
from ppzoo.data.protein.structure import STRUCTURE_SUFFIXES, Protein, read_chain
from ppzoo.errors import DataError

FASTA_SUFFIXES = (".fasta", ".fa", ".faa")
USER_INPUT_SUFFIXES = FASTA_SUFFIXES + STRUCTURE_SUFFIXES + (".npz",)

_HHBLITS_TO_OURS = np.array(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Building raw features
# ---------------------------------------------------------------------------------------------------------------
def check_sequence(sequence, where="sequence"):
    sequence = "".join(sequence.split()).upper()
    bad = sorted({c for c in sequence if not c.isalpha()})
    if not sequence:
        raise DataError(f"{where} is empty: a protein needs at least one residue.")
    if bad:
        raise DataError(f"{where} has characters that are not amino-acid letters: {''.join(bad)!r}.")
    return sequence


def sequence_features(sequence, residue_index=None):
    """Per-residue features of a query sequence (one chain: no segment breaks)."""
    sequence = check_sequence(sequence)
    n = len(sequence)
    residue_index = np.arange(n, dtype=np.int64) if residue_index is None else np.asarray(residue_index, np.int64)
    if residue_index.shape != (n,):
        raise DataError(f"residue_index has shape {residue_index.shape}, expected ({n},) for a {n}-residue sequence.")
    return {
        "aatype": rc.sequence_to_aatype(sequence),
        "residue_index": residue_index,
        "between_segment_residues": np.zeros(n, dtype=np.int64),
        "sequence": sequence,
    }


def msa_features(aligned_sequences, deletion_matrix=None):
    """MSA rows aligned to the query (query first; '-' gap; letters only in query columns) -> msa, deletions.

    Duplicate rows are dropped (the first is kept), as AlphaFold2 does across its MSA sources.
    """
    if not aligned_sequences:
        raise DataError("An MSA needs at least the query sequence.")
    width = len(aligned_sequences[0])
    if deletion_matrix is None:
        deletion_matrix = [[0] * width for _ in aligned_sequences]
    rows, deletions, seen = [], [], set()
    for i, (row, dels) in enumerate(zip(aligned_sequences, deletion_matrix)):
        if len(row) != width or len(dels) != width:
            raise DataError(f"MSA row {i} has {len(row)} columns, but the query has {width}: rows must be aligned.")
        if row in seen:
            continue
        seen.add(row)
        rows.append([rc.restypes_with_x_and_gap.index(c) if c in rc.restypes_with_x_and_gap
                     else rc.unk_restype_index for c in row.upper()])
        deletions.append(dels)
    return {"msa": np.array(rows, dtype=np.int64), "deletion_matrix": np.array(deletions, dtype=np.float32)}


def empty_template_features(num_residues):
    return {
        "template_aatype": np.zeros((0, num_residues), dtype=np.int64),
        "template_all_atom_positions": np.zeros((0, num_residues, rc.atom_type_num, 3), dtype=np.float32),
        "template_all_atom_masks": np.zeros((0, num_residues, rc.atom_type_num), dtype=np.float32),
    }


def single_sequence_features(sequence, residue_index=None):
    """Raw features with no MSA (the query alone) and no templates."""
    features = sequence_features(sequence, residue_index)
    features.update(msa_features([features["sequence"]]))
    features.update(empty_template_features(len(features["aatype"])))
    return features


def features_from_protein(protein: Protein):
    """Single-sequence raw features of a known structure, with its coordinates as ground truth."""
    features = single_sequence_features(protein.sequence, protein.residue_index)
    features["aatype"] = protein.aatype.astype(np.int64)  # keeps unknown residues at 20
    features["msa"][0] = features["aatype"]
    features.update(ground_truth_features(protein))
    return features


def ground_truth_features(protein: Protein):
    return {
        "all_atom_positions": protein.atom_positions.astype(np.float32),
        "all_atom_mask": protein.atom_mask.astype(np.float32),
        "resolution": float(protein.resolution),
    }


def align_structure_to_sequence(protein: Protein, sequence):
    """Ground-truth arrays over `sequence`'s residues from a structure of the same protein.

    The structure usually lacks some residues (disordered termini, loops), so its observed sequence is aligned
    globally to `sequence` (free end gaps); residues the structure lacks get an all-zero atom mask.
    """
    from Bio.Align import PairwiseAligner

    aligner = PairwiseAligner()
    aligner.mode = "global"
    aligner.match_score, aligner.mismatch_score = 2.0, -1.0
    aligner.open_gap_score, aligner.extend_gap_score = -5.0, -0.5
    aligner.end_gap_score = 0.0  # set after the gap scores, which it overrides at the ends
    alignment = aligner.align(sequence, protein.sequence)[0]
    positions = np.zeros((len(sequence), rc.atom_type_num, 3), dtype=np.float32)
    mask = np.zeros((len(sequence), rc.atom_type_num), dtype=np.float32)
    matched = 0
    for (t0, t1), (q0, q1) in zip(*alignment.aligned):
        positions[t0:t1] = protein.atom_positions[q0:q1]
        mask[t0:t1] = protein.atom_mask[q0:q1]
        matched += int(np.sum(np.array(list(sequence[t0:t1])) == np.array(list(protein.sequence[q0:q1]))))
    if matched < 0.9 * len(protein):
        raise DataError(
            f"The structure {protein.name or ''} chain {protein.chain_id} does not match the sequence: only "
            f"{matched} of its {len(protein)} residues align to an identical residue. Use the structure of "
            f"the same protein (or the right chain)."
        )
    return {"all_atom_positions": positions, "all_atom_mask": mask, "resolution": float(protein.resolution)}


# ---------------------------------------------------------------------------------------------------------------
# AlphaFold2's raw feature files
# ---------------------------------------------------------------------------------------------------------------
def _text(value):
    value = np.asarray(value).reshape(-1)[0] if np.ndim(value) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_af2_raw(raw, where="features"):
    """AlphaFold2's raw feature dict (pipeline.py output: one-hot aatype, HHblits-ordered msa and template
    aatype, deletion_matrix_int) -> this package's raw features."""
    required = ("aatype", "residue_index", "msa", "deletion_matrix_int")
    missing = [k for k in required if k not in raw]
    if missing:
        raise DataError(f"{where} lacks the AlphaFold2 feature(s) {', '.join(missing)}; present: {', '.join(sorted(raw))}.")
    aatype = np.asarray(raw["aatype"])
    aatype = aatype.argmax(-1) if aatype.ndim == 2 else aatype
    n = aatype.shape[0]
    msa = np.asarray(raw["msa"], dtype=np.int64)
    if msa.ndim != 2 or msa.shape[1] != n or msa.min() < 0 or msa.max() > 21:
        raise DataError(f"{where}: msa must be [num_seqs, {n}] with values 0..21 (HHblits order); got shape "
                        f"{msa.shape}.")
    features = {
        "aatype": aatype.astype(np.int64),
        "residue_index": np.asarray(raw["residue_index"], dtype=np.int64).reshape(n),
        "between_segment_residues": np.asarray(raw.get("between_segment_residues", np.zeros(n)), np.int64).reshape(n),
        "sequence": _text(raw["sequence"]) if "sequence" in raw else rc.aatype_to_sequence(aatype),
        "msa": _HHBLITS_TO_OURS[msa],
        "deletion_matrix": np.asarray(raw["deletion_matrix_int"], dtype=np.float32),
    }
    if "template_aatype" in raw and np.asarray(raw["template_aatype"]).shape[0] > 0:
        template_aatype = np.asarray(raw["template_aatype"])
        if template_aatype.ndim == 3:  # one-hot over the 22 HHblits classes
            template_aatype = template_aatype.argmax(-1)
        masks_key = "template_all_atom_masks" if "template_all_atom_masks" in raw else "template_all_atom_mask"
        features.update(
            template_aatype=_HHBLITS_TO_OURS[template_aatype.astype(np.int64)],
            template_all_atom_positions=np.asarray(raw["template_all_atom_positions"], dtype=np.float32),
            template_all_atom_masks=np.asarray(raw[masks_key], dtype=np.float32),
        )
    else:
        features.update(empty_template_features(n))
    features["domain_name"] = _text(raw["domain_name"]) if "domain_name" in raw else ""
    return features


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and refuses every other class or function a pickle may name."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise DataError(f"The feature pickle names {module}.{name}, which is not a numpy array type; refusing "
                            f"to load it.")
        return super().find_class(module, name)


def load_trusted_feature_pickle(path):
    """AlphaFold2 raw features from a pickle that ships with the project's data. Never call this on a file a
    user supplied (see the module docstring); convert trusted pickles to .npz for users instead."""
    if not str(path).endswith(".pkl"):
        raise DataError(f"{path} is not an AlphaFold2 feature pickle (.pkl).")
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnlyUnpickler(f).load()
    except FileNotFoundError as exc:
        raise DataError(f"Feature file {path} does not exist (resolved from {os.getcwd()}).") from exc
    except (pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"{path} is not a readable feature pickle: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path} holds a {type(raw).__name__}, not a dict of feature arrays.")
    return from_af2_raw(raw, where=str(path))


def save_features_npz(raw_af2, path):
    """Write AlphaFold2 raw features (dict of arrays; byte strings become unicode) to an .npz users can load."""
    arrays = {}
    for key, value in raw_af2.items():
        value = np.asarray(value)
        if value.dtype == object:
            value = np.array([_text(v) for v in value.reshape(-1)])
        arrays[key] = value
    np.savez_compressed(path, **arrays)


def load_features_npz(path):
    """AlphaFold2 raw features from an .npz (never unpickles: object arrays are refused)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = {key: data[key] for key in data.files}
    except FileNotFoundError as exc:
        raise DataError(f"Feature file {path} does not exist (resolved from {os.getcwd()}).") from exc
    except ValueError as exc:
        raise DataError(f"{path} holds Python objects, which are never unpickled; store strings as unicode "
                        f"arrays (save_features_npz does).") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from exc
    return from_af2_raw(raw, where=str(path))


def read_fasta(path_or_text, from_text=False):
    """[(description, sequence)] of a FASTA file (or text); DataError if there is no record."""
    if from_text:
        text = path_or_text
    else:
        try:
            with open(path_or_text, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError as exc:
            raise DataError(f"FASTA file {path_or_text} does not exist (resolved from {os.getcwd()}).") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path_or_text} is not a text FASTA file ({exc}).") from exc
    records, description, chunks = [], None, []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if description is not None:
                records.append((description, "".join(chunks)))
            description, chunks = line[1:].strip(), []
        elif description is None:
            raise DataError(f"{'FASTA text' if from_text else path_or_text}: sequence data before the first '>' "
                            f"header line.")
        else:
            chunks.append(line)
    if description is not None:
        records.append((description, "".join(chunks)))
    if not records:
        raise DataError(f"{'FASTA text' if from_text else path_or_text} has no '>' record.")
    return records


def load_user_input(path, chain_id=None):
    """Raw features from a file a user supplied: FASTA (first record, single-sequence), PDB/mmCIF (optionally
    .gz; single-sequence with the structure as ground truth) or .npz (AlphaFold2 raw features). Pickles and
    any other format are refused: user input is never unpickled."""
    name = os.path.basename(str(path)).lower()
    bare = name[:-3] if name.endswith(".gz") else name
    if bare.endswith((".pkl", ".pickle")):
        raise DataError(
            f"{path} is a pickle. Pickles can run arbitrary code when loaded, so user input is never unpickled. "
            f"Provide the features as .npz (see ppzoo.data.protein.save_features_npz), or a FASTA/PDB/mmCIF file."
        )
    is_structure = bare.endswith(STRUCTURE_SUFFIXES)
    if not bare.endswith(USER_INPUT_SUFFIXES) or (name.endswith(".gz") and not is_structure):
        raise DataError(f"{path}: unsupported input; use one of {', '.join(USER_INPUT_SUFFIXES)} (only structures "
                        f"may be gzipped).")
    if bare.endswith(FASTA_SUFFIXES):
        description, sequence = read_fasta(path)[0]
        return single_sequence_features(check_sequence(sequence, where=f"{path} ({description})"))
    if bare.endswith(".npz"):
        return load_features_npz(path)
    return features_from_protein(read_chain(path, chain_id))
