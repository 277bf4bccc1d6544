"""How much a cache policy (KCache's top-N values, ...) changes what a model computes, against the dense cache.

Two measures, both taken where a decode-time policy acts, on decode steps:

* decode perplexity: windows of validation text are teacher-forced through the cache one token at a time
  after a short dense prefill, and the next-token loss is averaged over the tokens the decode steps
  predict. With a dense cache this is the ordinary perplexity of those tokens (tested against one full
  forward);
* needle in a haystack (ppzoo.eval.niah's grid and scoring): the haystack is prefilled, the question's last
  `decode_tail` tokens go through as decode steps (Generator's decode_tail), and the answer is decoded, so
  the retrieval itself happens through the policy. Without that the answer's first token would come out of
  the dense prefill and no decode-time policy could change it.

    rows = compare_policies(model, tokenizer, {"dense": PreallocatedKVCache, "top-64": factory}, ...)
    print(markdown_table(rows))
"""
import math

import numpy as np
import paddle
import paddle.nn.functional as F

from ppzoo.data.datasets import _builtin_stream
from ppzoo.data.needle import Haystack, NeedleBuilder
from ppzoo.errors import DataError
from ppzoo.eval.niah import build_grid, run_cases, summarize
from ppzoo.inference.generate import Generator, SamplingConfig

NIAH_DECODE_TAIL = 24  # the needle question is 30-36 tokens with the built-in tokenizer: its last 24


def document_windows(tokenizer, seq_len, count, split="validation"):
    """[count, seq_len] token ids: the first seq_len tokens of the first `count` documents of the built-in
    corpus's split that are at least that long (a window inside one document: decoding through a cache
    sees no document boundary, so none is inside)."""
    stream = np.asarray(_builtin_stream(tokenizer, split, None))
    ends = np.flatnonzero(stream == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    long_enough = starts[(ends - starts) >= seq_len][:count]
    if len(long_enough) < count:
        raise DataError(f"the {split} split has only {len(long_enough)} documents of at least {seq_len} tokens, "
                        f"{count} were asked for; ask for fewer or shorter windows.")
    return np.stack([stream[s:s + seq_len] for s in long_enough]).astype(np.int64)


@paddle.no_grad()
def decode_perplexity(model, windows, cache_factory, prefill=16, batch_size=8):
    """Perplexity of the tokens of `windows` [n, seq_len] that decode steps predict: each batch is prefilled
    with its first `prefill` tokens (densely, as a generation's prompt), then fed one token at a time through
    a fresh cache from `cache_factory`; the logits of step t score token t + 1. Returns {"ppl", "nll",
    "tokens"}."""
    windows = np.asarray(windows, dtype=np.int64)
    if not 1 <= prefill < windows.shape[1] - 1:
        raise DataError(f"prefill must leave decode steps: 1 <= prefill < seq_len - 1, got {prefill} for "
                        f"windows of {windows.shape[1]} tokens")
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size]
        cache = cache_factory()
        model(paddle.to_tensor(ids[:, :prefill]), cache=cache)
        cache.advance(prefill)
        for t in range(prefill, ids.shape[1] - 1):
            logits = model(paddle.to_tensor(ids[:, t:t + 1]), cache=cache)[:, -1].astype("float32")
            cache.advance(1)
            nll = F.cross_entropy(logits, paddle.to_tensor(ids[:, t + 1:t + 2]), reduction="sum")
            total += float(nll)
            count += len(ids)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}


def niah_accuracy(model, tokenizer, cache_factory, lengths, depths, trials, seed=0, value_kind="token",
                  num_values=None, decode_tail=NIAH_DECODE_TAIL, prefill_chunk=512, batch_size=8,
                  max_new_tokens=4, haystack_chars=None):
    """The NIAH grid (ppzoo.eval.niah) through a cache policy, the question's tail decoded (see the module
    docstring); returns niah.summarize's result."""
    haystack = Haystack(tokenizer, "validation", haystack_chars, drop_digits=value_kind == "token")
    cases = build_grid(NeedleBuilder(tokenizer, haystack, value_kind, num_values), lengths, depths, trials, seed)
    generator = Generator(model, tokenizer, cache_factory=cache_factory, max_length=max(lengths) + max_new_tokens,
                          prefill_chunk=prefill_chunk, decode_tail=decode_tail)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    continuations = run_cases(lambda prompts: generator.generate(prompts, sampling), cases, batch_size)
    return summarize(cases, continuations, lengths, depths,
                     {"decode_tail": decode_tail, "value_kind": value_kind, "trials": trials, "seed": seed})


def compare_policies(model, tokenizer, policies, windows=None, prefill=16, niah=None, batch_size=8, log=print):
    """One row per policy (`policies`: name -> cache factory; the first is the reference): decode perplexity
    on `windows` (None: skipped) and NIAH accuracy with the keyword arguments `niah` of niah_accuracy (None:
    skipped), each with its change relative to the reference."""
    rows = []
    for name, factory in policies.items():
        row = {"policy": name}
        if windows is not None:
            row.update(decode_perplexity(model, windows, factory, prefill, batch_size))
        if niah is not None:
            result = niah_accuracy(model, tokenizer, factory, batch_size=batch_size, **niah)
            row["niah"] = result["overall_accuracy"]
            row["niah_per_length"] = result["per_length"]
        reference = rows[0] if rows else row
        if "ppl" in row:
            row["ppl_change"] = row["ppl"] / reference["ppl"] - 1
        if "niah" in row:
            row["niah_change"] = row["niah"] - reference["niah"]
        rows.append(row)
        if log:
            log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                         if k != "niah_per_length"))
    return rows


def markdown_table(rows):
    """The rows of compare_policies as a markdown table."""
    has_ppl, has_niah = "ppl" in rows[0], "niah" in rows[0]
    header = ["cache policy"] + (["decode ppl", "ppl vs ref"] if has_ppl else []) + \
        (["NIAH accuracy", "NIAH vs ref"] if has_niah else [])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["policy"]]
        if has_ppl:
            cells += [f"{row['ppl']:.3f}", f"{row['ppl_change']:+.2%}"]
        if has_niah:
            cells += [f"{row['niah']:.3f}", f"{row['niah_change']:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
