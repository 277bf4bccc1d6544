"""Protein data: residue constants, PDB/mmCIF parsing, AF2 features, MSA processing, cropping, the dataset.

Independent references: literature stereochemistry (bond lengths and angles) against the idealised rigid
groups; the raw fixed-column text of PDB files against the parsed arrays; Biopython's mmCIF writer for a
round trip; brute-force loops for cluster assignment; known facts of the shared proteins.
"""
import gzip
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from ppzoo.data.protein import collate, residue_constants as rc
from ppzoo.data.protein.dataset import ProteinStructures, ProteinStructuresConfig
from ppzoo.data.protein.msa_search import find_jackhmmer, msa_raw_features, parse_a3m, parse_stockholm
from ppzoo.data.protein.pipeline import FeatureConfig, make_example, mask_msa, nearest_clusters, summarize_clusters
from ppzoo.data.protein.raw_features import (align_structure_to_sequence, features_from_protein, load_features_npz,
                                             load_trusted_feature_pickle, load_user_input, msa_features,
                                             save_features_npz, single_sequence_features)
from ppzoo.data.protein.structure import read_chain, read_chains
from ppzoo.errors import DataError
from ppzoo.registry import DATASETS

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "proteins"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/proteins is absent (shared test data)")
T1026_PKL = SHARED / "casp14" / "T1026.features.pkl"
UBIQUITIN = "MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDGRTLSDYNIQKESTLHLVLRLRGG"
CRAMBIN = "TTCCPSIVARSNFNVCRLPGTPEALCATYTGCIIIPGATCPGDYAN"  # 1EJG SEQRES (Pro22 / Leu25 variant)


def pdb_atom_records(text):
    """Fixed-column ATOM records: [(resnum, resname, atom, altloc, occupancy, xyz)] (the PDB format spec)."""
    records = []
    for line in text.splitlines():
        if line.startswith("ATOM"):
            xyz = np.array([float(line[30:38]), float(line[38:46]), float(line[46:54])], dtype=np.float32)
            records.append((int(line[22:26]), line[17:20], line[12:16].strip(), line[16], float(line[54:60]), xyz))
    return records


# ---------------------------------------------------------------------------------------------------------------
# Residue constants
# ---------------------------------------------------------------------------------------------------------------
def test_vocabularies():
    assert "".join(rc.restypes) == "ARNDCQEGHILKMFPSTWYV" and rc.restype_num == 20 and rc.unk_restype_index == 20
    # restypes is the alphabetical order of the three-letter names
    assert [rc.restype_1to3[r] for r in rc.restypes] == sorted(rc.restype_3to1)
    assert rc.atom_type_num == 37 and rc.atom_types[:5] == ["N", "CA", "C", "CB", "O"] and rc.atom_types[-1] == "OXT"
    assert all(rc.atom_order[a] == i for i, a in enumerate(rc.atom_types))
    # HHblits letters map to the same residue in our order
    for letter in rc.restypes + ["X", "-"]:
        assert rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE[rc.HHBLITS_AA_TO_ID[letter]] == rc.restypes_with_x_and_gap.index(letter)


def test_atom14_atom37_tables():
    heavy_atoms = {"ALA": 5, "GLY": 4, "TRP": 14, "ARG": 11, "TYR": 12, "PRO": 7}
    for name, count in heavy_atoms.items():
        restype = rc.resname_to_idx[name]
        assert rc.restype_atom14_mask[restype].sum() == count == rc.restype_atom37_mask[restype].sum()
    assert rc.restype_atom14_mask[20].sum() == 0 and rc.restype_atom37_mask[20].sum() == 0
    for restype in range(20):
        slots = np.flatnonzero(rc.restype_atom14_mask[restype])
        atom37 = rc.restype_atom14_to_atom37[restype, slots]
        np.testing.assert_array_equal(rc.restype_atom37_to_atom14[restype, atom37], slots)
        assert set(atom37) == set(np.flatnonzero(rc.restype_atom37_mask[restype]))
        # the rigid-group table lists exactly the residue's heavy atoms
        name = rc.resnames[restype]
        assert {a for a, _, _ in rc.rigid_group_atom_positions[name]} == set(rc.residue_atoms[name])
    assert rc.restype_atom14_bond_lower_bound.shape == (21, 14, 14)


