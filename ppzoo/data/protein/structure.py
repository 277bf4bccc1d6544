"""Protein structures from PDB and mmCIF files (plain or gzipped), read with Biopython, in atom37 layout.

A chain becomes a `Protein`: per residue its type (restype index, 20 = unknown), author residue number,
atom37 coordinates and a mask of the atoms the file has, and B-factors. Only amino-acid residues are kept
(standard ones, plus modified residues that have a backbone N, CA and C, which count as unknown unless
`MODIFIED_RESIDUES` names their parent); waters and ligands are dropped. Hydrogens are ignored.

Alternate locations: each atom takes its highest-occupancy location (the first listed on a tie). A residue
with several residue types at one position (microheterogeneity) keeps the highest-occupancy variant where
Biopython exposes the variants; where the variants share backbone atoms with a blank altloc, Biopython keeps
only the first listed variant (the one that SEQRES usually names), and so does this reader.
"""
import gzip
import io
import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np

from ppzoo.data.protein import residue_constants as rc
from ppzoo.errors import DataError

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")

# Modified amino acids read as their parent residue (selenomethionine is routinely used for phasing and is
# methionine in every other respect); its selenium sits where methionine's sulfur would be.
MODIFIED_RESIDUES = {"MSE": ("MET", {"SE": "SD"})}


@dataclass
class Protein:
    """One chain: arrays over its N observed residues."""

    aatype: np.ndarray  # int64 [N], restype index, 20 = unknown
    atom_positions: np.ndarray  # float32 [N, 37, 3], Angstrom
    atom_mask: np.ndarray  # float32 [N, 37], 1 where the file has the atom
    residue_index: np.ndarray  # int64 [N], author residue numbers, shifted past insertion codes (increasing)
    b_factors: np.ndarray  # float32 [N, 37]
    chain_id: str = "A"
    resolution: float = 0.0  # Angstrom; 0 when the file does not say
    name: str = ""

    @property
    def sequence(self):
        return rc.aatype_to_sequence(self.aatype)

    def __len__(self):
        return len(self.aatype)

    def subset(self, residues):
        """A Protein with only the residues at the given positions (indices or boolean mask)."""
        return Protein(self.aatype[residues], self.atom_positions[residues], self.atom_mask[residues],
                       self.residue_index[residues], self.b_factors[residues], self.chain_id, self.resolution,
                       self.name)


def structure_format(path):
    """'pdb' or 'cif' from the file name (a trailing .gz is allowed); DataError for anything else."""
    name = os.path.basename(str(path)).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in STRUCTURE_SUFFIXES:
        if name.endswith(suffix):
            return "cif" if suffix in (".cif", ".mmcif") else "pdb"
    raise DataError(
        f"{path} is not a structure file this reader knows: the name must end in one of "
        f"{', '.join(STRUCTURE_SUFFIXES)} (optionally followed by .gz)."
    )


def _read_text(path):
    try:
        if str(path).lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                return f.read()
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise DataError(f"Structure file {path} does not exist (resolved from {os.getcwd()}).") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read structure file {path}: {exc}") from exc


def _parse_biopython(text, fmt, name, path=None):
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.PDBExceptions import PDBConstructionException

    parser = MMCIFParser(QUIET=True) if fmt == "cif" else PDBParser(QUIET=True)
    try:
        structure = parser.get_structure(name, io.StringIO(text))
    except (PDBConstructionException, ValueError, KeyError, IndexError) as exc:
        raise DataError(
            f"{path or name} is not a valid {'mmCIF' if fmt == 'cif' else 'PDB'} file ({type(exc).__name__}: "
            f"{exc}); it may be truncated or in another format. Check that the file is complete and that its "
            f"name's suffix matches its format."
        ) from exc
    resolution = 0.0
    if fmt == "pdb":
        resolution = structure.header.get("resolution") or 0.0
    else:
        from Bio.PDB.MMCIF2Dict import MMCIF2Dict

        fields = MMCIF2Dict(io.StringIO(text))
        for key in ("_refine.ls_d_res_high", "_em_3d_reconstruction.resolution", "_reflns.d_resolution_high"):
            value = fields.get(key, ["?"])[0]
            try:
                resolution = float(value)
                break
            except ValueError:
                continue
    return structure, float(resolution)


def _highest_occupancy(atom):
    """The location of a (possibly disordered) atom with the highest occupancy; the first listed on a tie."""
    if not atom.is_disordered():
        return atom
    best = None
    for location in atom.child_dict.values():  # insertion order = file order
        occupancy = location.get_occupancy() or 0.0
        if best is None or occupancy > (best.get_occupancy() or 0.0):
            best = location
    return best


def _residue_occupancy(residue):
    atoms = [_highest_occupancy(a) for a in residue]
    return float(np.mean([a.get_occupancy() or 0.0 for a in atoms])) if atoms else 0.0


def _choose_variant(residue):
    """A point-mutation site (Biopython DisorderedResidue) -> its highest-occupancy residue variant."""
    if residue.is_disordered() != 2:
        return residue
    variants = list(residue.child_dict.values())
    return max(variants, key=_residue_occupancy)  # max keeps the first on a tie


