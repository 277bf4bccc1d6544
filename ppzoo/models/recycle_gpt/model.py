"""RecycleGPT: a causal LM with a recyclable module (Jiang et al., 2023, "RecycleGPT: An Autoregressive
Language Model with Recyclable Module").

Adjacent tokens are strongly correlated, so the state the full model computed for position t-1 already
says much about token t+1. The recyclable module is a small stack of decoder layers that predicts token
t+1 from two things only: the base model's last hidden state at position t-1 (the "recycled" state) and
the embedding of token t, the token that state has just produced. They are concatenated and projected back
to the model width (a linear layer, as in the paper), run through the module's own decoder layers (with
their own attention over the module's earlier positions, hence their own KV cache), normalized, and scored
by the base model's LM head. The embedding and the head are the base's: the module adds only its
projection, layers and norm (the paper: 6 layers on a 24-layer 1.3B model, about 15% more parameters).

Position t of the module therefore plays the part of the full model's position t, with the full model's
position t-1 as its input: at decoding time the module can stand in for one full-model step. Training
runs both over every position of a batch (ppzoo.models.recycle_gpt.module); ppzoo.inference.recycle
decodes with it.

The base here is ChuXin (the LLaMA architecture): the config extends ChuXin's, so a RecycleGPT config is a
ChuXin config plus the module's fields, and the module's layers are ChuXin decoder layers. Everything the
module needs from its base goes through `BaseLM` (embedding, final hidden states, LM head).
"""
from dataclasses import dataclass

import paddle
import paddle.nn as nn

from ppzoo.distributed.tensor_parallel import copy_to_model_parallel
from ppzoo.models.chuxin.model import ChuXinConfig, ChuXinDecoderLayer, ChuXinForCausalLM, attention_inputs
from ppzoo.nn.norm import RMSNorm


@dataclass
class RecycleGPTConfig(ChuXinConfig):
    recycle_layers: int = 1  # decoder layers of the recyclable module
    recycle_loss_weight: float = 1.0  # lambda in L = L_lm + lambda * L_recycle
    # Train only the recyclable module: the base (including the shared embedding and LM head) keeps the
    # weights it was initialized with (Engine.init_from a trained ChuXin checkpoint).
    freeze_base: bool = False
    # What L_recycle fits: "labels", the next tokens (the paper); or "base", the base model's next-token
    # distribution at the same position (detached; soft-target cross entropy). The second makes the module
    # agree with the base more often, which is what verified decoding accepts.
    recycle_target: str = "labels"

    def __post_init__(self):
        super().__post_init__()
        if self.recycle_target not in ("labels", "base"):
            raise ValueError(f"Model.recycle_target must be 'labels' or 'base', got {self.recycle_target!r}")
        if self.recycle_layers < 1:
            raise ValueError(f"Model.recycle_layers must be at least 1, got {self.recycle_layers}")
        if self.recycle_loss_weight < 0:
            raise ValueError(f"Model.recycle_loss_weight (lambda) must be >= 0, got {self.recycle_loss_weight}")


def positions_after(cache, batch, length):
    """Positions 0..length-1 offset by what the cache already holds, [batch, length] (as ChuXinModel)."""
    start = cache.length if cache is not None else 0
    return paddle.arange(start, start + length, dtype="int64").unsqueeze(0).expand([batch, length])


class BaseLM:
    """What the recyclable module uses of its base causal LM (ChuXinForCausalLM), and nothing else."""

    def __init__(self, lm):
        self.lm = lm
        self.config = lm.config

    def embed(self, input_ids):
        return self.lm.model.embed_tokens(input_ids)

    def hidden_states(self, input_ids, position_ids=None, doc_ids=None, attn_mask=None, cache=None):
        """The final (normalized) hidden states [b, s, hidden]: what the LM head scores, and what is recycled."""
        return self.lm.model(input_ids, position_ids, doc_ids, attn_mask, cache)

    def head(self, hidden):
        """Logits over this rank's vocabulary shard, as ChuXinForCausalLM.forward computes them."""
        if self.lm.lm_head is None:
            hidden = copy_to_model_parallel(hidden, self.lm.mp_group)
            return paddle.matmul(hidden, self.lm.model.embed_tokens.weight, transpose_y=True)
        return self.lm.lm_head(hidden)


def recycled_states(hidden, keep):
    """The recycled input of every position: the base's hidden state one position earlier, [b, s, hidden].

    `keep` [b, s] (bool) says where that earlier state may be used; where it is False (the first position,
    a document's first token in a packed row, a left-padded row's first real token) the input is zeros."""
    shifted = paddle.concat([paddle.zeros_like(hidden[:, :1]), hidden[:, :-1]], axis=1)
    return shifted * keep.astype(hidden.dtype).unsqueeze(-1)


class RecyclableModule(nn.Layer):
    """(recycled state, embedding of the token it produced) -> the module's final hidden states."""

    def __init__(self, config, mp_group=None):
        super().__init__()
        self.config = config
        self.mp_group = mp_group
        # Replicated on every tensor-parallel rank: both inputs are full-width on every rank.
        self.input_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias_attr=False)
        self.layers = nn.LayerList([ChuXinDecoderLayer(config, mp_group) for _ in range(config.recycle_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The base's initialization (matrices ~ N(0, initializer_range), shards cut from one full draw); it
        # reads only self.config, self.mp_group and self.parameters().
        ChuXinForCausalLM.init_weights(self)

    def forward(self, recycled, token_embeds, position_ids=None, doc_ids=None, attn_mask=None, cache=None):
        """`recycled` and `token_embeds` [b, s, hidden]; positions, masks and the cache as in ChuXinModel
        (the cache is the module's own: its layers are numbered from 0)."""
        b, s = token_embeds.shape[0], token_embeds.shape[1]
        if position_ids is None:
            position_ids = positions_after(cache, b, s)
        x = self.input_proj(paddle.concat([recycled, token_embeds], axis=-1))
        rope, mask = attention_inputs(self.config, self.layers[0].self_attn, position_ids, doc_ids, attn_mask, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i)
        return self.norm(x)


class RecycleGPT:
    """A base causal LM and its recyclable module, for decoding (ppzoo.inference.recycle). Both are the
    Module's own layers: nothing is copied."""

    def __init__(self, base_lm, recycler):
        self.lm = base_lm
        self.base = BaseLM(base_lm)
        self.recycler = recycler
        self.config = base_lm.config

    def base_step(self, input_ids, position_ids, attn_mask, cache):
        """One forward of the full model: its final hidden states [b, s, hidden] (score them with logits())."""
        return self.base.hidden_states(input_ids, position_ids, None, attn_mask, cache)

    def logits(self, hidden):
        """The LM head's logits of hidden states ([b, hidden] -> [b, vocab]). Decoding scores one position at a
        time: with one row per sequence the product is a matrix-vector one, which MKL runs several times
        faster than a two-row matrix product (measured on this project's CPU, [2, 256] x [256, 4096])."""
        return self.base.head(hidden)

    def recycle_step(self, recycled, input_ids, position_ids, attn_mask, cache):
        """One forward of the recyclable module: the logits of its last position [b, vocab]."""
        hidden = self.recycler(recycled, self.base.embed(input_ids), position_ids, None, attn_mask, cache)
        return self.base.head(hidden[:, -1])

    def eval(self):
        self.lm.eval()
        self.recycler.eval()
        return self

    @property
    def training(self):
        return self.lm.training or self.recycler.training

    def train(self):
        self.lm.train()
        self.recycler.train()
        return self
