"""AlphaFold2's losses (supplement 1.9), in Paddle, and their combination by AF2's training presets.

`alphafold_loss(outputs, batch, loss_config)` takes the structure module's outputs plus the heads' logits and
a batch in the data contract (atom37 ground truth), derives the ground-truth frames, torsions and atom14
positions itself, and returns every named loss (unweighted) plus `loss`, their weighted sum:

  fape_backbone    FAPE of the backbone frames' CA positions, averaged over the structure module's layers;
                   clamped at 10 A except for a random 10% of examples (AF2's unclamped fraction)
  fape_sidechain   FAPE of all atoms under all 8 rigid-group frames of the final layer, after renaming the
                   ground truth's symmetric atoms to fit the prediction best; always clamped
  chi, angle_norm  side-chain torsions against the truth (or its pi-rotated alternative), and the
                   unnormalised angles' distance from the unit circle
  distogram, masked_msa, plddt, experimentally_resolved   the heads' losses
  violation        bond lengths and angles across peptide bonds, clashes, intra-residue bounds (fine-tuning)

Weights are AF2's (supplement 1.9, equation 7 and Table 6): 0.5 all-atom FAPE + 0.5 auxiliary loss (the
layers' mean backbone FAPE and torsion loss, chi + 0.02 angle norm) + 0.3 distogram + 2.0 masked MSA + 0.01
pLDDT, and in fine-tuning also 0.01 experimentally resolved + 1.0 violations. Named here: fape_sidechain 0.5,
fape_backbone 0.5, chi 0.5, angle_norm 0.01, distogram 0.3, masked_msa 2.0, plddt 0.01.
"""
import functools
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from ppzoo.data.protein import residue_constants as rc
from ppzoo.errors import ConfigError
from ppzoo.models.helixfold import geometry
from ppzoo.models.helixfold.geometry import Rigid
from ppzoo.models.helixfold.lddt import lddt


@dataclass
class LossConfig:
    """Weights and settings of AF2's losses (the Model.loss section). The defaults are AF2's initial-training
    preset; `preset: finetuning` switches on the experimentally-resolved and violation losses (unless
    their weights are set explicitly). The number of distogram and pLDDT bins is read from the
    heads' logits."""
    preset: str = "initial_training"
    # Weights of the named losses in the total.
    fape_backbone_weight: float = 0.5
    fape_sidechain_weight: float = 0.5
    chi_weight: float = 0.5
    angle_norm_weight: float = 0.01
    distogram_weight: float = 0.3
    masked_msa_weight: float = 2.0
    plddt_weight: float = 0.01
    experimentally_resolved_weight: Optional[float] = None  # None: the preset's (0 initial, 0.01 fine-tuning)
    violation_weight: Optional[float] = None                # None: the preset's (0 initial, 1.0 fine-tuning)
    # FAPE: errors clamped at clamp_distance and divided by loss_unit_distance (Angstrom). The backbone's is
    # clamped in a random `fape_clamped_fraction` of examples (a batch's `use_clamped_fape` decides if given).
    fape_clamp_distance: float = 10.0
    fape_loss_unit_distance: float = 10.0
    fape_clamped_fraction: float = 0.9
    sidechain_clamp_distance: float = 10.0
    sidechain_loss_unit_distance: float = 10.0
    # Distogram bins: edges evenly spaced between the first and last break (Angstrom).
    distogram_first_break: float = 2.3125
    distogram_last_break: float = 21.6875
    # pLDDT: lDDT-Ca inclusion radius; pLDDT and experimentally-resolved losses only for structures solved
    # at a resolution in [min_resolution, max_resolution] (Angstrom).
    plddt_cutoff: float = 15.0
    min_resolution: float = 0.1
    max_resolution: float = 3.0
    # Violations: bonds beyond this many literature standard deviations, clashes beyond this overlap.
    violation_tolerance_factor: float = 12.0
    clash_overlap_tolerance: float = 1.5

    def __post_init__(self):
        # ValueError: the config loader reports it with the file and key path.
        if self.preset not in LOSS_PRESETS:
            raise ValueError(f"preset={self.preset!r} is unknown; choose one of {sorted(LOSS_PRESETS)}")
        for name, value in LOSS_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not 0.0 <= self.fape_clamped_fraction <= 1.0:
            raise ValueError(f"fape_clamped_fraction={self.fape_clamped_fraction} must be in [0, 1]")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_weight") and value < 0:
                raise ValueError(f"{f.name}={value} must not be negative")


