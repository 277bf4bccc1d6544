"""HelixFold's geometry, structure module, lDDT and losses, checked against independent references: algebraic
identities of rigid transforms, real PDB structures rebuilt from their frames and torsions, dihedrals computed
by Biopython, plain NumPy re-implementations of FAPE, lDDT and the head losses, and physical facts (a native
structure has no violations)."""
import math
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppzoo.data.protein import residue_constants as rc
from ppzoo.errors import ConfigError
from ppzoo.models.helixfold import geometry, losses
from ppzoo.models.helixfold.geometry import Rigid
from ppzoo.models.helixfold.lddt import lddt, lddt_ca
from ppzoo.models.helixfold.structure_module import (InvariantPointAttention, StructureModule,
                                                     StructureModuleConfig)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTEINS = REPO_ROOT.parent / "shared" / "data" / "proteins"
UBIQUITIN = PROTEINS / "pdb" / "pdb1ubi.pdb"
needs_structures = pytest.mark.skipif(
    not UBIQUITIN.exists(), reason="../shared/data/proteins (real PDB structures) is absent beside the checkout")

BACKBONE = [rc.atom_order[a] for a in ("N", "CA", "C", "O")]


def tensor(x, dtype=None):
    return paddle.to_tensor(np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype))


def random_quaternions(rng, shape):
    q = rng.normal(size=list(shape) + [4])
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


def random_rigids(rng, shape, scale=5.0):
    quat = tensor(random_quaternions(rng, shape), "float32")
    trans = tensor(rng.normal(size=list(shape) + [3]) * scale, "float32")
    return Rigid(geometry.quat_to_rot(quat), trans)


def ubiquitin(num_residues=None):
    from ppzoo.data.protein.structure import read_chain

    protein = read_chain(UBIQUITIN)
    if num_residues is not None:
        protein = protein.subset(slice(0, num_residues))
    return protein


def protein_tensors(protein):
    """aatype [1, N], atom37 positions [1, N, 37, 3] and mask [1, N, 37] (atoms of the residue type only)."""
    mask = protein.atom_mask * rc.restype_atom37_mask[protein.aatype]
    return tensor(protein.aatype[None]), tensor(protein.atom_positions[None], "float32"), tensor(mask[None], "float32")


# ---------------------------------------------------------------------------------------------------------
# Rigid transforms


def test_quaternion_rotations_are_orthonormal_and_compose_like_matrices():
    rng = np.random.default_rng(0)
    q1, q2 = (tensor(random_quaternions(rng, [64]), "float32") for _ in range(2))
    r1, r2 = geometry.quat_to_rot(q1).numpy(), geometry.quat_to_rot(q2).numpy()
    np.testing.assert_allclose(r1 @ r1.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r1.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(r1), 1.0, atol=1e-5)
    # The Hamilton product composes rotations: R(q1 q2) = R(q1) R(q2).
    np.testing.assert_allclose(geometry.quat_to_rot(geometry.quat_multiply(q1, q2)).numpy(), r1 @ r2, atol=1e-5)
    # q * (0, v) equals the product with the pure quaternion.
    v = tensor(rng.normal(size=[64, 3]), "float32")
    pure = paddle.concat([paddle.zeros([64, 1]), v], axis=-1)
    np.testing.assert_allclose(geometry.quat_multiply_by_vec(q1, v).numpy(),
                               geometry.quat_multiply(q1, pure).numpy(), atol=1e-6)


def test_rigid_compose_invert_and_apply_agree_with_4x4_matrices():
    rng = np.random.default_rng(1)
    a, b = random_rigids(rng, [5, 7]), random_rigids(rng, [5, 7])
    x = tensor(rng.normal(size=[5, 7, 3]) * 10, "float32")
    ma, mb = a.to_tensor_4x4().numpy(), b.to_tensor_4x4().numpy()
    np.testing.assert_allclose(a.compose(b).to_tensor_4x4().numpy(), ma @ mb, atol=1e-4)
    np.testing.assert_allclose(a.invert().to_tensor_4x4().numpy(), np.linalg.inv(ma), atol=1e-4)
    homogeneous = np.concatenate([x.numpy(), np.ones([5, 7, 1])], axis=-1)[..., None]
    np.testing.assert_allclose(a.apply(x).numpy(), (ma @ homogeneous)[..., :3, 0], atol=1e-4)
    np.testing.assert_allclose(a.invert_apply(a.apply(x)).numpy(), x.numpy(), atol=1e-4)
    identity = a.compose(a.invert()).to_tensor_4x4().numpy()
    np.testing.assert_allclose(identity, np.broadcast_to(np.eye(4), identity.shape), atol=1e-5)
    np.testing.assert_allclose(Rigid.from_tensor_4x4(tensor(ma)).apply(x).numpy(), a.apply(x).numpy(), atol=1e-5)


