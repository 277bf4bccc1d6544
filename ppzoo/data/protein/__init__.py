"""Protein data for structure prediction (AlphaFold2 / HelixFold): structures, features, MSAs, datasets.

Modules: `residue_constants` (AF2's residue tables), `structure` (PDB/mmCIF -> atom37), `raw_features`
(sequence, MSA, template and ground-truth features; AF2 feature files; what user input may be),
`msa_search` (Stockholm/A3M, jackhmmer), `pipeline` (raw features -> model example), `dataset`
(the registered `ProteinStructures` dataset).

User input is never unpickled: `load_user_input` takes FASTA, PDB/mmCIF (optionally .gz) and .npz only.

Batch contract (what `ProteinStructures` yields, stacked by `collate` with a leading batch dimension B).
N residues after cropping (Data arg crop_size), S MSA cluster centres (max_msa_clusters), E extra MSA rows
(max_extra_msa), T templates (max_templates); every dimension is padded to its size, with masks marking what
is real. float32 unless marked int64. Residue types follow `residue_constants.restypes` (0..19, 20 unknown);
MSA values add 21 = gap and 22 = BERT mask token. Padded residues have aatype 0 and all masks 0.

    aatype                       int64 [B, N]
    residue_index                int64 [B, N]        author / feature numbering, gaps kept
    seq_mask                           [B, N]
    target_feat                        [B, N, 22]     has_break, one-hot(aatype, 21)
    msa_feat                           [B, S, N, 49]  one-hot(msa, 23), has_deletion, deletion_value,
                                                      cluster_profile (23), deletion_mean_value
    msa_mask                           [B, S, N]
    true_msa                     int64 [B, S, N]     the cluster centres before BERT corruption
    bert_mask                          [B, S, N]     1 where a centre position was corrupted
    extra_msa                    int64 [B, E, N]     values 0..22
    extra_msa_mask, extra_has_deletion, extra_deletion_value   [B, E, N]
    template_aatype              int64 [B, T, N]
    template_all_atom_positions        [B, T, N, 37, 3]
    template_all_atom_masks            [B, T, N, 37]
    template_mask                      [B, T]
    template_pseudo_beta               [B, T, N, 3]
    template_pseudo_beta_mask          [B, T, N]
    atom14_atom_exists                 [B, N, 14]
    residx_atom14_to_atom37      int64 [B, N, 14]
    residx_atom37_to_atom14      int64 [B, N, 37]
    atom37_atom_exists                 [B, N, 37]
  ground truth, when the structure is known:
    all_atom_positions                 [B, N, 37, 3]  Angstrom, zero where all_atom_mask is 0
    all_atom_mask                      [B, N, 37]
    resolution                         [B]            Angstrom, 0 when unknown
    pseudo_beta                        [B, N, 3]      CB (CA for glycine)
    pseudo_beta_mask                   [B, N]

Backbone frames, torsion angles and atom14 ground truth are derived from the atom37 arrays by the model's
loss code.
"""
import numpy as np

from ppzoo.data.protein import residue_constants
from ppzoo.data.protein.dataset import ProteinStructures, ProteinStructuresConfig
from ppzoo.data.protein.pipeline import FeatureConfig, make_example
from ppzoo.data.protein.raw_features import (features_from_protein, load_features_npz,
                                             load_trusted_feature_pickle, load_user_input, save_features_npz,
                                             single_sequence_features)
from ppzoo.data.protein.structure import Protein, read_chain, read_chains
from ppzoo.errors import DataError


def collate(examples):
    """Stack examples (dicts of equally shaped arrays) into a batch; DataError naming the first mismatch."""
    if not examples:
        raise DataError("collate needs at least one example.")
    keys = set(examples[0])
    for i, example in enumerate(examples[1:], start=1):
        if set(example) != keys:
            raise DataError(f"Example {i} has features {sorted(set(example) ^ keys)} that example 0 "
                            f"{'lacks' if set(example) - keys else 'has'}; mix examples with and without ground "
                            f"truth in separate batches.")
        for key in keys:
            if np.shape(example[key]) != np.shape(examples[0][key]):
                raise DataError(f"{key} has shape {np.shape(example[key])} in example {i} but "
                                f"{np.shape(examples[0][key])} in example 0: build them with the same crop_size and "
                                f"MSA/template sizes.")
    return {key: np.stack([np.asarray(example[key]) for example in examples]) for key in examples[0]}


__all__ = [
    "residue_constants", "Protein", "read_chain", "read_chains", "features_from_protein", "single_sequence_features",
    "load_user_input", "load_features_npz", "load_trusted_feature_pickle", "save_features_npz", "FeatureConfig",
    "make_example", "ProteinStructures", "ProteinStructuresConfig", "collate",
]