# What each preset sets where the config leaves a weight unset (AF2 supplement Table 6: the experimentally
# resolved and violation losses join in fine-tuning).
LOSS_PRESETS = {
    "initial_training": {"experimentally_resolved_weight": 0.0, "violation_weight": 0.0},
    "finetuning": {"experimentally_resolved_weight": 0.01, "violation_weight": 1.0},
}


def make_loss_config(loss_config=None):
    """A LossConfig from a LossConfig, a dict of its fields (unknown keys are a ConfigError) or None."""
    if isinstance(loss_config, LossConfig):
        return loss_config
    loss_config = dict(loss_config or {})
    known = {f.name for f in fields(LossConfig)}
    unknown = sorted(set(loss_config) - known)
    if unknown:
        raise ConfigError(f"unknown loss setting(s) {unknown}; the settings are {sorted(known)}")
    for key, value in loss_config.items():
        if key == "preset":
            if not isinstance(value, str):
                raise ConfigError(f"loss setting preset={value!r} must be a string: {sorted(LOSS_PRESETS)}")
            continue
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        left_to_preset = value is None and key in LOSS_PRESETS.get(loss_config.get("preset", "initial_training"), {})
        if not (is_number or left_to_preset):
            raise ConfigError(f"loss setting {key}={value!r} must be a number")
    return LossConfig(**loss_config)


def _masked_mean(mask, value, axis=None, eps=1e-10):
    mask = paddle.broadcast_to(mask.astype(value.dtype), value.shape)
    return paddle.sum(mask * value, axis=axis) / (eps + paddle.sum(mask, axis=axis))


def _softmax_cross_entropy(logits, labels):
    """-sum(one_hot(labels) * log_softmax(logits)) over the last axis."""
    one_hot = F.one_hot(labels.astype("int64"), logits.shape[-1]).astype(logits.dtype)
    return -paddle.sum(one_hot * F.log_softmax(logits, axis=-1), axis=-1)


# ---------------------------------------------------------------------------------------------------------
# FAPE


def _positions_in_frames(frames, positions):
    """Every position [B, P, 3] in every frame's coordinates (R^T (x - t)), as [B, F, 3, P]: one matrix
    product R^T x for all frames at once, rather than F x P tiny ones."""
    b, f = frames.trans.shape[0], frames.trans.shape[1]
    rot_t = frames.rot.transpose([0, 1, 3, 2])  # [B, F, 3, 3]
    rotated = paddle.matmul(rot_t.reshape([b, f * 3, 3]), positions, transpose_y=True).reshape([b, f, 3, -1])
    return rotated - paddle.matmul(rot_t, frames.trans.unsqueeze(-1))


def pairwise_distances(points, others=None, eps=1e-10):
    """Distances [B, M, K] between points [B, M, 3] and others [B, K, 3] (default: the points themselves),
    from the Gram matrix of centred coordinates: a matrix product instead of an [M, K, 3] difference tensor;
    centring keeps float32 cancellation below 1e-3 A."""
    others = points if others is None else others
    centre = paddle.mean(others, axis=1, keepdim=True)
    a, b = points - centre, others - centre
    gram = paddle.matmul(a, b, transpose_y=True)
    sq = paddle.sum(a * a, axis=-1).unsqueeze(-1) + paddle.sum(b * b, axis=-1).unsqueeze(-2)
    return paddle.sqrt(paddle.clip(sq - 2.0 * gram, min=0.0) + eps)