def test_frame_from_three_points_puts_them_on_its_axes():
    rng = np.random.default_rng(2)
    p0, origin, p2 = (tensor(rng.normal(size=[10, 3]) * 3, "float32") for _ in range(3))
    frame = Rigid.from_3_points(p0, origin, p2)
    np.testing.assert_allclose(frame.invert_apply(origin).numpy(), 0.0, atol=1e-5)
    local0, local2 = frame.invert_apply(p0).numpy(), frame.invert_apply(p2).numpy()
    np.testing.assert_allclose(local0[:, 1:], 0.0, atol=1e-4)  # on the negative x axis
    assert (local0[:, 0] < 0).all()
    np.testing.assert_allclose(local2[:, 2], 0.0, atol=1e-4)  # in the xy plane, positive y
    assert (local2[:, 1] > 0).all()
    rot = frame.rot.numpy()
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Residue geometry on real and idealised structures


@needs_structures
def test_real_structure_is_rebuilt_from_its_backbone_frames_and_torsions():
    aatype, pos, mask = protein_tensors(ubiquitin())
    frames = geometry.atom37_to_frames(aatype, pos, mask)
    torsions = geometry.atom37_to_torsion_angles(aatype, pos, mask)
    backbone = frames["rigidgroups_gt_frames"][..., 0]
    rebuilt = geometry.frames_to_atom14_positions(
        aatype, geometry.torsion_angles_to_frames(aatype, backbone, torsions["torsion_angles_sin_cos"]))
    truth = geometry.atom14_ground_truth(aatype, pos, mask)
    exists = truth["atom14_gt_exists"].numpy()[0]
    sq_error = np.sum((rebuilt.numpy()[0] - truth["atom14_gt_positions"].numpy()[0]) ** 2, axis=-1)
    rmsd_all = math.sqrt((sq_error * exists).sum() / exists.sum())
    rmsd_backbone = math.sqrt((sq_error[:, :4] * exists[:, :4]).sum() / exists[:, :4].sum())
    # Only the idealised bond lengths and angles of AF2's rigid groups differ from the crystal structure.
    assert rmsd_backbone < 0.05, rmsd_backbone
    assert rmsd_all < 0.25, rmsd_all
    # atom14 -> atom37 puts every resolved atom back in its slot.
    atom37, atom37_mask = geometry.atom14_to_atom37(truth["atom14_gt_positions"], aatype)
    np.testing.assert_allclose((atom37 * mask.unsqueeze(-1)).numpy(), (pos * mask.unsqueeze(-1)).numpy(), atol=1e-6)
    assert float((mask * (1 - atom37_mask)).sum()) == 0  # no resolved atom outside the residue's atom set


@needs_structures
def test_torsion_angles_match_biopython_dihedrals():
    from Bio.PDB import PDBParser
    from Bio.PDB.vectors import calc_dihedral

    protein = ubiquitin()
    aatype, pos, mask = protein_tensors(protein)
    torsions = geometry.atom37_to_torsion_angles(aatype, pos, mask)
    angles = np.arctan2(*np.moveaxis(torsions["torsion_angles_sin_cos"].numpy()[0], -1, 0))
    torsion_mask = torsions["torsion_angles_mask"].numpy()[0]
    chain = next(PDBParser(QUIET=True).get_structure("ubq", str(UBIQUITIN))[0].get_chains())
    residues = [r for r in chain if r.id[0] == " "]
    assert len(residues) == len(protein)

    def dihedral(atoms):
        return calc_dihedral(*[a.get_vector() for a in atoms])

    def angle_difference(a, b):
        return abs((a - b + math.pi) % (2 * math.pi) - math.pi)

    checked = 0
    for i in range(1, len(residues) - 1):
        prev, res, nxt = residues[i - 1], residues[i], residues[i + 1]
        assert torsion_mask[i, :3].all()
        assert angle_difference(angles[i, 0], dihedral([prev["CA"], prev["C"], res["N"], res["CA"]])) < 1e-3
        assert angle_difference(angles[i, 1], dihedral([prev["C"], res["N"], res["CA"], res["C"]])) < 1e-3
        # AF2's psi goes through O, shifted by pi; the peptide plane puts it near the psi through N(i+1).
        assert angle_difference(angles[i, 2], dihedral([res["N"], res["CA"], res["C"], res["O"]]) + math.pi) < 1e-3
        assert angle_difference(angles[i, 2], dihedral([res["N"], res["CA"], res["C"], nxt["N"]])) < math.radians(15)
        chis = rc.chi_angles_atoms[res.get_resname()]
        for k, quad in enumerate(chis):
            assert torsion_mask[i, 3 + k] == 1
            assert angle_difference(angles[i, 3 + k], dihedral([res[a] for a in quad])) < 1e-3
            checked += 1
        assert not torsion_mask[i, 3 + len(chis):].any()
    assert checked > 80
    assert torsion_mask[0, :2].sum() == 0  # the first residue has no pre-omega and phi


def idealised_structure(rng, aatype):
    """atom14/atom37 of residues built from random backbone frames and random torsions."""
    n = aatype.shape[1]
    backbone = random_rigids(rng, [1, n], scale=8.0)
    angles = rng.uniform(-math.pi, math.pi, size=[1, n, 7])
    sin_cos = tensor(np.stack([np.sin(angles), np.cos(angles)], axis=-1), "float32")
    atom14 = geometry.frames_to_atom14_positions(aatype, geometry.torsion_angles_to_frames(aatype, backbone, sin_cos))
    atom37, atom37_mask = geometry.atom14_to_atom37(atom14, aatype)
    return backbone, sin_cos, atom14, atom37, atom37_mask


