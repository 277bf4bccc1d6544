"""Protein geometry in AlphaFold2's conventions, on Paddle tensors.

- Rigid transforms (`Rigid`): a rotation [..., 3, 3] and a translation [..., 3]; x -> R x + t. Quaternions
  (w, x, y, z) are used where AF2 uses them: the structure module's backbone updates and its 7-number
  frame outputs (quaternion + translation).
- Residue geometry, driven by the tables of ppzoo.data.protein.residue_constants: atom37 <-> atom14,
  ground-truth frames of the 8 rigid groups from atom37 (with the alternative frames of pi-periodic chis),
  the 7 torsion angles as (sin, cos) from atom37 (pre-omega, phi, psi, chi1-4, with the alternative chis),
  and the way back: torsion angles -> the 8 group frames -> atom14 positions from the idealised ("literature")
  atom positions of each group.

Rigid groups per residue (AF2 supplement 1.8): 0 backbone, 1 pre-omega, 2 phi, 3 psi, 4-7 chi1-chi4.
Group k >= 1 is placed by its default frame relative to its parent (the backbone, or chi(k-1) for chi2-4)
composed with a rotation about the x axis by its torsion angle.
"""
import functools

import numpy as np
import paddle

from ppzoo.data.protein import residue_constants as rc

# ---------------------------------------------------------------------------------------------------------
# Quaternions (w, x, y, z)


def quat_to_rot(quat):
    """Rotation matrices [..., 3, 3] of unit quaternions [..., 4]."""
    w, x, y, z = paddle.unbind(quat, axis=-1)
    rows = [
        [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z],
    ]
    return paddle.stack([paddle.stack(row, axis=-1) for row in rows], axis=-2)


def quat_multiply(q1, q2):
    """Hamilton product q1 * q2 of quaternions [..., 4]."""
    w1, x1, y1, z1 = paddle.unbind(q1, axis=-1)
    w2, x2, y2, z2 = paddle.unbind(q2, axis=-1)
    return paddle.stack([
        w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
        w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
    ], axis=-1)


def quat_multiply_by_vec(quat, vec):
    """q * (0, v): the product of quaternions [..., 4] with pure quaternions given by vectors [..., 3]."""
    return quat_multiply(quat, paddle.concat([paddle.zeros_like(vec[..., :1]), vec], axis=-1))


def normalize(x, axis=-1, eps=1e-12):
    return x / paddle.sqrt(paddle.clip(paddle.sum(x * x, axis=axis, keepdim=True), min=eps))


# ---------------------------------------------------------------------------------------------------------
# Rigid transforms


