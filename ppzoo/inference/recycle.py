"""Decoding with RecycleGPT's recyclable module (ppzoo.models.recycle_gpt): two strategies beside the plain
Generator ("base").

Notation: the full model at position i reads token x_i and gives the hidden state h_i and the logits of
x_{i+1}; the recyclable module at position i reads (h_{i-1}, x_i) and gives logits of x_{i+1} too, without
running the full model at i. After the prompt's prefill the full model has chosen x_n, and the module (over
the prompt and x_n) proposes d, a guess at x_{n+1}. Then every step:

1. one full-model forward over the two tokens [x_n, d] at positions n, n+1 (on a CPU or a GPU at small
   batch, two tokens cost about as much as one: a decode step is bound by weights and per-op overhead);
2. "alternating" (the paper's): d is taken as x_{n+1}, and the forward's last logits give x_{n+2}. Two
   tokens a step, one from the module: lossy, the module is not the full model.
   "verified": the forward's first logits give the full model's own x_{n+1}; d is accepted if it equals
   it, and then the last logits give x_{n+2} (their context was right). A rejected d costs nothing but
   the step's second token. Greedy output is exactly the base model's;
3. the module runs over the positions the full model just confirmed, (h_n, x_{n+1}) and, when d was
   accepted, (h_{n+1}, x_{n+2}); its last logits propose the next d. So the module's own KV cache covers
   every position, as in training, and holds only confirmed tokens (it never needs a roll back).

Rows of a batch move at their own pace. A step gives every row the same number of slots; a row that needs
fewer gets holes at the left, masked out of attention like the Generator's left padding, and a rejected
draft becomes such a hole: its keys and values stay in the full model's cache but no later query sees
them (the roll back, done through the mask: it works for every cache policy and for each row on its own).
Positions count real tokens only, so a row's tokens are positioned as if it had decoded alone.
"""
import numpy as np
import paddle

from ppzoo.errors import PpzooError
from ppzoo.inference.cache import DenseKVCache
from ppzoo.inference.generate import Generator, SamplingConfig, TextRows
from ppzoo.models.recycle_gpt.model import recycled_states

STRATEGIES = ("base", "alternating", "verified")


class _Track:
    """One network's KV cache and which of its positions hold real tokens ([b, positions] bool)."""

    def __init__(self, cache, batch):
        self.cache = cache
        self.valid = np.zeros((batch, 0), dtype=bool)

    def append(self, new_valid):
        """Add the step's slots ([b, s] bool: real or hole); returns the step's attention mask."""
        self.valid = np.concatenate([self.valid, new_valid], axis=1)
        return Generator._attention_mask(self.valid, new_valid.shape[1])


def _ids(array):
    return paddle.to_tensor(np.ascontiguousarray(array, dtype=np.int64))