def test_idealised_structure_round_trips_exactly():
    rng = np.random.default_rng(3)
    aatype = tensor(np.arange(20)[None])  # every residue type once
    backbone, sin_cos, atom14, atom37, atom37_mask = idealised_structure(rng, aatype)
    frames = geometry.atom37_to_frames(aatype, atom37, atom37_mask)
    torsions = geometry.atom37_to_torsion_angles(aatype, atom37, atom37_mask)
    np.testing.assert_allclose(frames["rigidgroups_gt_frames"][..., 0].to_tensor_4x4().numpy(),
                               backbone.to_tensor_4x4().numpy(), atol=1e-4)
    # psi and chi1-4 come back as they went in (pre-omega and phi depend on the randomly placed neighbour).
    chi_mask = torsions["torsion_angles_mask"].numpy()[..., 3:]
    recovered = torsions["torsion_angles_sin_cos"].numpy()
    np.testing.assert_allclose(recovered[..., 2, :], sin_cos.numpy()[..., 2, :], atol=1e-4)
    np.testing.assert_allclose(recovered[..., 3:, :] * chi_mask[..., None],
                               sin_cos.numpy()[..., 3:, :] * chi_mask[..., None], atol=1e-4)
    np.testing.assert_array_equal(chi_mask[0], np.asarray(rc.chi_angles_mask))
    # The group frames built from atoms equal the frames the torsions built, where the group exists.
    built = geometry.torsion_angles_to_frames(aatype, backbone, sin_cos).to_tensor_4x4().numpy()
    exists = frames["rigidgroups_gt_exists"].numpy()[..., None, None]
    np.testing.assert_allclose(frames["rigidgroups_gt_frames"].to_tensor_4x4().numpy() * exists, built * exists,
                               atol=1e-4)
    # Rebuilding from the recovered torsions gives the same atoms.
    rebuilt = geometry.frames_to_atom14_positions(
        aatype, geometry.torsion_angles_to_frames(aatype, backbone, torsions["torsion_angles_sin_cos"]))
    np.testing.assert_allclose(rebuilt.numpy(), atom14.numpy(), atol=1e-3)
    # Pi-periodic chis (ASP, GLU, PHE, TYR): the alternative torsions and frames place the swapped atoms.
    truth = geometry.atom14_ground_truth(aatype, atom37, atom37_mask)
    alt_frames = geometry.torsion_angles_to_frames(aatype, backbone, torsions["alt_torsion_angles_sin_cos"])
    alt_atoms = geometry.frames_to_atom14_positions(aatype, alt_frames).numpy()
    np.testing.assert_allclose(alt_atoms, truth["atom14_alt_gt_positions"].numpy(), atol=0.05)
    ambiguous = frames["rigidgroups_group_is_ambiguous"].numpy()[..., None, None]
    np.testing.assert_allclose(frames["rigidgroups_alt_gt_frames"].to_tensor_4x4().numpy() * ambiguous,
                               alt_frames.to_tensor_4x4().numpy() * ambiguous, atol=1e-4)
    assert ambiguous.sum() == 4


# ---------------------------------------------------------------------------------------------------------
# Structure module


def tiny_config(**overrides):
    values = dict(c_s=16, c_z=8, c_ipa=8, num_heads_ipa=2, num_qk_points=3, num_v_points=4, num_layers=3,
                  c_resnet=16, dropout=0.0)
    values.update(overrides)
    return StructureModuleConfig(**values)


def test_invariant_point_attention_is_invariant_to_a_global_rigid_motion():
    paddle.seed(0)
    rng = np.random.default_rng(4)
    cfg = tiny_config()
    ipa = InvariantPointAttention(cfg)
    # The output layer starts at zero (AF2's init); give it weights so the test sees every term.
    ipa.output.weight.set_value(paddle.randn(ipa.output.weight.shape) * 0.1)
    b, n = 2, 9
    single, pair = paddle.randn([b, n, cfg.c_s]), paddle.randn([b, n, n, cfg.c_z])
    mask = tensor((rng.uniform(size=[b, n]) > 0.2).astype("float32"))
    # Frames in the structure module's internal unit (10 A): neighbours within a few units of each other.
    frames = random_rigids(rng, [b, n], scale=1.0)
    motion = random_rigids(rng, [b, 1], scale=30.0)
    out = ipa(single, pair, frames, mask)
    moved = ipa(single, pair, motion.compose(frames), mask)
    np.testing.assert_allclose(moved.numpy(), out.numpy(), atol=2e-4, rtol=1e-3)
    # ...but not to moving one residue alone.
    turn = Rigid(random_rigids(rng, [b, 1]).rot, paddle.zeros([b, 1, 3]))
    one = Rigid.concat([frames[:, :1].compose(turn), frames[:, 1:]], axis=1)  # residue 0 turns in place
    assert np.abs(ipa(single, pair, one, mask).numpy() - out.numpy()).max() > 1e-2