def _global_positions(restype):
    """Every atom of a residue in the backbone frame, composing the default frames (all torsions zero)."""
    frames = rc.restype_rigid_group_default_frame[restype].astype(np.float64)
    to_backbone = [np.eye(4)] * 8
    for group in range(1, 8):
        parent = 0 if group <= 4 else group - 1
        to_backbone[group] = to_backbone[parent] @ frames[group]
    out = {}
    for atom, group, pos in rc.rigid_group_atom_positions[rc.resnames[restype]]:
        out[atom] = (to_backbone[group] @ np.array([*pos, 1.0]))[:3]
    return out


def test_rigid_groups_reproduce_literature_geometry():
    bonds, _, angles = rc.load_stereo_chemical_props()
    worst_bond, worst_angle = 0.0, 0.0
    for restype in range(20):
        name = rc.resnames[restype]
        local = {a: np.array(p) for a, g, p in rc.rigid_group_atom_positions[name]}
        groups = {a: g for a, g, _ in rc.rigid_group_atom_positions[name]}
        assert groups["CA"] == 0 and np.allclose(local["CA"], 0.0)  # CA is the backbone frame's origin
        assert abs(local["C"][1]) < 1e-6 and abs(local["C"][2]) < 1e-6 and local["C"][0] > 0  # C on +x
        assert abs(local["N"][2]) < 1e-6  # N in the xy-plane
        assert abs(np.linalg.norm(local["N"]) - 1.458) < 0.01  # N-CA
        for frame in rc.restype_rigid_group_default_frame[restype]:
            rotation = frame[:3, :3]
            np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
            assert abs(np.linalg.det(rotation) - 1) < 1e-5
        placed = _global_positions(restype)
        # Proline's ring closes (CD-N) only at its real chi angles, not at the zero torsions used here.
        ring_closure = {"N", "CD"} if name == "PRO" else set()
        for bond in bonds[name]:
            if ring_closure <= {bond.atom1_name, bond.atom2_name}:
                continue
            length = np.linalg.norm(placed[bond.atom1_name] - placed[bond.atom2_name])
            worst_bond = max(worst_bond, abs(length - bond.length))
        for angle in angles[name]:
            if ring_closure <= {angle.atom1_name, angle.atom2_name, angle.atom3name}:
                continue
            u = placed[angle.atom1_name] - placed[angle.atom2_name]
            v = placed[angle.atom3name] - placed[angle.atom2_name]
            measured = math.acos(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v))
            worst_angle = max(worst_angle, abs(measured - angle.angle_rad))
    assert worst_bond < 0.05, worst_bond  # idealised groups within 0.05 A of every literature bond
    assert math.degrees(worst_angle) < 3.0, math.degrees(worst_angle)  # and within 3 degrees of every angle


def test_chi_ambiguity_and_bounds():
    for restype, letter in enumerate(rc.restypes):
        chis = rc.chi_angles_atoms[rc.restype_1to3[letter]]
        assert sum(rc.chi_angles_mask[restype]) == len(chis)
        for k, quad in enumerate(chis):
            assert [rc.atom_types[i] for i in rc.chi_angles_atom_indices[restype, k]] == quad
    periodic = {rc.resnames[i] for i, row in enumerate(rc.chi_pi_periodic) if any(row)}
    assert periodic == {"ASP", "GLU", "PHE", "TYR"} and len(rc.chi_pi_periodic) == 21
    swap = rc.restype_atom14_ambiguous_atoms_swap_idx
    np.testing.assert_array_equal(np.take_along_axis(swap, swap, axis=1), np.tile(np.arange(14), (21, 1)))
    phe = rc.restype_name_to_atom14_names["PHE"]
    assert phe[swap[rc.resname_to_idx["PHE"], phe.index("CD1")]] == "CD2"
    assert rc.restype_atom14_ambiguous_atoms.sum() == 2 + 2 + 4 + 4
    ala = rc.resname_to_idx["ALA"]
    n, ca = 0, 1  # atom14 slots
    assert rc.restype_atom14_bond_lower_bound[ala, n, ca] == pytest.approx(1.459 - 15 * 0.020)
    assert rc.restype_atom14_bond_upper_bound[ala, n, ca] == pytest.approx(1.459 + 15 * 0.020)
    # non-bonded C...O pair: vdW radii sum minus the 1.5 A tolerance, no upper bound
    cb, o = 4, 3
    assert rc.restype_atom14_bond_lower_bound[ala, cb, o] == pytest.approx(1.7 + 1.52 - 1.5)


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------
@needs_shared
def test_ubiquitin_matches_raw_pdb_columns():
    protein = read_chain(SHARED / "pdb" / "pdb1ubi.pdb")
    assert len(protein) == 76 and protein.sequence == UBIQUITIN and protein.resolution == pytest.approx(1.8)
    np.testing.assert_array_equal(protein.residue_index, np.arange(1, 77))
    records = pdb_atom_records((SHARED / "pdb" / "pdb1ubi.pdb").read_text())
    ca = {num: xyz for num, _, atom, _, _, xyz in records if atom == "CA"}
    np.testing.assert_allclose(protein.atom_positions[:, rc.atom_order["CA"]], np.stack([ca[i] for i in range(1, 77)]))
    heavy = sum(1 for num, res, atom, _, _, _ in records if atom in rc.residue_atoms.get(res, []) + ["OXT"])
    assert protein.atom_mask.sum() == heavy
    assert protein.atom_mask[:, rc.atom_order["OXT"]].nonzero()[0].tolist() == [75]  # C-terminal oxygen