def frame_aligned_point_error(pred_frames, target_frames, frames_mask, pred_positions, target_positions,
                              positions_mask, length_scale, clamp_distance=None, eps=1e-4):
    """Algorithm 28. Frames: Rigid [B, F]; positions [B, P, 3]; masks [B, F] and [B, P]. Every position is
    expressed in every frame, predicted and true alike, and the distances between the two are averaged
    (clamped at `clamp_distance` when given, in units of `length_scale`). Returns [B]."""
    local_pred = _positions_in_frames(pred_frames, pred_positions)  # [B, F, 3, P]
    local_true = _positions_in_frames(target_frames, target_positions)
    error = paddle.sqrt(paddle.sum(paddle.square(local_pred - local_true), axis=-2) + eps)
    if clamp_distance is not None:
        error = paddle.clip(error, max=clamp_distance)
    error = error / length_scale * frames_mask.unsqueeze(-1) * positions_mask.unsqueeze(-2)
    total = paddle.sum(error, axis=[-2, -1])
    return total / (eps + paddle.sum(frames_mask, axis=-1)) / (eps + paddle.sum(positions_mask, axis=-1))


def backbone_fape(frames, gt_frames, gt_exists, use_clamped_fape, clamp_distance=10.0, loss_unit_distance=10.0):
    """Backbone FAPE of each structure layer's frames ([L, B, N, 7], Angstrom) against the ground-truth
    backbone frames (Rigid [B, N]) with CA (the frames' origins) as positions; mean over layers, [B]."""
    per_layer = []
    for layer in range(frames.shape[0]):
        pred = Rigid.from_tensor_7(frames[layer])
        args = (pred, gt_frames, gt_exists, pred.trans, gt_frames.trans, gt_exists, loss_unit_distance)
        clamped = frame_aligned_point_error(*args, clamp_distance=clamp_distance)
        unclamped = frame_aligned_point_error(*args)
        per_layer.append(clamped * use_clamped_fape + unclamped * (1.0 - use_clamped_fape))
    return paddle.mean(paddle.stack(per_layer), axis=0)


@functools.lru_cache(maxsize=None)
def _ambiguous_atom14_slots_numpy():
    return np.nonzero(rc.restype_atom14_ambiguous_atoms.any(axis=0))[0].astype(np.int64)


def _ambiguous_atom14_slots():
    return paddle.to_tensor(_ambiguous_atom14_slots_numpy())


def rename_symmetric_atoms(pred_positions, gt):
    """Algorithm 26: per residue, use the ground truth's alternative naming of symmetric atoms (e.g. OD1/OD2
    of ASP) where it is closer to the prediction, judged by distances to all non-ambiguous atoms.

    pred_positions [B, N, 14, 3]; gt: atom14_ground_truth's dict. Returns (alt_naming_is_better [B, N],
    renamed positions [B, N, 14, 3], renamed exists [B, N, 14])."""
    b, n = pred_positions.shape[0], pred_positions.shape[1]
    # Only the atom14 slots that hold an ambiguous atom in some residue type (6-9) are compared.
    slots = _ambiguous_atom14_slots()
    k = len(slots)

    def distances(positions):
        # From the ambiguous slots of every residue to every atom: [B, N, k, N, 14].
        return pairwise_distances(paddle.gather(positions, slots, axis=2).reshape([b, n * k, 3]),
                                  positions.reshape([b, n * 14, 3])).reshape([b, n, k, n, 14])

    pred_dists = distances(pred_positions)
    gt_error = paddle.abs(pred_dists - distances(gt["atom14_gt_positions"]))
    alt_error = paddle.abs(pred_dists - distances(gt["atom14_alt_gt_positions"]))
    exists, ambiguous = gt["atom14_gt_exists"], gt["atom14_atom_is_ambiguous"]
    mask = ((paddle.gather(exists * ambiguous, slots, axis=2)).reshape([b, n, k, 1, 1])
            * (exists * (1.0 - ambiguous)).reshape([b, 1, 1, n, 14]))
    per_residue = paddle.sum(mask * gt_error, axis=[2, 3, 4])
    alt_per_residue = paddle.sum(mask * alt_error, axis=[2, 3, 4])
    alt_is_better = (alt_per_residue < per_residue).astype(pred_positions.dtype)
    pick = alt_is_better.reshape([b, n, 1])
    positions = (1.0 - pick.unsqueeze(-1)) * gt["atom14_gt_positions"] + pick.unsqueeze(-1) * gt[
        "atom14_alt_gt_positions"]
    exists = (1.0 - pick) * gt["atom14_gt_exists"] + pick * gt["atom14_alt_gt_exists"]
    return alt_is_better, positions, exists