def test_structure_module_outputs_are_consistent_and_share_weights_over_layers():
    paddle.seed(1)
    aatype = tensor(np.random.default_rng(5).integers(0, 20, size=[2, 11]))
    cfg = tiny_config()
    module = StructureModule(cfg)
    n_params = sum(int(np.prod(p.shape)) for p in module.parameters())
    assert n_params == sum(int(np.prod(p.shape)) for p in StructureModule(tiny_config(num_layers=8)).parameters())
    out = module(paddle.randn([2, 11, cfg.c_s]), paddle.randn([2, 11, 11, cfg.c_z]), aatype, paddle.ones([2, 11]))
    assert out["frames"].shape == [3, 2, 11, 7]
    assert out["angles"].shape == out["unnormalized_angles"].shape == [3, 2, 11, 7, 2]
    assert out["sidechain_frames"].shape == [2, 11, 8, 4, 4]
    assert out["positions"].shape == [2, 11, 14, 3]
    assert out["final_atom37_positions"].shape == [2, 11, 37, 3] and out["single"].shape == [2, 11, cfg.c_s]
    np.testing.assert_allclose(np.linalg.norm(out["angles"].numpy(), axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["frames"].numpy()[..., :4], axis=-1), 1.0, atol=1e-5)
    # The atoms are those of the final frames and torsions.
    final = geometry.torsion_angles_to_frames(aatype, Rigid.from_tensor_7(out["frames"][-1]), out["angles"][-1])
    np.testing.assert_allclose(out["sidechain_frames"].numpy(), final.to_tensor_4x4().numpy(), atol=1e-5)
    np.testing.assert_allclose(out["positions"].numpy(), geometry.frames_to_atom14_positions(aatype, final).numpy(),
                               atol=1e-5)
    # CA sits at the backbone frame's origin; N-CA has its literature length (the frames are rigid).
    ca = out["positions"].numpy()[..., 1, :]
    np.testing.assert_allclose(ca, out["frames"].numpy()[-1, ..., 4:], atol=1e-5)
    literature_n = rc.restype_atom14_rigid_group_positions[aatype.numpy(), 0]
    np.testing.assert_allclose(np.linalg.norm(out["positions"].numpy()[..., 0, :] - ca, axis=-1),
                               np.linalg.norm(literature_n, axis=-1), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(literature_n, axis=-1), 1.458, atol=0.01)
    np.testing.assert_allclose(out["final_atom37_mask"].numpy(), rc.restype_atom37_mask[aatype.numpy()])
    with pytest.raises(ValueError, match="num_angles"):
        tiny_config(num_angles=5)


# ---------------------------------------------------------------------------------------------------------
# FAPE


def fape_numpy(pred_rot, pred_trans, true_rot, true_trans, frames_mask, pred_pos, true_pos, pos_mask,
               length_scale, clamp, eps=1e-4):
    """Algorithm 28, one loop per frame."""
    out = []
    for b in range(pred_rot.shape[0]):
        total = 0.0
        for f in range(pred_rot.shape[1]):
            local_pred = (pred_pos[b] - pred_trans[b, f]) @ pred_rot[b, f]  # R^T (x - t), row vectors
            local_true = (true_pos[b] - true_trans[b, f]) @ true_rot[b, f]
            d = np.sqrt(np.sum((local_pred - local_true) ** 2, axis=-1) + eps)
            if clamp is not None:
                d = np.minimum(d, clamp)
            total += frames_mask[b, f] * np.sum(d * pos_mask[b]) / length_scale
        out.append(total / (eps + frames_mask[b].sum()) / (eps + pos_mask[b].sum()))
    return np.array(out)


def test_fape_matches_numpy_reference_is_zero_for_identical_and_invariant_to_rotation():
    rng = np.random.default_rng(6)
    b, f, p = 2, 12, 30
    pred, true = random_rigids(rng, [b, f], 10.0), random_rigids(rng, [b, f], 10.0)
    pred_pos = tensor(rng.normal(size=[b, p, 3]) * 10, "float32")
    true_pos = tensor(rng.normal(size=[b, p, 3]) * 10, "float32")
    frames_mask = tensor((rng.uniform(size=[b, f]) > 0.2).astype("float32"))
    pos_mask = tensor((rng.uniform(size=[b, p]) > 0.2).astype("float32"))
    for clamp in (None, 10.0):
        got = losses.frame_aligned_point_error(pred, true, frames_mask, pred_pos, true_pos, pos_mask, 10.0,
                                               clamp_distance=clamp).numpy()
        want = fape_numpy(pred.rot.numpy(), pred.trans.numpy(), true.rot.numpy(), true.trans.numpy(),
                          frames_mask.numpy(), pred_pos.numpy(), true_pos.numpy(), pos_mask.numpy(), 10.0, clamp)
        np.testing.assert_allclose(got, want, rtol=1e-4)
    # Identical structures: zero (up to the sqrt's epsilon).
    same = losses.frame_aligned_point_error(true, true, frames_mask, true_pos, true_pos, pos_mask, 10.0, 10.0)
    assert float(same.max()) < 2e-3
    # A global rigid motion of the prediction does not change FAPE.
    motion = random_rigids(rng, [b, 1], 50.0)
    moved = losses.frame_aligned_point_error(motion.compose(pred), true, frames_mask,
                                             motion.apply(pred_pos), true_pos, pos_mask, 10.0, 10.0)
    base = losses.frame_aligned_point_error(pred, true, frames_mask, pred_pos, true_pos, pos_mask, 10.0, 10.0)
    np.testing.assert_allclose(moved.numpy(), base.numpy(), rtol=1e-4)
    # A reflection (chirality) is not a rigid motion: FAPE sees it, unlike an RMSD after superposition.
    mirror = losses.frame_aligned_point_error(true, true, frames_mask, -true_pos, true_pos, pos_mask, 10.0, 10.0)
    assert float(mirror.min()) > 0.1


