"""AlphaFold2's structure module (supplement 1.8, Algorithms 20-24), in Paddle.

From the Evoformer's single [B, N, c_s] and pair [B, N, N, c_z] representations it builds the backbone as one
rigid frame per residue, starting from the identity ("black hole") and refining it over `num_layers` layers
that share their weights: invariant point attention (IPA), a transition, a quaternion backbone update, and an
angle resnet predicting the 7 torsion angles. The final layer's frames and torsions become the 8 rigid-group
frames of every residue and, from the idealised group coordinates, atom14 and atom37 positions.

Frames are refined in nanometre-like units (Angstrom / position_scale) and reported in Angstrom. Between
layers the rotation's gradient is stopped, as in AF2, so that the loss of each layer does not push the
rotations of earlier layers through long products of rotation matrices.
"""
import math
from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.models.helixfold import geometry
from ppzoo.models.helixfold.geometry import Rigid


@dataclass
class StructureModuleConfig:
    c_s: int = 384             # single representation channels
    c_z: int = 128             # pair representation channels
    c_ipa: int = 16            # IPA scalar query/key/value channels per head
    num_heads_ipa: int = 12
    num_qk_points: int = 4
    num_v_points: int = 8
    num_layers: int = 8        # IPA layers, all sharing one set of weights
    c_resnet: int = 128        # angle resnet channels
    num_resnet_blocks: int = 2
    num_angles: int = 7        # pre-omega, phi, psi, chi1-4
    num_transition_layers: int = 3
    position_scale: float = 10.0   # Angstrom per internal unit of the frames' translations
    dropout: float = 0.1
    epsilon: float = 1e-8

    def __post_init__(self):
        if self.num_angles != 7:
            raise ValueError(f"num_angles={self.num_angles}: the all-atom construction needs AF2's 7 torsions "
                             "(pre-omega, phi, psi, chi1-4)")
        for name in ("c_s", "c_z", "c_ipa", "num_heads_ipa", "num_qk_points", "num_v_points", "num_layers",
                     "c_resnet", "num_transition_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def linear(in_features, out_features, init="default", bias=True):
    """A Linear layer with AF2's initialisations: "default" (LeCun normal), "relu" (He normal, for layers
    followed by ReLU) or "final" (zeros, so that residual branches and updates start as the identity)."""
    if init == "final":
        weight_init = nn.initializer.Constant(0.0)
    else:
        scale = 2.0 if init == "relu" else 1.0
        weight_init = nn.initializer.TruncatedNormal(std=math.sqrt(scale / in_features))
    return nn.Linear(in_features, out_features, weight_attr=paddle.ParamAttr(initializer=weight_init),
                     bias_attr=paddle.ParamAttr(initializer=nn.initializer.Constant(0.0)) if bias else False)


class InvariantPointAttention(nn.Layer):
    """Algorithm 22: attention whose logits and outputs are invariant to a global rigid motion of the frames.

    Each head mixes three terms: scalar query-key products, a bias from the pair representation, and
    (negative, per-head weighted) squared distances between query and key points placed in the global frame
    by each residue's frame. Outputs: scalar values, value points brought back into the query residue's
    local frame (and their norms), and the attention-weighted pair representation.
    """

    def __init__(self, config):
        super().__init__()
        c, h = config.c_ipa, config.num_heads_ipa
        self.config = config
        self.q = linear(config.c_s, h * c)
        self.kv = linear(config.c_s, 2 * h * c)
        self.q_points = linear(config.c_s, h * config.num_qk_points * 3)
        self.kv_points = linear(config.c_s, h * (config.num_qk_points + config.num_v_points) * 3)
        self.pair_bias = linear(config.c_z, h)
        # softplus(log(e - 1)) = 1: every head starts with point weight 1.
        self.head_weights = self.create_parameter(
            [h], default_initializer=nn.initializer.Constant(math.log(math.e - 1.0)))
        out_dim = h * (c + config.c_z + config.num_v_points * 4)
        self.output = linear(out_dim, config.c_s, init="final")

    def forward(self, single, pair, rigid, mask):
        cfg = self.config
        b, n = single.shape[0], single.shape[1]
        h, c, pq, pv = cfg.num_heads_ipa, cfg.c_ipa, cfg.num_qk_points, cfg.num_v_points

        q = self.q(single).reshape([b, n, h, c])
        k, v = paddle.split(self.kv(single).reshape([b, n, h, 2 * c]), 2, axis=-1)

        # Points in each residue's local frame, then moved to the global frame by that frame.
        frames = rigid.unsqueeze(-1).unsqueeze(-1)  # [B, N, 1, 1] against points [B, N, H, P, 3]
        q_pts = frames.apply(self.q_points(single).reshape([b, n, h, pq, 3]))
        kv_pts = frames.apply(self.kv_points(single).reshape([b, n, h, pq + pv, 3]))
        k_pts, v_pts = kv_pts[:, :, :, :pq], kv_pts[:, :, :, pq:]

        scalar_weight = math.sqrt(1.0 / (3 * c))
        point_weight = math.sqrt(1.0 / (3 * pq * 9.0 / 2))
        pair_weight = math.sqrt(1.0 / 3)

        logits = paddle.matmul(q.transpose([0, 2, 1, 3]), k.transpose([0, 2, 1, 3]), transpose_y=True)
        logits = logits * scalar_weight  # [B, H, N, N]
        logits = logits + pair_weight * self.pair_bias(pair).transpose([0, 3, 1, 2])
        diff = q_pts.unsqueeze(2) - k_pts.unsqueeze(1)  # [B, N_i, N_j, H, P, 3]
        dist2 = paddle.sum(diff * diff, axis=[-1, -2]).transpose([0, 3, 1, 2])  # [B, H, N, N]
        head_weights = F.softplus(self.head_weights).reshape([1, h, 1, 1]) * point_weight
        logits = logits - 0.5 * head_weights * dist2
        pair_mask = mask.unsqueeze(-1) * mask.unsqueeze(-2)
        logits = logits - 1e5 * (1.0 - pair_mask.unsqueeze(1))
        attn = F.softmax(logits, axis=-1)  # [B, H, N_i, N_j]

        out_scalar = paddle.matmul(attn, v.transpose([0, 2, 1, 3])).transpose([0, 2, 1, 3])  # [B, N, H, C]
        v_flat = v_pts.transpose([0, 2, 1, 3, 4]).reshape([b, h, n, pv * 3])
        out_pts = paddle.matmul(attn, v_flat).reshape([b, h, n, pv, 3]).transpose([0, 2, 1, 3, 4])
        out_pts = frames.invert_apply(out_pts)  # back into each query residue's frame, [B, N, H, Pv, 3]
        out_pts_norm = paddle.sqrt(cfg.epsilon + paddle.sum(out_pts * out_pts, axis=-1))
        # attention over j of the pair row i: [B, N_i, H, N_j] @ [B, N_i, N_j, c_z]
        out_pair = paddle.matmul(attn.transpose([0, 2, 1, 3]), pair)  # [B, N, H, c_z]

        features = paddle.concat([
            out_scalar.reshape([b, n, h * c]),
            out_pts.transpose([0, 1, 4, 2, 3]).reshape([b, n, 3 * h * pv]),
            out_pts_norm.reshape([b, n, h * pv]),
            out_pair.reshape([b, n, h * cfg.c_z]),
        ], axis=-1)
        return self.output(features)


class BackboneUpdate(nn.Layer):
    """Algorithm 23: a per-residue rigid update, rotation as a quaternion (1, b, c, d) and a translation,
    composed on the right of the current frame (i.e. expressed in the residue's own frame)."""

    def __init__(self, c_s):
        super().__init__()
        self.linear = linear(c_s, 6, init="final")

    def forward(self, single, quat, trans):
        update = self.linear(single)
        rot_update, trans_update = update[..., :3], update[..., 3:]
        # q * (1, v) = q + q * (0, v), renormalised.
        new_quat = geometry.normalize(quat + geometry.quat_multiply_by_vec(quat, rot_update))
        rot = geometry.quat_to_rot(quat)
        new_trans = trans + paddle.matmul(rot, trans_update.unsqueeze(-1)).squeeze(-1)
        return new_quat, new_trans


class AngleResnet(nn.Layer):
    """Algorithm 20 lines 11-14: torsion angles (unnormalised and normalised (sin, cos)) from the current
    and the initial single representation."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.input = linear(config.c_s, config.c_resnet)
        self.input_initial = linear(config.c_s, config.c_resnet)
        self.blocks = nn.LayerList([
            nn.LayerList([linear(config.c_resnet, config.c_resnet, init="relu"),
                          linear(config.c_resnet, config.c_resnet, init="final")])
            for _ in range(config.num_resnet_blocks)])
        self.output = linear(config.c_resnet, config.num_angles * 2)

    def forward(self, single, single_initial):
        act = self.input(F.relu(single)) + self.input_initial(F.relu(single_initial))
        for first, second in self.blocks:
            act = act + second(F.relu(first(F.relu(act))))
        unnormalized = self.output(F.relu(act)).reshape(list(act.shape[:-1]) + [self.config.num_angles, 2])
        norm = paddle.sqrt(paddle.clip(paddle.sum(unnormalized * unnormalized, axis=-1, keepdim=True),
                                       min=self.config.epsilon))
        return unnormalized, unnormalized / norm


class StructureModule(nn.Layer):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.single_norm = nn.LayerNorm(config.c_s)
        self.pair_norm = nn.LayerNorm(config.c_z)
        self.initial_projection = linear(config.c_s, config.c_s)
        self.ipa = InvariantPointAttention(config)
        self.ipa_dropout = nn.Dropout(config.dropout)
        self.ipa_norm = nn.LayerNorm(config.c_s)
        self.transition = nn.LayerList(
            [linear(config.c_s, config.c_s, init="relu") for _ in range(config.num_transition_layers - 1)]
            + [linear(config.c_s, config.c_s, init="final")])
        self.transition_dropout = nn.Dropout(config.dropout)
        self.transition_norm = nn.LayerNorm(config.c_s)
        self.backbone_update = BackboneUpdate(config.c_s)
        self.angle_resnet = AngleResnet(config)

    def _transition(self, single):
        act = single
        for i, layer in enumerate(self.transition):
            act = layer(act)
            if i < len(self.transition) - 1:
                act = F.relu(act)
        return self.transition_norm(self.transition_dropout(single + act))

    def forward(self, single, pair, aatype, seq_mask):
        cfg = self.config
        mask = seq_mask.astype(single.dtype)
        single = self.single_norm(single)
        single_initial = single
        single = self.initial_projection(single)
        pair = self.pair_norm(pair)

        b, n = single.shape[0], single.shape[1]
        quat = paddle.concat([paddle.ones([b, n, 1], single.dtype), paddle.zeros([b, n, 3], single.dtype)], -1)
        trans = paddle.zeros([b, n, 3], single.dtype)

        frames, unnormalized_angles, angles = [], [], []
        for layer in range(cfg.num_layers):
            rigid = Rigid(geometry.quat_to_rot(quat), trans)
            single = single + self.ipa(single, pair, rigid, mask)
            single = self.ipa_norm(self.ipa_dropout(single))
            single = self._transition(single)
            quat, trans = self.backbone_update(single, quat, trans)
            unnormalized, normalized = self.angle_resnet(single, single_initial)
            frames.append(paddle.concat([quat, trans * cfg.position_scale], axis=-1))
            unnormalized_angles.append(unnormalized)
            angles.append(normalized)
            if layer < cfg.num_layers - 1:
                quat = quat.detach()

        backbone = Rigid.from_tensor_7(frames[-1])
        sidechain_frames = geometry.torsion_angles_to_frames(aatype, backbone, angles[-1])
        positions = geometry.frames_to_atom14_positions(aatype, sidechain_frames)
        atom37_positions, atom37_mask = geometry.atom14_to_atom37(positions, aatype)
        return {
            "frames": paddle.stack(frames),                          # [L, B, N, 7], Angstrom
            "sidechain_frames": sidechain_frames.to_tensor_4x4(),   # [B, N, 8, 4, 4]
            "unnormalized_angles": paddle.stack(unnormalized_angles),  # [L, B, N, 7, 2]
            "angles": paddle.stack(angles),                          # [L, B, N, 7, 2] (sin, cos)
            "positions": positions,                                  # [B, N, 14, 3]
            "final_atom37_positions": atom37_positions,              # [B, N, 37, 3]
            "final_atom37_mask": atom37_mask,                        # [B, N, 37]
            "single": single,
        }