def sidechain_fape(sidechain_frames, pred_positions, gt_frames, gt_alt_frames, gt_frames_exist,
                   alt_is_better, renamed_positions, renamed_exists, clamp_distance=10.0,
                   loss_unit_distance=10.0):
    """All-atom FAPE of the final layer: all 8 group frames x all atom14 positions, against the renamed truth.
    sidechain_frames [B, N, 8, 4, 4]; gt frames Rigid [B, N, 8]. Returns [B]."""
    b = pred_positions.shape[0]
    pick = alt_is_better.reshape([b, -1, 1, 1])
    target = Rigid((1.0 - pick.unsqueeze(-1)) * gt_frames.rot + pick.unsqueeze(-1) * gt_alt_frames.rot,
                   gt_frames.trans)  # the alternative frames differ in rotation only
    pred = Rigid.from_tensor_4x4(sidechain_frames)

    def flat(rigid):
        return Rigid(rigid.rot.reshape([b, -1, 3, 3]), rigid.trans.reshape([b, -1, 3]))

    return frame_aligned_point_error(
        flat(pred), flat(target), gt_frames_exist.reshape([b, -1]),
        pred_positions.reshape([b, -1, 3]), renamed_positions.reshape([b, -1, 3]), renamed_exists.reshape([b, -1]),
        loss_unit_distance, clamp_distance=clamp_distance)


# ---------------------------------------------------------------------------------------------------------
# Torsions


def chi_and_angle_norm_losses(angles, unnormalized_angles, torsions, seq_mask):
    """Side-chain torsion loss (squared chord distance of chi1-4 to the truth or, for pi-periodic chis, its
    pi-shifted alternative, whichever is closer; mean over layers and existing chis) and the angle-norm
    loss (mean |norm - 1| of the unnormalised angles of all 7 torsions). Angles [L, B, N, 7, 2]. Scalars."""
    chi_mask = torsions["torsion_angles_mask"][..., 3:]
    pred_chi = angles[..., 3:, :]
    true_chi = torsions["torsion_angles_sin_cos"][..., 3:, :].unsqueeze(0)
    shifted_chi = torsions["alt_torsion_angles_sin_cos"][..., 3:, :].unsqueeze(0)
    error = paddle.minimum(paddle.sum(paddle.square(pred_chi - true_chi), axis=-1),
                           paddle.sum(paddle.square(pred_chi - shifted_chi), axis=-1))
    chi_loss = _masked_mean(chi_mask.unsqueeze(0), error)
    norm = paddle.sqrt(paddle.sum(paddle.square(unnormalized_angles), axis=-1) + 1e-6)
    angle_norm_loss = _masked_mean(seq_mask.reshape([1] + list(seq_mask.shape) + [1]), paddle.abs(norm - 1.0))
    return chi_loss, angle_norm_loss


# ---------------------------------------------------------------------------------------------------------
# Heads


def distogram_loss(logits, pseudo_beta, pseudo_beta_mask, first_break=2.3125, last_break=21.6875):
    """Cross-entropy of the distogram head [B, N, N, bins] against binned true CB-CB distances; [B]."""
    boundaries = np.linspace(first_break, last_break, logits.shape[-1] - 1)
    boundaries = paddle.to_tensor(np.square(boundaries).astype(np.float32)).astype(logits.dtype)
    diff = pseudo_beta.unsqueeze(-2) - pseudo_beta.unsqueeze(-3)
    dist2 = paddle.sum(diff * diff, axis=-1, keepdim=True)
    true_bins = paddle.sum((dist2 > boundaries).astype("int64"), axis=-1)
    mask = pseudo_beta_mask.astype(logits.dtype)
    square_mask = mask.unsqueeze(-1) * mask.unsqueeze(-2)
    errors = _softmax_cross_entropy(logits, true_bins)
    return paddle.sum(errors * square_mask, axis=[-2, -1]) / (1e-6 + paddle.sum(square_mask, axis=[-2, -1]))


