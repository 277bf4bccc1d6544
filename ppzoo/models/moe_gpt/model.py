"""MoE-GPT: a GPT-style decoder (pre-norm RMSNorm, RoPE attention, SwiGLU MLP) whose feed-forward block is a
mixture of experts every `moe_every` layers (GShard puts one in every other layer: moe_every = 2).

The experts are spread over the expert-parallel group the engine sets up (ppzoo.distributed.expert_parallel);
the model only builds MoELayers with that context. Every MoE layer reports its auxiliary loss and the
tokens it exchanged between ranks (MoEStats); the Module turns them into logged metrics.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn

from ppzoo.distributed.expert_parallel import expert_parallel_kind, EXPERT
from ppzoo.errors import ConfigError
from ppzoo.nn.attention import attention, packed_causal_mask
from ppzoo.nn.mlp import swiglu
from ppzoo.nn.moe.gates import GATES
from ppzoo.nn.moe.layer import ExpertParallelContext, MoELayer
from ppzoo.nn.norm import RMSNorm
from ppzoo.nn.rope import as_dtype, rope_cos_sin, rotary_tables


@dataclass
class MoEGPTConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688  # the dense MLPs
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # Mixture of experts
    num_experts: int = 8
    expert_intermediate_size: Optional[int] = None  # None: intermediate_size
    moe_every: int = 2  # layer i (0-based) is MoE when (i + 1) % moe_every == 0
    gate: str = "gshard"  # gshard (top-2) | switch (top-1) | naive (top-k)
    top_k: int = 2  # naive gate only (GShard routes to 2 experts, Switch to 1)
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    random_routing: bool = True  # GShard: keep the second expert with probability 2 * g2
    aux_loss_coef: float = 0.01
    # TA-MoE: weight the load-balance loss by the topology (Distributed.topology), so each rank routes more
    # tokens over its fast links. With rank_local_gate each rank's gate trains on its own tokens (see MoELayer):
    # a gate shared by every rank sees the same kind of tokens everywhere and cannot route per rank.
    topology_aware: bool = False
    rank_local_gate: bool = True

    def __post_init__(self):
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.intermediate_size
        if self.gate not in GATES:
            raise ConfigError(f"Model.gate={self.gate!r} is not a gate; choose one of {sorted(GATES)}.")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"Model.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")
        if self.moe_every < 1 or self.num_experts < 1:
            raise ConfigError("Model.moe_every and Model.num_experts must be at least 1.")
        if self.topology_aware and self.gate == "naive":
            raise ConfigError("Model.topology_aware needs a gate with a load-balance loss (gshard or switch), "
                              "not naive.")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    def is_moe_layer(self, index):
        return (index + 1) % self.moe_every == 0


class Attention(nn.Layer):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias_attr=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias_attr=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias_attr=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias_attr=False)

    def forward(self, x, rope, mask):
        rope_q, rope_k = rope
        q = rope_q.rotate(self.q_proj(x).reshape([0, 0, self.num_heads, self.head_dim]))
        k = rope_k.rotate(self.k_proj(x).reshape([0, 0, self.num_heads, self.head_dim]))
        v = self.v_proj(x).reshape([0, 0, self.num_heads, self.head_dim])
        out = attention(q, k, v, additive_mask=mask, scale=1.0)  # the query tables carry 1/sqrt(head_dim)
        return self.o_proj(out.reshape([0, 0, self.num_heads * self.head_dim]))


class DenseMLP(nn.Layer):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias_attr=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias_attr=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Layer):
    def __init__(self, config, moe=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = moe if moe is not None else DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, mask):
        """-> (x, MoEStats or None)."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        if isinstance(self.mlp, MoELayer):
            out, stats = self.mlp(self.post_attention_layernorm(x))
            return x + out, stats
        return x + self.mlp(self.post_attention_layernorm(x)), None


def topology_loss_weights(config, parallel_env):
    """This rank's topology-aware loss weight of every expert ([E]), or None for GShard's plain loss."""
    if not config.topology_aware:
        return None
    topology = parallel_env.topology if parallel_env is not None else None
    if topology is None:
        raise ConfigError("Model.topology_aware is set but Distributed.topology is not: give a topology YAML or "
                          "bandwidth matrix (e.g. configs/moe_gpt/topology_2x2.yaml).")
    ep = ExpertParallelContext.from_env(parallel_env)
    per_rank = topology.subset(ep.ranks).loss_weights()[ep.rank]  # [P]: weight of each destination rank
    return np.repeat(per_rank, config.num_experts // ep.size)


class MoEGPTForCausalLM(nn.Layer):
    def __init__(self, config, parallel_env=None):
        super().__init__()
        self.config = config
        ep = ExpertParallelContext.from_env(parallel_env)
        if config.num_experts % ep.size:
            raise ConfigError(f"Model.num_experts={config.num_experts} must be divisible by Distributed.ep_degree="
                              f"{ep.size}: each rank holds num_experts / ep_degree experts.")
        loss_weights = topology_loss_weights(config, parallel_env)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers = []
        for index in range(config.num_layers):
            moe = None
            if config.is_moe_layer(index):
                moe = MoELayer(config.hidden_size, config.expert_intermediate_size, config.num_experts, config.gate,
                               config.top_k, config.capacity_factor, config.eval_capacity_factor,
                               config.random_routing, ep, loss_weights, config.rank_local_gate)
            layers.append(DecoderLayer(config, moe))
        self.layers = nn.LayerList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias_attr=False)
        self.init_weights()

    def moe_layers(self):
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoELayer)]

    def init_weights(self):
        """Matrices ~ N(0, initializer_range), norms 1. Dense weights first, then every expert of every MoE
        layer in global order, drawn on every rank and kept where the expert lives: the same seed gives the
        same model at any ep degree."""
        std = self.config.initializer_range
        with paddle.no_grad():
            for param in self.parameters():
                if param.ndim == 2 and expert_parallel_kind(param) != EXPERT:
                    param.set_value(paddle.normal(0.0, std, param.shape).astype(param.dtype))
            for moe in self.moe_layers():
                template = next(iter(moe.experts.values()))
                local = set(moe.local_expert_indices())
                for g in range(moe.num_experts):
                    for name, param in template.named_parameters():
                        value = paddle.normal(0.0, std, param.shape).astype(param.dtype)
                        if g in local:
                            getattr(moe.expert(g), name).set_value(value)

    def forward(self, input_ids, doc_ids=None):
        """-> (logits [b, s, vocab], [MoEStats of each MoE layer])."""
        b, s = input_ids.shape
        position_ids = paddle.arange(s, dtype="int64").unsqueeze(0).expand([b, s])
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        heads = self.config.num_heads
        rope = rotary_tables(cos, sin, heads, heads, x.dtype, q_scale=self.config.head_dim ** -0.5)
        mask = None
        if doc_ids is not None:
            mask = as_dtype(packed_causal_mask(doc_ids), x.dtype).expand([-1, heads, -1, -1])
        stats = []
        for layer in self.layers:
            x, layer_stats = layer(x, rope, mask)
            if layer_stats is not None:
                stats.append(layer_stats)
        return self.lm_head(self.norm(x)), stats