@needs_shared
def test_adenylate_kinase_chains(tmp_path):
    from Bio.PDB import PDBIO, PDBParser

    chains = read_chains(SHARED / "pdb" / "pdb1ake.pdb")
    assert len(chains["A"]) == 214 and chains["A"].sequence.startswith("MRIILLGAPGAGKGTQAQ")
    # a two-chain file (chain A copied to B and shifted) written by Biopython's own writer
    structure = PDBParser(QUIET=True).get_structure("x", str(SHARED / "pdb" / "pdb1ake.pdb"))
    copy = structure[0]["A"].copy()
    copy.id = "B"
    for atom in copy.get_atoms():
        atom.set_coord(atom.get_coord() + 50.0)
    structure[0].add(copy)
    io = PDBIO()
    io.set_structure(structure)
    io.save(str(tmp_path / "two.pdb"))
    two = read_chains(tmp_path / "two.pdb")
    assert list(two) == ["A", "B"] and len(two["A"]) == len(two["B"]) == 214
    chain_b = read_chain(tmp_path / "two.pdb", "B")
    np.testing.assert_allclose(chain_b.atom_positions - 50.0 * chain_b.atom_mask[..., None],
                               two["A"].atom_positions, atol=1e-3)
    with pytest.raises(DataError, match="no protein chain 'C'.*A, B"):
        read_chain(tmp_path / "two.pdb", "C")


@needs_shared
def test_alternate_locations_take_highest_occupancy(tmp_path):
    path = SHARED / "pdb" / "pdb1ejg.pdb"
    protein = read_chain(path)
    assert len(protein) == 46 and protein.sequence == CRAMBIN
    records = pdb_atom_records(path.read_text())
    expected, checked = {}, 0
    for num, res, atom, altloc, occupancy, xyz in records:
        if res != rc.restype_1to3[CRAMBIN[num - 1]] or atom not in rc.atom_order:
            continue  # the other residue variant of a microheterogeneous site
        if (num, atom) not in expected or occupancy > expected[(num, atom)][0]:
            expected[(num, atom)] = (occupancy, xyz, altloc)
    for (num, atom), (_, xyz, altloc) in expected.items():
        np.testing.assert_allclose(protein.atom_positions[num - 1, rc.atom_order[atom]], xyz, atol=1e-3)
        checked += altloc != " "
    assert checked > 50  # many disordered atoms were compared
    # make altloc B of THR1 CA the majority: the reader must follow the occupancy, not the letter
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("ATOM") and line[12:16].strip() == "CA" and int(line[22:26]) == 1:
            lines[i] = line[:54] + ("  0.30" if line[16] == "A" else "  0.70") + line[60:]
    (tmp_path / "flip.pdb").write_text("\n".join(lines) + "\n")
    flipped = read_chain(tmp_path / "flip.pdb")
    ca_b = [xyz for num, _, atom, alt, _, xyz in records if num == 1 and atom == "CA" and alt == "B"][0]
    np.testing.assert_allclose(flipped.atom_positions[0, rc.atom_order["CA"]], ca_b, atol=1e-3)


