"""Structure parsing on files of every kind: several models, insertion codes, missing residues, several chains,
hetero groups, and files that cannot be used (no protein, truncated, garbage) with clear errors.

The files are written here from ubiquitin (1UBI) by editing its fixed-column ATOM records, so the expected
arrays are known: the original coordinates, and the residue numbers the edit gave.
"""
import gzip
from pathlib import Path

import numpy as np
import pytest

from ppzoo.data.protein import residue_constants as rc
from ppzoo.data.protein.structure import read_chain, read_chains
from ppzoo.errors import DataError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "proteins"
UBI = SHARED / "pdb" / "pdb1ubi.pdb"
pytestmark = pytest.mark.skipif(not UBI.exists(), reason="../shared/data/proteins is absent (shared test data)")
CA = rc.atom_order["CA"]


def ubi_atoms(first=1, last=76):
    """1UBI's ATOM records of residues first..last (one chain A, no altlocs)."""
    return [line for line in UBI.read_text().splitlines()
            if line.startswith("ATOM") and first <= int(line[22:26]) <= last]


def renumber(line, number, icode=" ", chain=None):
    line = line.ljust(80)
    return line[:21] + (chain or line[21]) + f"{number:4d}" + icode + line[27:]


def shift(line, dx):
    x, y, z = (float(line[30 + 8 * k:38 + 8 * k]) for k in range(3))
    return line[:30] + f"{x + dx:8.3f}{y:8.3f}{z:8.3f}" + line[54:]


