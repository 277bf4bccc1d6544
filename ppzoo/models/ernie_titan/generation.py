"""Generation with ERNIE 3.0 Titan: the generation module as a causal LM for ppzoo.inference.Generator, with
recurrence memory; sampling of the adversarial negatives; credibility reranking; controllable prompts.

Recurrence memory in the generation API: `lm.memory` (a model.Memory, e.g. from `lm.read_context(ids)` or
the soft genre prompts) is written into a fresh KV cache through the cache's own `attend` before the first
forward, as the keys and values its layer inputs give; the prompt's positions follow the memory's. Every
cache policy (dense, preallocated, KCache) therefore serves memory and prompt alike.
"""
import weakref

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.data.ernie_tasks import format_control_prompt
from ppzoo.inference.cache import PreallocatedKVCache
from ppzoo.inference.generate import Generator, SamplingConfig
from ppzoo.models.ernie_titan.model import NEG_INF, additive_mask, relative_index, segment_mask


class TitanCausalLM(nn.Layer):
    """`forward(input_ids, position_ids=, attn_mask=, cache=) -> logits`, the interface Generator drives."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config  # no max_position_embeddings: relative positions have no fixed context
        self.memory = None
        # Logits beyond this many ids are cut off (None: none): Model.vocab_size rounds the tokenizer's vocabulary
        # up, and ids no tokenizer token has must never be generated (and Generator sizes its arrays by it).
        self.vocab_limit = None
        self._key_positions = weakref.WeakKeyDictionary()  # per cache: positions of every key it holds

    def causal_layers(self):
        return list(self.model.universal.layers) + list(self.model.generation.layers)

    def read_context(self, input_ids, memory=None):
        """Memory after reading `input_ids` [1 or b, s] (following `memory`, if given) segment by segment,
        mem_len tokens at a time, as the generation module reads a long document."""
        ids = paddle.to_tensor(input_ids, dtype="int64")
        step = self.config.mem_len
        with paddle.no_grad():
            for start in range(0, ids.shape[1], step):
                _, memory = self.model.lm_segment(ids[:, start:start + step], memory=memory)
        return memory

    def genre_memory(self, genre):
        with paddle.no_grad():
            return self.model.genre_memory(paddle.to_tensor([int(genre)], dtype="int64"))

    def _prime(self, cache, memory):
        """Write the memory's keys and values into the empty cache, layer by layer, through cache.attend."""
        m = memory.length
        rel = relative_index(memory.positions, memory.positions, self.model.universal.max_distance)
        mask = additive_mask(segment_mask(memory.valid, m, causal=True))
        for index, (layer, hidden) in enumerate(zip(self.causal_layers(), memory.hidden)):
            attn = layer.attn
            b = hidden.shape[0]
            q, k, v = attn.qkv(layer.norm1(hidden)).reshape([b, m, 3, attn.heads, attn.head_dim]).unbind(axis=2)
            cache.attend(index, q + attn.u, k, v, additive_mask=attn.position_scores(q, rel) + mask)
        cache.advance(m)

    def forward(self, input_ids, position_ids=None, attn_mask=None, cache=None):
        b, s = input_ids.shape
        memory = self.memory.expand(b) if self.memory is not None else None
        embeds = self.model.embed(input_ids)
        if cache is None:  # one causal forward over the ids (after the memory)
            hidden, _ = self.model.generate_hidden(embeds, position_ids, memory=memory)
            return self._logits(hidden)
        known = self._key_positions.get(cache)
        if known is None:
            if cache.length != 0:
                raise ValueError("this cache was filled by another model; give each generation a fresh cache")
            if memory is not None:
                self._prime(cache, memory)
            known = memory.positions if memory is not None else paddle.zeros([b, 0], dtype="int64")
        if position_ids is None:  # continue after the last key (memory positions end at -1)
            start = known[:, -1:] + 1 if known.shape[1] else paddle.zeros([b, 1], dtype="int64")
            position_ids = start + paddle.arange(s, dtype="int64").unsqueeze(0)
        key_positions = paddle.concat([known, position_ids.astype("int64")], axis=1)
        if attn_mask is None:
            attn_mask = additive_mask(segment_mask(paddle.ones(key_positions.shape, dtype="bool"), s, causal=True))
        elif memory is not None:
            # The Generator's mask covers its own tokens; the memory (first in the cache) is visible to all.
            memory_columns = paddle.where(memory.valid, paddle.zeros([], "float32"), paddle.full([], NEG_INF, "float32"))
            attn_mask = paddle.concat([memory_columns[:, None, None, :].expand([b, 1, s, memory.length]),
                                       attn_mask.astype("float32")], axis=-1)
        hidden, _ = self.model.generate_hidden(embeds, position_ids, cache=cache, key_positions=key_positions,
                                               mask=attn_mask)
        self._key_positions[cache] = key_positions
        return self._logits(hidden)

    def _logits(self, hidden):
        logits = self.model.lm_head(hidden)
        return logits[..., :self.vocab_limit] if self.vocab_limit is not None else logits


