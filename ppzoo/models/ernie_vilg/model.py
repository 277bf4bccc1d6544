"""ERNIE-ViLG's generator (Zhang et al. 2021): one transformer, shared by text-to-image and image-to-text.

A caption and an image (its VQ-VAE codes) are two segments, each opened by a start token:

    text segment   [BOT] w1 .. wT        (T = max_text_len: words, eos, pads)
    image segment  [BOI] c1 .. cN        (N = grid_size^2 codes, row-major)

Text-to-image reads the text segment, then the image segment; image-to-text the image segment, then the text
segment. Positions are learned per segment (text positions, image positions), so a token has the same
embedding in both directions: what differs is the order and the attention mask. The first segment is the
condition and attends bidirectionally within itself; the second is generated and attends causally, to the
whole condition and to its own earlier tokens (the seq2seq mask of UniLM, which ERNIE-ViLG uses):

    allowed[q, k] = k < P  or  k <= q        (P = length of the condition segment), and k is not a pad

The loss of a pair is L_t2i (next image code at each image position) + L_i2t (next word at each text
position). The last layer's hidden states at the image positions are what the end-to-end mode feeds to
the image decoder (module.py).

Blocks are pre-norm: RMSNorm, multi-head attention (ppzoo.nn.attention), SwiGLU MLP (ppzoo.nn.mlp).
"""
import paddle
import paddle.nn as nn

from ppzoo.nn.attention import attention
from ppzoo.nn.mlp import swiglu
from ppzoo.nn.norm import RMSNorm

BOT, BOI = 0, 1  # rows of the start-token table: begin of text, begin of image
NEG_INF = float("-inf")


def seq2seq_allowed(prefix_len, key_valid):
    """Boolean [b, L, L]: which keys each query may attend to. key_valid [b, L] marks real (non-pad) tokens;
    the first `prefix_len` positions are the bidirectional condition, the rest causal."""
    length = key_valid.shape[1]
    q = paddle.arange(length).unsqueeze(1)
    k = paddle.arange(length).unsqueeze(0)
    pattern = (k < prefix_len) | (k <= q)  # [L, L]
    return pattern.unsqueeze(0) & key_valid.unsqueeze(1)


def additive_mask(allowed):
    """Boolean [b, Lq, Lk] -> additive float mask [b, 1, Lq, Lk] (0 allowed, -inf not)."""
    zero = paddle.zeros([], dtype="float32")
    return paddle.where(allowed, zero, paddle.full([], NEG_INF, dtype="float32")).unsqueeze(1)


class Block(nn.Layer):
    def __init__(self, config):
        super().__init__()
        d, self.heads = config.hidden_size, config.num_heads
        self.head_dim = d // config.num_heads
        self.attn_norm = RMSNorm(d, config.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias_attr=False)
        self.out = nn.Linear(d, d, bias_attr=False)
        self.mlp_norm = RMSNorm(d, config.norm_eps)
        self.gate_up = nn.Linear(d, 2 * config.intermediate_size, bias_attr=False)
        self.down = nn.Linear(config.intermediate_size, d, bias_attr=False)

    def forward(self, x, mask, cache=None):
        """x [b, s, d]; mask [b, heads, s, s_cached + s] (additive); cache: (k, v) of earlier positions or None.
        Returns (output, k, v), keys and values including this call's positions (flat, so activation
        recompute can wrap the block)."""
        q, k, v = (t.reshape([0, 0, self.heads, self.head_dim]) for t in self.qkv(self.attn_norm(x)).chunk(3, axis=-1))
        if cache is not None:
            k, v = paddle.concat([cache[0], k], axis=1), paddle.concat([cache[1], v], axis=1)
        x = x + self.out(attention(q, k, v, additive_mask=mask).reshape([0, 0, -1]))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, axis=-1)
        return x + self.down(swiglu(gate, up)), k, v