MICROHETEROGENEOUS = """\
ATOM      1  N   GLY A   1       0.000   0.000   0.000  1.00 10.00           N
ATOM      2  CA  GLY A   1       1.458   0.000   0.000  1.00 10.00           C
ATOM      3  C   GLY A   1       2.000   1.400   0.000  1.00 10.00           C
ATOM      4  N  APRO A   2       3.000   1.500   0.000  0.30 10.00           N
ATOM      5  CA APRO A   2       3.500   2.900   0.000  0.30 10.00           C
ATOM      6  C  APRO A   2       5.000   3.000   0.000  0.30 10.00           C
ATOM      7  N  BSER A   2       3.100   1.600   0.100  0.70 10.00           N
ATOM      8  CA BSER A   2       3.600   3.000   0.100  0.70 10.00           C
ATOM      9  C  BSER A   2       5.100   3.100   0.100  0.70 10.00           C
ATOM     10  OG BSER A   2       3.000   3.900   1.000  0.70 10.00           O
ATOM     11  N   GLY A   3       6.000   3.500   0.000  1.00 10.00           N
ATOM     12  CA  GLY A   3       7.400   3.600   0.000  1.00 10.00           C
ATOM     13  C   GLY A   3       8.000   5.000   0.000  1.00 10.00           C
END
"""


def test_point_mutation_takes_highest_occupancy_variant(tmp_path):
    (tmp_path / "micro.pdb").write_text(MICROHETEROGENEOUS)
    protein = read_chain(tmp_path / "micro.pdb")
    assert protein.sequence == "GSG"  # SER (0.70) over PRO (0.30), though PRO is listed first
    np.testing.assert_allclose(protein.atom_positions[1, rc.atom_order["CA"]], [3.6, 3.0, 0.1])
    assert protein.atom_mask[1, rc.atom_order["OG"]] == 1 and protein.atom_mask[1].sum() == 4


@needs_shared
def test_gzip_and_mmcif_match_plain_pdb(tmp_path):
    from Bio.PDB import MMCIFIO, PDBParser

    gz = SHARED / "pdb" / "3ejfA.pdb.gz"
    plain = tmp_path / "3ejfA.pdb"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    a, b = read_chain(gz), read_chain(plain)
    assert len(a) == 166 and a.sequence == b.sequence
    np.testing.assert_array_equal(a.atom_positions, b.atom_positions)
    for path in sorted((SHARED / "pdb").glob("*.pdb.gz")):
        assert len(read_chain(path)) > 100
    # mmCIF written by Biopython's writer, plain and gzipped, reads back to the same arrays
    reference = read_chain(SHARED / "pdb" / "pdb1ubi.pdb")
    io = MMCIFIO()
    io.set_structure(PDBParser(QUIET=True).get_structure("1ubi", str(SHARED / "pdb" / "pdb1ubi.pdb")))
    io.save(str(tmp_path / "1ubi.cif"))
    (tmp_path / "1ubi.cif.gz").write_bytes(gzip.compress((tmp_path / "1ubi.cif").read_bytes()))
    for cif in (tmp_path / "1ubi.cif", tmp_path / "1ubi.cif.gz"):
        parsed = read_chain(cif)
        assert parsed.sequence == UBIQUITIN
        np.testing.assert_array_equal(parsed.atom_mask, reference.atom_mask)
        np.testing.assert_allclose(parsed.atom_positions, reference.atom_positions, atol=1e-3)


def test_bad_structure_files(tmp_path):
    (tmp_path / "x.xyz").write_text("nothing")
    with pytest.raises(DataError, match="must end in one of"):
        read_chain(tmp_path / "x.xyz")
    with pytest.raises(DataError, match="does not exist"):
        read_chain(tmp_path / "missing.pdb")
    (tmp_path / "empty.pdb").write_text("REMARK nothing here\nEND\n")
    with pytest.raises(DataError, match="no atoms|no amino-acid"):
        read_chain(tmp_path / "empty.pdb")


# ---------------------------------------------------------------------------------------------------------------
# Raw features and the user-input rule
# ---------------------------------------------------------------------------------------------------------------
@needs_shared
def test_t1026_features_and_native():
    raw = load_trusted_feature_pickle(T1026_PKL)
    fasta = (SHARED / "casp14" / "T1026.fasta").read_text().splitlines()[1].strip()
    assert raw["sequence"] == fasta and len(raw["aatype"]) == 172
    np.testing.assert_array_equal(raw["aatype"], rc.sequence_to_aatype(fasta))
    np.testing.assert_array_equal(raw["msa"][0], raw["aatype"])  # HHblits order converted: the query row
    with open(T1026_PKL, "rb") as f:
        original = pickle.load(f)  # the shipped, trusted file
    for t in range(raw["template_aatype"].shape[0]):
        letters = "".join(rc.restypes_with_x_and_gap[a] for a in raw["template_aatype"][t])
        assert letters == original["template_sequence"][t].decode()
    native = align_structure_to_sequence(read_chain(SHARED / "casp14" / "T1026.pdb"), raw["sequence"])
    ca = native["all_atom_mask"][:, rc.atom_order["CA"]]
    assert ca[:26].sum() == 0 and ca[26] == 1  # the native starts at residue 27
    assert ca.sum() == 146


