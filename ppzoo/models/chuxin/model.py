"""ChuXin: the LLaMA architecture (RMSNorm pre-norm, RoPE, SwiGLU MLP, no biases, untied embeddings,
multi-head attention with optional grouped KV heads).

The model only chooses tensor-parallel-aware layers; how many ranks share them (`mp_group`) is decided by
the engine. Parameter names follow Hugging Face's LlamaForCausalLM so checkpoints map one to one.
"""
from dataclasses import dataclass
from typing import Optional

import paddle
import paddle.nn as nn

from ppzoo.distributed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_model_parallel,
    mp_rank_of,
    mp_size_of,
)
from ppzoo.nn.attention import attention, packed_causal_mask, repeat_kv
from ppzoo.nn.mlp import swiglu
from ppzoo.nn.norm import RMSNorm
from ppzoo.nn.rope import as_dtype, rope_cos_sin, rotary_tables


@dataclass
class ChuXinConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: as many as num_heads (plain multi-head attention)
    intermediate_size: int = 688
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_position_scale: float = 1.0  # position interpolation factor (1.0: none)
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


def _check_divisible(config, mp_size):
    for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        value = getattr(config, name)
        if value % mp_size:
            raise ValueError(f"Model.{name}={value} must be divisible by Distributed.mp_degree={mp_size}")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"Model.hidden_size={config.hidden_size} must be divisible by num_heads={config.num_heads}")
    if config.num_heads % config.num_kv_heads:
        raise ValueError(f"Model.num_heads={config.num_heads} must be a multiple of num_kv_heads={config.num_kv_heads}")


class ChuXinAttention(nn.Layer):
    def __init__(self, config, mp_group=None):
        super().__init__()
        mp = mp_size_of(mp_group)
        self.head_dim = config.head_dim
        self.local_heads = config.num_heads // mp
        self.local_kv_heads = config.num_kv_heads // mp
        kv_dim = config.num_kv_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(config.hidden_size, config.hidden_size, mp_group=mp_group)
        self.k_proj = ColumnParallelLinear(config.hidden_size, kv_dim, mp_group=mp_group)
        self.v_proj = ColumnParallelLinear(config.hidden_size, kv_dim, mp_group=mp_group)
        self.o_proj = RowParallelLinear(config.hidden_size, config.hidden_size, mp_group=mp_group)

    def forward(self, x, rope, mask=None, cache=None, layer_idx=0):
        # Shapes with 0 ("as in x") for batch and length: see the note in ppzoo/nn/attention.py.
        rope_q, rope_k = rope
        q = rope_q.rotate(self.q_proj(x).reshape([0, 0, self.local_heads, self.head_dim]))
        k = rope_k.rotate(self.k_proj(x).reshape([0, 0, self.local_kv_heads, self.head_dim]))
        v = self.v_proj(x).reshape([0, 0, self.local_kv_heads, self.head_dim])
        # scale=1.0: the queries' RoPE tables already carry 1/sqrt(head_dim) (see attention_inputs).
        if cache is not None:
            out = cache.attend(layer_idx, q, k, v, mask, scale=1.0)
        else:
            n_rep = self.local_heads // self.local_kv_heads
            out = attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), additive_mask=mask, scale=1.0)
        return self.o_proj(out.reshape([0, 0, self.local_heads * self.head_dim]))


