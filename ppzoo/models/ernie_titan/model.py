"""ERNIE 3.0 Titan: a Transformer-XL universal representation module under two task modules.

    tokens ─▶ embedding ─▶ universal module (Transformer-XL, shared) ─┬▶ understanding module (bidirectional)
                                                                      │      └▶ MLM, [CLS] heads (sentence
                                                                      │         reordering, sentence distance,
                                                                      │         credibility discriminator, NLU)
                                                                      └▶ generation module (unidirectional,
                                                                             recurrence memory) └▶ LM head

Every layer is a Transformer-XL layer (Dai et al. 2019): no absolute positions; the attention score of query
i and key j is

    ((q_i + u) . k_j  +  (q_i + v) . W_r R(i - j)) / sqrt(d_head)

with R a sinusoid of the relative distance and u, v learned per head. Distances are clipped to
+-max_relative_distance (the bidirectional module needs negative ones too; a sinusoid is defined for both).
The "content" term (q + u) . k is an ordinary attention score, so with a KV cache the keys stay in the cache
(ppzoo.inference.cache: `cache.attend`); the "position" term depends only on the query and the distance, so
it is computed here and handed to the cache as an additive bias next to the mask. Any cache policy (dense,
preallocated, KCache) therefore applies unchanged.

Segment recurrence memory: each layer's input hidden states of the previous segment (the memory, without
gradient) are prepended to that layer's keys and values. For causal attention with a memory that holds the
whole history this gives exactly what the concatenated sequence would (tests check it).

The sizes of the 260B model (48 layers, hidden 12288, 192 heads, FFN 196608; task modules 12 layers, hidden
768) are configs/ernie_titan/titan_260b.yaml.
"""
import math
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.nn.attention import heads_first, positions_first

NEG_INF = -1e9  # finite: a row whose keys are all masked (padding) stays finite


@dataclass
class ErnieTitanConfig:
    vocab_size: int = 4096  # at least the tokenizer's vocabulary plus the task tokens ([CLS], [SEP], [MASK])
    hidden_size: int = 128  # universal representation module
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    task_hidden_size: int = 128  # each task module (understanding, generation)
    task_num_layers: int = 2
    task_num_heads: int = 4
    task_intermediate_size: int = 512
    mem_len: int = 64  # positions of recurrence memory kept per layer
    max_relative_distance: int = 512  # relative distances are clipped to +- this
    dropout: float = 0.0
    layer_norm_eps: float = 1.0e-5
    num_genres: int = 2  # soft genre prompts for the controllable LM (prose, code)
    soft_prompt_len: int = 4  # learnable prompt vectors per genre
    reorder_segments: int = 3  # sentence reordering: classes = segments!
    num_labels: int = 0  # ErnieTitanNLU: classes of the fine-tuning task
    # Pretraining: loss weights and the adversarial negatives' refresh.
    mlm_weight: float = 1.0
    doc_lm_weight: float = 1.0
    reorder_weight: float = 0.5
    distance_weight: float = 0.5
    adversarial_weight: float = 0.5
    controllable_weight: float = 1.0
    adversarial_refresh_every: int = 20  # steps between regenerations of the negatives buffer
    adversarial_new_tokens: int = 24  # tokens generated after each prefix
    adversarial_temperature: float = 1.0
    adversarial_top_k: int = 20