@needs_shared
def test_user_input_is_never_unpickled(tmp_path):
    for name in ("features.pkl", "features.pickle", "features.pkl.gz"):
        shutil.copy(T1026_PKL, tmp_path / name)
        with pytest.raises(DataError, match="never unpickled"):
            load_user_input(tmp_path / name)
    for name in ("thing.json", "q.fasta.gz"):
        with pytest.raises(DataError, match="unsupported input"):
            load_user_input(tmp_path / name)
    ubiquitin = load_user_input(SHARED / "pdb" / "pdb1ubi.pdb")
    assert ubiquitin["sequence"] == UBIQUITIN and ubiquitin["all_atom_mask"].shape == (76, 37)
    # the trusted pickle converts to .npz, which users may hand in and which loads identically
    with open(T1026_PKL, "rb") as f:
        save_features_npz(pickle.load(f), tmp_path / "T1026.npz")
    from_npz, from_pkl = load_user_input(tmp_path / "T1026.npz"), load_trusted_feature_pickle(T1026_PKL)
    for key in ("aatype", "msa", "deletion_matrix", "template_aatype", "template_all_atom_positions"):
        np.testing.assert_array_equal(from_npz[key], from_pkl[key])
    assert from_npz["sequence"] == from_pkl["sequence"]
    np.savez(tmp_path / "objects.npz", msa=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="never unpickled"):
        load_features_npz(tmp_path / "objects.npz")
    # even the trusted loader rebuilds numpy arrays only
    import datetime

    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"when": datetime.date(2020, 1, 1)}))
    with pytest.raises(DataError, match="not a numpy array type"):
        load_trusted_feature_pickle(tmp_path / "other.pkl")
    (tmp_path / "q.fasta").write_text(">q\nMKT AYI\nAKQ\n")
    assert load_user_input(tmp_path / "q.fasta")["sequence"] == "MKTAYIAKQ"
    (tmp_path / "bad.fasta").write_text(">q\nMKT1\n")
    with pytest.raises(DataError, match="not amino-acid letters"):
        load_user_input(tmp_path / "bad.fasta")


def test_stockholm_and_a3m_deletions():
    sto = """# STOCKHOLM 1.0
query      MK-TA--Y
hit1       MRQTAWWY
hit2       -K-TA--Y
#=GC RF    xx.xx..x
//
"""
    rows, deletions, names = parse_stockholm(sto)
    assert rows == ["MKTAY", "MRTAY", "-KTAY"] and names == ["query", "hit1", "hit2"]
    assert deletions[1] == [0, 0, 1, 0, 2]  # Q before T, WW before Y
    rows3, deletions3, _ = parse_a3m(">query\nMKTAY\n>hit1\nMRqTAwwY\n>hit2\n-KTAY\n")
    assert rows3 == rows and deletions3 == deletions
    features = msa_features(rows + ["MKTAY"], deletions + [[0] * 5])  # duplicate rows are dropped
    assert features["msa"].shape == (3, 5) and features["deletion_matrix"][1].tolist() == [0, 0, 1, 0, 2]
    assert features["msa"][2, 0] == 21  # gap


