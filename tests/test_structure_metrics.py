"""Structure metrics (ppzoo.eval.structure), the PDB writer and `tools/eval.py --task structure`.

Independent references: tmtools (TM-align's C++ code) for TM-score, both on a fixed residue correspondence
(native against a perturbed copy) and on TM-align's own structural alignment of two different chains; the
HelixFold model's Paddle lDDT and a brute-force loop for lDDT-Ca; exact constructions for Kabsch and GDT (a
known rigid motion; a chain whose part was moved 20 A away).
"""
from pathlib import Path

import numpy as np
import pytest

from conftest import last_json_line, run_tool
from ppzoo.data.protein import residue_constants as rc
from ppzoo.data.protein.pdb_writer import to_pdb, with_residue_b_factors, write_pdb
from ppzoo.data.protein.structure import read_chain
from ppzoo.eval.structure import (apply_transform, correspond, gdt, kabsch, lddt_ca, score_files, score_proteins,
                                  superposed_rmsd, tm_d0, tm_score)
from ppzoo.eval.structure.scores import GDT_HA_CUTOFFS

tmtools = pytest.importorskip("tmtools", reason="tmtools (TM-align) is a test dependency: requirements-dev.txt")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "proteins"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/proteins is absent (shared test data)")
CA = rc.atom_order["CA"]
SINGLE_CHAINS = ["3ejfA.pdb.gz", "3fhkA.pdb.gz", "3l4rA.pdb.gz", "3lqcA.pdb.gz"]


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def ca_of(protein):
    has = protein.atom_mask[:, CA] > 0
    return protein.atom_positions[has, CA].astype(np.float64), "".join(np.array(list(protein.sequence))[has])