@needs_structures
def test_backbone_and_sidechain_fape_vanish_for_the_native_structure():
    protein = ubiquitin(30)
    aatype, pos, mask = protein_tensors(protein)
    frames = geometry.atom37_to_frames(aatype, pos, mask)
    torsions = geometry.atom37_to_torsion_angles(aatype, pos, mask)
    truth = geometry.atom14_ground_truth(aatype, pos, mask)
    gt = frames["rigidgroups_gt_frames"]
    # Two structure-module layers that both output the native backbone, as quaternion + translation.
    native = paddle.concat([_rot_to_quat(gt.rot[..., 0, :, :]), gt.trans[..., 0, :]], axis=-1)
    backbone = losses.backbone_fape(paddle.stack([native, native]), gt[..., 0],
                                    frames["rigidgroups_gt_exists"][..., 0], paddle.ones([1]))
    assert backbone.item() < 1.5e-3  # sqrt(eps) / 10 A: FAPE's floor
    # All-atom FAPE of the native frames and atoms against themselves.
    exists = frames["rigidgroups_gt_exists"]
    alt, renamed, renamed_exists = losses.rename_symmetric_atoms(truth["atom14_gt_positions"], truth)
    sidechain = losses.sidechain_fape(gt.to_tensor_4x4(), truth["atom14_gt_positions"], gt,
                                      frames["rigidgroups_alt_gt_frames"], exists, alt, renamed, renamed_exists)
    assert sidechain.item() < 1.5e-3 and float(alt.sum()) == 0


def test_sidechain_fape_forgives_the_other_naming_of_symmetric_atoms():
    rng = np.random.default_rng(11)
    aatype = tensor(np.arange(20)[None])
    backbone, sin_cos, atom14, atom37, atom37_mask = idealised_structure(rng, aatype)
    frames = geometry.atom37_to_frames(aatype, atom37, atom37_mask)
    truth = geometry.atom14_ground_truth(aatype, atom37, atom37_mask)
    # The prediction turns the pi-periodic chis (ASP, GLU, PHE, TYR) by pi: the same atoms, named the other way.
    alt_sin_cos = geometry.atom37_to_torsion_angles(aatype, atom37, atom37_mask)["alt_torsion_angles_sin_cos"]
    pred_frames = geometry.torsion_angles_to_frames(aatype, backbone, alt_sin_cos)
    pred_atoms = geometry.frames_to_atom14_positions(aatype, pred_frames)

    def fape(alt, renamed, renamed_exists):
        return losses.sidechain_fape(pred_frames.to_tensor_4x4(), pred_atoms, frames["rigidgroups_gt_frames"],
                                     frames["rigidgroups_alt_gt_frames"], frames["rigidgroups_gt_exists"], alt,
                                     renamed, renamed_exists).item()

    alt, renamed, renamed_exists = losses.rename_symmetric_atoms(pred_atoms, truth)
    assert alt.numpy()[0].nonzero()[0].tolist() == [rc.restype_order[r] for r in "DEFY"]
    assert fape(alt, renamed, renamed_exists) < 5e-3  # only the idealised OD1/OD2 asymmetry (< 0.05 A)
    no_renaming = fape(paddle.zeros_like(alt), truth["atom14_gt_positions"], truth["atom14_gt_exists"])
    assert no_renaming > 0.02


def _rot_to_quat(rot):
    """Unit quaternion of rotation matrices (NumPy, Shepperd's method via the largest diagonal term)."""
    r = rot.numpy().reshape([-1, 3, 3])
    out = []
    for m in r:
        k = np.array([
            [m[0, 0] + m[1, 1] + m[2, 2], m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1]],
            [m[2, 1] - m[1, 2], m[0, 0] - m[1, 1] - m[2, 2], m[0, 1] + m[1, 0], m[0, 2] + m[2, 0]],
            [m[0, 2] - m[2, 0], m[0, 1] + m[1, 0], m[1, 1] - m[0, 0] - m[2, 2], m[1, 2] + m[2, 1]],
            [m[1, 0] - m[0, 1], m[0, 2] + m[2, 0], m[1, 2] + m[2, 1], m[2, 2] - m[0, 0] - m[1, 1]],
        ]) / 3.0
        values, vectors = np.linalg.eigh(k)
        out.append(vectors[:, np.argmax(values)])
    return tensor(np.array(out).reshape(list(rot.shape[:-2]) + [4]), "float32")


# ---------------------------------------------------------------------------------------------------------
# lDDT