@pytest.mark.skipif(find_jackhmmer() is None, reason="HMMER's jackhmmer is not installed (apt-get install hmmer)")
@needs_shared
def test_jackhmmer_msa_from_local_database(tmp_path):
    raw = load_trusted_feature_pickle(T1026_PKL)
    homologs = {rc.aatype_to_sequence(row).replace("-", "") for row in raw["msa"][1:]}
    with open(tmp_path / "db.fasta", "w") as f:
        for i, seq in enumerate(sorted(homologs)):
            f.write(f">hom{i}\n{seq}\n")
        f.write(f">ubiquitin\n{UBIQUITIN}\n")
    features = msa_raw_features(SHARED / "casp14" / "T1026.fasta", str(tmp_path / "db.fasta"), e_value=1e-3)
    assert features["msa"].shape[1] == 172 and features["sequence"] == raw["sequence"]
    np.testing.assert_array_equal(features["msa"][0], raw["aatype"])
    assert features["msa"].shape[0] >= 2  # homologs found ...
    found = {rc.aatype_to_sequence(row).replace("-", "") for row in features["msa"][1:]}
    assert UBIQUITIN not in found  # ... and the unrelated protein not
    example = make_example(features, FeatureConfig(crop_size=48, max_msa_clusters=4, max_extra_msa=8), seed=0)
    assert example["msa_mask"][:, 0].sum() == min(4, features["msa"].shape[0])
    # the dataset searches the same database for a structure's chain (the T1026 native: residues 27..172)
    dataset = ProteinStructures(ProteinStructuresConfig(
        structures=[str(SHARED / "casp14" / "T1026.pdb")], feature_sets=[], msa_database=str(tmp_path / "db.fasta"),
        crop_size=48, max_msa_clusters=4, max_extra_msa=8, samples_per_entry=1))
    entry = dataset.entries[0]
    assert entry["msa"].shape[0] >= 2 and entry["msa"].shape[1] == 146
    np.testing.assert_array_equal(entry["msa"][0], entry["aatype"])
    assert dataset[0]["msa_mask"][:, 0].sum() >= 2


# ---------------------------------------------------------------------------------------------------------------
# Pipeline: MSA sampling, clustering, BERT masking, cropping, padding
# ---------------------------------------------------------------------------------------------------------------
SMALL = FeatureConfig(crop_size=48, max_msa_clusters=8, max_extra_msa=12, max_templates=3)

CONTRACT = {  # key: (dtype, shape with N=48, S=8, E=12, T=3)
    "aatype": ("int64", (48,)), "residue_index": ("int64", (48,)), "seq_mask": ("float32", (48,)),
    "target_feat": ("float32", (48, 22)), "msa_feat": ("float32", (8, 48, 49)), "msa_mask": ("float32", (8, 48)),
    "true_msa": ("int64", (8, 48)), "bert_mask": ("float32", (8, 48)), "extra_msa": ("int64", (12, 48)),
    "extra_msa_mask": ("float32", (12, 48)), "extra_has_deletion": ("float32", (12, 48)),
    "extra_deletion_value": ("float32", (12, 48)), "template_aatype": ("int64", (3, 48)),
    "template_all_atom_positions": ("float32", (3, 48, 37, 3)), "template_all_atom_masks": ("float32", (3, 48, 37)),
    "template_mask": ("float32", (3,)), "template_pseudo_beta": ("float32", (3, 48, 3)),
    "template_pseudo_beta_mask": ("float32", (3, 48)), "atom14_atom_exists": ("float32", (48, 14)),
    "residx_atom14_to_atom37": ("int64", (48, 14)), "residx_atom37_to_atom14": ("int64", (48, 37)),
    "atom37_atom_exists": ("float32", (48, 37)), "all_atom_positions": ("float32", (48, 37, 3)),
    "all_atom_mask": ("float32", (48, 37)), "resolution": ("float32", ()), "pseudo_beta": ("float32", (48, 3)),
    "pseudo_beta_mask": ("float32", (48,)),
}


@pytest.fixture(scope="module")
def t1026_raw():
    if not SHARED.is_dir():
        pytest.skip("../shared/data/proteins is absent (shared test data)")
    raw = load_trusted_feature_pickle(T1026_PKL)
    raw.update(align_structure_to_sequence(read_chain(SHARED / "casp14" / "T1026.pdb"), raw["sequence"]))
    return raw