def perturbed(x, rng, noise=1.5, hinge=0.6):
    """x with Gaussian noise, its second half rotated about the middle residue (a domain motion), moved."""
    y = x + rng.normal(scale=noise, size=x.shape)
    h = len(y) // 2
    c, s = np.cos(hinge), np.sin(hinge)
    y[h:] = (y[h:] - y[h]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T + y[h]
    return y @ random_rotation(rng).T + rng.normal(scale=10, size=3)


# ---------------------------------------------------------------------------------------------------------------
# Superposition
# ---------------------------------------------------------------------------------------------------------------
def test_kabsch_recovers_a_rigid_motion_and_never_reflects():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) * 10
    rotation, translation = random_rotation(rng), rng.normal(size=3) * 5
    r, t = kabsch(x, x @ rotation.T + translation)
    np.testing.assert_allclose(r, rotation, atol=1e-10)
    np.testing.assert_allclose(t, translation, atol=1e-9)
    assert superposed_rmsd(x, x @ rotation.T + translation) < 1e-9
    mirrored = x * np.array([1.0, 1.0, -1.0])  # no rotation maps a chiral set onto its mirror image
    r, _ = kabsch(x, mirrored)
    assert np.linalg.det(r) == pytest.approx(1.0)
    assert superposed_rmsd(x, mirrored) > 1.0
    # batched weights: each row equals its own unbatched superposition
    weights = (rng.random((5, 40)) < 0.5).astype(float) + 1e-3
    rb, tb = kabsch(x, mirrored, weights)
    for k in range(5):
        r1, t1 = kabsch(x, mirrored, weights[k])
        np.testing.assert_allclose(rb[k], r1, atol=1e-10)
        np.testing.assert_allclose(apply_transform(x, rb[k], tb[k]), apply_transform(x, r1, t1), atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# TM-score against TM-align
# ---------------------------------------------------------------------------------------------------------------
def test_tm_d0_follows_the_published_formula():
    assert tm_d0(100) == pytest.approx(1.24 * 85 ** (1 / 3) - 1.8)
    assert tm_d0(15) == tm_d0(21) == 0.5  # short chains use the floor


@needs_shared
@pytest.mark.parametrize("name", ["3ejfA.pdb.gz", "3lqcA.pdb.gz", "../casp14/T1026.pdb"])
def test_tm_score_matches_tmalign_on_a_perturbed_native(name):
    x, seq = ca_of(read_chain(SHARED / "pdb" / name))
    y = perturbed(x, np.random.default_rng(len(x)))
    ours, rotation, translation = tm_score(y, x)
    reference = tmtools.tm_align(y, x, seq, seq, alignment=[seq, seq])  # TM-align -I: this correspondence
    assert ours == pytest.approx(reference.tm_norm_chain2, abs=1e-4)
    assert 0.3 < ours < 0.95  # a real search problem: neither identical nor unrelated
    # the returned superposition attains the score
    d = np.linalg.norm(apply_transform(y, rotation, translation) - x, axis=-1)
    assert np.mean(1 / (1 + (d / tm_d0(len(x))) ** 2)) == pytest.approx(ours)
    assert tm_score(x, x)[0] == pytest.approx(1.0)


@needs_shared
@pytest.mark.parametrize("pair", [(0, 1), (0, 2), (2, 3)])
def test_tm_score_matches_tmalign_on_its_alignment_of_different_chains(pair):
    a, b = (read_chain(SHARED / "pdb" / SINGLE_CHAINS[i]) for i in pair)
    (xa, sa), (xb, sb) = ca_of(a), ca_of(b)
    reference = tmtools.tm_align(xa, xb, sa, sb)
    ia, ib, i, j = [], [], 0, 0
    for ca, cb in zip(reference.seqxA, reference.seqyA):
        if ca != "-" and cb != "-":
            ia.append(i)
            ib.append(j)
        i, j = i + (ca != "-"), j + (cb != "-")
    ours, _, _ = tm_score(xa[ia], xb[ib], n_native=len(xb))
    assert ours == pytest.approx(reference.tm_norm_chain2, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# GDT and lDDT
# ---------------------------------------------------------------------------------------------------------------
@needs_shared
def test_gdt_on_a_chain_with_a_part_moved_away():
    x, _ = ca_of(read_chain(SHARED / "pdb" / "3l4rA.pdb.gz"))
    k = int(0.6 * len(x))
    y = x.copy()
    y[k:] += np.array([20.0, 0.0, 0.0])  # 40% of the chain, rigidly 20 A off: beyond every cutoff
    rng = np.random.default_rng(1)
    y = y @ random_rotation(rng).T + 7.0
    ts, fractions = gdt(y, x)
    assert ts == pytest.approx(k / len(x))
    assert all(f == pytest.approx(k / len(x)) for f in fractions.values())
    assert gdt(x, x)[0] == gdt(x, x, GDT_HA_CUTOFFS)[0] == 1.0
    # with noise: the search does at least as well as the plain least-squares superposition, per cutoff
    noisy = x + rng.normal(scale=1.5, size=x.shape)
    r, t = kabsch(noisy, x)
    d = np.linalg.norm(apply_transform(noisy, r, t) - x, axis=-1)
    ts, fractions = gdt(noisy, x)
    ha, _ = gdt(noisy, x, GDT_HA_CUTOFFS)
    for cutoff, fraction in fractions.items():
        assert fraction >= np.mean(d <= cutoff) - 1e-12
    assert ha < ts < 1.0


def lddt_brute_force(pred, native, pred_present):
    preserved = scored = 0.0
    for i in range(len(native)):
        for j in range(len(native)):
            d = np.linalg.norm(native[i] - native[j])
            if i == j or d >= 15.0:
                continue
            scored += 1
            if pred_present[i] and pred_present[j]:
                error = abs(d - np.linalg.norm(pred[i] - pred[j]))
                preserved += sum(error < t for t in (0.5, 1, 2, 4)) / 4
    return preserved / scored


@needs_shared
def test_lddt_ca_against_brute_force_and_the_models_paddle_lddt():
    import paddle

    from ppzoo.models.helixfold.lddt import lddt as paddle_lddt

    x, _ = ca_of(read_chain(SHARED / "pdb" / "pdb1ubi.pdb"))
    rng = np.random.default_rng(2)
    y = x + rng.normal(scale=1.0, size=x.shape)
    present = np.ones(len(x))
    present[[3, 40, 41]] = 0  # residues the prediction lacks
    assert lddt_ca(y, x, present) == pytest.approx(lddt_brute_force(y, x, present), abs=1e-12)
    moved = y @ random_rotation(rng).T + 3.0
    assert lddt_ca(moved, x) == pytest.approx(lddt_ca(y, x), abs=1e-9)  # superposition-free
    to = lambda a: paddle.to_tensor(a[None].astype(np.float32))  # noqa: E731
    reference = paddle_lddt(to(y), to(x), paddle.ones([1, len(x)]), per_residue=True).numpy()[0]
    np.testing.assert_allclose(lddt_ca(y, x, per_residue=True), reference, atol=1e-5)
    assert lddt_ca(x, x) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Files: correspondence, the PDB writer, the command line
# ---------------------------------------------------------------------------------------------------------------
@needs_shared
def test_renumbered_prediction_against_a_native_with_missing_residues():
    native = read_chain(SHARED / "pdb" / "3fhkA.pdb.gz")
    rng = np.random.default_rng(3)
    pred = native.subset(np.arange(len(native)))
    pred.atom_positions = (native.atom_positions + rng.normal(scale=1.0, size=(len(native), 1, 3))).astype(np.float32)
    pred.residue_index = np.arange(1, len(native) + 1)  # the prediction numbers from 1
    keep = np.ones(len(native), bool)
    keep[[10, 11, 12, 80, 81]] = False
    gapped = native.subset(keep)  # the native lacks five residues
    pred_idx, native_idx, method = correspond(pred, gapped)
    assert method == "sequence"
    np.testing.assert_array_equal(pred_idx, np.flatnonzero(keep))
    np.testing.assert_array_equal(native_idx, np.arange(keep.sum()))
    result = score_proteins(pred, gapped)
    direct, _, _ = tm_score(pred.atom_positions[keep, CA], gapped.atom_positions[:, CA])
    assert result["tm_score"] == pytest.approx(direct)
    assert result["aligned_residues"] == result["native_residues"] == keep.sum()
    # by numbering, when the numbers agree
    assert correspond(native, gapped)[2] == "numbering"


@needs_shared
def test_pdb_writer_round_trip_with_plddt_b_factors(tmp_path):
    protein = read_chain(SHARED / "pdb" / "3fhkA.pdb.gz")  # numbering starts at -2
    plddt = np.linspace(20, 95, len(protein))
    path = write_pdb(with_residue_b_factors(protein, plddt), tmp_path / "pred.pdb")
    back = read_chain(path)
    np.testing.assert_array_equal(back.aatype, protein.aatype)
    np.testing.assert_array_equal(back.residue_index, protein.residue_index)
    np.testing.assert_array_equal(back.atom_mask, protein.atom_mask)
    np.testing.assert_allclose(back.atom_positions, protein.atom_positions, atol=6e-4)
    np.testing.assert_allclose(back.b_factors[:, CA], plddt, atol=6e-3)
    lines = [line for line in to_pdb(protein).splitlines() if line.startswith("ATOM")]
    assert all(len(line) == 80 for line in lines) and lines[1][12:16] == " CA " and lines[1][76:78] == " C"


@needs_shared
def test_eval_tool_scores_structure_files(tmp_path):
    native_path = SHARED / "casp14" / "T1026.pdb"
    native = read_chain(native_path)
    x, seq = ca_of(native)
    pred = native.subset(np.arange(len(native)))
    moved = perturbed(x, np.random.default_rng(4), noise=1.0)
    pred.atom_positions = pred.atom_positions.copy()
    pred.atom_positions[:, CA] = moved  # every residue of this native has a CA
    pred.atom_mask = np.zeros_like(pred.atom_mask)
    pred.atom_mask[:, CA] = 1.0  # a CA-only model
    write_pdb(pred, tmp_path / "pred.pdb")
    result = score_files(tmp_path / "pred.pdb", native_path)
    reference = tmtools.tm_align(moved, x, seq, seq, alignment=[seq, seq])
    assert result["tm_score"] == pytest.approx(reference.tm_norm_chain2, abs=1e-4)
    assert result["rmsd"] == pytest.approx(superposed_rmsd(moved, x), rel=1e-4)  # PDB keeps 3 decimals
    done = run_tool("eval", ["--task", "structure", "--pred", tmp_path / "pred.pdb", "--native", native_path],
                    timeout=120)
    assert done.returncode == 0, done.stderr
    printed = last_json_line(done.stdout)
    for key in ("tm_score", "gdt_ts", "gdt_ha", "lddt_ca", "rmsd"):
        assert printed[key] == pytest.approx(result[key])
    assert "| TM-score |" in done.stdout
    wrong = run_tool("eval", ["--task", "structure", "--pred", tmp_path / "pred.pdb", "--native", native_path,
                              "--chain", "Z"], timeout=120)
    assert wrong.returncode == 2 and "its protein chains are A" in wrong.stderr
    missing = run_tool("eval", ["--task", "loss"], timeout=120)
    assert missing.returncode == 2 and "needs -c CONFIG and --ckpt" in missing.stderr
