"""KCache against the dense cache at equal fast-memory budgets: decode tokens/s at a long context, with
decode perplexity and needle-in-a-haystack accuracy beside them, in one run.

For each dense batch b in --dense-batches the budget is the fast memory a dense cache (PreallocatedKVCache)
of b sequences holds at the context (prompt + new tokens, in whole blocks). KCache keeps in fast memory the
keys of every layer, the values of its dense layers and the value rows one decode step fetches; its batch is
the largest whose bytes fit the same budget (computed from the shapes, then checked against the bytes the
caches report after the run: column "fast MB"). Both decode greedily from prompts of validation text with
the trained long-context tiny ChuXin; "decode ms/step" is the median time between the Generator's per-step
yields after the first (prefill excluded; the median so that a step stalled by another process on a shared
machine does not count), tokens/s = batch / that. Engines alternate within each round and the best round
counts. A third row per budget, dense at KCache's batch, is over the budget: it separates what
the larger batch buys from what KCache's own work costs.

Accuracy, for the same KCache settings (ppzoo.eval.cache_policy): decode perplexity of validation text
teacher-forced token by token (tiny ChuXin of configs/chuxin/tiny.yaml, the language model; at its trained
context of 256 tokens) and NIAH with the question's tail decoded through the cache (the retrieval model of
configs/chuxin/tiny_long.yaml). Needs both checkpoints: `make demo` (or tools/train.py -c
configs/chuxin/tiny.yaml) and then tiny_niah_ft.yaml and tiny_long.yaml (see their headers).

Run it on an otherwise idle machine, or with OMP_NUM_THREADS=1 on a busy one: KCache's host-side work
(selection, gathering from the value files) and Paddle's kernels then do not wait on each other's threads.

    python benchmarks/bench_kcache.py [--context 2048] [--dense-batches 2 5] [--top-n 0.125] [--dense-layers 1]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppzoo  # noqa: E402  (first: CPU threading defaults)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ppzoo.data.datasets import _builtin_stream  # noqa: E402
from ppzoo.errors import CheckpointError  # noqa: E402
from ppzoo.eval.cache_policy import compare_policies, document_windows  # noqa: E402
from ppzoo.inference import Generator, PreallocatedKVCache, SamplingConfig, load_checkpoint_for_inference  # noqa: E402
from ppzoo.inference.kcache import KCache, KCacheConfig, parse_top_n  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IDLE_GAP_S = 0.3  # MKL's worker threads spin 200 ms after parallel work (see bench_decode.py)
MB = 2 ** 20


class RecordingFactory:
    """A cache factory that keeps the last cache it made, to read its memory_report() after a run."""

    def __init__(self, make):
        self.make, self.last = make, None

    def __call__(self):
        self.last = self.make()
        return self.last


def load(path, what, how):
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint; the {what} comes from {how}.")
    module, tokenizer, cfg = load_checkpoint_for_inference(path)
    return module.language_model(), tokenizer, cfg


def fast_bytes_per_sequence(model_cfg, capacity, kcache=None):
    """Fast-memory bytes one sequence's cache takes at `capacity` positions (float32): a dense cache holds
    keys and values of every layer; KCache the keys of every layer, the values of its dense layers and, one
    layer at a time, the fetched value rows and their weights."""
    row = model_cfg.num_kv_heads * (model_cfg.hidden_size // model_cfg.num_heads) * 4  # one position, one layer
    if kcache is None:
        return 2 * model_cfg.num_layers * capacity * row
    n = kcache.num_selected(capacity)
    fetched = model_cfg.num_heads * n * (model_cfg.hidden_size // model_cfg.num_heads + 1) * 4
    return (model_cfg.num_layers + min(kcache.dense_layers, model_cfg.num_layers)) * capacity * row + fetched


def time_decode(model, tokenizer, factory, prompts, new_tokens):
    """(median decode ms per step, the cache used) of one greedy generation."""
    generator = Generator(model, tokenizer, cache_factory=factory, max_length=len(prompts[0]) + new_tokens + 1)
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=[])
    time.sleep(IDLE_GAP_S)
    stamps = [time.perf_counter() for _ in generator.stream(prompts, sampling)]
    return float(np.median(np.diff(stamps))) * 1e3, factory.last


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--speed-ckpt", default="output/chuxin_tiny_long", help="model timed at the long context")
    parser.add_argument("--lm-ckpt", default="output/chuxin_tiny", help="model of the perplexity column")
    parser.add_argument("--niah-ckpt", default="output/chuxin_tiny_long", help="model of the NIAH column")
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens of the timed generations")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dense-batches", type=int, nargs="+", default=[2, 5],
                        help="each sets a budget: the fast memory of a dense cache of this many sequences")
    parser.add_argument("--top-n", default="0.125", help="KCache rows per head and step: count or fraction")
    parser.add_argument("--dense-layers", type=int, default=KCacheConfig.dense_layers)
    parser.add_argument("--renormalize", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--ppl-len", type=int, default=256)
    parser.add_argument("--niah-lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--niah-depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--niah-trials", type=int, default=2)
    args = parser.parse_args()
    os.chdir(REPO)

    kcache = KCacheConfig(top_n=parse_top_n(args.top_n), dense_layers=args.dense_layers, renormalize=args.renormalize)
    speed_model, tokenizer, cfg = load(args.speed_ckpt, "timed model", "configs/chuxin/tiny_long.yaml")
    block = kcache.block_size
    capacity = -(-(args.context + args.new_tokens) // block) * block
    dense_seq = fast_bytes_per_sequence(cfg.Model, capacity)
    kcache_seq = fast_bytes_per_sequence(cfg.Model, capacity, kcache)

    stream = np.asarray(_builtin_stream(tokenizer, "validation", None))
    budgets = []
    for b_dense in args.dense_batches:
        budget = b_dense * dense_seq
        b_kcache = budget // kcache_seq
        budgets.append((b_dense, b_kcache, budget))
    runs = []  # (budget index, label, batch, factory maker)
    for i, (b_dense, b_kcache, _) in enumerate(budgets):
        runs.append((i, "dense", b_dense, lambda: PreallocatedKVCache(block_size=block)))
        runs.append((i, "KCache", b_kcache, lambda: KCache(kcache)))
        runs.append((i, "dense, over budget", b_kcache, lambda: PreallocatedKVCache(block_size=block)))
    best = {}
    reports = {}
    for round_index in range(args.rounds):
        order = runs if round_index % 2 == 0 else runs[::-1]
        for i, label, batch, make in order:
            prompts = [stream[j * args.context:(j + 1) * args.context].tolist() for j in range(batch)]
            factory = RecordingFactory(make)
            ms, cache = time_decode(speed_model, tokenizer, factory, prompts, args.new_tokens)
            best[(i, label)] = min(best.get((i, label), float("inf")), ms)
            reports[(i, label)] = cache.memory_report()
            print(f"round {round_index}: budget {i} {label:20s} batch {batch:2d}: {ms:7.2f} ms/step", flush=True)

    print(f"\naccuracy of {kcache.describe()} against the dense cache", flush=True)
    policies = {"dense": PreallocatedKVCache, "KCache": lambda: KCache(kcache)}
    lm, lm_tokenizer, _ = load(args.lm_ckpt, "language model", "configs/chuxin/tiny.yaml (make demo)")
    ppl = compare_policies(lm, lm_tokenizer, policies, document_windows(lm_tokenizer, args.ppl_len, args.ppl_windows))
    niah_model, niah_tokenizer, niah_cfg = load(args.niah_ckpt, "retrieval model", "configs/chuxin/tiny_long.yaml")
    train = niah_cfg.Data.Train
    num_values = train.args.num_values if train is not None and train.dataset == "NeedleRetrieval" else None
    niah = compare_policies(niah_model, niah_tokenizer, policies, niah={
        "lengths": args.niah_lengths, "depths": args.niah_depths, "trials": args.niah_trials, "value_kind": "token",
        "num_values": num_values})
    accuracy = {row["policy"]: {"ppl": row["ppl"], "ppl_change": row["ppl_change"]} for row in ppl}
    for row in niah:
        accuracy[row["policy"]].update(niah=row["niah"], niah_change=row["niah_change"])

    print(f"\n{kcache.describe()}; {os.environ.get('OMP_NUM_THREADS')} math threads; context {args.context} + "
          f"{args.new_tokens} new tokens (capacity {capacity}); fast memory per sequence: dense "
          f"{dense_seq / MB:.2f} MB, KCache {kcache_seq / MB:.2f} MB; perplexity: "
          f"{args.ppl_windows} validation windows of {args.ppl_len} tokens; NIAH: lengths {args.niah_lengths}, "
          f"depths {args.niah_depths}, {args.niah_trials} trials\n")
    header = ["budget MB", "cache", "batch", "fast MB", "offloaded MB", "fits", "decode ms/step", "tokens/s",
              "vs dense", "ppl", "ppl vs dense", "NIAH", "NIAH vs dense"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    table = []
    for i, (b_dense, b_kcache, budget) in enumerate(budgets):
        dense_tps = b_dense / best[(i, "dense")] * 1e3
        for _, label, batch, _ in [r for r in runs if r[0] == i]:
            ms = best[(i, label)]
            report = reports[(i, label)]
            tps = batch / ms * 1e3
            acc = accuracy["KCache" if label == "KCache" else "dense"]
            fits = report["fast_tier_bytes"] <= budget
            row = {"budget_mb": budget / MB, "cache": label, "batch": batch, "fast_mb": report["fast_tier_bytes"] / MB,
                   "offloaded_mb": report["offloaded_bytes"] / MB, "fits": fits, "ms_per_step": ms,
                   "tokens_per_s": tps, "ratio": tps / dense_tps, **acc}
            table.append(row)
            print(f"| {row['budget_mb']:.1f} | {label} | {batch} | {row['fast_mb']:.1f} | {row['offloaded_mb']:.1f} | "
                  f"{'yes' if fits else 'no'} | {ms:.2f} | {tps:.1f} | {row['ratio']:.2f}x | {acc['ppl']:.3f} | "
                  f"{acc['ppl_change']:+.2%} | {acc['niah']:.3f} | {acc['niah_change']:+.3f} |")
    print(json.dumps({"kcache": kcache.describe(), "context": args.context, "new_tokens": args.new_tokens,
                      "rows": table}))


if __name__ == "__main__":
    main()
