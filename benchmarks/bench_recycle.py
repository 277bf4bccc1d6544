"""RecycleGPT decoding against its base model alone, on the same weights: tokens/s at batch 1 and 4, and what
each strategy costs or keeps.

Engines (all eager Paddle, PreallocatedKVCache, greedy, exactly --new-tokens tokens, no stop tokens):
  base         the Generator over the checkpoint's base language model (the reference);
  alternating  the paper's decoding: full model and recyclable module take turns (lossy);
  verified     the module drafts, the next full-model pass checks: output identical to base by design.

Prompts are --prompt-len token windows of the built-in corpus's validation split (text the model never trained
on), tokenized with the checkpoint's tokenizer. Tokens/s counts generated tokens over whole generate calls,
prefill included; on each batch of prompts the engines run in alternating rounds so they see the same machine
state, and each engine's best round counts.
Quality, on the batch-1 outputs: the perplexity the base model assigns to each engine's generations, the
agreement with base greedy (the share of generated tokens that are the base's greedy choice given the
engine's own prefix; 1.0 for base), whether the tokens are identical to base's (every prompt, both batch
sizes) and, for verified, the share of drafts accepted. A last table times one forward of the full model
(1 and 2 new tokens) and of the module (2 new tokens) against a 128-token cache, which bounds the speed-up:
alternating makes 2 tokens per (full 2 + module 2), verified 1 + acceptance per (full 2 + module 1 or 2).

    python benchmarks/bench_recycle.py --ckpt output/recycle_gpt_tiny_from_chuxin [--rounds 3]
    OMP_NUM_THREADS=1 python benchmarks/bench_recycle.py ...   (on a machine other jobs keep busy)
    python benchmarks/bench_recycle.py --random-config configs/recycle_gpt/tiny.yaml -o Model.num_layers=12
        (random weights: speed only; acceptance and quality mean nothing there)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppzoo  # noqa: E402  (first: CPU threading defaults)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from ppzoo.data.corpus import builtin_texts  # noqa: E402
from ppzoo.data.tokenizer import Tokenizer  # noqa: E402
from ppzoo.inference import PreallocatedKVCache, SamplingConfig, load_checkpoint_for_inference  # noqa: E402
from ppzoo.inference.predictor import default_threads  # noqa: E402
from ppzoo.inference.recycle import STRATEGIES, make_generator  # noqa: E402
from ppzoo.registry import MODULES  # noqa: E402

IDLE_GAP_S = 0.3  # past MKL's spin time after parallel work (see bench_decode.py)


class IdTokenizer:
    """Outputs as space-separated token ids, so engines are compared token for token; prompts are id lists."""

    bos_id = eos_id = None
    pad_id = 0

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def decode(self, ids):
        return "".join(f" {int(i)}" for i in ids)


def corpus_prompts(tokenizer, count, length):
    """`count` windows of `length` tokens from the validation split, spread over it."""
    stream = []
    for text in builtin_texts("validation", 400_000):
        stream.extend(tokenizer.encode(text))
        if len(stream) > count * length * 8:
            break
    starts = np.linspace(0, len(stream) - length - 1, count).astype(int)
    return [stream[s:s + length] for s in starts]


def load_model(args):
    if args.ckpt:
        module, tokenizer, cfg = load_checkpoint_for_inference(args.ckpt)
        return module, tokenizer, cfg, f"checkpoint {args.ckpt}"
    cfg = ppzoo.load_config(args.random_config, args.override)
    paddle.seed(0)
    module = MODULES.get(cfg.model_module)(cfg.Model, None)
    module.eval()
    tokenizer = Tokenizer.from_file(cfg.Data.tokenizer)
    return module, tokenizer, cfg, f"random weights, {args.random_config} {' '.join(args.override)}"


def base_scores(lm, prompt, generated):
    """(negative log-likelihoods, base greedy choices) of each generated token given everything before it."""
    ids = paddle.to_tensor([list(prompt) + list(generated)], dtype="int64")
    logits = lm(ids).astype("float32")[0, len(prompt) - 1:-1]
    log_probs = F.log_softmax(logits, axis=-1).numpy()
    nll = -log_probs[np.arange(len(generated)), generated]
    return nll, log_probs.argmax(-1)


@paddle.no_grad()
def forward_ms(module, batch, context, rounds, repeats=10):
    """ms per forward of the full model (1 and 2 new tokens, the last one scored) and of the module (1 and 2
    new tokens) against a cache of `context` positions at batch `batch`: each the best of `rounds`
    interleaved rounds of `repeats` calls."""
    rg = module.recyclable_model()
    rng = np.random.default_rng(0)
    ids = paddle.to_tensor(rng.integers(0, rg.config.vocab_size, (batch, context)), dtype="int64")
    base_cache, module_cache = PreallocatedKVCache(), PreallocatedKVCache()
    rg.base_step(ids, None, None, base_cache)
    rg.recycle_step(paddle.zeros([batch, context, rg.config.hidden_size]), ids, None, None, module_cache)
    base_cache.advance(context)
    module_cache.advance(context)
    # The cache lengths are not advanced: every call writes the same positions, the cost of one decode step.
    calls = {}
    for new in (1, 2):
        step, recycled = ids[:, :new], paddle.zeros([batch, new, rg.config.hidden_size])
        calls[f"full model, {new} token{'s' * (new > 1)}"] = (
            lambda step=step: rg.logits(rg.base_step(step, None, None, base_cache)[:, -1]).numpy())
        calls[f"module, {new} token{'s' * (new > 1)}"] = (
            lambda step=step, recycled=recycled: rg.recycle_step(recycled, step, None, None, module_cache).numpy())
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / repeats * 1000)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a RecycleGPT checkpoint (tools/train.py -c configs/recycle_gpt/...)")
    source.add_argument("--random-config", help="a RecycleGPT config, random weights (speed only)")
    parser.add_argument("-o", "--override", action="append", default=[], help="with --random-config")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch size")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    module, tokenizer, cfg, described = load_model(args)
    if not hasattr(module, "recyclable_model"):
        raise SystemExit(f"{described} is a {cfg.model_module} model; this benchmark needs a RecycleGPT one")
    prompts = corpus_prompts(tokenizer, args.prompts, args.prompt_len)
    ids_tokenizer = IdTokenizer(cfg.Model.vocab_size)
    generators = {s: make_generator(module, ids_tokenizer, s, cache_factory=PreallocatedKVCache) for s in STRATEGIES}
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, stop_token_ids=[])

    def run(strategy, chunk):
        """(seconds, token lists, drafts, accepted) of one generate call on a batch of prompts."""
        generator = generators[strategy]
        time.sleep(IDLE_GAP_S)
        start = time.perf_counter()
        texts = generator.generate(chunk, sampling)
        seconds = time.perf_counter() - start
        stats = getattr(generator, "stats", {})
        outputs = [[int(t) for t in text.split()] for text in texts]
        return seconds, outputs, stats.get("drafts", 0), stats.get("accepted", 0)

    rows, outputs = [], {}
    for batch in args.batch_sizes:
        for strategy in STRATEGIES:  # warm-up
            generators[strategy].generate(prompts[:batch], SamplingConfig(max_new_tokens=4, stop_token_ids=[]))
        seconds = {s: 0.0 for s in STRATEGIES}
        tokens = {s: [] for s in STRATEGIES}
        drafts = {s: [0, 0] for s in STRATEGIES}  # checked, accepted
        # Each batch of prompts runs every engine in turn, in several rounds; its best round counts.
        for first in range(0, len(prompts), batch):
            best, last = {s: float("inf") for s in STRATEGIES}, {}
            for _ in range(args.rounds):
                for strategy in STRATEGIES:
                    elapsed, *last[strategy] = run(strategy, prompts[first:first + batch])
                    best[strategy] = min(best[strategy], elapsed)
            for strategy in STRATEGIES:  # outputs and counts are the same every round (greedy)
                out, checked, accepted = last[strategy]
                seconds[strategy] += best[strategy]
                tokens[strategy] += out
                drafts[strategy] = [drafts[strategy][0] + checked, drafts[strategy][1] + accepted]
        total = len(prompts) * args.new_tokens
        for strategy in STRATEGIES:
            checked, accepted = drafts[strategy]
            outputs[batch, strategy] = tokens[strategy]
            rows.append({
                "batch": batch, "strategy": strategy, "tokens_per_s": round(total / seconds[strategy], 1),
                "speedup": round(seconds["base"] / seconds[strategy], 2),
                "identical_prompts": sum(a == b for a, b in zip(tokens[strategy], tokens["base"])),
                "acceptance": round(accepted / checked, 3) if checked else None,
            })

    lm = module.language_model()
    quality = {}
    for strategy in STRATEGIES:
        nll, agree = [], []
        for prompt, generated in zip(prompts, outputs[args.batch_sizes[0], strategy]):
            token_nll, greedy = base_scores(lm, prompt, generated)
            nll.extend(token_nll)
            agree.extend(greedy == np.array(generated))
        quality[strategy] = {"ppl_under_base": round(math.exp(float(np.mean(nll))), 2),
                             "agreement_with_base_greedy": round(float(np.mean(agree)), 3)}
    forward = {batch: forward_ms(module, batch, 2 * args.prompt_len, 10 * args.rounds) for batch in args.batch_sizes}

    threads = default_threads()
    print(f"\nRecycleGPT decoding, {described}; {len(prompts)} corpus prompts of {args.prompt_len} tokens + "
          f"{args.new_tokens} new tokens, greedy, {threads} threads, best of {args.rounds} rounds "
          f"(Paddle {paddle.__version__})\n")
    print("| batch | strategy | tokens/s | vs base | identical to base | acceptance |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        acceptance = f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "-"
        print(f"| {r['batch']} | {r['strategy']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['identical_prompts']}/{len(prompts)} | {acceptance} |")
    print(f"\nQuality of the batch-{args.batch_sizes[0]} generations\n")
    print("| strategy | ppl under base | agreement with base greedy |")
    print("|---|---:|---:|")
    for strategy, q in quality.items():
        print(f"| {strategy} | {q['ppl_under_base']:.2f} | {q['agreement_with_base_greedy']:.3f} |")
    print(f"\nOne forward against a {2 * args.prompt_len}-position cache, ms\n")
    names = list(next(iter(forward.values())))
    print("| batch | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for batch, ms in forward.items():
        print(f"| {batch} | " + " | ".join(f"{ms[n]:.2f}" for n in names) + " |")
    print(json.dumps({"source": described, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "prompts": len(prompts), "rounds": args.rounds, "threads": threads, "results": rows,
                      "quality": quality, "forward_ms": {str(b): v for b, v in forward.items()}}))


if __name__ == "__main__":
    main()
