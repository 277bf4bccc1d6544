"""Input embedding (AF2 Algorithms 3, 4) and the recycling embedder (Algorithm 32)."""
import paddle
import paddle.nn as nn

from ppzoo.data.protein import residue_constants as rc
from ppzoo.models.helixfold.primitives import Linear, distance_bins, one_hot


class InputEmbedder(nn.Layer):
    """target_feat and msa_feat -> the MSA representation [B, S, N, c_m]; target_feat and the relative
    residue positions (clipped at +-max_relative_feature) -> the pair representation [B, N, N, c_z]."""

    def __init__(self, cfg):
        super().__init__()
        c_m, c_z = cfg.msa_channel, cfg.pair_channel
        self.max_relative = cfg.max_relative_feature
        self.target_to_msa = Linear(cfg.target_feat_dim, c_m)
        self.msa_to_msa = Linear(cfg.msa_feat_dim, c_m)
        self.left_single = Linear(cfg.target_feat_dim, c_z)
        self.right_single = Linear(cfg.target_feat_dim, c_z)
        self.relative_position = Linear(2 * cfg.max_relative_feature + 1, c_z)

    def forward(self, target_feat, msa_feat, residue_index):
        msa = self.msa_to_msa(msa_feat) + self.target_to_msa(target_feat).unsqueeze(1)
        pair = self.left_single(target_feat).unsqueeze(2) + self.right_single(target_feat).unsqueeze(1)
        offset = residue_index.unsqueeze(2) - residue_index.unsqueeze(1)  # [B, N, N]: i - j
        offset = paddle.clip(offset, -self.max_relative, self.max_relative) + self.max_relative
        pair = pair + self.relative_position(one_hot(offset, 2 * self.max_relative + 1, pair.dtype))
        return msa, pair


def pseudo_beta(aatype, atom37_positions):
    """The pseudo-beta atom of each residue: CB, or CA for glycine. [B, N, 37, 3] -> [B, N, 3]."""
    is_gly = (aatype == rc.restype_order["G"]).unsqueeze(-1)
    ca = atom37_positions[:, :, rc.atom_order["CA"]]
    cb = atom37_positions[:, :, rc.atom_order["CB"]]
    return paddle.where(is_gly, ca, cb)


class RecyclingEmbedder(nn.Layer):
    """The previous iteration's first MSA row, pair and predicted pseudo-beta distances, added to this
    iteration's representations (the distances one-hot in recycle_bins bins from 3.25 to 20.75 A)."""

    def __init__(self, cfg):
        super().__init__()
        self.msa_norm = nn.LayerNorm(cfg.msa_channel)
        self.pair_norm = nn.LayerNorm(cfg.pair_channel)
        self.distances = Linear(cfg.recycle_bins, cfg.pair_channel)
        self.bins = (cfg.recycle_min_bin, cfg.recycle_max_bin, cfg.recycle_bins)

    def forward(self, msa, pair, prev_msa_first_row, prev_pair, prev_pseudo_beta):
        first_row = msa[:, :1] + self.msa_norm(prev_msa_first_row).unsqueeze(1)
        msa = paddle.concat([first_row, msa[:, 1:]], axis=1)
        pair = pair + self.pair_norm(prev_pair) + self.distances(distance_bins(prev_pseudo_beta, *self.bins))
        return msa, pair


def extra_msa_features(batch, classes):
    """AF2's extra MSA features: one-hot residue (23), has_deletion, deletion_value -> [B, E, N, 25]."""
    return paddle.concat([
        one_hot(batch["extra_msa"], classes),
        batch["extra_has_deletion"].unsqueeze(-1),
        batch["extra_deletion_value"].unsqueeze(-1),
    ], axis=-1)