def masked_msa_loss(logits, true_msa, bert_mask):
    """Cross-entropy of the masked MSA head [B, S, N, 23] at the masked positions; [B]."""
    errors = _softmax_cross_entropy(logits, true_msa)
    mask = bert_mask.astype(logits.dtype)
    return paddle.sum(errors * mask, axis=[-2, -1]) / (1e-8 + paddle.sum(mask, axis=[-2, -1]))


def _resolution_filter(resolution, min_resolution, max_resolution):
    resolution = resolution.reshape([-1]).astype("float32")
    return ((resolution >= min_resolution) & (resolution <= max_resolution)).astype("float32")


def plddt_loss(logits, final_atom37_positions, all_atom_positions, all_atom_mask, resolution, cutoff=15.0,
               min_resolution=0.1, max_resolution=3.0):
    """Cross-entropy of the pLDDT head [B, N, bins] against the binned per-residue lDDT-Ca of the (detached)
    final prediction; only for experimental structures within the resolution range. Returns (loss [B],
    lDDT-Ca of the prediction [B])."""
    ca = rc.atom_order["CA"]
    pred_ca = final_atom37_positions[..., ca, :].detach()
    true_ca, ca_mask = all_atom_positions[..., ca, :], all_atom_mask[..., ca].astype(logits.dtype)
    per_residue = lddt(pred_ca, true_ca, ca_mask, cutoff=cutoff, per_residue=True)
    num_bins = logits.shape[-1]
    bins = paddle.clip(paddle.floor(per_residue * num_bins), max=num_bins - 1).astype("int64")
    errors = _softmax_cross_entropy(logits, bins)
    loss = paddle.sum(errors * ca_mask, axis=-1) / (1e-8 + paddle.sum(ca_mask, axis=-1))
    whole = lddt(pred_ca, true_ca, ca_mask, cutoff=cutoff)
    return loss * _resolution_filter(resolution, min_resolution, max_resolution), whole


def experimentally_resolved_loss(logits, all_atom_mask, atom37_atom_exists, resolution, min_resolution=0.1,
                                 max_resolution=3.0):
    """Sigmoid cross-entropy of the experimentally-resolved head [B, N, 37] against the atom mask; [B]."""
    xent = F.binary_cross_entropy_with_logits(logits, all_atom_mask.astype(logits.dtype), reduction="none")
    exists = atom37_atom_exists.astype(logits.dtype)
    loss = paddle.sum(xent * exists, axis=[-2, -1]) / (1e-8 + paddle.sum(exists, axis=[-2, -1]))
    return loss * _resolution_filter(resolution, min_resolution, max_resolution)


# ---------------------------------------------------------------------------------------------------------
# Structural violations (supplement 1.9.11)


