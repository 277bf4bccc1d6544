"""Write a `Protein` (atom37) as a PDB file: ATOM records in atom37 order, one chain, TER and END.

The B-factor column carries `protein.b_factors`; for a prediction that is the per-residue pLDDT (0-100) on
every atom of the residue, which molecular viewers color by ("color by B-factor"). Reading the file back with
`read_chain` returns the same residue types, numbers, coordinates (to 0.001 A) and B-factors (to 0.01).
"""
import numpy as np

from ppzoo.data.protein import residue_constants as rc
from ppzoo.errors import DataError

MAX_ATOM_SERIAL = 99999
MAX_RESIDUE_NUMBER = 9999


def _atom_name_field(name):
    """PDB atom name columns 13-16: names shorter than four characters start in column 14."""
    return name if len(name) == 4 else f" {name:<3}"


def to_pdb(protein, chain_id=None):
    """The PDB text of one chain. Residue numbers come from protein.residue_index."""
    chain_id = (chain_id or protein.chain_id or "A")[:1]
    if np.any(protein.residue_index > MAX_RESIDUE_NUMBER) or np.any(protein.residue_index < -999):
        raise DataError(f"Residue numbers of {protein.name or 'the protein'} do not fit the PDB format's four "
                        f"columns ({protein.residue_index.min()}..{protein.residue_index.max()}); renumber from 1.")
    lines = []
    if protein.name:
        lines.append(f"REMARK   1 {protein.name[:68]}")
    serial = 0
    for i in range(len(protein)):
        aatype = int(protein.aatype[i])
        resname = rc.resnames[aatype] if aatype < len(rc.resnames) else rc.unk_restype
        for slot in np.flatnonzero(protein.atom_mask[i] > 0):
            serial += 1
            if serial > MAX_ATOM_SERIAL:
                raise DataError(f"{protein.name or 'The protein'} has more than {MAX_ATOM_SERIAL} atoms: too many "
                                f"for the PDB format; write mmCIF instead.")
            name = rc.atom_types[slot]
            x, y, z = (float(v) for v in protein.atom_positions[i, slot])
            b = float(protein.b_factors[i, slot])
            lines.append(
                f"ATOM  {serial:5d} {_atom_name_field(name)} {resname:>3} {chain_id}{int(protein.residue_index[i]):4d}"
                f"    {x:8.3f}{y:8.3f}{z:8.3f}{1.00:6.2f}{b:6.2f}          {name[0]:>2}  "
            )
    if len(protein):
        last = len(protein) - 1
        last_name = rc.resnames[int(protein.aatype[last])] if int(protein.aatype[last]) < len(rc.resnames) else "UNK"
        lines.append(f"TER   {serial + 1:5d}      {last_name:>3} {chain_id}{int(protein.residue_index[last]):4d}")
    lines.append("END")
    return "\n".join(line.ljust(80) if line.startswith("ATOM") else line for line in lines) + "\n"


def write_pdb(protein, path, chain_id=None):
    """Write `protein` to `path` as PDB; returns the path."""
    with open(path, "w") as f:
        f.write(to_pdb(protein, chain_id))
    return path


def with_residue_b_factors(protein, values):
    """A copy of `protein` whose every atom carries its residue's value (e.g. pLDDT) as the B-factor."""
    from dataclasses import replace

    values = np.asarray(values, dtype=np.float32)
    if values.shape != (len(protein),):
        raise ValueError(f"need one value per residue ({len(protein)}), got shape {values.shape}")
    return replace(protein, b_factors=np.repeat(values[:, None], rc.atom_type_num, axis=1) * protein.atom_mask)
