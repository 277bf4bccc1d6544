"""Raw features -> one fixed-size model example (the batch contract in ppzoo/data/protein/__init__.py).

The steps are AlphaFold2's input pipeline (supplement section 1.2.6-1.2.9 and its data config), on numpy with
one seeded generator so an example is a pure function of (raw features, config, seed):

1. MSA profile: the per-column frequency of each of the 22 MSA classes over the whole MSA.
2. Cluster centres: the query plus `max_msa_clusters - 1` other sequences drawn at random; the remaining
   sequences form the extra MSA.
3. Masked-MSA (BERT) corruption of the centres: each position is picked with probability
   `masked_msa_replace_fraction` (15%) and replaced by a uniformly random amino acid (10%), a draw from the
   column profile (10%), itself (10%) or the mask token 22 (the remaining 70%). `true_msa` keeps the original
   and `bert_mask` marks the picked positions.
4. Every extra sequence joins the cluster centre it agrees with at the most positions (gaps and masks do not
   count); a cluster's profile and mean deletion count average its centre and members.
5. The extra MSA is cut to a random `max_extra_msa` sequences.
6. msa_feat = [one-hot(centre, 23), has_deletion, deletion_value, cluster_profile(23), deletion_mean_value]
   with deletion_value = 2/pi * arctan(d / 3); target_feat = [has_break, one-hot(aatype, 21)].
7. Templates: at training time a random number (0..max_templates) of them in random order, else the first
   max_templates; each with its pseudo-beta atom (CB, CA for glycine).
8. A contiguous crop of `crop_size` residues (random start at training time, the first residues otherwise),
   applied to every per-residue array alike, then padding of every dimension to its configured size.
"""
from dataclasses import dataclass

import numpy as np

from ppzoo.data.protein import residue_constants as rc
from ppzoo.data.protein.structure import pseudo_beta
from ppzoo.errors import DataError

MSA_CLASSES = 23  # 20 amino acids, X, gap, mask token
MASK_TOKEN = 22
GAP = 21