class Rigid:
    """A batch of rigid transforms x -> rot @ x + trans; rot [..., 3, 3], trans [..., 3]."""

    def __init__(self, rot, trans):
        self.rot = rot
        self.trans = trans

    @staticmethod
    def from_tensor_7(tensor):
        """From [..., 7] = quaternion (w, x, y, z, normalised here) + translation."""
        return Rigid(quat_to_rot(normalize(tensor[..., :4])), tensor[..., 4:])

    @staticmethod
    def from_tensor_4x4(mat):
        return Rigid(mat[..., :3, :3], mat[..., :3, 3])

    def to_tensor_4x4(self):
        top = paddle.concat([self.rot, self.trans.unsqueeze(-1)], axis=-1)
        bottom = paddle.zeros_like(top[..., :1, :])
        bottom = paddle.concat([bottom[..., :3], paddle.ones_like(bottom[..., 3:])], axis=-1)
        return paddle.concat([top, bottom], axis=-2)

    @staticmethod
    def from_3_points(point_on_neg_x_axis, origin, point_on_xy_plane, eps=1e-8):
        """The frame with its origin at `origin`, its x axis pointing away from `point_on_neg_x_axis`, and
        `point_on_xy_plane` in its xy plane at positive y (Gram-Schmidt; AF2's convention)."""
        e0 = origin - point_on_neg_x_axis
        e1 = point_on_xy_plane - origin
        e0 = e0 / paddle.sqrt(paddle.sum(e0 * e0, axis=-1, keepdim=True) + eps)
        e1 = e1 - e0 * paddle.sum(e0 * e1, axis=-1, keepdim=True)
        e1 = e1 / paddle.sqrt(paddle.sum(e1 * e1, axis=-1, keepdim=True) + eps)
        e2 = paddle.cross(e0, e1, axis=-1)
        # Columns of the rotation are the frame's axes in global coordinates.
        return Rigid(paddle.stack([e0, e1, e2], axis=-1), origin)

    # apply, invert_apply and compose are sums over the three components rather than batched 3x3 matmuls:
    # Paddle runs a batch of 3x3 products one small GEMM at a time, several times slower on CPU.
    def apply(self, points):
        """Local -> global: points [..., 3] broadcast against the transforms' batch shape."""
        rot = self.rot
        return (rot[..., 0] * points[..., 0:1] + rot[..., 1] * points[..., 1:2] + rot[..., 2] * points[..., 2:3]
                + self.trans)

    def invert_apply(self, points):
        """Global -> local."""
        v = points - self.trans
        rot = self.rot
        return rot[..., 0, :] * v[..., 0:1] + rot[..., 1, :] * v[..., 1:2] + rot[..., 2, :] * v[..., 2:3]

    def invert(self):
        rot_t = self.rot.transpose(list(range(self.rot.ndim - 2)) + [self.rot.ndim - 1, self.rot.ndim - 2])
        return Rigid(rot_t, -paddle.matmul(rot_t, self.trans.unsqueeze(-1)).squeeze(-1))

    def compose(self, other):
        """self o other: apply `other` first, then `self`."""
        a, b = self.rot, other.rot
        rot = (a[..., :, 0:1] * b[..., 0:1, :] + a[..., :, 1:2] * b[..., 1:2, :] + a[..., :, 2:3] * b[..., 2:3, :])
        return Rigid(rot, self.apply(other.trans))

    def __getitem__(self, index):
        """Index the batch dimensions only: rigid[..., 0] is group 0 of every residue."""
        index = index if isinstance(index, tuple) else (index,)
        return Rigid(self.rot[index + (slice(None), slice(None))], self.trans[index + (slice(None),)])

    def unsqueeze(self, axis):
        """Insert a batch axis (axis counted among the batch dimensions, may be negative)."""
        batch_ndim = self.trans.ndim - 1
        axis = axis if axis >= 0 else batch_ndim + 1 + axis
        return Rigid(self.rot.unsqueeze(axis), self.trans.unsqueeze(axis))

    @staticmethod
    def concat(rigids, axis):
        batch_ndim = rigids[0].trans.ndim - 1
        axis = axis if axis >= 0 else batch_ndim + axis
        return Rigid(paddle.concat([r.rot for r in rigids], axis=axis),
                     paddle.concat([r.trans for r in rigids], axis=axis))


def rot_x(sin, cos):
    """Rotations [..., 3, 3] about the x axis by the angles given as sin, cos [...]."""
    zeros, ones = paddle.zeros_like(sin), paddle.ones_like(sin)
    return paddle.stack([
        paddle.stack([ones, zeros, zeros], axis=-1),
        paddle.stack([zeros, cos, -sin], axis=-1),
        paddle.stack([zeros, sin, cos], axis=-1),
    ], axis=-2)


# ---------------------------------------------------------------------------------------------------------
# Residue geometry tables derived from residue_constants (numpy, built once)


