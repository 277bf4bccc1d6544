"""HelixFold's configuration: the Model section of configs/helixfold/*.yaml.

The defaults are AlphaFold2's sizes (Jumper et al. 2021, supplementary Table and model config); the tiny
CPU config and the presets (initial_training, finetuning, model_1 .. model_5) override them in YAML. The
structure module's and the losses' dataclasses are nested here as `structure_module` and `loss` (whose
`preset: initial_training | finetuning` picks AF2's loss weights; see losses.py).
"""
from dataclasses import dataclass, field
from typing import Optional

from ppzoo.models.helixfold.losses import LossConfig
from ppzoo.models.helixfold.structure_module import StructureModuleConfig


@dataclass
class HelixFoldConfig:
    # Representation widths: MSA (c_m), pair (c_z), extra MSA (c_e), single (c_s), template pair (c_t).
    msa_channel: int = 256
    pair_channel: int = 128
    extra_msa_channel: int = 64
    single_channel: int = 384
    template_channel: int = 64

    # Input features (the data pipeline's widths) and the relative position encoding.
    target_feat_dim: int = 22
    msa_feat_dim: int = 49
    extra_msa_classes: int = 23  # 20 amino acids, unknown, gap, mask
    max_relative_feature: int = 32  # residue offsets are clipped to [-32, 32]: 65 one-hot classes

    # Stacks.
    evoformer_blocks: int = 48
    extra_msa_blocks: int = 4
    template_pair_blocks: int = 2

    # Attention heads (count and per-head width) of each attention.
    msa_row_heads: int = 8
    msa_row_head_dim: int = 32
    msa_column_heads: int = 8
    msa_column_head_dim: int = 32
    extra_msa_row_heads: int = 8
    extra_msa_row_head_dim: int = 8
    extra_msa_column_heads: int = 8  # global column attention
    extra_msa_column_head_dim: int = 8
    triangle_heads: int = 4
    triangle_head_dim: int = 32
    template_triangle_heads: int = 4
    template_triangle_head_dim: int = 16
    template_pointwise_heads: int = 4
    template_pointwise_head_dim: int = 16

    # Widths inside blocks.
    outer_product_channel: int = 32
    triangle_mult_channel: int = 128
    template_triangle_mult_channel: int = 64
    transition_factor: int = 4
    template_transition_factor: int = 2

    # Dropout (AF2: rows of the MSA attention 0.15, the pair's triangle updates 0.25); 0 disables.
    msa_dropout: float = 0.15
    pair_dropout: float = 0.25

    # Templates: AF2 embeds up to 4 templates' pair features through the template pair stack and their
    # torsion angles as extra MSA rows.
    templates: bool = True
    template_torsion_angles: bool = True
    max_templates: int = 4

    # Recycling: in training a number of recycles is drawn uniformly from [0, num_recycle] per step (the
    # same on every data-parallel rank: it comes from the seeded generator); evaluation runs all of them.
    num_recycle: int = 3
    recycle_min_bin: float = 3.25
    recycle_max_bin: float = 20.75
    recycle_bins: int = 15

    # Heads.
    distogram_bins: int = 64  # the bins' edges are the loss's (Model.loss.distogram_first/last_break)
    plddt_bins: int = 50
    plddt_hidden: int = 128

    structure_module: StructureModuleConfig = field(default_factory=StructureModuleConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    # HelixFold's optimizations (each has a plain path and gives the same results):
    # the gated attention as one fused kernel where this Paddle build registers fused_gate_attention (GPU);
    fuse_gate_attention: bool = True
    # attention over at most chunk_size rows at a time and the transitions / outer product mean over
    # chunk_size rows at a time ("subbatching"): lower peak memory for long sequences; None: all at once;
    chunk_size: Optional[int] = None
    # with Engine.recompute, the Evoformer blocks from this index on are recomputed in backward.
    recompute_start_block: int = 0

    def __post_init__(self):
        positive = ["msa_channel", "pair_channel", "extra_msa_channel", "single_channel", "template_channel",
                    "evoformer_blocks", "msa_row_heads", "msa_column_heads", "triangle_heads", "recycle_bins",
                    "distogram_bins", "plddt_bins"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ["extra_msa_blocks", "template_pair_blocks", "num_recycle", "max_relative_feature"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ["msa_dropout", "pair_dropout"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        structure = self.structure_module
        if (structure.c_s, structure.c_z) != (self.single_channel, self.pair_channel):
            raise ValueError(
                f"structure_module.c_s={structure.c_s} and c_z={structure.c_z} must equal single_channel="
                f"{self.single_channel} and pair_channel={self.pair_channel}: the structure module reads the "
                "Evoformer's single and pair representations"
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows or null, got {self.chunk_size}")
        if not 0 <= self.recompute_start_block <= self.evoformer_blocks:
            raise ValueError(
                f"recompute_start_block must be in [0, evoformer_blocks={self.evoformer_blocks}], got "
                f"{self.recompute_start_block}"
            )