def between_residue_bond_loss(positions, atom_mask, residue_index, aatype, tolerance_factor=12.0, eps=1e-6):
    """Peptide-bond geometry between consecutive residues (no gap in residue_index): the C-N length and the
    CA-C-N and C-N-CA angles, penalised (flat-bottom) beyond `tolerance_factor` standard deviations of the
    literature values. positions [B, N, 14, 3] (atom14: N, CA, C first), atom_mask [B, N, 14].
    Returns the three masked-mean losses [B] and the per-residue violation mask [B, N]."""
    dtype = positions.dtype
    this_ca, this_c = positions[:, :-1, 1], positions[:, :-1, 2]
    next_n, next_ca = positions[:, 1:, 0], positions[:, 1:, 1]
    this_ca_mask, this_c_mask = atom_mask[:, :-1, 1], atom_mask[:, :-1, 2]
    next_n_mask, next_ca_mask = atom_mask[:, 1:, 0], atom_mask[:, 1:, 1]
    no_gap = ((residue_index[:, 1:] - residue_index[:, :-1]) == 1).astype(dtype)

    def length(v):
        return paddle.sqrt(eps + paddle.sum(v * v, axis=-1))

    next_is_proline = (aatype[:, 1:] == rc.resname_to_idx["PRO"]).astype(dtype)
    gt_length = (1 - next_is_proline) * rc.between_res_bond_length_c_n[0] + \
        next_is_proline * rc.between_res_bond_length_c_n[1]
    gt_stddev = (1 - next_is_proline) * rc.between_res_bond_length_stddev_c_n[0] + \
        next_is_proline * rc.between_res_bond_length_stddev_c_n[1]
    c_n_length = length(this_c - next_n)
    c_n_error = paddle.sqrt(eps + paddle.square(c_n_length - gt_length))
    c_n_mask = this_c_mask * next_n_mask * no_gap
    c_n_per_residue = F.relu(c_n_error - tolerance_factor * gt_stddev)
    c_n_violation = c_n_mask * (c_n_error > tolerance_factor * gt_stddev).astype(dtype)

    c_to_ca = (this_ca - this_c) / length(this_ca - this_c).unsqueeze(-1)
    c_to_n = (next_n - this_c) / c_n_length.unsqueeze(-1)
    n_to_ca = (next_ca - next_n) / length(next_ca - next_n).unsqueeze(-1)

    def angle_term(cos_angle, literature, mask):
        error = paddle.sqrt(eps + paddle.square(cos_angle - literature[0]))
        return F.relu(error - tolerance_factor * literature[1]), \
            mask * (error > tolerance_factor * literature[1]).astype(dtype)

    ca_c_n_mask = this_ca_mask * this_c_mask * next_n_mask * no_gap
    ca_c_n_per_residue, ca_c_n_violation = angle_term(
        paddle.sum(c_to_ca * c_to_n, axis=-1), rc.between_res_cos_angles_ca_c_n, ca_c_n_mask)
    c_n_ca_mask = this_c_mask * next_n_mask * next_ca_mask * no_gap
    c_n_ca_per_residue, c_n_ca_violation = angle_term(
        paddle.sum(-c_to_n * n_to_ca, axis=-1), rc.between_res_cos_angles_c_n_ca, c_n_ca_mask)

    def masked(mask, value):
        return paddle.sum(mask * value, axis=-1) / (eps + paddle.sum(mask, axis=-1))

    # A bond's violation counts for the residues on both of its sides.
    bond_violation = paddle.maximum(paddle.maximum(c_n_violation, ca_c_n_violation), c_n_ca_violation)
    zero = paddle.zeros_like(bond_violation[:, :1])
    per_residue_violation = paddle.maximum(paddle.concat([bond_violation, zero], axis=1),
                                           paddle.concat([zero, bond_violation], axis=1))
    return (masked(c_n_mask, c_n_per_residue), masked(ca_c_n_mask, ca_c_n_per_residue),
            masked(c_n_ca_mask, c_n_ca_per_residue), per_residue_violation)


def _atom14_radius(aatype):
    radius = np.zeros([21, 14], dtype=np.float32)
    for restype, name in enumerate(rc.resnames[:20]):
        for slot, atom in enumerate(rc.restype_name_to_atom14_names[name]):
            if atom:
                radius[restype, slot] = rc.van_der_waals_radius[atom[0]]
    return paddle.gather(paddle.to_tensor(radius), aatype.reshape([-1]), axis=0).reshape(list(aatype.shape) + [14])


def between_residue_clash_loss(positions, atom_mask, residue_index, aatype, overlap_tolerance=1.5, eps=1e-10):
    """Clashes between atoms of different residues: closer than the sum of their van der Waals radii minus
    `overlap_tolerance`. The peptide bond C(i)-N(i+1) and CYS-CYS disulfide SG-SG pairs are bonded and
    exempt. Returns the per-atom loss sum [B, N, 14] and the per-atom clash mask [B, N, 14]."""
    b, n = positions.shape[0], positions.shape[1]
    dtype = positions.dtype
    dists = pairwise_distances(positions.reshape([b, n * 14, 3]), eps=eps).reshape([b, n, 14, n, 14])
    mask = atom_mask.astype(dtype).reshape([b, n, 14, 1, 1]) * atom_mask.astype(dtype).reshape([b, 1, 1, n, 14])
    res_i, res_j = residue_index.reshape([b, n, 1, 1, 1]), residue_index.reshape([b, 1, 1, n, 1])
    mask = mask * (res_i < res_j).astype(dtype)  # each residue pair once
    slot_c, slot_n = 2, 0
    c_n = np.zeros([14, 14], dtype=np.float32)
    c_n[slot_c, slot_n] = 1.0
    mask = mask * (1.0 - (res_i + 1 == res_j).astype(dtype) * paddle.to_tensor(c_n).reshape([1, 1, 14, 1, 14]))
    cys = rc.resname_to_idx["CYS"]
    sg = rc.restype_name_to_atom14_names["CYS"].index("SG")
    is_cys = (aatype == cys).astype(dtype)
    sg_sg = np.zeros([14, 14], dtype=np.float32)
    sg_sg[sg, sg] = 1.0
    disulfide = (is_cys.reshape([b, n, 1, 1, 1]) * is_cys.reshape([b, 1, 1, n, 1])
                 * paddle.to_tensor(sg_sg).reshape([1, 1, 14, 1, 14]))
    mask = mask * (1.0 - disulfide)
    radius = _atom14_radius(aatype)
    lower = mask * (radius.reshape([b, n, 14, 1, 1]) + radius.reshape([b, 1, 1, n, 14]))
    error = mask * F.relu(lower - overlap_tolerance - dists)
    per_atom_loss = paddle.sum(error, axis=[3, 4]) + paddle.sum(error, axis=[1, 2])
    clash = mask * (dists < lower - overlap_tolerance).astype(dtype)
    per_atom_clash = paddle.maximum(paddle.max(clash, axis=[3, 4]), paddle.max(clash, axis=[1, 2]))
    return per_atom_loss, per_atom_clash


