"""Autoregressive generation: batched prompts with left padding, a KV cache, and the usual decoding knobs.

The model is any causal LM whose forward is `model(input_ids, position_ids=, attn_mask=, cache=) -> logits`
(ChuXinForCausalLM is). Prompts are left-padded so every row's next token sits in the last column; padding
is masked out of attention and positions count only real tokens, so a row's output does not depend on the
other rows in its batch.

Chunked prefill (`prefill_chunk`): a long prompt is fed through the model in pieces of that many tokens, each
attending to the cache of the pieces before it, so attention holds a [chunk, past + chunk] score matrix per
head instead of [prompt, prompt]: memory grows linearly with the prompt, not quadratically. The result is
the same as one full forward (the masks are the same rows of the full causal mask).

Decoded prompt tail (`decode_tail`): a prompt's last n tokens go through the model one at a time, as decode
steps do, instead of in the prefill. The logits are the same for a dense cache; a cache policy that treats
decode steps differently (KCache fetches only some values) then also acts on them, e.g. on the question at
the end of a needle-in-a-haystack prompt, whose answer otherwise comes straight out of the prefill.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import paddle
import paddle.nn.functional as F

from ppzoo.errors import PpzooError
from ppzoo.inference.cache import DenseKVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the row (CTRL-style)
    stop_strings: List[str] = field(default_factory=list)
    stop_token_ids: Optional[List[int]] = None  # default: the tokenizer's eos
    seed: Optional[int] = None

    def check(self):
        if self.max_new_tokens < 1:
            raise PpzooError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise PpzooError(
                f"invalid sampling settings: temperature {self.temperature} (>= 0), top_p {self.top_p} (0 < p <= 1), "
                f"top_k {self.top_k} (>= 0), repetition_penalty {self.repetition_penalty} (> 0)"
            )


NEG_INF = float("-inf")


def apply_repetition_penalty(logits, generated_mask, penalty):
    """Divide positive logits / multiply negative logits of tokens already seen by `penalty`."""
    if penalty == 1.0:
        return logits
    penalized = paddle.where(logits > 0, logits / penalty, logits * penalty)
    return paddle.where(generated_mask, penalized, logits)


def filter_top_k_top_p(logits, top_k, top_p):
    """Set logits outside the top-k and outside the smallest nucleus of mass top_p to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = paddle.topk(logits, top_k, axis=-1)[0][:, -1:]
        logits = paddle.where(logits < kth, paddle.full_like(logits, NEG_INF), logits)
    if top_p < 1.0:
        sorted_logits = paddle.sort(logits, axis=-1, descending=True)
        probs = F.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass of the tokens before it is below top_p (the top token is always kept);
        # the kept set is every logit at or above the smallest kept sorted logit.
        kept_sorted = (paddle.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = paddle.where(kept_sorted, sorted_logits, paddle.full_like(sorted_logits, float("inf")))
        cutoff = cutoff.min(axis=-1, keepdim=True)
        logits = paddle.where(logits < cutoff, paddle.full_like(logits, NEG_INF), logits)
    return logits


def _pending_length(text, stop_strings):
    """How many trailing characters to hold back from a stream: a byte-level token may end mid-character
    (decoded as U+FFFD until its next byte arrives), and a suffix that begins a stop string may yet turn
    into it (then it is never shown)."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    longest = max((len(s) for s in stop_strings), default=0)
    for k in range(min(len(text), longest - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop_strings):
            return k
    return 0


class TextRows:
    """Each row's generated tokens and the text streamed so far. A row ends at a stop token or a stop string
    (cut before it); text that may still change is held back (see _pending_length) until flush()."""

    def __init__(self, tokenizer, batch, stop_ids, stop_strings):
        self.tokenizer = tokenizer
        self.stop_ids, self.stop_strings = stop_ids, stop_strings
        self.generated = [[] for _ in range(batch)]
        self.emitted = ["" for _ in range(batch)]
        self.done = np.zeros(batch, dtype=bool)

    def add(self, row, token):
        """Append a token to a row; returns the row's newly streamable text (possibly '')."""
        if self.done[row]:
            return ""
        if token in self.stop_ids:
            self.done[row] = True
            return ""
        self.generated[row].append(token)
        text = self.tokenizer.decode(self.generated[row])
        hit = next((s for s in self.stop_strings if s in text), None)
        if hit:
            text = text[: text.index(hit)]
            self.done[row] = True
        final = text if self.done[row] else text[: len(text) - _pending_length(text, self.stop_strings)]
        piece = final[len(self.emitted[row]):]
        self.emitted[row] = final
        return piece

    def flush(self):
        """Each row's held-back text (at the end of generation)."""
        return [self.tokenizer.decode(g)[len(e):] if not d else ""
                for g, e, d in zip(self.generated, self.emitted, self.done)]


class Generator:
    """`prefill_chunk`: feed prompts through the model at most this many tokens at a time (None: all at
    once); `decode_tail`: feed each prompt's last this many tokens one at a time, as decode steps (0: none);
    see the module docstring."""

    def __init__(self, model, tokenizer, cache_factory=DenseKVCache, max_length=None, prefill_chunk=None,
                 decode_tail=0):
        if prefill_chunk is not None and prefill_chunk < 1:
            raise PpzooError(f"prefill_chunk must be a positive number of tokens or None, got {prefill_chunk}")
        if decode_tail < 0:
            raise PpzooError(f"decode_tail must be a number of prompt tokens >= 0, got {decode_tail}")
        self.model = model
        self.tokenizer = tokenizer
        self.cache_factory = cache_factory
        self.max_length = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.prefill_chunk = prefill_chunk
        self.decode_tail = decode_tail

    # ------------------------------------------------------------------------------------- helpers
    def _encode_prompts(self, prompts, truncate):
        """Token ids of each prompt. A prompt that is already a list of ids is taken as is (no bos added):
        callers that build token streams themselves (e.g. needle-in-a-haystack) control every token."""
        rows = []
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.bos_id is not None)
            else:
                ids = [int(i) for i in prompt]
            if not ids:
                raise PpzooError("a prompt is empty: there is nothing to continue from")
            rows.append(ids)
        return rows

    def _check_length(self, rows, max_new_tokens, truncate):
        if self.max_length is None:
            return rows
        budget = self.max_length - max_new_tokens
        out = []
        for i, ids in enumerate(rows):
            if len(ids) > budget:
                if not truncate:
                    raise PpzooError(
                        f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                        f"model's context of {self.max_length} tokens. Shorten the prompt, lower max_new_tokens, or "
                        "ask for truncation (keeps the prompt's last tokens)."
                    )
                ids = ids[len(ids) - budget:]
            out.append(ids)
        return out

    @staticmethod
    def _left_pad(rows, pad_id):
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        valid = np.zeros((len(rows), width), dtype=bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = r
            valid[i, width - len(r):] = True
        return ids, valid

    @staticmethod
    def _attention_mask(valid_keys, num_queries):
        """Additive mask [b, 1, q, k]: a query (the last `num_queries` positions) sees valid keys at or before
        its own position."""
        b, k = valid_keys.shape
        q_pos = np.arange(k - num_queries, k)[:, None]
        causal = np.arange(k)[None, :] <= q_pos
        allowed = causal[None, :, :] & valid_keys[:, None, :]
        # A fully padded query row (padding position) would be all -inf: let it see itself to stay finite.
        allowed |= np.eye(k, dtype=bool)[None, k - num_queries:, :]
        mask = np.where(allowed, 0.0, NEG_INF).astype(np.float32)
        return paddle.to_tensor(mask[:, None, :, :])

    def _forward(self, step_ids, step_pos, valid, cache):
        """Run the model on the new tokens `step_ids` [b, n] (positions `step_pos`) against the cache; `valid`
        [b, past + n] marks real (non-padding) keys. Advances the cache; returns the last position's logits.

        With prefill_chunk set, n > chunk tokens go through in chunks: chunk i's queries see the valid keys of
        every earlier chunk (now in the cache) and, causally, of their own chunk, exactly the rows of the
        full forward's mask, so the result matches the unchunked forward. With decode_tail, a prefill's last
        tokens (all but its first) go through one at a time after the chunks, the same way."""
        num_new = step_ids.shape[1]
        past = valid.shape[1] - num_new
        head = num_new - min(self.decode_tail, num_new - 1)
        chunk = self.prefill_chunk or head
        bounds = [(start, min(start + chunk, head)) for start in range(0, head, chunk)]
        bounds += [(start, start + 1) for start in range(head, num_new)]
        logits = None
        for start, end in bounds:
            logits = self.model(
                paddle.to_tensor(step_ids[:, start:end]),
                position_ids=paddle.to_tensor(step_pos[:, start:end], dtype="int64"),
                # Keys are everything up to this chunk's end; the queries are its last end - start positions.
                attn_mask=self._attention_mask(valid[:, : past + end], end - start),
                cache=cache,
            )
            cache.advance(end - start)
            logits = logits[:, -1, :]  # only the last position is needed: drop the chunk's [b, n, vocab]
        return logits.astype("float32")

    def _prepare(self, prompts, max_new_tokens, truncate):
        """(rows, left-padded ids, valid mask, positions) of a batch of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = self._check_length(self._encode_prompts(prompts, truncate), max_new_tokens, truncate)
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids, valid = self._left_pad(rows, pad_id)
        # Positions count real tokens only, so a left-padded row is positioned as if it were alone.
        positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
        return rows, ids, valid, positions

    @paddle.no_grad()
    def prompt_logits(self, prompts, truncate=False):
        """The next-token logits after each prompt ([b, vocab] numpy float32): one prefill, no decoding."""
        rows, ids, valid, positions = self._prepare(prompts, 1, truncate)
        was_training = self.model.training
        self.model.eval()
        try:
            return self._forward(ids, positions, valid, self.cache_factory()).numpy()
        finally:
            if was_training:
                self.model.train()

    # ------------------------------------------------------------------------------------ decoding
    @paddle.no_grad()
    def stream(self, prompts, sampling=None, truncate=False):
        """Yield, after every decoding step, a list with each row's newly decoded text (possibly '')."""
        sampling = sampling or SamplingConfig()
        sampling.check()
        rows, ids, valid, positions = self._prepare(prompts, sampling.max_new_tokens, truncate)
        stop_ids = set(sampling.stop_token_ids if sampling.stop_token_ids is not None else [self.tokenizer.eos_id])
        stop_ids.discard(None)
        batch = len(rows)
        generator = np.random.default_rng(sampling.seed)

        was_training = self.model.training
        self.model.eval()
        cache = self.cache_factory()
        seen = np.zeros((batch, max(self.tokenizer.vocab_size, 1)), dtype=bool)
        for i, r in enumerate(rows):
            seen[i, r] = True
        texts = TextRows(self.tokenizer, batch, stop_ids, sampling.stop_strings)

        step_ids, step_pos = ids, positions
        try:
            for _ in range(sampling.max_new_tokens):
                next_logits = self._forward(step_ids, step_pos, valid, cache)
                vocab = next_logits.shape[-1]
                next_tokens = self._choose(next_logits, paddle.to_tensor(seen[:, :vocab]), sampling, generator)
                pieces = []
                for i in range(batch):
                    pieces.append(texts.add(i, int(next_tokens[i])))
                    seen[i, int(next_tokens[i])] = True
                yield pieces
                if texts.done.all():
                    break
                valid = np.concatenate([valid, np.ones((batch, 1), dtype=bool)], axis=1)
                step_pos = step_pos[:, -1:] + 1
                step_ids = next_tokens.reshape(batch, 1).astype(np.int64)
            tail = texts.flush()
            if any(tail):
                yield tail
        finally:
            if was_training:
                self.model.train()

    def _choose(self, logits, seen_mask, sampling, generator):
        logits = apply_repetition_penalty(logits, seen_mask, sampling.repetition_penalty)
        if sampling.temperature == 0:
            return paddle.argmax(logits, axis=-1).numpy()
        logits = filter_top_k_top_p(logits / sampling.temperature, sampling.top_k, sampling.top_p)
        probs = F.softmax(logits, axis=-1).numpy().astype(np.float64)
        probs /= probs.sum(axis=-1, keepdims=True)
        # Sampling on the host with a seeded numpy generator: reproducible for a given seed.
        return np.array([generator.choice(probs.shape[-1], p=p) for p in probs])

    def generate(self, prompts, sampling=None, truncate=False):
        """The full continuation of each prompt (a list of strings; a str prompt gives a str)."""
        single = isinstance(prompts, str)
        texts = ["" for _ in range(1 if single else len(prompts))]
        for pieces in self.stream(prompts, sampling, truncate):
            texts = [t + p for t, p in zip(texts, pieces)]
        return texts[0] if single else texts