def lddt_numpy(pred, true, mask, cutoff=15.0):
    """Per-residue and global lDDT by explicit loops over residue pairs."""
    n = len(true)
    per_residue, total_scored, total_score = [], 0, 0.0
    for i in range(n):
        scored, score = 0, 0.0
        for j in range(n):
            if i == j or not (mask[i] and mask[j]):
                continue
            d_true = np.linalg.norm(true[i] - true[j])
            if d_true >= cutoff:
                continue
            diff = abs(d_true - np.linalg.norm(pred[i] - pred[j]))
            scored += 1
            score += np.mean([diff < t for t in (0.5, 1.0, 2.0, 4.0)])
        per_residue.append(score / scored if scored else 1.0)
        total_scored += scored
        total_score += score
    return np.array(per_residue), total_score / total_scored


@needs_structures
def test_lddt_ca_is_one_for_identical_structures_and_matches_numpy_reference():
    _, pos, mask = protein_tensors(ubiquitin())
    assert np.allclose(lddt_ca(pos, pos, mask).numpy(), 1.0)
    rng = np.random.default_rng(7)
    ca = pos.numpy()[0, :, 1]
    noisy = ca + rng.normal(size=ca.shape) * 1.5
    ca_mask = (rng.uniform(size=len(ca)) > 0.1).astype("float32")
    want_per_residue, want = lddt_numpy(noisy, ca, ca_mask)
    got = lddt(tensor(noisy[None], "float32"), tensor(ca[None]), tensor(ca_mask[None])).numpy()[0]
    got_per_residue = lddt(tensor(noisy[None], "float32"), tensor(ca[None]), tensor(ca_mask[None]),
                           per_residue=True).numpy()[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_per_residue * ca_mask, want_per_residue * ca_mask, atol=1e-5)
    assert 0.2 < want < 0.9
    # A rigid motion keeps lDDT at 1: it needs no superposition.
    motion = random_rigids(rng, [1, 1], 20.0)
    assert np.allclose(lddt_ca(motion.unsqueeze(-1).apply(pos), pos, mask).numpy(), 1.0)


# ---------------------------------------------------------------------------------------------------------
# Violations, renaming, torsion losses, heads, total


@needs_structures
def test_violation_loss_is_zero_on_a_native_structure_and_positive_when_broken():
    aatype, pos, mask = protein_tensors(ubiquitin())
    truth = geometry.atom14_ground_truth(aatype, pos, mask)
    residue_index = tensor(ubiquitin().residue_index[None])
    atoms, exists = truth["atom14_gt_positions"], truth["atom14_gt_exists"]
    loss, violated = losses.structural_violations(atoms, exists, residue_index, aatype)
    assert loss.item() < 1e-3, loss.item()
    assert float(violated.sum()) == 0
    # Pull residue 40 1.5 A away from its neighbours: the peptide bonds on both sides break.
    shift = np.zeros(atoms.shape, dtype="float32")
    shift[0, 40] = [1.5, 0.0, 0.0]
    loss, violated = losses.structural_violations(atoms + tensor(shift), exists, residue_index, aatype)
    assert loss.item() > 0.02
    c_n_loss = losses.between_residue_bond_loss(atoms + tensor(shift), exists, residue_index, aatype)[0]
    moved = atoms.numpy()[0] + shift[0]
    lengths = np.linalg.norm(moved[1:, 0] - moved[:-1, 2], axis=-1)  # C(i) - N(i+1); ubiquitin has no gap
    literature = np.where(aatype.numpy()[0, 1:] == rc.resname_to_idx["PRO"], 1.341, 1.329)
    stddev = np.where(aatype.numpy()[0, 1:] == rc.resname_to_idx["PRO"], 0.016, 0.014)
    want = np.maximum(np.abs(lengths - literature) - 12 * stddev, 0).mean()
    np.testing.assert_allclose(c_n_loss.item(), want, rtol=1e-3)
    assert want > 0.01
    assert violated.numpy()[0, [39, 40, 41]].all() and violated.numpy()[0].sum() <= 6
    # Superimposing two residues is a clash.
    clash = atoms.numpy().copy()
    clash[0, 60] = clash[0, 20]
    loss, violated = losses.structural_violations(tensor(clash), exists, residue_index, aatype)
    assert violated.numpy()[0, 20] == 1 and violated.numpy()[0, 60] == 1