@paddle.no_grad()
def sample_continuations(lm, prefixes, num_new_tokens, temperature=1.0, top_k=0, seed=0, stop_id=None):
    """Token ids the model generates after each prefix (lists of ids), sampled with the cache; used for the
    adversarial negatives inside a training step (ids in, ids out: no tokenizer there)."""
    was_training = lm.training
    lm.eval()
    rng = np.random.default_rng(seed)
    width = max(len(p) for p in prefixes)
    ids = np.zeros((len(prefixes), width), dtype=np.int64)
    valid = np.zeros((len(prefixes), width), dtype=bool)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p):], valid[i, width - len(p):] = p, True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    cache = PreallocatedKVCache()
    out = [[] for _ in prefixes]
    done = np.zeros(len(prefixes), dtype=bool)
    step_ids, step_pos = ids, positions
    try:
        for _ in range(num_new_tokens):
            mask = Generator._attention_mask(valid, step_ids.shape[1])
            logits = lm(paddle.to_tensor(step_ids), position_ids=paddle.to_tensor(step_pos), attn_mask=mask,
                        cache=cache)[:, -1].astype("float32")
            cache.advance(step_ids.shape[1])
            if temperature == 0:
                chosen = logits.argmax(axis=-1).numpy()
            else:
                logits = logits / temperature
                if top_k:
                    kth = paddle.topk(logits, top_k, axis=-1)[0][:, -1:]
                    logits = paddle.where(logits < kth, paddle.full([], NEG_INF, "float32"), logits)
                probs = F.softmax(logits, axis=-1).numpy().astype(np.float64)
                probs /= probs.sum(-1, keepdims=True)
                chosen = np.array([rng.choice(len(p), p=p) for p in probs])
            for i, token in enumerate(chosen):
                if not done[i]:
                    if stop_id is not None and token == stop_id:
                        done[i] = True
                    else:
                        out[i].append(int(token))
            if done.all():
                break
            valid = np.concatenate([valid, np.ones((len(prefixes), 1), dtype=bool)], axis=1)
            step_pos, step_ids = step_pos[:, -1:] + 1, chosen.reshape(-1, 1).astype(np.int64)
    finally:
        if was_training:
            lm.train()
    return out


@paddle.no_grad()
def credibility_scores(model, sequences, cls_id, pad_id=0, max_len=None):
    """P(original text) the discriminator gives each token sequence ([CLS] is prepended)."""
    rows = [[cls_id] + list(s)[: (max_len - 1) if max_len else None] for s in sequences]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], valid[i, : len(r)] = r, True
    was_training = model.training
    model.eval()
    logits = model.cls_logits(model.credibility_head, paddle.to_tensor(ids), paddle.to_tensor(valid))
    if was_training:
        model.train()
    return F.sigmoid(logits[:, 0]).numpy()


@paddle.no_grad()
def continuation_log_likelihood(lm, prompt_ids, continuation_ids):
    """Sum of log p(continuation | prompt, memory) and its token count under the generation module."""
    ids = list(prompt_ids) + list(continuation_ids)
    if not continuation_ids:
        return 0.0, 0
    logits = lm(paddle.to_tensor([ids[:-1]], dtype="int64")).astype("float32")
    logp = F.log_softmax(logits[0], axis=-1).numpy()
    start = len(prompt_ids) - 1
    total = sum(logp[start + i, t] for i, t in enumerate(continuation_ids))
    return float(total), len(continuation_ids)


def controllable_generate(lm, tokenizer, text_prefix="", topic=None, keywords=None, sentiment=None, length=None,
                          genre=None, sampling=None, num_candidates=1, rerank=False, cls_id=None,
                          cache_factory=PreallocatedKVCache):
    """Generate text under the controllable-LM prompt built from the attributes (any may be None: dropped),
    with the soft genre prompt as memory when `genre` is given. With num_candidates > 1 and `rerank`, the
    candidate the credibility discriminator scores highest is returned first.

    Returns a list of dicts {text, credibility (if scored)} ordered best first when reranked."""
    prompt = format_control_prompt(topic, keywords, sentiment, length) + text_prefix
    # Token ids as the controllable LM trained on them: eos, the prompt (if any), the text.
    prompt_ids = [tokenizer.eos_id] + tokenizer.encode(prompt)
    sampling = sampling or SamplingConfig()
    previous = lm.memory
    lm.memory = lm.genre_memory(genre) if genre is not None else previous
    lm.vocab_limit = tokenizer.vocab_size
    try:
        generator = Generator(lm, tokenizer, cache_factory=cache_factory)
        texts = generator.generate([prompt_ids] * num_candidates, sampling)
    finally:
        lm.memory = previous
    results = [{"text": t} for t in texts]
    if rerank and cls_id is not None:
        scores = credibility_scores(lm.model, [tokenizer.encode(text_prefix + t) for t in texts], cls_id,
                                    tokenizer.pad_id or 0)
        for r, s in zip(results, scores):
            r["credibility"] = float(s)
        results.sort(key=lambda r: -r["credibility"])
    return results