@functools.lru_cache(maxsize=4)
def _atom14_dists_bounds(overlap_tolerance, tolerance_factor):
    return rc.make_atom14_dists_bounds(overlap_tolerance=overlap_tolerance,
                                       bond_length_tolerance_factor=tolerance_factor)


def within_residue_violations(positions, atom_mask, aatype, overlap_tolerance=1.5, tolerance_factor=12.0,
                              eps=1e-10):
    """Intra-residue distance bounds: bonds and 1-3 (angle) distances within `tolerance_factor` standard
    deviations of the literature, other pairs at least their van der Waals distance minus the tolerance.
    Returns the per-atom loss sum and violation mask, [B, N, 14] each."""
    bounds = _atom14_dists_bounds(overlap_tolerance, tolerance_factor)
    index = aatype.reshape([-1])
    lower, upper = (paddle.gather(paddle.to_tensor(bounds[k]), index, axis=0).reshape(list(aatype.shape) + [14, 14])
                    for k in ("lower_bound", "upper_bound"))
    dtype = positions.dtype
    mask = atom_mask.astype(dtype)
    pair_mask = mask.unsqueeze(-1) * mask.unsqueeze(-2) * (1.0 - paddle.eye(14, dtype=dtype))
    diff = positions.unsqueeze(-2) - positions.unsqueeze(-3)
    dists = paddle.sqrt(eps + paddle.sum(diff * diff, axis=-1))
    error = pair_mask * (F.relu(lower - dists) + F.relu(dists - upper))
    per_atom_loss = paddle.sum(error, axis=-1) + paddle.sum(error, axis=-2)
    violation = pair_mask * ((dists < lower) | (dists > upper)).astype(dtype)
    per_atom_violation = paddle.maximum(paddle.max(violation, axis=-1), paddle.max(violation, axis=-2))
    return per_atom_loss, per_atom_violation


def structural_violations(positions, atom_mask, residue_index, aatype, tolerance_factor=12.0,
                          overlap_tolerance=1.5):
    """Violation loss [B] (AF2's structural_violation_loss) and the fraction of residues with any violation."""
    c_n, ca_c_n, c_n_ca, bond_violation = between_residue_bond_loss(
        positions, atom_mask, residue_index, aatype, tolerance_factor)
    clash_loss, clash_mask = between_residue_clash_loss(
        positions, atom_mask, residue_index, aatype, overlap_tolerance)
    within_loss, within_mask = within_residue_violations(
        positions, atom_mask, aatype, overlap_tolerance, tolerance_factor)
    num_atoms = paddle.sum(atom_mask.astype(positions.dtype), axis=[-2, -1])
    loss = c_n + ca_c_n + c_n_ca + paddle.sum(clash_loss + within_loss, axis=[-2, -1]) / (1e-6 + num_atoms)
    residue_violation = paddle.maximum(bond_violation, paddle.max(paddle.maximum(clash_mask, within_mask), -1))
    return loss, residue_violation


