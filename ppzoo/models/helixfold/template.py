"""Template embedding (AF2 supplement 1.7.1, Algorithms 2, 16, 17).

Each template's pair features (its pseudo-beta distogram, masks and residue types) go through the template
pair stack; the query pair then attends pointwise over the templates. Each template's torsion angles become
an extra MSA row (the "template angle features").
"""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.data.protein import residue_constants as rc
from ppzoo.models.helixfold import geometry
from ppzoo.models.helixfold.evoformer import TriangleAttention, TriangleMultiplication
from ppzoo.models.helixfold.primitives import GatedAttention, Linear, Transition, distance_bins, one_hot, shared_dropout

TEMPLATE_DGRAM = (3.25, 50.75, 39)  # AF2's template distogram: 39 bins from 3.25 to 50.75 A
AATYPE_CLASSES = 22  # 20 amino acids, unknown, gap
# distogram, its pair mask, the two residues' types, the backbone pair mask. (AF2 also has unit vectors
# between the backbone frames, but its released models switch them off: use_template_unit_vector=False.)
TEMPLATE_PAIR_FEAT = TEMPLATE_DGRAM[2] + 1 + 2 * AATYPE_CLASSES + 1
# residue type, (sin, cos) of the 7 torsions and of their alternatives, the 7 torsions' masks
TEMPLATE_ANGLE_FEAT = AATYPE_CLASSES + 14 + 14 + 7
TEMPLATE_KEYS = ("template_aatype", "template_all_atom_positions", "template_all_atom_masks", "template_mask",
                 "template_pseudo_beta", "template_pseudo_beta_mask")


def template_pair_features(batch, t):
    """The pair features of template t: [B, N, N, TEMPLATE_PAIR_FEAT], zero where a pseudo-beta is absent."""
    beta_mask = batch["template_pseudo_beta_mask"][:, t]
    mask_2d = beta_mask.unsqueeze(2) * beta_mask.unsqueeze(1)
    dgram = distance_bins(batch["template_pseudo_beta"][:, t], *TEMPLATE_DGRAM)
    aatype = one_hot(batch["template_aatype"][:, t], AATYPE_CLASSES)  # [B, N, 22]
    n = aatype.shape[1]
    atom_mask = batch["template_all_atom_masks"][:, t]
    backbone = atom_mask[..., rc.atom_order["N"]] * atom_mask[..., rc.atom_order["CA"]] * atom_mask[..., rc.atom_order["C"]]
    features = paddle.concat([
        dgram,
        mask_2d.unsqueeze(-1),
        aatype.unsqueeze(1).expand([-1, n, -1, -1]),  # residue j's type
        aatype.unsqueeze(2).expand([-1, -1, n, -1]),  # residue i's type
        (backbone.unsqueeze(2) * backbone.unsqueeze(1)).unsqueeze(-1),
    ], axis=-1)
    return features * mask_2d.unsqueeze(-1)


def template_angle_features(batch):
    """Per template and residue: type, torsion (sin, cos), alternative torsions, torsion masks ->
    ([B, T, N, TEMPLATE_ANGLE_FEAT], the psi torsion's mask [B, T, N] as the rows' MSA mask)."""
    aatype = batch["template_aatype"]
    b, t, n = aatype.shape
    # Gaps (type 21) have no atoms, hence masked torsions; the residue tables know types 0..20 only.
    torsions = geometry.atom37_to_torsion_angles(
        paddle.clip(aatype, max=rc.unk_restype_index).reshape([b * t, n]),
        batch["template_all_atom_positions"].reshape([b * t, n, 37, 3]),
        batch["template_all_atom_masks"].reshape([b * t, n, 37]),
    )
    sin_cos = torsions["torsion_angles_sin_cos"].reshape([b, t, n, 14])
    alt_sin_cos = torsions["alt_torsion_angles_sin_cos"].reshape([b, t, n, 14])
    mask = torsions["torsion_angles_mask"].reshape([b, t, n, 7])
    features = paddle.concat([one_hot(aatype, AATYPE_CLASSES), sin_cos * mask.repeat_interleave(2, axis=-1),
                              alt_sin_cos * mask.repeat_interleave(2, axis=-1), mask], axis=-1)
    return features, mask[..., 2]


