"""ProteinStructures: training examples from structure files and AlphaFold2 feature sets.

Sources (both optional, at least one needed):
- `structures`: glob patterns of PDB/mmCIF files (plain or .gz). Every protein chain with enough resolved
  backbone becomes a single-sequence entry (the chain's own sequence, no MSA, no templates) with its
  coordinates as ground truth. With `msa_database` (a FASTA of sequences) set, each chain instead gets an
  MSA from a jackhmmer search of that database (HMMER must be installed).
- `feature_sets`: path prefixes P with P.features.npz (or, for the trusted files that ship with the
  project's data only, P.features.pkl) holding AlphaFold2 raw features (MSA, templates), and P.pdb or
  P.cif the native structure, aligned to the feature sequence as ground truth.

The dataset has `len(entries) * samples_per_entry` items; item i is entry i % len(entries), processed by
`pipeline.make_example` with the seed (seed, i): a different crop, MSA sample and BERT mask for every
repeat of an entry, yet the same example every time item i is asked for (so resumed runs see the same data).
"""
import glob
import os
from dataclasses import dataclass, field, fields
from typing import List, Optional


from ppzoo.data.protein import residue_constants as rc
from ppzoo.data.protein.msa_search import run_jackhmmer
from ppzoo.data.protein.pipeline import FeatureConfig, make_example
from ppzoo.data.protein.raw_features import (align_structure_to_sequence, features_from_protein, msa_features,
                                             load_features_npz, load_trusted_feature_pickle)
from ppzoo.data.protein.structure import read_chain, read_chains
from ppzoo.errors import DataError
from ppzoo.registry import register_dataset

SHARED_PROTEINS = "../shared/data/proteins"


@dataclass
class ProteinStructuresConfig:
    structures: List[str] = field(default_factory=lambda: [
        f"{SHARED_PROTEINS}/pdb/*.pdb", f"{SHARED_PROTEINS}/pdb/*.pdb.gz"])
    feature_sets: List[str] = field(default_factory=lambda: [f"{SHARED_PROTEINS}/casp14/T1026"])
    msa_database: Optional[str] = None  # FASTA searched with jackhmmer for the structures' MSAs; None: no MSA
    min_residues: int = 16  # chains shorter than this are left out
    min_backbone_fraction: float = 0.5  # chains with N, CA and C resolved in fewer residues are left out
    samples_per_entry: int = 8
    seed: int = 0
    crop_size: int = 64
    max_msa_clusters: int = 16
    max_extra_msa: int = 32
    max_templates: int = 4
    masked_msa_replace_fraction: float = 0.15
    training: bool = True  # random crops and template subsets; false: the first residues and templates


def _feature_config(args):
    """The pipeline settings the dataset exposes (the BERT replacement probabilities keep AF2's values)."""
    shared = {f.name for f in fields(FeatureConfig)} & {f.name for f in fields(ProteinStructuresConfig)}
    return FeatureConfig(**{name: getattr(args, name) for name in shared})


def _expand(pattern):
    matches = sorted(glob.glob(pattern))
    if not matches and not glob.has_magic(pattern):
        raise DataError(f"Structure file {pattern} does not exist (resolved from {os.getcwd()}).")
    return matches


def _backbone_fraction(protein):
    backbone = [rc.atom_order[a] for a in ("N", "CA", "C")]
    return float(protein.atom_mask[:, backbone].all(axis=1).mean())


def _load_feature_set(prefix):
    """Raw features with ground truth for one feature-set prefix."""
    npz, pkl = f"{prefix}.features.npz", f"{prefix}.features.pkl"
    if os.path.exists(npz):
        raw = load_features_npz(npz)
    elif os.path.exists(pkl):
        raw = load_trusted_feature_pickle(pkl)  # feature sets name the project's shipped data, never uploads
    else:
        raise DataError(f"Feature set {prefix}: neither {npz} nor {pkl} exists (resolved from {os.getcwd()}).")
    natives = [p for p in (f"{prefix}.pdb", f"{prefix}.cif", f"{prefix}.pdb.gz", f"{prefix}.cif.gz")
               if os.path.exists(p)]
    if not natives:
        raise DataError(f"Feature set {prefix} has no native structure: put it at {prefix}.pdb or {prefix}.cif.")
    raw.update(align_structure_to_sequence(read_chain(natives[0]), raw["sequence"]))
    raw["name"] = os.path.basename(prefix)
    return raw


@register_dataset()
class ProteinStructures:
    """Protein structure prediction examples in the batch contract of ppzoo.data.protein."""

    config_class = ProteinStructuresConfig
    needs_tokenizer = False

    @classmethod
    def build(cls, args, tokenizer=None, seq_len=None):
        return cls(args if args is not None else ProteinStructuresConfig())

    def __init__(self, args: ProteinStructuresConfig):
        if isinstance(args.structures, str) or isinstance(args.feature_sets, str):
            raise DataError("ProteinStructures structures and feature_sets must be lists of paths, not one string.")
        if args.samples_per_entry < 1:
            raise DataError(f"samples_per_entry must be at least 1, got {args.samples_per_entry}.")
        self.args = args
        self.feature_config = _feature_config(args)
        self.feature_config.validate()
        self.entries, self.skipped = [], []
        for pattern in args.structures:
            for path in _expand(pattern):
                for chain_id, protein in read_chains(path).items():
                    label = f"{os.path.basename(path)}:{chain_id}"
                    if len(protein) < args.min_residues:
                        self.skipped.append(f"{label} ({len(protein)} residues < min_residues)")
                    elif _backbone_fraction(protein) < args.min_backbone_fraction:
                        self.skipped.append(f"{label} (backbone resolved in {_backbone_fraction(protein):.0%})")
                    else:
                        raw = features_from_protein(protein)
                        if args.msa_database:
                            raw.update(msa_features(*run_jackhmmer(protein.sequence, args.msa_database)[:2]))
                        raw["name"] = label
                        self.entries.append(raw)
        for prefix in args.feature_sets:
            self.entries.append(_load_feature_set(prefix))
        if not self.entries:
            raise DataError(
                "ProteinStructures found no usable protein: check `structures` (glob patterns of PDB/mmCIF files) "
                f"and `feature_sets` (resolved from {os.getcwd()}); left out: {self.skipped or 'nothing'}."
            )

    @property
    def names(self):
        return [entry["name"] for entry in self.entries]

    def __len__(self):
        return len(self.entries) * self.args.samples_per_entry

    def __getitem__(self, index):
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for ProteinStructures with {len(self)} examples")
        raw = self.entries[index % len(self.entries)]
        return make_example(raw, self.feature_config, seed=[self.args.seed, index])

    def __repr__(self):
        return (f"<ProteinStructures: {len(self.entries)} proteins x {self.args.samples_per_entry} samples, "
                f"crop {self.args.crop_size}; left out: {', '.join(self.skipped) or 'none'}>")