@dataclass
class FeatureConfig:
    crop_size: int = 64  # N: residues per example (longer chains are cropped, shorter ones padded)
    max_msa_clusters: int = 16  # S: cluster centres in msa_feat, the query included
    max_extra_msa: int = 32  # E: extra MSA sequences
    max_templates: int = 4  # T
    masked_msa_replace_fraction: float = 0.15
    masked_msa_uniform_prob: float = 0.1
    masked_msa_profile_prob: float = 0.1
    masked_msa_same_prob: float = 0.1
    training: bool = True  # random crop start and template subsampling; False: deterministic choices

    def validate(self):
        for name in ("crop_size", "max_msa_clusters"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_extra_msa", "max_templates"):
            if getattr(self, name) < 0:
                raise DataError(f"{name} must be non-negative, got {getattr(self, name)}.")
        probs = (self.masked_msa_uniform_prob, self.masked_msa_profile_prob, self.masked_msa_same_prob)
        if not 0 <= self.masked_msa_replace_fraction <= 1 or min(probs) < 0 or sum(probs) > 1:
            raise DataError(
                "masked_msa_replace_fraction must be in [0, 1] and the uniform/profile/same probabilities must be "
                f"non-negative with a sum of at most 1; got {self.masked_msa_replace_fraction} and {probs}."
            )


def one_hot(indices, depth):
    return np.eye(depth, dtype=np.float32)[indices]


# MSAs can have thousands of rows over a full-length sequence, so the counting below works class by class or
# with scatter-adds over [rows, N] index arrays instead of materialising [rows, N, 23] one-hot tensors.
def msa_profile(msa, msa_mask):
    """[N, 22] frequency of each MSA class per column over the rows that are present."""
    counts = np.stack([((msa == c) * msa_mask).sum(0) for c in range(22)], axis=-1)
    return (counts / np.maximum(msa_mask.sum(0), 1e-6)[:, None]).astype(np.float32)


def deletion_value(deletion_matrix):
    return (np.arctan(deletion_matrix / 3.0) * (2.0 / np.pi)).astype(np.float32)


def sample_clusters(num_seqs, max_clusters, rng):
    """(cluster centre rows, extra rows): row 0 (the query) is always a centre, the rest are shuffled."""
    order = np.concatenate([[0], 1 + rng.permutation(num_seqs - 1)]).astype(np.int64)
    return order[:max_clusters], order[max_clusters:]


def mask_msa(msa, profile, cfg: FeatureConfig, rng):
    """AF2's masked-MSA corruption: (corrupted msa, bert_mask)."""
    uniform = np.array([0.05] * 20 + [0.0, 0.0], dtype=np.float64)
    probs = (cfg.masked_msa_uniform_prob * uniform
             + cfg.masked_msa_profile_prob * profile[None].astype(np.float64)
             + cfg.masked_msa_same_prob * one_hot(msa, 22).astype(np.float64))
    mask_prob = 1.0 - cfg.masked_msa_uniform_prob - cfg.masked_msa_profile_prob - cfg.masked_msa_same_prob
    probs = np.concatenate([probs, np.full(probs.shape[:-1] + (1,), mask_prob)], axis=-1)
    # Inverse-CDF sampling of one class per position.
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(msa.shape)[..., None] * cumulative[..., -1:]
    replacement = np.minimum((draws > cumulative).sum(-1), MSA_CLASSES - 1)
    bert_mask = rng.random(msa.shape) < cfg.masked_msa_replace_fraction
    return np.where(bert_mask, replacement, msa).astype(np.int64), bert_mask.astype(np.float32)


def nearest_clusters(centres, centre_mask, extra, extra_mask):
    """Index of the centre each extra row agrees with at the most positions (gap and mask agreements count 0)."""
    agreement = np.zeros((extra.shape[0], centres.shape[0]), dtype=np.float32)
    for c in range(GAP):  # amino acids and X
        agreement += ((extra == c) * extra_mask) @ ((centres == c) * centre_mask).T.astype(np.float32)
    return agreement.argmax(axis=1)


def summarize_clusters(centres, centre_mask, centre_deletions, extra, extra_mask, extra_deletions, assignment):
    """(cluster_profile [S, N, 23], cluster_deletion_mean [S, N]) over each centre and its members."""
    member_counts = np.zeros(centre_mask.shape, dtype=np.float32)
    np.add.at(member_counts, assignment, extra_mask)
    profile = one_hot(centres, MSA_CLASSES) * centre_mask[..., None]
    columns = np.broadcast_to(np.arange(extra.shape[1]), extra.shape)
    np.add.at(profile, (np.broadcast_to(assignment[:, None], extra.shape), columns, extra), extra_mask)
    deletions = centre_deletions * centre_mask
    np.add.at(deletions, assignment, extra_mask * extra_deletions)
    counts = centre_mask + member_counts
    denominator = np.maximum(counts, 1e-6)
    return profile / denominator[..., None], deletions / denominator


def crop_start(num_residues, crop_size, training, rng):
    if num_residues <= crop_size:
        return 0
    return int(rng.integers(0, num_residues - crop_size + 1)) if training else 0


def _pad(array, sizes, value=0):
    """Zero-pad (or `value`-pad) the leading dimensions of `array` up to `sizes`."""
    pad = [(0, size - dim) for size, dim in zip(sizes, array.shape)] + [(0, 0)] * (array.ndim - len(sizes))
    if any(p[1] < 0 for p in pad):
        raise ValueError(f"cannot pad shape {array.shape} to {sizes}")
    return np.pad(array, pad, constant_values=value)


def check_raw(raw):
    n = len(raw["aatype"])
    expect = {"residue_index": (n,), "between_segment_residues": (n,)}
    for key, shape in expect.items():
        if np.shape(raw[key]) != shape:
            raise DataError(f"Raw feature {key} has shape {np.shape(raw[key])}, expected {shape}.")
    if raw["msa"].ndim != 2 or raw["msa"].shape[1] != n or raw["msa"].shape[0] < 1:
        raise DataError(f"Raw msa has shape {raw['msa'].shape}, expected [num_seqs >= 1, {n}].")
    if raw["deletion_matrix"].shape != raw["msa"].shape:
        raise DataError(f"deletion_matrix shape {raw['deletion_matrix'].shape} differs from msa {raw['msa'].shape}.")
    if raw["template_aatype"].shape[1:] != (n,):
        raise DataError(f"template_aatype has shape {raw['template_aatype'].shape}, expected [T, {n}].")


def make_example(raw, cfg: FeatureConfig, seed):
    """One model example (no batch dimension) from raw features; deterministic in `seed`."""
    cfg.validate()
    check_raw(raw)
    rng = np.random.default_rng(seed)
    aatype = raw["aatype"].astype(np.int64)
    n = len(aatype)

    # --- MSA: profile, cluster centres, BERT corruption, cluster assignment and summaries ---
    msa = raw["msa"].astype(np.int64)
    deletions = raw["deletion_matrix"].astype(np.float32)
    msa_mask_full = np.ones(msa.shape, dtype=np.float32)
    profile = msa_profile(msa, msa_mask_full)
    centre_rows, extra_rows = sample_clusters(msa.shape[0], cfg.max_msa_clusters, rng)
    true_msa = msa[centre_rows]
    centre_mask = msa_mask_full[centre_rows]
    centre_deletions = deletions[centre_rows]
    centres, bert_mask = mask_msa(true_msa, profile, cfg, rng)
    extra, extra_mask, extra_deletions = msa[extra_rows], msa_mask_full[extra_rows], deletions[extra_rows]
    assignment = nearest_clusters(centres, centre_mask, extra, extra_mask)
    cluster_profile, cluster_deletion_mean = summarize_clusters(
        centres, centre_mask, centre_deletions, extra, extra_mask, extra_deletions, assignment)
    keep_extra = rng.permutation(len(extra_rows))[: cfg.max_extra_msa]
    extra, extra_mask, extra_deletions = extra[keep_extra], extra_mask[keep_extra], extra_deletions[keep_extra]

    msa_feat = np.concatenate([
        one_hot(centres, MSA_CLASSES),
        np.clip(centre_deletions, 0.0, 1.0)[..., None],
        deletion_value(centre_deletions)[..., None],
        cluster_profile,
        deletion_value(cluster_deletion_mean)[..., None],
    ], axis=-1).astype(np.float32)
    has_break = np.clip(raw["between_segment_residues"], 0, 1).astype(np.float32)
    target_feat = np.concatenate([has_break[:, None], one_hot(aatype, 21)], axis=-1)

    # --- templates ---
    num_templates = raw["template_aatype"].shape[0]
    if cfg.training:
        count = int(rng.integers(0, min(num_templates, cfg.max_templates) + 1))
        chosen = rng.permutation(num_templates)[:count]
    else:
        chosen = np.arange(min(num_templates, cfg.max_templates))
    template_aatype = raw["template_aatype"][chosen].astype(np.int64)
    template_positions = raw["template_all_atom_positions"][chosen].astype(np.float32)
    template_masks = raw["template_all_atom_masks"][chosen].astype(np.float32)
    template_pb, template_pb_mask = pseudo_beta(template_aatype, template_positions, template_masks)

    example = {
        "aatype": aatype,
        "residue_index": raw["residue_index"].astype(np.int64),
        "seq_mask": np.ones(n, dtype=np.float32),
        "target_feat": target_feat.astype(np.float32),
        "msa_feat": msa_feat,
        "msa_mask": centre_mask,
        "true_msa": true_msa,
        "bert_mask": bert_mask * centre_mask,
        "extra_msa": extra,
        "extra_msa_mask": extra_mask,
        "extra_has_deletion": np.clip(extra_deletions, 0.0, 1.0),
        "extra_deletion_value": deletion_value(extra_deletions),
        "template_aatype": template_aatype,
        "template_all_atom_positions": template_positions,
        "template_all_atom_masks": template_masks,
        "template_mask": np.ones(len(chosen), dtype=np.float32),
        "template_pseudo_beta": template_pb,
        "template_pseudo_beta_mask": template_pb_mask,
        "atom14_atom_exists": rc.restype_atom14_mask[aatype],
        "residx_atom14_to_atom37": rc.restype_atom14_to_atom37[aatype],
        "residx_atom37_to_atom14": rc.restype_atom37_to_atom14[aatype],
        "atom37_atom_exists": rc.restype_atom37_mask[aatype],
    }
    if "all_atom_positions" in raw:
        positions = raw["all_atom_positions"].astype(np.float32)
        mask = raw["all_atom_mask"].astype(np.float32) * rc.restype_atom37_mask[aatype]  # drop OXT / stray atoms
        pb, pb_mask = pseudo_beta(aatype, positions, mask)
        example.update(all_atom_positions=positions * mask[..., None], all_atom_mask=mask,
                       resolution=np.float32(raw.get("resolution", 0.0)), pseudo_beta=pb, pseudo_beta_mask=pb_mask)

    # --- crop and pad ---
    start = crop_start(n, cfg.crop_size, cfg.training, rng)
    return crop_and_pad(example, start, cfg)


# Which axis of each feature runs over residues, and which leading axes are padded to which size.
_RESIDUE_AXIS = {
    "aatype": 0, "residue_index": 0, "seq_mask": 0, "target_feat": 0, "atom14_atom_exists": 0,
    "residx_atom14_to_atom37": 0, "residx_atom37_to_atom14": 0, "atom37_atom_exists": 0, "all_atom_positions": 0,
    "all_atom_mask": 0, "pseudo_beta": 0, "pseudo_beta_mask": 0,
    "msa_feat": 1, "msa_mask": 1, "true_msa": 1, "bert_mask": 1, "extra_msa": 1, "extra_msa_mask": 1,
    "extra_has_deletion": 1, "extra_deletion_value": 1, "template_aatype": 1, "template_all_atom_positions": 1,
    "template_all_atom_masks": 1, "template_pseudo_beta": 1, "template_pseudo_beta_mask": 1,
}


def _row_size_name(key):
    if key in ("msa_feat", "msa_mask", "true_msa", "bert_mask"):
        return "max_msa_clusters"
    if key.startswith("extra_"):
        return "max_extra_msa"
    if key.startswith("template_"):
        return "max_templates"
    return None


def crop_and_pad(example, start, cfg: FeatureConfig):
    out = {}
    for key, value in example.items():
        axis = _RESIDUE_AXIS.get(key)
        if axis is None:  # scalars (resolution) and per-template vectors
            if key == "template_mask":
                value = _pad(value, (cfg.max_templates,))
            out[key] = value
            continue
        index = [slice(None)] * value.ndim
        index[axis] = slice(start, start + cfg.crop_size)
        value = value[tuple(index)]
        sizes = (cfg.crop_size,) if axis == 0 else (getattr(cfg, _row_size_name(key)), cfg.crop_size)
        out[key] = _pad(value, sizes)
    return out