def parameter_count(config):
    """Parameters of ErnieTitanModel for `config`, computed from the sizes (no tensors are built), e.g. to check
    a recipe such as the 260B one."""
    c = config

    def stack(layers, d, ffn, heads):
        per_layer = (3 * d * d + 3 * d) + d * d + 2 * heads * (d // heads) + (d * d + d) + (d * ffn + ffn) \
            + (ffn * d + d) + 4 * d
        return layers * per_layer

    t = c.task_hidden_size
    heads = t * t + t + t * c.vocab_size + c.vocab_size + 2 * t + (t * c.vocab_size + c.vocab_size) \
        + (t + 1) * (math.factorial(c.reorder_segments) + 3 + 1)
    return (c.vocab_size * c.hidden_size + stack(c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads)
            + 2 * (c.hidden_size * t + t + stack(c.task_num_layers, t, c.task_intermediate_size, c.task_num_heads)
                   + 2 * t) + heads + c.num_genres * c.soft_prompt_len * c.hidden_size)


# ------------------------------------------------------------------------------------ relative positions
def sinusoid(distances, dim):
    """[n] distances -> [n, dim] sinusoid embeddings (Transformer-XL's R): sin on the first half, cos on the
    second."""
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles = np.asarray(distances, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def relative_index(query_pos, key_pos, max_distance):
    """[b, sq] and [b, sk] positions -> ([b, sq, sk] indices into the distance table -K..K (clipped), the
    lowest and the highest index that occur: only that part of the table is projected)."""
    distance = query_pos.unsqueeze(2) - key_pos.unsqueeze(1)
    index = paddle.clip(distance, -max_distance, max_distance) + max_distance
    return index, int(index.min()), int(index.max())


def additive_mask(allowed):
    """bool [b, sq, sk] -> float [b, 1, sq, sk] (0 where allowed, NEG_INF elsewhere)."""
    return paddle.where(allowed, paddle.zeros([], "float32"), paddle.full([], NEG_INF, "float32")).unsqueeze(1)


def segment_mask(key_valid, num_queries, causal):
    """Allowed-bool [b, sq, sk] for queries that are the last `num_queries` keys: keys must be valid and, if
    causal, not after the query. Memory keys come first in `key_valid` and precede every query."""
    sk = key_valid.shape[1]
    offset = sk - num_queries
    allowed = key_valid.unsqueeze(1).expand([-1, num_queries, -1])
    if causal:
        allowed = allowed & paddle.tril(paddle.ones([num_queries, sk], dtype="bool"), diagonal=offset).unsqueeze(0)
    # A query that sees nothing else (a padding position) sees itself, so its softmax stays finite.
    own = paddle.arange(sk).unsqueeze(0) == (paddle.arange(num_queries) + offset).unsqueeze(1)
    return allowed | own.unsqueeze(0)


class RelativeSelfAttention(nn.Layer):
    def __init__(self, hidden, heads, max_distance, dropout=0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.hidden, self.heads, self.head_dim = hidden, heads, hidden // heads
        self.max_distance = max_distance
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.r_proj = nn.Linear(hidden, hidden, bias_attr=False)  # W_r
        self.u = self.create_parameter([heads, self.head_dim], default_initializer=nn.initializer.Constant(0.0))
        self.v = self.create_parameter([heads, self.head_dim], default_initializer=nn.initializer.Constant(0.0))
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        table = sinusoid(np.arange(-max_distance, max_distance + 1), hidden)
        self.register_buffer("distance_table", paddle.to_tensor(table), persistable=False)

    def position_scores(self, q, rel_index):
        """The position term (q + v) . W_r R(i - j) / sqrt(d) as [b, h, sq, sk]: scored once against every
        distance that occurs, then gathered per (query, key) pair (the general form of XL's "rel shift").
        `rel_index` is (index [b, sq, sk] into the table, lowest and highest index that occur)."""
        index, lo, hi = rel_index
        b, sq, sk = index.shape
        table = self.distance_table[lo:hi + 1]
        projected = self.r_proj(table).reshape([-1, self.heads, self.head_dim])  # [n, h, d]
        qv = heads_first(q + self.v)  # [b, h, sq, d]
        by_distance = paddle.matmul(qv, projected.transpose([1, 2, 0]).unsqueeze(0))  # [b, h, sq, n]
        index = (index - lo).unsqueeze(1).expand([b, self.heads, sq, sk])
        return paddle.take_along_axis(by_distance, index, axis=3, broadcast=False) * (self.head_dim ** -0.5)

    def forward(self, x, memory, rel_index, mask, cache=None, layer_idx=0, return_probs=False):
        """x [b, s, hidden]; memory [b, m, hidden] or None; rel_index see relative_index; mask [b, 1, s, keys] additive.
        Without a cache the keys are memory + x; with one, the cache holds earlier keys (and memory)."""
        b, s = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).reshape([b, s, 3, self.heads, self.head_dim]).unbind(axis=2)
        if memory is not None:
            m = memory.shape[1]
            _, km, vm = self.qkv(memory).reshape([b, m, 3, self.heads, self.head_dim]).unbind(axis=2)
            k, v = paddle.concat([km, k], axis=1), paddle.concat([vm, v], axis=1)
        bias = self.position_scores(q, rel_index) + mask
        if cache is not None:
            context = cache.attend(layer_idx, q + self.u, k, v, additive_mask=bias)
            probs = None
        else:
            scores = paddle.matmul(heads_first(q + self.u) * (self.head_dim ** -0.5), heads_first(k),
                                   transpose_y=True) + bias
            probs = F.softmax(scores, axis=-1)
            context = positions_first(paddle.matmul(self.dropout(probs), heads_first(v)))
        out = self.out(context.reshape([b, s, self.hidden]))
        return (out, probs) if return_probs else (out, None)


class XLLayer(nn.Layer):
    """Pre-norm Transformer-XL layer (pre-norm trains stably at the tiny sizes used here)."""

    def __init__(self, hidden, heads, intermediate, max_distance, dropout=0.0, eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, epsilon=eps)
        self.attn = RelativeSelfAttention(hidden, heads, max_distance, dropout)
        self.norm2 = nn.LayerNorm(hidden, epsilon=eps)
        self.ffn = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory, rel_index, mask, cache=None, layer_idx=0, return_probs=False):
        normed_memory = self.norm1(memory) if memory is not None else None
        attn_out, probs = self.attn(self.norm1(x), normed_memory, rel_index, mask, cache, layer_idx, return_probs)
        x = x + self.dropout(attn_out)
        x = x + self.dropout(self.ffn(self.norm2(x)))
        return x, probs


class XLStack(nn.Layer):
    """Transformer-XL layers with per-layer recurrence memory."""

    def __init__(self, num_layers, hidden, heads, intermediate, max_distance, dropout=0.0, eps=1e-5):
        super().__init__()
        self.layers = nn.LayerList([XLLayer(hidden, heads, intermediate, max_distance, dropout, eps)
                                    for _ in range(num_layers)])
        self.max_distance = max_distance

    def forward(self, x, query_pos, key_pos, mask, memories=None, cache=None, layer_offset=0, return_probs=False):
        """x [b, s, hidden]; positions [b, s] / [b, m + s]; mask [b, 1, s, m + s]; memories: per layer [b, m,
        hidden] or None. Returns (output, each layer's input (the next segment's memory), attention probs per
        layer or Nones)."""
        rel_index = relative_index(query_pos, key_pos, self.max_distance)
        inputs, probs = [], []
        for i, layer in enumerate(self.layers):
            inputs.append(x)
            memory = memories[i] if memories is not None else None
            x, p = layer(x, memory, rel_index, mask, cache, layer_offset + i, return_probs)
            probs.append(p)
        return x, inputs, probs


class Memory:
    """Recurrence memory of a causal stack: each layer's input hidden states (no gradient) [b, m, hidden],
    their positions [b, m] (relative to the segment that follows, i.e. negative) and which are real
    ([b, m] bool)."""

    def __init__(self, hidden, positions, valid):
        self.hidden, self.positions, self.valid = hidden, positions, valid

    @property
    def length(self):
        return self.positions.shape[1]

    def expand(self, batch):
        if self.positions.shape[0] == batch:
            return self
        return Memory([h.expand([batch, -1, -1]) for h in self.hidden], self.positions.expand([batch, -1]),
                      self.valid.expand([batch, -1]))


class ErnieTitanModel(nn.Layer):
    def __init__(self, config):
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.universal = XLStack(c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size,
                                 c.max_relative_distance, c.dropout, c.layer_norm_eps)
        # The task modules are narrower than the universal one (768 vs 12288 in the paper): a projection
        # into each.
        self.to_understanding = nn.Linear(c.hidden_size, c.task_hidden_size)
        self.understanding = XLStack(c.task_num_layers, c.task_hidden_size, c.task_num_heads,
                                     c.task_intermediate_size, c.max_relative_distance, c.dropout, c.layer_norm_eps)
        self.to_generation = nn.Linear(c.hidden_size, c.task_hidden_size)
        self.generation = XLStack(c.task_num_layers, c.task_hidden_size, c.task_num_heads,
                                  c.task_intermediate_size, c.max_relative_distance, c.dropout, c.layer_norm_eps)
        self.understanding_norm = nn.LayerNorm(c.task_hidden_size, epsilon=c.layer_norm_eps)
        self.generation_norm = nn.LayerNorm(c.task_hidden_size, epsilon=c.layer_norm_eps)
        self.mlm_head = nn.Sequential(nn.Linear(c.task_hidden_size, c.task_hidden_size), nn.GELU(),
                                      nn.LayerNorm(c.task_hidden_size, epsilon=c.layer_norm_eps),
                                      nn.Linear(c.task_hidden_size, c.vocab_size))
        self.lm_head = nn.Linear(c.task_hidden_size, c.vocab_size)
        self.reorder_head = nn.Linear(c.task_hidden_size, math.factorial(c.reorder_segments))
        self.distance_head = nn.Linear(c.task_hidden_size, 3)  # adjacent / same document / other document
        self.credibility_head = nn.Linear(c.task_hidden_size, 1)  # [CLS]: original (1) or generated (0)
        self.soft_prompts = self.create_parameter(
            [c.num_genres, c.soft_prompt_len, c.hidden_size],
            default_initializer=nn.initializer.Normal(std=0.02))

    # ---------------------------------------------------------------------------------- understanding
    def understand(self, input_ids, valid=None, return_probs=False):
        """Bidirectional path: [b, s] ids (valid: [b, s] bool, padding False) -> ([b, s, task_hidden], probs of
        the understanding module's layers)."""
        b, s = input_ids.shape
        valid = valid if valid is not None else paddle.ones([b, s], dtype="bool")
        pos = paddle.arange(s, dtype="int64").unsqueeze(0).expand([b, s])
        mask = additive_mask(segment_mask(valid, s, causal=False))
        x, _, _ = self.universal(self.embed(input_ids), pos, pos, mask)
        x, _, probs = self.understanding(self.to_understanding(x), pos, pos, mask, return_probs=return_probs)
        return self.understanding_norm(x), probs

    def cls_logits(self, head, input_ids, valid=None):
        hidden, _ = self.understand(input_ids, valid)
        return head(hidden[:, 0])

    # ------------------------------------------------------------------------------------- generation
    @property
    def num_causal_layers(self):
        return len(self.universal.layers) + len(self.generation.layers)

    def generate_hidden(self, inputs_embeds, positions=None, valid=None, memory=None, cache=None, key_positions=None,
                        mask=None):
        """Unidirectional path over embeddings [b, s, hidden]: -> (final hidden [b, s, task_hidden], new memory
        inputs per layer). With `memory` (Memory) its positions precede the segment's. With a `cache`, the
        caller gives `mask` [b, 1, s, keys] and `key_positions` [b, keys] of every key in the cache."""
        b, s = inputs_embeds.shape[0], inputs_embeds.shape[1]
        positions = positions if positions is not None else paddle.arange(s, dtype="int64").unsqueeze(0).expand([b, s])
        u_mem = g_mem = None
        if cache is None:
            valid = valid if valid is not None else paddle.ones([b, s], dtype="bool")
            key_positions, key_valid = positions, valid
            if memory is not None:
                memory = memory.expand(b)
                key_positions = paddle.concat([memory.positions, positions], axis=1)
                key_valid = paddle.concat([memory.valid, valid], axis=1)
                n_u = len(self.universal.layers)
                u_mem, g_mem = memory.hidden[:n_u], memory.hidden[n_u:]
            mask = additive_mask(segment_mask(key_valid, s, causal=True))
        x, u_inputs, _ = self.universal(inputs_embeds, positions, key_positions, mask, u_mem, cache, 0)
        x, g_inputs, _ = self.generation(self.to_generation(x), positions, key_positions, mask, g_mem, cache,
                                         len(self.universal.layers))
        return self.generation_norm(x), u_inputs + g_inputs

    def next_memory(self, layer_inputs, positions, valid, memory=None):
        """The memory after a segment: the last mem_len of (old memory + this segment's layer inputs), with
        positions shifted so the next segment starts at 0. No gradient flows into memory."""
        shift = positions[:, -1:] + 1
        hidden = [h.detach() for h in layer_inputs]
        new_pos, new_valid = positions - shift, valid
        if memory is not None:
            memory = memory.expand(positions.shape[0])
            hidden = [paddle.concat([m, h], axis=1) for m, h in zip(memory.hidden, hidden)]
            new_pos = paddle.concat([memory.positions - shift, new_pos], axis=1)
            new_valid = paddle.concat([memory.valid, valid], axis=1)
        keep = min(self.config.mem_len, new_pos.shape[1])
        return Memory([h[:, -keep:] for h in hidden], new_pos[:, -keep:], new_valid[:, -keep:])

    def lm_segment(self, input_ids, valid=None, memory=None):
        """Causal LM over one segment with recurrence memory -> (logits [b, s, vocab], the next Memory)."""
        b, s = input_ids.shape
        valid = valid if valid is not None else paddle.ones([b, s], dtype="bool")
        positions = paddle.arange(s, dtype="int64").unsqueeze(0).expand([b, s])
        hidden, inputs = self.generate_hidden(self.embed(input_ids), positions, valid, memory)
        return self.lm_head(hidden), self.next_memory(inputs, positions, valid, memory)

    def genre_memory(self, genres):
        """Memory holding the soft genre prompts [b] (ids) run through the causal stack: prepending them to a
        causal segment is exactly this memory (their states do not depend on what follows)."""
        prompts = paddle.index_select(self.soft_prompts, genres, axis=0)  # [b, P, hidden]
        b, p = prompts.shape[0], prompts.shape[1]
        positions = paddle.arange(p, dtype="int64").unsqueeze(0).expand([b, p])
        valid = paddle.ones([b, p], dtype="bool")
        _, inputs = self.generate_hidden(prompts, positions, valid)
        # Kept with gradient (unlike recurrence memory): the prompts are learned through it.
        return Memory(inputs, positions - p, valid)