class RecycleGenerator(Generator):
    """Generates with a RecycleGPT (model.recycle_gpt.RecycleGPT, from Module.recyclable_model()) using
    `strategy` "alternating" or "verified" (see the module docstring). After each generation, `stats` holds
    the number of full-model and module forwards and, for verified decoding, the drafts checked and
    accepted (rows still generating only)."""

    def __init__(self, model, tokenizer, strategy="verified", cache_factory=DenseKVCache, max_length=None):
        if strategy not in ("alternating", "verified"):
            raise PpzooError(f"unknown decoding strategy {strategy!r} for RecycleGenerator; use 'alternating' or "
                             "'verified' (or the plain Generator for 'base')")
        super().__init__(model.lm, tokenizer, cache_factory, max_length)
        self.recycle_gpt = model
        self.strategy = strategy
        self.stats = {}

    def _pick(self, logits, seen, sampling, rng):
        vocab = logits.shape[-1]
        return self._choose(logits.astype("float32"), paddle.to_tensor(seen[:, :vocab]), sampling, rng)

    @paddle.no_grad()
    def stream(self, prompts, sampling=None, truncate=False):
        sampling = sampling or SamplingConfig()
        sampling.check()
        verified = self.strategy == "verified"
        if verified and sampling.temperature != 0:
            raise PpzooError(
                "verified decoding reproduces the base model's greedy output, so it needs temperature 0; sample "
                "with the 'alternating' or 'base' strategy instead"
            )
        max_new = sampling.max_new_tokens
        # One position of room more than the tokens returned: a step may compute one token past the end.
        rows, ids, valid, positions = self._prepare(prompts, max_new + 1, truncate)
        stop_ids = set(sampling.stop_token_ids if sampling.stop_token_ids is not None else [self.tokenizer.eos_id])
        stop_ids.discard(None)
        batch = len(rows)
        rng = np.random.default_rng(sampling.seed)
        seen = np.zeros((batch, max(self.tokenizer.vocab_size, 1)), dtype=bool)
        for i, r in enumerate(rows):
            seen[i, r] = True
        texts = TextRows(self.tokenizer, batch, stop_ids, sampling.stop_strings)
        counts = np.zeros(batch, dtype=np.int64)
        self.stats = stats = {"base_forwards": 0, "module_forwards": 0, "drafts": 0, "accepted": 0}

        def active():
            return ~texts.done & (counts < max_new)

        def emit(tokens_per_row):
            pieces = []
            for i, tokens in enumerate(tokens_per_row):
                piece = ""
                for token in tokens:
                    if counts[i] < max_new:
                        counts[i] += 1
                        seen[i, token] = True
                        piece += texts.add(i, int(token))
                pieces.append(piece)
            return pieces

        model = self.recycle_gpt
        was_training = model.training
        model.eval()
        base, module = _Track(self.cache_factory(), batch), _Track(self.cache_factory(), batch)
        try:
            # Prefill: the full model over the prompts, then the module over the prompts and the first token.
            hidden = model.base_step(_ids(ids), _ids(positions), base.append(valid), base.cache)
            base.cache.advance(ids.shape[1])
            stats["base_forwards"] += 1
            last = self._pick(model.logits(hidden[:, -1]), seen, sampling, rng)  # x_n
            pos = positions[:, -1] + 1  # n, each row's position of x_n
            yield emit(last[:, None])
            module_valid = np.concatenate([valid, np.ones((batch, 1), dtype=bool)], axis=1)
            keep = np.concatenate([np.zeros((batch, 1), dtype=bool), module_valid[:, :-1]], axis=1)
            recycled = recycled_states(paddle.concat([hidden, paddle.zeros_like(hidden[:, :1])], axis=1),
                                       paddle.to_tensor(keep))
            module_ids = np.concatenate([ids, last[:, None]], axis=1)
            module_pos = np.concatenate([positions, pos[:, None]], axis=1)
            draft_logits = model.recycle_step(recycled, _ids(module_ids), _ids(module_pos),
                                              module.append(module_valid), module.cache)
            module.cache.advance(module_ids.shape[1])
            stats["module_forwards"] += 1
            draft = self._pick(draft_logits, seen, sampling, rng)
            if not verified:
                yield emit(draft[:, None])

            while active().any():
                # 1. The full model over [x_n, d].
                step_ids = np.stack([last, draft], axis=1)
                step_pos = np.stack([pos, pos + 1], axis=1)
                hidden = model.base_step(_ids(step_ids), _ids(step_pos), base.append(np.ones((batch, 2), dtype=bool)),
                                         base.cache)
                base.cache.advance(2)
                stats["base_forwards"] += 1
                # 2. Check the draft (verified) or take it (alternating); x_{n+2} from the last logits.
                if verified:
                    first = self._pick(model.logits(hidden[:, 0]), seen, sampling, rng)
                    accepted = first == draft
                    base.valid[~accepted, -1] = False  # rejected drafts: holes no later query sees
                    rows_checked = active()
                    stats["drafts"] += int(rows_checked.sum())
                    stats["accepted"] += int((accepted & rows_checked).sum())
                else:
                    first, accepted = draft, np.ones(batch, dtype=bool)
                seen_after_first = seen.copy()
                seen_after_first[np.arange(batch), first] = True
                # Scored only where it counts: a rejected draft's next token is never used.
                second = (self._pick(model.logits(hidden[:, 1]), seen_after_first, sampling, rng) if accepted.any()
                          else first)
                if verified:
                    yield emit([[f, s] if a else [f] for f, s, a in zip(first, second, accepted)])
                else:
                    yield emit(second[:, None])
                if not active().any():
                    break
                # 3. The module over the confirmed positions: (h_n, x_{n+1}) at n+1, and (h_{n+1}, x_{n+2}) at
                # n+2 where the draft was accepted (a hole in front of the rejected rows' one slot).
                if accepted.any():
                    module_ids = np.stack([first, np.where(accepted, second, first)], axis=1)
                    module_pos = np.stack([pos + 1, np.where(accepted, pos + 2, pos + 1)], axis=1)
                    module_valid = np.stack([accepted, np.ones(batch, dtype=bool)], axis=1)
                    if accepted.all():
                        recycled = hidden  # (h_n, h_{n+1})
                    else:
                        both = paddle.to_tensor(accepted)[:, None]
                        h_n, h_next = hidden[:, 0], hidden[:, 1]
                        recycled = paddle.stack([paddle.where(both, h_n, paddle.zeros_like(h_n)),
                                                 paddle.where(both, h_next, h_n)], axis=1)
                else:  # one slot: (h_n, x_{n+1})
                    module_ids, module_pos = first[:, None], (pos + 1)[:, None]
                    module_valid = np.ones((batch, 1), dtype=bool)
                    recycled = hidden[:, :1]
                draft_logits = model.recycle_step(recycled, _ids(module_ids), _ids(module_pos),
                                                  module.append(module_valid), module.cache)
                module.cache.advance(module_ids.shape[1])
                stats["module_forwards"] += 1
                last = np.where(accepted, second, first)
                pos = np.where(accepted, pos + 2, pos + 1)
                draft = self._pick(draft_logits, seen, sampling, rng)
                if not verified:
                    yield emit(draft[:, None])
            tail = texts.flush()
            if any(tail):
                yield tail
        finally:
            if was_training:
                model.train()


def make_generator(module, tokenizer, strategy="base", cache_factory=DenseKVCache, max_length=None):
    """A generator for an engine Module: the plain Generator over its language model ("base"), or a
    RecycleGenerator ("alternating", "verified") for a module with a recyclable module (RecycleGPT)."""
    if strategy not in STRATEGIES:
        raise PpzooError(f"unknown decoding strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "base":
        return Generator(module.language_model(), tokenizer, cache_factory=cache_factory, max_length=max_length)
    if not hasattr(module, "recyclable_model"):
        raise PpzooError(
            f"the {strategy!r} decoding strategy needs a model with a recyclable module (Model.module: RecycleGPT, "
            f"e.g. a checkpoint of configs/recycle_gpt/tiny.yaml); {type(module).__name__} has none. Use the "
            "'base' strategy for it."
        )
    return RecycleGenerator(module.recyclable_model(), tokenizer, strategy, cache_factory, max_length)