class ChuXinMLP(nn.Layer):
    def __init__(self, config, mp_group=None):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, mp_group=mp_group)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, mp_group=mp_group)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, mp_group=mp_group)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class ChuXinDecoderLayer(nn.Layer):
    def __init__(self, config, mp_group=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ChuXinAttention(config, mp_group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ChuXinMLP(config, mp_group)

    def forward(self, x, rope, mask=None, cache=None, layer_idx=0):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_inputs(config, attn, position_ids, doc_ids=None, attn_mask=None, dtype="float32"):
    """RoPE tables (for queries, for keys) and the additive mask for every layer of one forward.

    Built once per forward, already at the attention's full shape, and shared by all layers (see
    RotaryTables). The queries' tables carry attention's 1/sqrt(head_dim), so attention does not scale q
    again. Positions need not restart at document boundaries: RoPE scores depend only on relative
    positions, and the mask keeps documents apart."""
    cos, sin = rope_cos_sin(position_ids, config.head_dim, config.rope_theta, config.rope_position_scale)
    rope = rotary_tables(cos, sin, attn.local_heads, attn.local_kv_heads, dtype, q_scale=config.head_dim ** -0.5)
    mask = attn_mask
    if mask is None and doc_ids is not None:
        mask = packed_causal_mask(doc_ids)
    if mask is not None:
        mask = as_dtype(mask, dtype).expand([-1, attn.local_heads, -1, -1])
    return rope, mask


class ChuXinModel(nn.Layer):
    """The decoder stack: token ids -> final hidden states."""

    def __init__(self, config, mp_group=None):
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, mp_group=mp_group)
        self.layers = nn.LayerList([ChuXinDecoderLayer(config, mp_group) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, position_ids=None, doc_ids=None, attn_mask=None, cache=None):
        """`doc_ids` [b, s] builds the packed-document causal mask; `attn_mask` (additive, [b, 1, s, k])
        overrides it (generation with padding and a cache). `position_ids` default: 0..s-1 offset by the
        cache length."""
        b, s = input_ids.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = paddle.arange(start, start + s, dtype="int64").unsqueeze(0).expand([b, s])
        x = self.embed_tokens(input_ids)
        rope, mask = attention_inputs(self.config, self.layers[0].self_attn, position_ids, doc_ids, attn_mask, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i)
        return self.norm(x)


class ChuXinForCausalLM(nn.Layer):
    def __init__(self, config, mp_group=None):
        super().__init__()
        _check_divisible(config, mp_size_of(mp_group))
        self.config = config
        self.mp_group = mp_group
        self.model = ChuXinModel(config, mp_group)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, mp_group=mp_group)
        self.init_weights()

    def init_weights(self):
        """Matrices ~ N(0, initializer_range), norms 1. A tensor-parallel shard is cut from a full-size draw,
        so every rank's shard differs and the model equals an mp=1 model made with the same seed."""
        std = self.config.initializer_range
        mp_size, mp_rank = mp_size_of(self.mp_group), mp_rank_of(self.mp_group)
        with paddle.no_grad():
            for param in self.parameters():
                if param.ndim != 2:
                    continue
                axis = getattr(param, "mp_split_axis", None)
                if axis is None or mp_size == 1:
                    param.set_value(paddle.normal(0.0, std, param.shape).astype(param.dtype))
                    continue
                full_shape = list(param.shape)
                full_shape[axis] *= mp_size
                full = paddle.normal(0.0, std, full_shape).astype(param.dtype)
                param.set_value(paddle.split(full, mp_size, axis=axis)[mp_rank])

    def forward(self, input_ids, position_ids=None, doc_ids=None, attn_mask=None, cache=None, logits_to_keep=0):
        """Logits over this rank's share of the vocabulary ([b, s, vocab / mp]); with `logits_to_keep` = n > 0
        only those of the last n positions ([b, n, vocab / mp]), as Hugging Face's argument of that name.

        Generation needs only the last position's logits: computing all of a prompt's is most of a prefill
        (tiny ChuXin, batch 8 x 128 tokens: the [1024, 256] x [256, 4096] product of the head is ~1 GFLOP,
        about half the prefill's work)."""
        hidden = self.model(input_ids, position_ids, doc_ids, attn_mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        if self.lm_head is None:
            # Every rank multiplies the whole hidden state with its vocabulary shard of the embedding, so the
            # hidden state's gradient is the sum of the ranks' partial gradients (as in ColumnParallelLinear).
            hidden = copy_to_model_parallel(hidden, self.mp_group)
            return paddle.matmul(hidden, self.model.embed_tokens.weight, transpose_y=True)
        return self.lm_head(hidden)