@functools.lru_cache(maxsize=None)
def _tables():
    order = rc.atom_order
    # Three atoms defining each rigid group's frame: (point on -x axis, origin, point in the xy plane).
    base_atoms = np.zeros([21, 8, 3], dtype=np.int64)
    group_exists = np.zeros([21, 8], dtype=np.float32)
    base_atoms[:, 0] = [order["C"], order["CA"], order["N"]]
    base_atoms[:, 3] = [order["CA"], order["C"], order["O"]]
    group_exists[:, 0] = group_exists[:, 3] = 1.0
    chi_atoms = np.zeros([21, 4, 4], dtype=np.int64)
    chi_mask = np.zeros([21, 4], dtype=np.float32)
    # A pi-periodic chi's frame has an equally valid alternative rotated by pi about its x axis.
    group_is_ambiguous = np.zeros([21, 8], dtype=np.float32)
    ambiguity_rot = np.tile(np.eye(3, dtype=np.float32), [21, 8, 1, 1])
    for restype, resname in enumerate(rc.resnames[:20]):
        for k, quad in enumerate(rc.chi_angles_atoms[resname]):
            base_atoms[restype, 4 + k] = [order[a] for a in quad[1:]]
            group_exists[restype, 4 + k] = 1.0
            chi_atoms[restype, k] = [order[a] for a in quad]
            chi_mask[restype, k] = 1.0
        if resname in rc.residue_atom_renaming_swaps:
            last_chi_group = 3 + len(rc.chi_angles_atoms[resname])
            group_is_ambiguous[restype, last_chi_group] = 1.0
            ambiguity_rot[restype, last_chi_group, 1, 1] = ambiguity_rot[restype, last_chi_group, 2, 2] = -1.0
    return {
        "rigidgroup_base_atoms": base_atoms,
        "rigidgroup_exists": group_exists,
        "rigidgroup_is_ambiguous": group_is_ambiguous,
        "rigidgroup_ambiguity_rot": ambiguity_rot,
        "chi_atoms": chi_atoms,
        "chi_mask": chi_mask,
        "chi_pi_periodic": np.asarray(rc.chi_pi_periodic, dtype=np.float32),
        "default_frames": rc.restype_rigid_group_default_frame.astype(np.float32),
        "atom14_to_group": rc.restype_atom14_to_rigid_group,
        "atom14_group_positions": rc.restype_atom14_rigid_group_positions.astype(np.float32),
        "atom14_to_atom37": rc.restype_atom14_to_atom37,
        "atom37_to_atom14": rc.restype_atom37_to_atom14,
        "atom14_mask": rc.restype_atom14_mask.astype(np.float32),
        "atom37_mask": rc.restype_atom37_mask.astype(np.float32),
        "atom14_is_ambiguous": rc.restype_atom14_ambiguous_atoms.astype(np.float32),
        "atom14_swap_index": rc.restype_atom14_ambiguous_atoms_swap_idx,
    }


def restype_table(name, aatype):
    """Row `aatype` of a per-residue-type table: [*aatype.shape, *table.shape[1:]]."""
    table = _tables()[name]
    flat = paddle.gather(paddle.to_tensor(table), aatype.reshape([-1]).astype("int64"), axis=0)
    return flat.reshape(list(aatype.shape) + list(table.shape[1:]))


def gather_atoms(values, index):
    """values [*, A, *tail], index [*, K] -> [*, K, *tail]: pick atoms (e.g. atom37 slots) per residue."""
    axis = index.ndim - 1
    tail = list(values.shape[axis + 1:])
    index = index.reshape(list(index.shape) + [1] * len(tail)).expand(list(index.shape) + tail)
    return paddle.take_along_axis(values, index, axis=axis, broadcast=False)


def atom37_to_atom14(values, aatype):
    """Per-atom values [*, 37, ...] -> [*, 14, ...] in each residue's atom14 layout (absent slots zero)."""
    out = gather_atoms(values, restype_table("atom14_to_atom37", aatype))
    mask = restype_table("atom14_mask", aatype).astype(values.dtype)
    return out * mask.reshape(list(mask.shape) + [1] * (values.ndim - mask.ndim))


def atom14_to_atom37(positions, aatype):
    """atom14 positions [*, 14, 3] -> (atom37 positions [*, 37, 3], atom37 mask [*, 37])."""
    mask = restype_table("atom37_mask", aatype).astype(positions.dtype)
    return gather_atoms(positions, restype_table("atom37_to_atom14", aatype)) * mask.unsqueeze(-1), mask


def atom14_ground_truth(aatype, all_atom_positions, all_atom_mask):
    """Ground-truth atom14 positions and masks, with the alternative naming of symmetric atoms (AF2's
    make_atom14_positions): atom14_gt_positions/exists, atom14_alt_gt_positions/exists, atom14_atom_is_ambiguous."""
    gt_exists = atom37_to_atom14(all_atom_mask, aatype)
    gt_positions = atom37_to_atom14(all_atom_positions, aatype) * gt_exists.unsqueeze(-1)
    swap = restype_table("atom14_swap_index", aatype)
    return {
        "atom14_gt_positions": gt_positions,
        "atom14_gt_exists": gt_exists,
        "atom14_alt_gt_positions": gather_atoms(gt_positions, swap),
        "atom14_alt_gt_exists": gather_atoms(gt_exists, swap),
        "atom14_atom_is_ambiguous": restype_table("atom14_is_ambiguous", aatype),
        "atom14_atom_exists": restype_table("atom14_mask", aatype),
    }