class TemplatePairBlock(nn.Layer):
    """Algorithm 16: triangle attention (starting, ending), triangle multiplication (outgoing, incoming),
    transition, on one template's pair."""

    def __init__(self, cfg):
        super().__init__()
        c_t, fuse, chunk = cfg.template_channel, cfg.fuse_gate_attention, cfg.chunk_size
        heads, dim = cfg.template_triangle_heads, cfg.template_triangle_head_dim
        self.dropout = cfg.pair_dropout
        self.tri_att_start = TriangleAttention(c_t, heads, dim, True, fuse, chunk)
        self.tri_att_end = TriangleAttention(c_t, heads, dim, False, fuse, chunk)
        self.tri_mul_out = TriangleMultiplication(c_t, cfg.template_triangle_mult_channel, outgoing=True)
        self.tri_mul_in = TriangleMultiplication(c_t, cfg.template_triangle_mult_channel, outgoing=False)
        self.transition = Transition(c_t, cfg.template_transition_factor, chunk)

    def forward(self, pair, pair_mask):
        training = self.training
        pair = pair + shared_dropout(self.tri_att_start(pair, pair_mask), self.dropout, 1, training)
        pair = pair + shared_dropout(self.tri_att_end(pair, pair_mask), self.dropout, 2, training)
        pair = pair + shared_dropout(self.tri_mul_out(pair, pair_mask), self.dropout, 1, training)
        pair = pair + shared_dropout(self.tri_mul_in(pair, pair_mask), self.dropout, 1, training)
        return pair + self.transition(pair)


class TemplateEmbedder(nn.Layer):
    """Templates -> an update of the query pair [B, N, N, c_z] (zero when a sample has no template), and
    the template angle features as MSA rows [B, T, N, c_m] with their mask."""

    def __init__(self, cfg):
        super().__init__()
        self.max_templates = cfg.max_templates
        self.embed_pair = Linear(TEMPLATE_PAIR_FEAT, cfg.template_channel)
        self.pair_stack = nn.LayerList([TemplatePairBlock(cfg) for _ in range(cfg.template_pair_blocks)])
        self.pair_norm = nn.LayerNorm(cfg.template_channel)
        self.pointwise = GatedAttention(cfg.pair_channel, cfg.template_channel, cfg.template_pointwise_heads,
                                        cfg.template_pointwise_head_dim, cfg.pair_channel, gating=False,
                                        chunk_size=cfg.chunk_size)
        self.use_angles = cfg.template_torsion_angles
        if self.use_angles:
            self.angle_hidden = Linear(TEMPLATE_ANGLE_FEAT, cfg.msa_channel, init="relu")
            self.angle_output = Linear(cfg.msa_channel, cfg.msa_channel, init="relu")

    def forward(self, batch, pair, pair_mask):
        num = min(batch["template_aatype"].shape[1], self.max_templates)
        batch = {key: batch[key][:, :num] for key in TEMPLATE_KEYS}
        templates = []
        for t in range(num):
            act = self.embed_pair(template_pair_features(batch, t))
            for block in self.pair_stack:
                act = block(act, pair_mask)
            templates.append(self.pair_norm(act))
        stacked = paddle.stack(templates, axis=3)  # [B, N, N, T, c_t]
        b, n = pair.shape[0], pair.shape[1]
        template_mask = batch["template_mask"].astype(pair.dtype)  # [B, T]
        # Pointwise attention: every query pair entry (a row of length 1) attends over its T templates.
        query = pair.reshape([b, n * n, 1, -1])
        keys = stacked.reshape([b, n * n, num, -1])
        mask = template_mask.unsqueeze(1).expand([-1, n * n, -1])
        update = self.pointwise(query, keys, mask).reshape([b, n, n, -1])
        has_template = (template_mask.sum(axis=1) > 0).astype(pair.dtype).reshape([b, 1, 1, 1])
        update = update * has_template

        angle_rows = angle_mask = None
        if self.use_angles:
            features, angle_mask = template_angle_features(batch)
            angle_rows = self.angle_output(F.relu(self.angle_hidden(features)))
            angle_mask = angle_mask * template_mask.unsqueeze(-1)
        return update, angle_rows, angle_mask