# ---------------------------------------------------------------------------------------------------------
# The total


def alphafold_loss(outputs, batch, loss_config=None):
    """Named losses (each a scalar, averaged over the batch) and `loss`, their weighted sum; also the
    detached lDDT-Ca of the final prediction (`lddt_ca`) for logging. loss_config: a LossConfig, a dict of
    its fields, or None for AF2's initial-training weights. See the module docstring."""
    cfg = make_loss_config(loss_config)
    aatype = batch["aatype"]
    positions37 = batch["all_atom_positions"].astype("float32")
    seq_mask = batch["seq_mask"].astype("float32")
    mask37 = batch["all_atom_mask"].astype("float32") * seq_mask.unsqueeze(-1)
    b = aatype.shape[0]

    frames_gt = geometry.atom37_to_frames(aatype, positions37, mask37)
    torsions = geometry.atom37_to_torsion_angles(aatype, positions37, mask37)
    atom14_gt = geometry.atom14_ground_truth(aatype, positions37, mask37)

    losses = {}
    if "use_clamped_fape" in batch:
        use_clamped = batch["use_clamped_fape"].astype("float32").reshape([b])
    else:
        # AF2 trains a random 10% of examples on the unclamped backbone FAPE.
        use_clamped = (paddle.rand([b]) < cfg.fape_clamped_fraction).astype("float32")
    gt_backbone_exists = frames_gt["rigidgroups_gt_exists"][..., 0]
    losses["fape_backbone"] = backbone_fape(
        outputs["frames"], frames_gt["rigidgroups_gt_frames"][..., 0], gt_backbone_exists, use_clamped,
        cfg.fape_clamp_distance, cfg.fape_loss_unit_distance).mean()

    # The prediction decides which naming of symmetric atoms the truth uses; that choice is not trained.
    alt_is_better, renamed_positions, renamed_exists = rename_symmetric_atoms(
        outputs["positions"].detach(), atom14_gt)
    losses["fape_sidechain"] = sidechain_fape(
        outputs["sidechain_frames"], outputs["positions"], frames_gt["rigidgroups_gt_frames"],
        frames_gt["rigidgroups_alt_gt_frames"], frames_gt["rigidgroups_gt_exists"], alt_is_better,
        renamed_positions, renamed_exists, cfg.sidechain_clamp_distance, cfg.sidechain_loss_unit_distance).mean()

    losses["chi"], losses["angle_norm"] = chi_and_angle_norm_losses(
        outputs["angles"], outputs["unnormalized_angles"], torsions, seq_mask)

    losses["distogram"] = distogram_loss(outputs["distogram_logits"], batch["pseudo_beta"],
                                         batch["pseudo_beta_mask"] * seq_mask, cfg.distogram_first_break,
                                         cfg.distogram_last_break).mean()
    losses["masked_msa"] = masked_msa_loss(outputs["masked_msa_logits"], batch["true_msa"],
                                           batch["bert_mask"]).mean()
    resolution = batch["resolution"]
    plddt, lddt_ca = plddt_loss(outputs["plddt_logits"], outputs["final_atom37_positions"], positions37, mask37,
                                resolution, cfg.plddt_cutoff, cfg.min_resolution, cfg.max_resolution)
    losses["plddt"] = plddt.mean()
    if cfg.experimentally_resolved_weight > 0:
        losses["experimentally_resolved"] = experimentally_resolved_loss(
            outputs["experimentally_resolved_logits"], mask37, batch["atom37_atom_exists"] * seq_mask.unsqueeze(-1),
            resolution, cfg.min_resolution, cfg.max_resolution).mean()
    if cfg.violation_weight > 0:
        violation, _ = structural_violations(
            outputs["positions"], atom14_gt["atom14_atom_exists"] * seq_mask.unsqueeze(-1), batch["residue_index"],
            aatype, cfg.violation_tolerance_factor, cfg.clash_overlap_tolerance)
        losses["violation"] = violation.mean()

    losses["loss"] = sum(getattr(cfg, f"{name}_weight") * value for name, value in losses.items())
    losses["lddt_ca"] = lddt_ca.mean().detach()
    return losses
