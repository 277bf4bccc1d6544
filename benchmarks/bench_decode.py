"""Greedy decode speed of tiny ChuXin: ppzoo eager (Generator), ppzoo exported (Paddle Inference) and Hugging
Face LlamaForCausalLM.generate() on PyTorch CPU, all with the same random weights.

Shapes of configs/chuxin/tiny.yaml (4 layers, hidden 256, 4 heads, FFN 688, vocab 4096); each prompt is
`--prompt-len` random token ids and exactly `--new-tokens` tokens are generated (no stop tokens). Tokens/s
counts generated tokens over the whole generate call, prefill included; "decode ms/step" is
(time for N tokens - time for 1 token) / (N - 1), the cost of one decode step alone. Engines run in
alternating rounds (best round kept) so all see the same machine state. At batch 1 the three engines'
greedy tokens are compared (they can differ where two logits are nearly tied: the kernels differ in the
last float bits). Prints a markdown table and, last, one JSON line.

Run it on an otherwise idle machine, or with OMP_NUM_THREADS below the core count: when the threads fill
every core, another busy process stalls PyTorch's OpenMP barriers (measured here: the same batch-1 HF
generate took 0.5 s alone and 12.9 s beside a one-core training job), and Paddle's less so.

    python benchmarks/bench_decode.py [--batch-sizes 1 8] [--rounds 3] [--onednn] [-o Model.hidden_size=512]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppzoo  # noqa: E402  (first: CPU threading defaults)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from ppzoo.data.corpus import builtin_texts  # noqa: E402
from ppzoo.data.tokenizer import train_byte_level_bpe  # noqa: E402
from ppzoo.inference import Generator, PreallocatedKVCache, SamplingConfig  # noqa: E402
from ppzoo.inference.export import export_language_model  # noqa: E402
from ppzoo.inference.predictor import ExportedKVCache, ExportedLanguageModel, Predictor, default_threads  # noqa: E402
from ppzoo.registry import MODULES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HF = "HF transformers"


class IdTokenizer:
    """Prompts are space-separated token ids, so every engine sees exactly the same ids; no special tokens."""

    bos_id = eos_id = None
    pad_id = 0

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode(self, text, add_bos=False):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {int(i)}" for i in ids)


def ppzoo_engine(model, vocab_size, cache_factory):
    generator = Generator(model, IdTokenizer(vocab_size), cache_factory=cache_factory)

    def generate(prompts, new_tokens):
        texts = generator.generate([" ".join(map(str, p)) for p in prompts],
                                   SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=[]))
        return [[int(t) for t in text.split()] for text in texts]

    return generate


def hf_engine(lm, model_config, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ppzoo.models.chuxin.convert import hf_config_from_chuxin, ppzoo_to_hf_state

    torch.set_num_threads(threads)
    config = LlamaConfig(**hf_config_from_chuxin(model_config), attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    state = ppzoo_to_hf_state({name: value.numpy() for name, value in lm.state_dict().items()})
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
    # No stop token: every call generates exactly the requested number of tokens, as the ppzoo engines do.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def generate(prompts, new_tokens):
        ids = torch.tensor(np.array(prompts), dtype=torch.long)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[:, ids.shape[1]:].tolist()

    return generate


# Intel OpenMP (Paddle's MKL) keeps its worker threads spinning for KMP_BLOCKTIME (200 ms) after parallel
# work; on a machine whose cores the threads fill, they take a core from whichever engine runs next
# (measured, 2 threads: HF's batch-8 decode step took 7.1-8.9 ms right after a Paddle engine, 5.4-5.5 ms with
# this pause). So every timed call starts after a pause longer than that.
IDLE_GAP_S = 0.3


def timed(generate, prompts, new_tokens):
    time.sleep(IDLE_GAP_S)
    start = time.perf_counter()
    tokens = generate(prompts, new_tokens)
    return time.perf_counter() - start, tokens


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--onednn", action="store_true", help="also time the exported model with oneDNN kernels")
    parser.add_argument("-o", "--override", action="append", default=[], help="config override (Section.key=value)")
    args = parser.parse_args()

    threads = default_threads()
    cfg = ppzoo.load_config(REPO / "configs/chuxin/tiny.yaml", args.override)
    paddle.seed(0)
    module = MODULES.get(cfg.model_module)(cfg.Model, None)
    module.eval()
    lm = module.language_model()
    vocab = cfg.Model.vocab_size

    # Eager decoding with the preallocated cache: new keys/values written in place, no copy of the cache a
    # step (DenseKVCache concatenates; see ppzoo/inference/cache.py).
    engines = {"ppzoo eager": ppzoo_engine(lm, vocab, PreallocatedKVCache)}
    with tempfile.TemporaryDirectory() as tmp:
        # The exported directory needs a tokenizer file; the benchmark itself feeds token ids.
        tokenizer = train_byte_level_bpe(builtin_texts("train", 20_000), 300)
        export_language_model(module, cfg, tokenizer, Path(tmp) / "exported")
        engines["ppzoo exported"] = ppzoo_engine(
            ExportedLanguageModel(Predictor(Path(tmp) / "exported", threads=threads)), vocab, ExportedKVCache)
        if args.onednn:
            engines["ppzoo exported (oneDNN)"] = ppzoo_engine(
                ExportedLanguageModel(Predictor(Path(tmp) / "exported", threads=threads, onednn=True)), vocab,
                ExportedKVCache)
    engines[HF] = hf_engine(lm, cfg.Model, threads)

    rng = np.random.default_rng(0)
    results, greedy = [], {}
    for batch in args.batch_sizes:
        prompts = rng.integers(0, vocab, size=(batch, args.prompt_len)).tolist()
        for generate in engines.values():  # warm-up: first-call allocations, kernel selection
            generate(prompts, 2)
        best = {name: float("inf") for name in engines}
        best_one = {name: float("inf") for name in engines}
        tokens = {}
        for _ in range(args.rounds):
            for name, generate in engines.items():
                seconds, tokens[name] = timed(generate, prompts, args.new_tokens)
                best[name] = min(best[name], seconds)
                best_one[name] = min(best_one[name], timed(generate, prompts, 1)[0])
        if batch == 1:
            reference = tokens[HF][0]
            greedy = {
                name: {"identical_to_hf": t[0] == reference, "first_difference": first_difference(t[0], reference)}
                for name, t in tokens.items() if name != HF
            }
        hf_rate = batch * args.new_tokens / best[HF]
        for name in engines:
            rate = batch * args.new_tokens / best[name]
            step_ms = 1000 * (best[name] - best_one[name]) / max(1, args.new_tokens - 1)
            results.append({"batch": batch, "engine": name, "tokens_per_s": round(rate, 1),
                            "decode_ms_per_step": round(step_ms, 2), "prefill_s": round(best_one[name], 4),
                            "ratio_vs_hf": round(rate / hf_rate, 2)})

    print(f"\nGreedy decode, prompt {args.prompt_len} + {args.new_tokens} new tokens, {threads} threads, "
          f"best of {args.rounds} rounds (Paddle {paddle.__version__})\n")
    print("| batch | engine | tokens/s | decode ms/step | prefill s | vs HF |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['batch']} | {r['engine']} | {r['tokens_per_s']:.1f} | {r['decode_ms_per_step']:.2f} | "
              f"{r['prefill_s']:.3f} | {r['ratio_vs_hf']:.2f}x |")
    if greedy:
        print()
        for name, check in greedy.items():
            verdict = "identical" if check["identical_to_hf"] else f"differ from token {check['first_difference']}"
            print(f"batch 1 greedy tokens, {name} vs {HF}: {verdict}")
    print(json.dumps({"threads": threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "rounds": args.rounds, "paddle": paddle.__version__, "results": results,
                      "greedy_batch1": greedy}))


if __name__ == "__main__":
    main()