def test_example_contract_and_msa_invariants(t1026_raw):
    ex = make_example(t1026_raw, SMALL, seed=3)
    assert set(ex) == set(CONTRACT)
    for key, (dtype, shape) in CONTRACT.items():
        assert str(ex[key].dtype) == dtype and ex[key].shape == shape, key
    real_rows = ex["msa_mask"][:, 0] == 1
    assert real_rows.sum() == 8  # T1026 has 22 sequences: 8 centres, 14 extra, 12 kept
    assert ex["extra_msa_mask"].sum() == 12 * 48
    one_hot_sum = ex["msa_feat"][..., :23].sum(-1)
    np.testing.assert_allclose(one_hot_sum, ex["msa_mask"])  # one class per present position, none in padding
    np.testing.assert_allclose(ex["msa_feat"][..., 25:48].sum(-1), ex["msa_mask"], atol=1e-5)  # profiles sum to 1
    # positions left alone by BERT show the true residue; the query is row 0
    shown = ex["msa_feat"][..., :23].argmax(-1)
    untouched = (ex["bert_mask"] == 0) & (ex["msa_mask"] == 1)
    np.testing.assert_array_equal(shown[untouched], ex["true_msa"][untouched])
    np.testing.assert_array_equal(ex["true_msa"][0], ex["aatype"])
    # deletion features: has_deletion = d > 0, value = 2/pi atan(d/3) (so value > 0 exactly where has_deletion)
    np.testing.assert_array_equal(ex["msa_feat"][..., 23] > 0, ex["msa_feat"][..., 24] > 0)
    np.testing.assert_allclose(ex["target_feat"][:, 1:].argmax(-1), ex["aatype"])
    assert ex["target_feat"][:, 0].sum() == 0  # one chain: no breaks
    np.testing.assert_array_equal(ex["atom14_atom_exists"], rc.restype_atom14_mask[ex["aatype"]])
    gly = ex["aatype"] == rc.restype_order["G"]
    np.testing.assert_allclose(ex["pseudo_beta"][gly], ex["all_atom_positions"][gly, 1])
    assert ex["template_mask"].sum() <= 3
    np.testing.assert_array_equal(ex["template_all_atom_masks"][ex["template_mask"] == 0], 0)


def test_cropping_keeps_every_array_aligned(t1026_raw):
    raw = t1026_raw
    for seed in range(4):
        ex = make_example(raw, SMALL, seed=seed)
        start = int(ex["residue_index"][0] - raw["residue_index"][0])
        window = slice(start, start + 48)
        np.testing.assert_array_equal(ex["residue_index"], raw["residue_index"][window])
        np.testing.assert_array_equal(ex["aatype"], raw["aatype"][window])
        np.testing.assert_array_equal(ex["true_msa"][0], raw["msa"][0, window])
        np.testing.assert_allclose(ex["all_atom_positions"], raw["all_atom_positions"][window]
                                   * raw["all_atom_mask"][window][..., None])
        for t in np.flatnonzero(ex["template_mask"]):
            matches = [k for k in range(raw["template_aatype"].shape[0])
                       if np.array_equal(raw["template_aatype"][k, window], ex["template_aatype"][t])
                       and np.array_equal(raw["template_all_atom_positions"][k, window],
                                          ex["template_all_atom_positions"][t])]
            assert matches
        for row in ex["true_msa"][ex["msa_mask"][:, 0] == 1]:  # every centre is a cropped MSA row
            assert any(np.array_equal(row, r[window]) for r in raw["msa"])