def hetatm(serial, resname, chain, number, atom, xyz, element):
    return (f"HETATM{serial:5d} {atom:<4} {resname:>3} {chain}{number:4d}    "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00 20.00          {element:>2}")


def test_first_model_of_a_multi_model_file(tmp_path):
    from Bio.PDB import MMCIFIO, PDBParser

    reference = read_chain(UBI)
    model2 = [shift(line, 5.0) for line in ubi_atoms(1, 70)]
    text = "\n".join(["MODEL        1", *ubi_atoms(), "ENDMDL", "MODEL        2", *model2, "ENDMDL", "END"])
    (tmp_path / "nmr.pdb").write_text(text + "\n")
    first = read_chain(tmp_path / "nmr.pdb")
    assert len(first) == 76
    np.testing.assert_array_equal(first.atom_positions, reference.atom_positions)
    # the same two models as mmCIF (Biopython's writer), gzipped
    structure = PDBParser(QUIET=True).get_structure("nmr", str(tmp_path / "nmr.pdb"))
    io = MMCIFIO()
    io.set_structure(structure)
    io.save(str(tmp_path / "nmr.cif"))
    (tmp_path / "nmr.cif.gz").write_bytes(gzip.compress((tmp_path / "nmr.cif").read_bytes()))
    from_cif = read_chain(tmp_path / "nmr.cif.gz")
    np.testing.assert_allclose(from_cif.atom_positions, reference.atom_positions, atol=1e-3)


def test_insertion_codes_and_missing_residues_keep_the_numbering_meaningful(tmp_path):
    # residues 1-4, then 5 and 6 relabelled 4A and 4B (insertions), 7-8, a gap (9-11 missing), 12-20
    numbers = {1: (1, " "), 2: (2, " "), 3: (3, " "), 4: (4, " "), 5: (4, "A"), 6: (4, "B"), 7: (7, " "),
               8: (8, " ")}
    numbers.update({n: (n, " ") for n in range(12, 21)})
    lines = [renumber(line, *numbers[int(line[22:26])]) for line in ubi_atoms(1, 20) if int(line[22:26]) in numbers]
    (tmp_path / "icode.pdb").write_text("\n".join(lines) + "\nEND\n")
    protein = read_chain(tmp_path / "icode.pdb")
    reference = read_chain(UBI)
    kept = np.array(sorted(numbers)) - 1
    assert protein.sequence == "".join(reference.sequence[i] for i in kept)  # file order, nothing merged
    np.testing.assert_array_equal(protein.atom_positions, reference.atom_positions[kept])
    # 4A, 4B take the next numbers and later residues shift by two; the gap of three missing residues stays
    np.testing.assert_array_equal(protein.residue_index, [1, 2, 3, 4, 5, 6, 9, 10] + list(range(14, 23)))
    assert np.diff(protein.residue_index)[7] == 4


def test_several_chains_hetero_groups_and_the_chain_the_user_picks(tmp_path):
    chain_a = ubi_atoms(1, 30)
    chain_b = [shift(renumber(line, int(line[22:26]), chain="B"), 40.0) for line in ubi_atoms(31, 76)]
    het = [
        # selenomethionine inside chain A's sequence is methionine; a ligand and waters are dropped
        hetatm(900, "MSE", "A", 31, "N", (30.0, 20.0, 5.0), "N"),
        hetatm(901, "MSE", "A", 31, "CA", (31.4, 20.0, 5.0), "C"),
        hetatm(902, "MSE", "A", 31, "C", (32.0, 21.4, 5.0), "C"),
        hetatm(903, "MSE", "A", 31, "SE", (33.0, 19.0, 6.0), "SE"),
        hetatm(904, "ATP", "A", 101, "PG", (0.0, 0.0, 0.0), "P"),
        hetatm(905, "HOH", "A", 201, "O", (5.0, 5.0, 5.0), "O"),
        hetatm(906, "ATP", "L", 1, "PG", (9.0, 9.0, 9.0), "P"),
        hetatm(907, "HOH", "W", 1, "O", (7.0, 7.0, 7.0), "O"),
    ]
    text = "\n".join([*chain_a, *het[:4], "TER", *chain_b, "TER", *het[4:], "END"])
    (tmp_path / "complex.pdb").write_text(text + "\n")
    chains = read_chains(tmp_path / "complex.pdb")
    assert list(chains) == ["A", "B"]
    a = chains["A"]
    assert len(a) == 31 and a.sequence.endswith("M") and a.residue_index[-1] == 31
    assert a.atom_mask[-1, rc.atom_order["SD"]] == 1  # selenium where methionine's sulfur is
    b = read_chain(tmp_path / "complex.pdb", "B")
    np.testing.assert_allclose(b.atom_positions[:, CA, 0] - 40.0, read_chain(UBI).atom_positions[30:, CA, 0],
                               atol=1e-3)
    assert read_chain(tmp_path / "complex.pdb").chain_id == "A"  # default: the first protein chain
    with pytest.raises(DataError, match=r"chain 'L' holds no amino acids \(only ATP\).*protein chains are A, B"):
        read_chain(tmp_path / "complex.pdb", "L")
    with pytest.raises(DataError, match=r"has no chain 'Q'.*protein chains are A, B"):
        read_chain(tmp_path / "complex.pdb", "Q")


def test_files_that_cannot_be_used_say_why(tmp_path):
    cases = {
        "ligands.pdb": ("\n".join([hetatm(1, "ATP", "A", 1, "PG", (0, 0, 0), "P"),
                                   hetatm(2, "HOH", "W", 1, "O", (1, 1, 1), "O")]) + "\nEND\n",
                        r"no amino-acid residues \(chain A: ATP; chain W: HOH\)"),
        "header_only.pdb": ("HEADER    TRUNCATED\nREMARK   2 RESOLUTION. 1.80 ANGSTROMS.\n", "has no atoms"),
        "cut.pdb": ("\n".join(ubi_atoms(1, 3)) + "\n" + ubi_atoms(4, 4)[0][:40] + "\n", "may be truncated"),
        "words.cif": ("data_x\n# not really mmCIF\nloop_\n_foo.bar\n1\n", "not a valid mmCIF file"),
    }
    for name, (text, pattern) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=pattern):
            read_chain(tmp_path / name)
    whole = gzip.compress(UBI.read_bytes())
    (tmp_path / "cut.pdb.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "plain.pdb.gz").write_bytes(UBI.read_bytes())
    (tmp_path / "binary.pdb").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match="Cannot read structure file .*cut.pdb.gz"):
        read_chain(tmp_path / "cut.pdb.gz")
    with pytest.raises(DataError, match="Cannot read structure file .*plain.pdb.gz.*gzip"):
        read_chain(tmp_path / "plain.pdb.gz")
    with pytest.raises(DataError, match="binary.pdb"):
        read_chain(tmp_path / "binary.pdb")