def atom37_to_frames(aatype, all_atom_positions, all_atom_mask, eps=1e-8):
    """Ground-truth frames of the 8 rigid groups from atom37 positions [*, 37, 3] and mask [*, 37].

    Returns rigidgroups_gt_frames and rigidgroups_alt_gt_frames (Rigid [*, 8]), rigidgroups_gt_exists (the
    group exists for this residue type and its three base atoms were resolved), rigidgroups_group_exists and
    rigidgroups_group_is_ambiguous ([*, 8]).
    """
    base_index = restype_table("rigidgroup_base_atoms", aatype)  # [*, 8, 3]
    shape = list(base_index.shape)
    flat_index = base_index.reshape(shape[:-2] + [24])
    base_pos = gather_atoms(all_atom_positions, flat_index).reshape(shape + [3])
    base_mask = gather_atoms(all_atom_mask, flat_index).reshape(shape)
    frames = Rigid.from_3_points(base_pos[..., 0, :], base_pos[..., 1, :], base_pos[..., 2, :], eps=eps)
    # The backbone frame built from (C, CA, N) has x pointing from C to CA; rotating it by pi about y makes
    # x point from CA to C with N in the xy plane, the backbone frame of the paper (Algorithm 21).
    flip = np.tile(np.eye(3, dtype=np.float32), [8, 1, 1])
    flip[0, 0, 0] = flip[0, 2, 2] = -1.0
    flip = paddle.to_tensor(flip)
    frames = Rigid(paddle.matmul(frames.rot, flip), frames.trans)
    group_exists = restype_table("rigidgroup_exists", aatype)
    gt_exists = paddle.min(base_mask, axis=-1) * group_exists
    ambiguity_rot = restype_table("rigidgroup_ambiguity_rot", aatype)
    return {
        "rigidgroups_gt_frames": frames,
        "rigidgroups_alt_gt_frames": Rigid(paddle.matmul(frames.rot, ambiguity_rot), frames.trans),
        "rigidgroups_gt_exists": gt_exists,
        "rigidgroups_group_exists": group_exists,
        "rigidgroups_group_is_ambiguous": restype_table("rigidgroup_is_ambiguous", aatype),
    }


