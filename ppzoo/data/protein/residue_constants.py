"""AlphaFold2's residue constants: amino-acid and atom vocabularies, idealised geometry, and arrays derived from it.

The facts (atom names, rigid-group atom positions, chi-angle definitions, literature bond lengths and angles)
come from the AlphaFold2 paper's supplement (Jumper et al. 2021, sections 1.2.1, 1.8 and 1.9.11) and live in
two data files beside this module: ``residue_constants.json`` and ``stereo_chemical_props.txt``. Everything
else here is derived from them at import time. Names follow AlphaFold2 so model and loss code can use them
as written in the paper's algorithms.

Conventions:
- residue types are indexed in ``restypes`` order (ARNDCQEGHILKMFPSTWYV, alphabetical by three-letter
  name), 20 is unknown (UNK / X), 21 is the alignment gap in MSA encodings;
- atom37 is the fixed 37-slot layout ``atom_types`` (any residue's heavy atoms plus OXT);
- atom14 is the compact per-residue layout ``restype_name_to_atom14_names`` (at most 14 heavy atoms);
- rigid groups: 0 backbone, 1 pre-omega (empty), 2 phi (empty: only hydrogens), 3 psi, 4..7 chi1..chi4.
"""
import collections
import functools
import json
import math
import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "residue_constants.json"), encoding="utf-8") as _f:
    _DATA = json.load(_f)

# ---------------------------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------------------------
restypes = list("ARNDCQEGHILKMFPSTWYV")
restype_order = {r: i for i, r in enumerate(restypes)}
restype_num = len(restypes)  # 20
unk_restype_index = restype_num  # 20: any residue that is not one of the 20 standard ones
restypes_with_x = restypes + ["X"]
restype_order_with_x = {r: i for i, r in enumerate(restypes_with_x)}
restypes_with_x_and_gap = restypes + ["X", "-"]  # the 22 values of an MSA column (23 with the BERT mask token)

restype_1to3 = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY", "H": "HIS",
    "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER", "T": "THR", "W": "TRP",
    "Y": "TYR", "V": "VAL",
}
restype_3to1 = {three: one for one, three in restype_1to3.items()}
unk_restype = "UNK"
resnames = [restype_1to3[r] for r in restypes] + [unk_restype]
resname_to_idx = {name: i for i, name in enumerate(resnames)}

# MSA tools (HHblits, jackhmmer via the a3m/sto converters) index residues alphabetically by one-letter code,
# with ambiguity codes folded: B->D, Z->E, U->C, J/O->X. AlphaFold2's raw feature files store `msa` and
# `template_aatype` in this order; `MAP_HHBLITS_AATYPE_TO_OUR_AATYPE` converts them to `restypes` order.
HHBLITS_AA_TO_ID = {
    "A": 0, "B": 2, "C": 1, "D": 2, "E": 3, "F": 4, "G": 5, "H": 6, "I": 7, "J": 20, "K": 8, "L": 9, "M": 10,
    "N": 11, "O": 20, "P": 12, "Q": 13, "R": 14, "S": 15, "T": 16, "U": 1, "V": 17, "W": 18, "X": 20, "Y": 19,
    "Z": 3, "-": 21,
}
ID_TO_HHBLITS_AA = dict(enumerate("ACDEFGHIKLMNPQRSTVWYX-"))
MAP_HHBLITS_AATYPE_TO_OUR_AATYPE = tuple(restypes_with_x_and_gap.index(ID_TO_HHBLITS_AA[i]) for i in range(22))

atom_types = list(_DATA["atom_types"])
atom_order = {name: i for i, name in enumerate(atom_types)}
atom_type_num = len(atom_types)  # 37

restype_name_to_atom14_names = {
    name: list(atoms) + [""] * (14 - len(atoms)) for name, atoms in _DATA["restype_name_to_atom14_names"].items()
}
# Heavy atoms of each residue (PDB names, no OXT), in atom14 order.
residue_atoms = {name: [a for a in atoms if a] for name, atoms in restype_name_to_atom14_names.items()
                 if name != unk_restype}

# ---------------------------------------------------------------------------------------------------------------
# Side chains: chi angles and symmetric atoms
# ---------------------------------------------------------------------------------------------------------------
# chi1..chi4 as four atoms each; ARG's chi5 is always 0 +- 5 degrees and is left out.
chi_angles_atoms = {name: [list(q) for q in quads] for name, quads in _DATA["chi_angles_atoms"].items()}
# [20, 4] in restype order: which chi angles exist.
chi_angles_mask = [[1.0 if k < len(chi_angles_atoms[restype_1to3[r]]) else 0.0 for k in range(4)]
                   for r in restypes]