class ViLGTransformer(nn.Layer):
    """The shared generator. Embeddings of the two segments, the blocks, and one head per modality."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        d, vq = config.hidden_size, config.vqvae
        self.text_len, self.num_image_tokens = config.max_text_len, vq.grid_size ** 2
        init = nn.initializer.Normal(std=config.initializer_range)
        self.start_embed = nn.Embedding(2, d, weight_attr=init)
        self.text_embed = nn.Embedding(config.text_vocab_size, d, weight_attr=init)
        self.image_embed = nn.Embedding(vq.codebook_size, d, weight_attr=init)
        self.text_pos = nn.Embedding(self.text_len + 1, d, weight_attr=init)  # position 0: BOT
        self.image_pos = nn.Embedding(self.num_image_tokens + 1, d, weight_attr=init)  # position 0: BOI
        self.blocks = nn.LayerList([Block(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(d, config.norm_eps)
        self.text_head = nn.Linear(d, config.text_vocab_size, bias_attr=False)
        self.image_head = nn.Linear(d, vq.codebook_size, bias_attr=False)

    # --------------------------------------------------------------------------------- embeddings
    def text_tokens(self, text_ids, first_position):
        """Embeddings of text ids [b, n] at text positions first_position.. (position 0 is BOT's)."""
        positions = paddle.arange(first_position, first_position + text_ids.shape[1])
        return self.text_embed(text_ids) + self.text_pos(positions)

    def image_tokens(self, codes, first_position):
        """Embeddings of image codes [b, n] at image positions first_position.. (position 0 is BOI's)."""
        positions = paddle.arange(first_position, first_position + codes.shape[1])
        return self.image_embed(codes) + self.image_pos(positions)

    def text_start(self, batch):
        return self.start_embed(paddle.full([batch, 1], BOT, "int64")) + self.text_pos(paddle.zeros([1], "int64"))

    def image_start(self, batch):
        return self.start_embed(paddle.full([batch, 1], BOI, "int64")) + self.image_pos(paddle.zeros([1], "int64"))

    def text_segment(self, text_ids):
        """[BOT] w1 .. wT embedded: [b, T + 1, d]."""
        return paddle.concat([self.text_start(text_ids.shape[0]), self.text_tokens(text_ids, 1)], axis=1)

    def image_segment(self, codes):
        """[BOI] c1 .. cN embedded: [b, N + 1, d]."""
        return paddle.concat([self.image_start(codes.shape[0]), self.image_tokens(codes, 1)], axis=1)

    # ------------------------------------------------------------------------------------ forward
    def run(self, x, mask, cache=None):
        """Blocks and final norm over embeddings x [b, s, d]; returns (hidden [b, s, d], new cache)."""
        # One mask at full shape [b, heads, s, s'] for all layers: Paddle's CPU add broadcasting a size-1
        # middle axis is about ten times slower than the plain add (measured on [32, 4, 76, 76]).
        mask = mask.expand([-1, self.config.num_heads, -1, -1]).contiguous()
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, mask, None if cache is None else cache[i])
            new_cache.append((k, v))
        return self.norm(x), new_cache

    def text_to_image(self, text_ids, codes, pad_id):
        """Teacher-forced text-to-image pass. Returns (image logits [b, N, K] predicting c1..cN, hidden
        states at the image-code positions [b, N, d])."""
        b, t = text_ids.shape
        x = paddle.concat([self.text_segment(text_ids), self.image_segment(codes)], axis=1)
        valid = paddle.concat([paddle.ones([b, 1], "bool"), text_ids != pad_id,
                               paddle.ones([b, self.num_image_tokens + 1], "bool")], axis=1)
        hidden, _ = self.run(x, additive_mask(seq2seq_allowed(t + 1, valid)))
        image_part = hidden[:, t + 1:]  # BOI, c1 .. cN
        return self.image_head(image_part[:, :-1]), image_part[:, 1:]

    def image_to_text(self, codes, text_ids, pad_id):
        """Teacher-forced image-to-text pass. Returns text logits [b, T, V] predicting w1..wT."""
        b, n = codes.shape
        x = paddle.concat([self.image_segment(codes), self.text_segment(text_ids)], axis=1)
        valid = paddle.concat([paddle.ones([b, n + 2], "bool"), text_ids != pad_id], axis=1)
        hidden, _ = self.run(x, additive_mask(seq2seq_allowed(n + 1, valid)))
        return self.text_head(hidden[:, n + 1:-1])

    # ------------------------------------------------------------------------ incremental decoding
    def start_decoding(self, condition, target_start, key_valid):
        """Run the embedded condition segment [b, P, d] and the target's start token [b, 1, d]; key_valid
        [b, P + 1] marks real tokens. Returns (hidden state of the start token [b, d], cache)."""
        x = paddle.concat([condition, target_start], axis=1)
        hidden, cache = self.run(x, additive_mask(seq2seq_allowed(condition.shape[1], key_valid)))
        return hidden[:, -1], cache

    def step(self, x, cache, key_valid):
        """One generated position: x [b, 1, d] attends to every cached key that is valid (key_valid [b, s]
        covers the cache plus this position). Returns (hidden [b, d], cache)."""
        hidden, cache = self.run(x, additive_mask(key_valid.unsqueeze(1)), cache)
        return hidden[:, -1], cache