def _is_amino_acid(residue):
    hetflag = residue.id[0]
    resname = residue.get_resname()
    if hetflag == "W":
        return False
    if resname in rc.restype_3to1 or resname in MODIFIED_RESIDUES:
        return True
    names = {a.get_id() for a in residue}
    return {"N", "CA", "C"} <= names


def _chain_to_protein(chain, resolution, name):
    aatype, positions, mask, numbers, bfactors = [], [], [], [], []
    last_number, shift = None, 0
    for residue in chain:
        residue = _choose_variant(residue)
        if not _is_amino_acid(residue):
            continue
        resname = residue.get_resname()
        renames = {}
        if resname in MODIFIED_RESIDUES:
            resname, renames = MODIFIED_RESIDUES[resname]
        pos = np.zeros((rc.atom_type_num, 3), dtype=np.float32)
        msk = np.zeros(rc.atom_type_num, dtype=np.float32)
        bf = np.zeros(rc.atom_type_num, dtype=np.float32)
        for atom in residue:
            atom_name = renames.get(atom.get_id(), atom.get_id())
            if atom_name not in rc.atom_order:
                continue  # hydrogens and atoms outside the 37 heavy-atom types
            location = _highest_occupancy(atom)
            slot = rc.atom_order[atom_name]
            pos[slot] = location.get_coord()
            msk[slot] = 1.0
            bf[slot] = location.get_bfactor()
        # Insertion codes (52, 52A, 52B, 53) and any other non-increasing numbers: the residue takes the next
        # number and every later residue shifts by as much (52, 53, 54, 55), so numbering stays strictly
        # increasing and a gap of missing residues after an insertion keeps its size.
        number = int(residue.id[1]) + shift
        if last_number is not None and number <= last_number:
            shift += last_number + 1 - number
            number = last_number + 1
        last_number = number
        aatype.append(rc.restype_order.get(rc.restype_3to1.get(resname, "X"), rc.unk_restype_index))
        positions.append(pos)
        mask.append(msk)
        numbers.append(number)
        bfactors.append(bf)
    if not aatype:
        return None
    return Protein(
        aatype=np.array(aatype, dtype=np.int64),
        atom_positions=np.stack(positions),
        atom_mask=np.stack(mask),
        residue_index=np.array(numbers, dtype=np.int64),
        b_factors=np.stack(bfactors),
        chain_id=chain.id.strip() or "A",
        resolution=resolution,
        name=name,
    )


def read_chains(path) -> Dict[str, Protein]:
    """Every protein chain of the first model of a PDB/mmCIF file (plain or .gz): {chain id: Protein}."""
    return _protein_chains(path)[0]


def _protein_chains(path):
    """_read_all_chains, with a DataError naming what the file holds instead when it has no protein chain."""
    chains, other = _read_all_chains(path)
    if not chains:
        found = "; ".join(f"chain {cid}: {', '.join(names)}" for cid, names in other.items())
        raise DataError(f"{path} has no amino-acid residues ({found or 'no residues at all'}): nothing to use as "
                        f"a protein chain. Give a file with the protein's ATOM records.")
    return chains, other


def _read_all_chains(path):
    """({chain id: Protein} of the protein chains of the first model, {chain id: residue names} of the rest)."""
    fmt = structure_format(path)
    name = os.path.basename(str(path)).split(".")[0]
    structure, resolution = _parse_biopython(_read_text(path), fmt, name, path)
    models = list(structure)  # NMR ensembles and multi-model files: the first model (MODEL 1) is the structure
    if not models:
        raise DataError(f"{path} has no atoms (no ATOM or HETATM records): it is empty, truncated before its "
                        f"coordinates, or not a {'mmCIF' if fmt == 'cif' else 'PDB'} file.")
    chains, other = {}, {}
    for chain in models[0]:
        protein = _chain_to_protein(chain, resolution, name)
        if protein is not None:
            chains[protein.chain_id] = protein
        else:
            other[chain.id.strip() or "A"] = sorted({residue.get_resname() for residue in chain})
    return chains, other


def read_chain(path, chain_id: Optional[str] = None) -> Protein:
    """One protein chain of a structure file: `chain_id`, or the first protein chain when it is None."""
    chains, other = _protein_chains(path)
    if chain_id is None:
        return next(iter(chains.values()))
    if chain_id not in chains:
        why = (f"chain {chain_id!r} holds no amino acids (only {', '.join(other[chain_id])}); " if chain_id in other
               else f"it has no chain {chain_id!r}; ")
        raise DataError(
            f"{path} has no protein chain {chain_id!r}: {why}its protein chains are {', '.join(chains)}. Set the "
            f"chain id to one of them."
        )
    return chains[chain_id]


def pseudo_beta(aatype, atom_positions, atom_mask):
    """CB position (CA for glycine) and its mask: AF2's pseudo-beta atom, [..., 3] and [...]."""
    is_gly = aatype == rc.restype_order["G"]
    ca, cb = rc.atom_order["CA"], rc.atom_order["CB"]
    positions = np.where(is_gly[..., None], atom_positions[..., ca, :], atom_positions[..., cb, :])
    mask = np.where(is_gly, atom_mask[..., ca], atom_mask[..., cb])
    return positions.astype(np.float32), mask.astype(np.float32)