# [21, 4] (UNK row included): chi angles that are symmetric under a rotation by pi (carboxylates, rings).
chi_pi_periodic = [[float(v) for v in _DATA["chi_pi_periodic"].get(name, [0, 0, 0, 0])] for name in resnames]
# [20, 4, 4] atom37 indices of each chi angle's four atoms (zeros where the chi angle does not exist).
chi_angles_atom_indices = np.array([
    [[atom_order[a] for a in quad] for quad in chi_angles_atoms[restype_1to3[r]]]
    + [[0, 0, 0, 0]] * (4 - len(chi_angles_atoms[restype_1to3[r]]))
    for r in restypes
], dtype=np.int64)

# Atom names that can be swapped by a symmetry of the residue (180-degree ring flips, carboxylate oxygens).
residue_atom_renaming_swaps = {name: dict(swaps) for name, swaps in _DATA["residue_atom_renaming_swaps"].items()}

# ---------------------------------------------------------------------------------------------------------------
# Idealised geometry
# ---------------------------------------------------------------------------------------------------------------
# Each residue's heavy atoms as [name, rigid group index, position in that group's frame (Angstrom)]. A group's
# frame has its origin at the end atom of the rotation axis, x along the axis, and the atom that defines the
# torsion angle in the xy-plane with positive y.
rigid_group_atom_positions = {
    name: [[atom, int(group), tuple(float(x) for x in pos)] for atom, group, pos in entries]
    for name, entries in _DATA["rigid_group_atom_positions"].items()
}

van_der_waals_radius = {k: float(v) for k, v in _DATA["van_der_waals_radius"].items()}

# Distance from one CA to the next in a trans peptide (omega = 180 degrees).
ca_ca = 3.80209737096
# Peptide bond C(i)-N(i+1): [general, before proline] mean and standard deviation (Angstrom).
between_res_bond_length_c_n = [1.329, 1.341]
between_res_bond_length_stddev_c_n = [0.014, 0.016]
# [cosine, stddev of cosine] of the angles across the peptide bond: C-N-CA 121.352 +- 2.315 degrees and
# CA-C-N 116.568 +- 1.995 degrees.
between_res_cos_angles_c_n_ca = [-0.5203, 0.0353]
between_res_cos_angles_ca_c_n = [-0.4473, 0.0311]

Bond = collections.namedtuple("Bond", ["atom1_name", "atom2_name", "length", "stddev"])
BondAngle = collections.namedtuple("BondAngle", ["atom1_name", "atom2_name", "atom3name", "angle_rad", "stddev"])