def test_symmetric_atom_renaming_picks_the_naming_closer_to_the_prediction():
    rng = np.random.default_rng(8)
    aatype = tensor(np.array([[3, 6, 13, 18, 0, 1]]))  # ASP GLU PHE TYR ALA ARG
    _, _, atom14, atom37, atom37_mask = idealised_structure(rng, aatype)
    truth = geometry.atom14_ground_truth(aatype, atom37, atom37_mask)
    # The prediction names the symmetric atoms of residues 0 and 2 the other way round.
    swapped = truth["atom14_alt_gt_positions"].numpy()
    prediction = atom14.numpy().copy()
    prediction[0, [0, 2]] = swapped[0, [0, 2]]
    alt, renamed, _ = losses.rename_symmetric_atoms(tensor(prediction), truth)
    np.testing.assert_array_equal(alt.numpy()[0], [1, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(renamed.numpy(), prediction, atol=1e-5)


def test_chi_loss_accepts_the_truth_and_its_pi_rotation_for_periodic_chis():
    rng = np.random.default_rng(9)
    aatype = tensor(np.array([[3, 6, 13, 18, 1, 10]]))
    _, _, _, atom37, atom37_mask = idealised_structure(rng, aatype)
    torsions = geometry.atom37_to_torsion_angles(aatype, atom37, atom37_mask)
    seq_mask = paddle.ones([1, 6])
    truth = torsions["torsion_angles_sin_cos"].unsqueeze(0)
    angles = rng.uniform(-math.pi, math.pi, size=[2, 1, 6, 7])
    unit = tensor(np.stack([np.sin(angles), np.cos(angles)], axis=-1), "float32")
    chi, norm = losses.chi_and_angle_norm_losses(truth, unit * 3.0, torsions, seq_mask)
    assert float(chi) < 1e-8 and abs(float(norm) - 2.0) < 1e-5  # |norm(3 * unit) - 1| = 2
    alternative = torsions["alt_torsion_angles_sin_cos"].unsqueeze(0)
    chi, _ = losses.chi_and_angle_norm_losses(alternative, alternative, torsions, seq_mask)
    assert float(chi) < 1e-8
    # A pi rotation of a chi that is not periodic (ARG chi1) costs |2 sin, 2 cos|^2 = 4 for that chi.
    flipped = truth.numpy().copy()
    flipped[0, 0, 4, 3] *= -1
    chi, _ = losses.chi_and_angle_norm_losses(tensor(flipped), tensor(flipped), torsions, seq_mask)
    num_chis = float(torsions["torsion_angles_mask"][..., 3:].sum())
    np.testing.assert_allclose(float(chi), 4.0 / num_chis, rtol=1e-4)


def log_softmax_numpy(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_head_losses_match_numpy_references():
    rng = np.random.default_rng(10)
    b, n, s = 2, 7, 3
    # Distogram: 64 bins with edges from 2.3125 to 21.6875 A.
    logits = rng.normal(size=[b, n, n, 64]).astype("float32")
    beta = (rng.normal(size=[b, n, 3]) * 8).astype("float32")
    beta_mask = (rng.uniform(size=[b, n]) > 0.2).astype("float32")
    edges = np.linspace(2.3125, 21.6875, 63)
    dist = np.linalg.norm(beta[:, :, None] - beta[:, None], axis=-1)
    bins = np.searchsorted(edges, dist, side="left")
    nll = -np.take_along_axis(log_softmax_numpy(logits), bins[..., None], -1)[..., 0]
    pair = beta_mask[:, :, None] * beta_mask[:, None]
    want = (nll * pair).sum((1, 2)) / (1e-6 + pair.sum((1, 2)))
    got = losses.distogram_loss(tensor(logits), tensor(beta), tensor(beta_mask)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # Masked MSA.
    logits = rng.normal(size=[b, s, n, 23]).astype("float32")
    true_msa = rng.integers(0, 22, size=[b, s, n])
    bert = (rng.uniform(size=[b, s, n]) < 0.3).astype("float32")
    nll = -np.take_along_axis(log_softmax_numpy(logits), true_msa[..., None], -1)[..., 0]
    want = (nll * bert).sum((1, 2)) / (1e-8 + bert.sum((1, 2)))
    np.testing.assert_allclose(losses.masked_msa_loss(tensor(logits), tensor(true_msa), tensor(bert)).numpy(),
                               want, rtol=1e-4)
    # pLDDT: the per-residue lDDT-Ca binned into 50 bins; structures outside 0.1-3 A resolution skipped.
    true = (rng.normal(size=[b, n, 37, 3]) * 5).astype("float32")
    pred = true + rng.normal(size=true.shape).astype("float32")
    atom_mask = np.ones([b, n, 37], dtype="float32")
    logits = rng.normal(size=[b, n, 50]).astype("float32")
    got, whole = losses.plddt_loss(tensor(logits), tensor(pred), tensor(true), tensor(atom_mask),
                                   tensor(np.array([1.5, 4.0], dtype="float32")))
    per_residue, overall = lddt_numpy(pred[0, :, 1], true[0, :, 1], np.ones(n))
    bins = np.minimum(np.floor(per_residue * 50), 49).astype(int)
    want = -np.take_along_axis(log_softmax_numpy(logits[0]), bins[:, None], -1).mean()
    np.testing.assert_allclose(got.numpy(), [want, 0.0], rtol=1e-4)
    np.testing.assert_allclose(whole.numpy()[0], overall, rtol=1e-5)
    # Experimentally resolved: sigmoid cross-entropy over the residue type's atoms.
    logits = rng.normal(size=[b, n, 37]).astype("float32")
    resolved = (rng.uniform(size=[b, n, 37]) > 0.3).astype("float32")
    exists = (rng.uniform(size=[b, n, 37]) > 0.5).astype("float32")
    xent = np.maximum(logits, 0) - logits * resolved + np.log1p(np.exp(-np.abs(logits)))
    want = (xent * exists).sum((1, 2)) / (1e-8 + exists.sum((1, 2)))
    got = losses.experimentally_resolved_loss(tensor(logits), tensor(resolved), tensor(exists),
                                              tensor(np.array([2.0, 2.5], dtype="float32")))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)


def loss_batch_and_outputs(protein, module, seed=0):
    """A batch in the data contract for `protein` and the structure module's outputs plus random logits."""
    from ppzoo.data.protein.structure import pseudo_beta

    rng = np.random.default_rng(seed)
    n = len(protein)
    aatype, pos, mask = protein_tensors(protein)
    beta, beta_mask = pseudo_beta(protein.aatype, protein.atom_positions, protein.atom_mask)
    batch = {
        "aatype": aatype, "seq_mask": paddle.ones([1, n]), "all_atom_positions": pos, "all_atom_mask": mask,
        "pseudo_beta": tensor(beta[None]), "pseudo_beta_mask": tensor(beta_mask[None]),
        "true_msa": tensor(rng.integers(0, 21, size=[1, 4, n])),
        "bert_mask": tensor((rng.uniform(size=[1, 4, n]) < 0.15).astype("float32")),
        "resolution": tensor(np.array([1.8], dtype="float32")), "residue_index": tensor(protein.residue_index[None]),
        "atom37_atom_exists": tensor(rc.restype_atom37_mask[protein.aatype][None]),
        "atom14_atom_exists": tensor(rc.restype_atom14_mask[protein.aatype][None]),
        "residx_atom14_to_atom37": tensor(rc.restype_atom14_to_atom37[protein.aatype][None]),
    }
    cfg = module.config
    return batch, {"single": paddle.randn([1, n, cfg.c_s]), "pair": paddle.randn([1, n, n, cfg.c_z]),
                   "distogram_logits": paddle.randn([1, n, n, 64]), "masked_msa_logits": paddle.randn([1, 4, n, 23]),
                   "plddt_logits": paddle.randn([1, n, 50]),
                   "experimentally_resolved_logits": paddle.randn([1, n, 37])}


@needs_structures
def test_alphafold_loss_weights_the_named_losses_per_preset():
    paddle.seed(2)
    protein = ubiquitin(20)
    module = StructureModule(tiny_config())
    batch, inputs = loss_batch_and_outputs(protein, module)
    outputs = dict(module(inputs["single"], inputs["pair"], batch["aatype"], batch["seq_mask"]), **inputs)
    batch["use_clamped_fape"] = paddle.ones([1])
    initial = losses.alphafold_loss(outputs, batch)
    assert "violation" not in initial and "experimentally_resolved" not in initial
    cfg = losses.LossConfig()
    total = sum(getattr(cfg, f"{k}_weight") * float(v) for k, v in initial.items() if k not in ("loss", "lddt_ca"))
    np.testing.assert_allclose(float(initial["loss"]), total, rtol=1e-5)
    fine = losses.alphafold_loss(outputs, batch, losses.LossConfig(preset="finetuning"))
    assert fine["violation"] > 0 and fine["experimentally_resolved"] > 0
    np.testing.assert_allclose(float(fine["loss"]), total + 0.01 * float(fine["experimentally_resolved"])
                               + float(fine["violation"]), rtol=1e-5)
    assert losses.LossConfig(preset="finetuning", violation_weight=0.5).violation_weight == 0.5
    # Gradients reach the structure module through the losses.
    fine["loss"].backward()
    assert float(module.backbone_update.linear.weight.grad.abs().sum()) > 0
    assert float(module.angle_resnet.output.weight.grad.abs().sum()) > 0
    # The unclamped backbone FAPE is at least the clamped one.
    batch["use_clamped_fape"] = paddle.zeros([1])
    assert float(losses.alphafold_loss(outputs, batch)["fape_backbone"]) >= float(initial["fape_backbone"])
    with pytest.raises(ConfigError, match="fape_weight"):
        losses.alphafold_loss(outputs, batch, {"fape_weight": 1.0})
    with pytest.raises(ValueError, match="preset"):
        losses.LossConfig(preset="model_9")


@needs_structures
def test_structure_module_learns_a_real_backbone():
    """Trained on one real fragment from fixed random single/pair features, FAPE falls and lDDT-Ca rises."""
    paddle.seed(3)
    protein = ubiquitin(16)
    module = StructureModule(tiny_config(num_layers=2))
    batch, inputs = loss_batch_and_outputs(protein, module)
    batch["use_clamped_fape"] = paddle.ones([1])
    optimizer = paddle.optimizer.Adam(learning_rate=1e-2, parameters=module.parameters())
    history = []
    for _ in range(40):
        outputs = dict(module(inputs["single"], inputs["pair"], batch["aatype"], batch["seq_mask"]), **inputs)
        result = losses.alphafold_loss(outputs, batch)
        structure_loss = result["fape_backbone"] + result["fape_sidechain"] + 0.5 * result["chi"]
        structure_loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        history.append((float(result["fape_backbone"]), float(result["lddt_ca"])))
    # Measured: FAPE 0.74 -> 0.54, lDDT-Ca 0.04 -> 0.54 (the identity frames start as a collapsed point).
    assert history[-1][0] < 0.8 * history[0][0], history[::10]
    assert history[0][1] < 0.1 and history[-1][1] > 0.4, history[::10]