def test_determinism_by_seed(t1026_raw):
    a, b = make_example(t1026_raw, SMALL, seed=7), make_example(t1026_raw, SMALL, seed=7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = make_example(t1026_raw, SMALL, seed=8)
    assert not all(np.array_equal(a[k], c[k]) for k in ("residue_index", "bert_mask", "true_msa"))
    evaluation = FeatureConfig(**{**SMALL.__dict__, "training": False})
    d = make_example(t1026_raw, evaluation, seed=1)
    assert d["residue_index"][0] == t1026_raw["residue_index"][0] and d["template_mask"].sum() == 3


def test_bert_masking_proportions():
    rng = np.random.default_rng(0)
    msa = rng.integers(0, 20, size=(64, 400))
    profile = np.full((400, 22), 1 / 22)
    corrupted, bert_mask = mask_msa(msa, profile, FeatureConfig(), rng)
    picked = bert_mask == 1
    assert abs(picked.mean() - 0.15) < 0.01
    assert np.array_equal(corrupted[~picked], msa[~picked])
    assert abs((corrupted[picked] == 22).mean() - 0.7) < 0.02  # mask token
    kept = (corrupted[picked] == msa[picked]).mean()  # 10% same + chance hits of uniform/profile draws
    assert abs(kept - (0.1 + 0.1 / 20 + 0.1 / 22)) < 0.02
    assert corrupted.max() <= 22


def test_cluster_assignment_and_profiles_against_brute_force():
    rng = np.random.default_rng(1)
    centres = rng.integers(0, 22, size=(5, 30))
    extra = rng.integers(0, 22, size=(40, 30))
    centre_mask, extra_mask = np.ones((5, 30), np.float32), (rng.random((40, 30)) > 0.1).astype(np.float32)
    assignment = nearest_clusters(centres, centre_mask, extra, extra_mask)
    for e in range(40):
        agree = [sum(1 for n in range(30) if extra_mask[e, n] and extra[e, n] == centres[s, n] and extra[e, n] < 21)
                 for s in range(5)]
        assert assignment[e] == int(np.argmax(agree))
    deletions_c, deletions_e = rng.integers(0, 3, (5, 30)).astype(np.float32), rng.integers(0, 3, (40, 30)).astype(np.float32)
    profile, deletion_mean = summarize_clusters(centres, centre_mask, deletions_c, extra, extra_mask, deletions_e,
                                                assignment)
    for s in range(5):
        members = np.flatnonzero(assignment == s)
        for n in (0, 17):
            values = [centres[s, n]] + [extra[e, n] for e in members if extra_mask[e, n]]
            expected = np.bincount(values, minlength=23) / len(values)
            np.testing.assert_allclose(profile[s, n], expected, atol=1e-6)
            dels = [deletions_c[s, n]] + [deletions_e[e, n] for e in members if extra_mask[e, n]]
            assert deletion_mean[s, n] == pytest.approx(np.mean(dels))


@needs_shared
def test_single_sequence_mode():
    protein = read_chain(SHARED / "pdb" / "pdb1ubi.pdb")
    ex = make_example(features_from_protein(protein), SMALL, seed=0)
    assert ex["msa_mask"][:, 0].tolist() == [1] + [0] * 7
    assert ex["extra_msa_mask"].sum() == 0 and ex["template_mask"].sum() == 0
    np.testing.assert_allclose(ex["msa_feat"][0, :, 25:48], ex["msa_feat"][0, :, :23])  # profile of one sequence
    fasta = make_example(single_sequence_features(UBIQUITIN), SMALL, seed=0)
    assert "all_atom_positions" not in fasta and fasta["aatype"].shape == (48,)
    short = make_example(single_sequence_features("MKTAYIAKQR"), SMALL, seed=0)
    assert short["seq_mask"].sum() == 10 and short["atom14_atom_exists"][10:].sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# Dataset and batches
# ---------------------------------------------------------------------------------------------------------------
@needs_shared
def test_protein_structures_dataset_batches():
    base = str(SHARED)
    args = ProteinStructuresConfig(structures=[f"{base}/pdb/*.pdb", f"{base}/pdb/*.pdb.gz"],
                                   feature_sets=[f"{base}/casp14/T1026"], samples_per_entry=2, crop_size=48,
                                   max_msa_clusters=8, max_extra_msa=12, max_templates=3)
    dataset = DATASETS.get("ProteinStructures").build(args, None, None)
    assert isinstance(dataset, ProteinStructures) and dataset.needs_tokenizer is False
    assert len(dataset.entries) == 8 and len(dataset) == 16  # 7 chains + T1026; 2gb1 is CA-only
    assert any("pdb2gb1_truncated" in s for s in dataset.skipped)
    batch = collate([dataset[i] for i in (0, 7, 8, 15)])
    for key, (dtype, shape) in CONTRACT.items():
        assert str(batch[key].dtype) == dtype and batch[key].shape == (4,) + shape, key
    assert batch["msa_mask"][0, :, 0].sum() == 1 and batch["msa_mask"][1, :, 0].sum() == 8  # single-seq vs T1026
    np.testing.assert_array_equal(dataset[5]["bert_mask"], dataset[5]["bert_mask"])
    assert not np.array_equal(dataset[7]["true_msa"], dataset[15]["true_msa"])  # T1026 twice, different samples
    from ppzoo.data.sampler import collate as engine_collate

    assert set(engine_collate([dataset[0], dataset[1]])) == set(CONTRACT)
    with pytest.raises(DataError, match="ground truth"):
        collate([dataset[0], make_example(single_sequence_features(UBIQUITIN), dataset.feature_config, 0)])
    with pytest.raises(DataError, match="does not exist"):
        ProteinStructures(ProteinStructuresConfig(structures=[f"{base}/nope.pdb"], feature_sets=[]))
    with pytest.raises(DataError, match="found no usable protein"):
        ProteinStructures(ProteinStructuresConfig(structures=[f"{base}/nothing*.pdb"], feature_sets=[]))