@functools.lru_cache(maxsize=None)
def load_stereo_chemical_props():
    """Literature bond lengths and angles per residue, and the angles turned into 1-3 distances.

    Returns (residue_bonds, residue_virtual_bonds, residue_bond_angles): dicts resname -> list of Bond /
    Bond / BondAngle. A "virtual bond" is the distance between the outer atoms of a bond angle, from the law
    of cosines, with its standard deviation propagated from the two bonds and the angle (errors assumed
    independent); the violation loss checks those distances instead of angles.
    """
    sections = [[]]
    with open(os.path.join(_HERE, "stereo_chemical_props.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line == "-":
                sections.append([])
            else:
                sections[-1].append(line.split())
    bond_rows, angle_rows = sections[0], sections[1]

    residue_bonds = {name: [] for name in resnames}
    for resname, atoms, mean, std in bond_rows:
        a1, a2 = atoms.split("-")
        residue_bonds[resname].append(Bond(a1, a2, float(mean), float(std)))
    residue_bond_angles = {name: [] for name in resnames}
    for resname, atoms, mean, std in angle_rows:
        a1, a2, a3 = atoms.split("-")
        residue_bond_angles[resname].append(
            BondAngle(a1, a2, a3, math.radians(float(mean)), math.radians(float(std))))

    residue_virtual_bonds = {}
    for resname, angles in residue_bond_angles.items():
        by_pair = {frozenset((b.atom1_name, b.atom2_name)): b for b in residue_bonds[resname]}
        virtual = []
        for angle in angles:
            b1 = by_pair[frozenset((angle.atom1_name, angle.atom2_name))]
            b2 = by_pair[frozenset((angle.atom2_name, angle.atom3name))]
            g = angle.angle_rad
            length = math.sqrt(b1.length ** 2 + b2.length ** 2 - 2 * b1.length * b2.length * math.cos(g))
            # d(length)/d(input) for each of the three independent inputs.
            d_gamma = b1.length * b2.length * math.sin(g) / length
            d_b1 = (b1.length - b2.length * math.cos(g)) / length
            d_b2 = (b2.length - b1.length * math.cos(g)) / length
            std = math.sqrt((d_gamma * angle.stddev) ** 2 + (d_b1 * b1.stddev) ** 2 + (d_b2 * b2.stddev) ** 2)
            virtual.append(Bond(angle.atom1_name, angle.atom3name, length, std))
        residue_virtual_bonds[resname] = virtual
    return residue_bonds, residue_virtual_bonds, residue_bond_angles


def load_non_bonded_min_distances():
    """Minimum distances between non-bonded heavy atoms by element pair: {('C','N'): (min_dist, tol), ...}."""
    table = {}
    with open(os.path.join(_HERE, "stereo_chemical_props.txt"), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    separators = [i for i, ln in enumerate(lines) if ln == "-"]
    for ln in lines[separators[1] + 1:]:
        pair, dist, tol = ln.split()
        e1, e2 = pair.split("-")
        table[(e1, e2)] = table[(e2, e1)] = (float(dist), float(tol))
    return table


# ---------------------------------------------------------------------------------------------------------------
# Derived arrays (row 20 = UNK is all zeros / identity where relevant)
# ---------------------------------------------------------------------------------------------------------------
def _frame_4x4(x_direction, xy_plane_direction, origin):
    """Rigid transform whose x axis points along x_direction and whose xy-plane contains xy_plane_direction.

    Gram-Schmidt: e1 = normalised x_direction, e2 = the part of xy_plane_direction orthogonal to e1, e3 = e1 x e2.
    The columns of the rotation are e1, e2, e3; the translation is `origin`.
    """
    e1 = np.asarray(x_direction, dtype=np.float64)
    e1 = e1 / np.linalg.norm(e1)
    e2 = np.asarray(xy_plane_direction, dtype=np.float64)
    e2 = e2 - np.dot(e2, e1) * e1
    e2 = e2 / np.linalg.norm(e2)
    e3 = np.cross(e1, e2)
    frame = np.eye(4)
    frame[:3, :3] = np.stack([e1, e2, e3], axis=1)
    frame[:3, 3] = origin
    return frame


def _build_atom_maps():
    atom14_to_atom37 = np.zeros([21, 14], dtype=np.int64)
    atom37_to_atom14 = np.zeros([21, 37], dtype=np.int64)
    atom14_mask = np.zeros([21, 14], dtype=np.float32)
    atom37_mask = np.zeros([21, 37], dtype=np.float32)
    for restype, name in enumerate(resnames):
        for slot, atom in enumerate(restype_name_to_atom14_names[name]):
            if not atom:
                continue
            atom14_to_atom37[restype, slot] = atom_order[atom]
            atom37_to_atom14[restype, atom_order[atom]] = slot
            atom14_mask[restype, slot] = 1.0
            atom37_mask[restype, atom_order[atom]] = 1.0
    return atom14_to_atom37, atom37_to_atom14, atom14_mask, atom37_mask


(restype_atom14_to_atom37, restype_atom37_to_atom14,
 restype_atom14_mask, restype_atom37_mask) = _build_atom_maps()
STANDARD_ATOM_MASK = restype_atom37_mask.astype(np.int32)


def _build_rigid_group_tables():
    atom37_to_group = np.zeros([21, 37], dtype=np.int64)
    atom37_positions = np.zeros([21, 37, 3], dtype=np.float32)
    atom14_to_group = np.zeros([21, 14], dtype=np.int64)
    atom14_positions = np.zeros([21, 14, 3], dtype=np.float32)
    default_frames = np.tile(np.eye(4, dtype=np.float32), [21, 8, 1, 1])
    for restype, letter in enumerate(restypes):
        name = restype_1to3[letter]
        positions = {}
        for atom, group, pos in rigid_group_atom_positions[name]:
            atom37_to_group[restype, atom_order[atom]] = group
            atom37_positions[restype, atom_order[atom]] = pos
            slot = restype_name_to_atom14_names[name].index(atom)
            atom14_to_group[restype, slot] = group
            atom14_positions[restype, slot] = pos
            positions[atom] = np.array(pos, dtype=np.float64)

        # Groups 0 (backbone) and 1 (pre-omega) are the backbone frame itself. Every other default frame maps
        # its group's coordinates into the parent frame: phi and psi and chi1 into the backbone frame, chi2..4
        # into the previous chi frame.
        # phi: rotation about CA->N, origin at N; the x-axis of the backbone frame fixes the plane.
        default_frames[restype, 2] = _frame_4x4(positions["N"] - positions["CA"], [1.0, 0.0, 0.0], positions["N"])
        # psi: rotation about CA->C, origin at C; N (through CA-N) fixes the plane.
        default_frames[restype, 3] = _frame_4x4(
            positions["C"] - positions["CA"], positions["CA"] - positions["N"], positions["C"])
        chis = chi_angles_atoms[name]
        if chis:
            # chi1 in backbone coordinates: axis CA->CB, origin at CB, N fixes the plane.
            a0, a1, a2 = (positions[a] for a in chis[0][:3])
            default_frames[restype, 4] = _frame_4x4(a2 - a1, a0 - a1, a2)
        for k in range(1, len(chis)):
            # chi(k+1) in chi(k) coordinates: the previous frame's origin is the new axis start, so the axis is
            # the axis-end atom's position; the previous axis (-x) fixes the plane.
            axis_end = positions[chis[k][2]]
            default_frames[restype, 4 + k] = _frame_4x4(axis_end, [-1.0, 0.0, 0.0], axis_end)
    return atom37_to_group, atom37_positions, atom14_to_group, atom14_positions, default_frames


(restype_atom37_to_rigid_group, restype_atom37_rigid_group_positions, restype_atom14_to_rigid_group,
 restype_atom14_rigid_group_positions, restype_rigid_group_default_frame) = _build_rigid_group_tables()


def _build_ambiguous_atoms():
    """[21,14] flag of atoms with a symmetric partner, and [21,14] the atom14 slot each atom maps to on a swap."""
    ambiguous = np.zeros([21, 14], dtype=np.float32)
    swap_index = np.tile(np.arange(14, dtype=np.int64), [21, 1])
    for name, swaps in residue_atom_renaming_swaps.items():
        restype = resname_to_idx[name]
        names14 = restype_name_to_atom14_names[name]
        for a, b in swaps.items():
            i, j = names14.index(a), names14.index(b)
            ambiguous[restype, i] = ambiguous[restype, j] = 1.0
            swap_index[restype, i], swap_index[restype, j] = j, i
    return ambiguous, swap_index


restype_atom14_ambiguous_atoms, restype_atom14_ambiguous_atoms_swap_idx = _build_ambiguous_atoms()


def make_atom14_dists_bounds(overlap_tolerance=1.5, bond_length_tolerance_factor=15):
    """Allowed intra-residue atom-pair distance ranges in atom14 layout, for the violation loss.

    Non-bonded pairs must be at least the sum of their van der Waals radii minus `overlap_tolerance`; bonded
    pairs and 1-3 pairs of a bond angle must lie within `bond_length_tolerance_factor` standard deviations of
    the literature value. Returns {'lower_bound', 'upper_bound', 'stddev'}, each [21, 14, 14] float32.
    """
    lower = np.zeros([21, 14, 14], dtype=np.float32)
    upper = np.zeros([21, 14, 14], dtype=np.float32)
    stddev = np.zeros([21, 14, 14], dtype=np.float32)
    residue_bonds, residue_virtual_bonds, _ = load_stereo_chemical_props()
    for restype, letter in enumerate(restypes):
        name = restype_1to3[letter]
        names14 = restype_name_to_atom14_names[name]
        for i, a in enumerate(names14):
            for j, b in enumerate(names14):
                if a and b and i != j:
                    lower[restype, i, j] = (van_der_waals_radius[a[0]] + van_der_waals_radius[b[0]]
                                            - overlap_tolerance)
                    upper[restype, i, j] = 1e10
        for bond in residue_bonds[name] + residue_virtual_bonds[name]:
            i, j = names14.index(bond.atom1_name), names14.index(bond.atom2_name)
            for p, q in ((i, j), (j, i)):
                lower[restype, p, q] = bond.length - bond_length_tolerance_factor * bond.stddev
                upper[restype, p, q] = bond.length + bond_length_tolerance_factor * bond.stddev
                stddev[restype, p, q] = bond.stddev
    return {"lower_bound": lower, "upper_bound": upper, "stddev": stddev}


_DEFAULT_BOUNDS = make_atom14_dists_bounds()
restype_atom14_bond_lower_bound = _DEFAULT_BOUNDS["lower_bound"]
restype_atom14_bond_upper_bound = _DEFAULT_BOUNDS["upper_bound"]
restype_atom14_bond_stddev = _DEFAULT_BOUNDS["stddev"]


def sequence_to_aatype(sequence):
    """One-letter sequence -> int64 [N] in restype order; anything that is not a standard residue -> 20."""
    return np.array([restype_order.get(c, unk_restype_index) for c in sequence.upper()], dtype=np.int64)


def aatype_to_sequence(aatype):
    """Residue indices (0..19, 20 unknown, 21 gap as in MSAs) -> one-letter string with X and '-'."""
    return "".join(restypes_with_x_and_gap[int(a)] for a in aatype)