def atom37_to_torsion_angles(aatype, all_atom_positions, all_atom_mask, eps=1e-8):
    """The 7 torsion angles of each residue as (sin, cos), from atom37 positions [B, N, 37, 3] (residues along
    axis -3; the first residue has no predecessor, so its pre-omega and phi are masked).

    Torsion atoms: pre-omega CA(i-1) C(i-1) N CA, phi C(i-1) N CA C, psi N CA C O, chi1-4 per residue type.
    Each angle is that of a frame with origin at the third atom, x from the second to the third atom and the
    first atom in the xy plane, and measured to the fourth atom about x. psi through O is psi through N(i+1)
    plus pi, so it is shifted by pi. Returns torsion_angles_sin_cos and alt_torsion_angles_sin_cos
    ([B, N, 7, 2]: pi-periodic chis shifted by pi) and torsion_angles_mask [B, N, 7].
    """
    o = rc.atom_order
    pos, mask = all_atom_positions, all_atom_mask.astype(all_atom_positions.dtype)
    prev_pos = paddle.concat([paddle.zeros_like(pos[..., :1, :, :]), pos[..., :-1, :, :]], axis=-3)
    prev_mask = paddle.concat([paddle.zeros_like(mask[..., :1, :]), mask[..., :-1, :]], axis=-2)

    def atoms(p, names):
        return paddle.stack([p[..., o[n], :] for n in names], axis=-2)

    def atoms_mask(m, names):
        return paddle.prod(paddle.stack([m[..., o[n]] for n in names], axis=-1), axis=-1)

    pre_omega = paddle.concat([atoms(prev_pos, ["CA", "C"]), atoms(pos, ["N", "CA"])], axis=-2)
    phi = paddle.concat([atoms(prev_pos, ["C"]), atoms(pos, ["N", "CA", "C"])], axis=-2)
    psi = atoms(pos, ["N", "CA", "C", "O"])
    pre_omega_mask = atoms_mask(prev_mask, ["CA", "C"]) * atoms_mask(mask, ["N", "CA"])
    phi_mask = atoms_mask(prev_mask, ["C"]) * atoms_mask(mask, ["N", "CA", "C"])
    psi_mask = atoms_mask(mask, ["N", "CA", "C", "O"])

    chi_index = restype_table("chi_atoms", aatype)  # [B, N, 4, 4]
    shape = list(chi_index.shape)
    flat = chi_index.reshape(shape[:-2] + [16])
    chi_pos = gather_atoms(pos, flat).reshape(shape + [3])
    chi_mask = restype_table("chi_mask", aatype) * paddle.prod(gather_atoms(mask, flat).reshape(shape), axis=-1)

    torsion_pos = paddle.concat([pre_omega.unsqueeze(-3), phi.unsqueeze(-3), psi.unsqueeze(-3), chi_pos], -3)
    torsion_mask = paddle.concat([pre_omega_mask.unsqueeze(-1), phi_mask.unsqueeze(-1), psi_mask.unsqueeze(-1),
                                  chi_mask], axis=-1)
    frames = Rigid.from_3_points(torsion_pos[..., 1, :], torsion_pos[..., 2, :], torsion_pos[..., 0, :], eps=eps)
    fourth = frames.invert_apply(torsion_pos[..., 3, :])
    sin_cos = paddle.stack([fourth[..., 2], fourth[..., 1]], axis=-1)
    sin_cos = sin_cos / paddle.sqrt(paddle.sum(sin_cos * sin_cos, axis=-1, keepdim=True) + eps)
    psi_shift = paddle.to_tensor(np.array([1, 1, -1, 1, 1, 1, 1], dtype=np.float32)).astype(sin_cos.dtype)
    sin_cos = sin_cos * psi_shift.unsqueeze(-1)
    periodic = restype_table("chi_pi_periodic", aatype).astype(sin_cos.dtype)
    alt_sign = paddle.concat([paddle.ones_like(periodic[..., :3]), 1.0 - 2.0 * periodic], axis=-1)
    return {
        "torsion_angles_sin_cos": sin_cos,
        "alt_torsion_angles_sin_cos": sin_cos * alt_sign.unsqueeze(-1),
        "torsion_angles_mask": torsion_mask,
    }


def torsion_angles_to_frames(aatype, backbone, angles_sin_cos):
    """Algorithm 24: the 8 rigid-group frames [*, 8] in global coordinates from each residue's backbone frame
    (Rigid [*], Angstrom) and its 7 torsion angles as (sin, cos) [*, 7, 2]."""
    default = Rigid.from_tensor_4x4(restype_table("default_frames", aatype).astype(angles_sin_cos.dtype))
    # The backbone group is not rotated: angle 0.
    backbone_angle = paddle.concat([paddle.zeros_like(angles_sin_cos[..., :1, :1]),
                                    paddle.ones_like(angles_sin_cos[..., :1, :1])], axis=-1)
    sin_cos = paddle.concat([backbone_angle, angles_sin_cos], axis=-2)  # [*, 8, 2]
    rotation = rot_x(sin_cos[..., 0], sin_cos[..., 1])
    to_parent = default.compose(Rigid(rotation, paddle.zeros_like(default.trans)))
    # chi2-chi4 hang on the previous chi group; everything else hangs on the backbone.
    to_backbone = [to_parent[..., g] for g in range(5)]
    for g in range(5, 8):
        to_backbone.append(to_backbone[g - 1].compose(to_parent[..., g]))
    to_backbone = Rigid.concat([r.unsqueeze(-1) for r in to_backbone], axis=-1)
    return backbone.unsqueeze(-1).compose(to_backbone)


def frames_to_atom14_positions(aatype, group_frames):
    """atom14 positions [*, 14, 3] from the 8 group frames (Rigid [*, 8]) and the idealised positions of each
    atom in its group's frame; absent atoms are zero."""
    group = restype_table("atom14_to_group", aatype)  # [*, 14]
    atom_frames = Rigid(gather_atoms(group_frames.rot, group), gather_atoms(group_frames.trans, group))
    local = restype_table("atom14_group_positions", aatype).astype(group_frames.trans.dtype)
    mask = restype_table("atom14_mask", aatype).astype(local.dtype)
    return atom_frames.apply(local) * mask.unsqueeze(-1)
