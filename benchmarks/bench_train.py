"""Training throughput of tiny ChuXin (ppzoo Engine) against Hugging Face LlamaForCausalLM on PyTorch CPU.

Both train the same shapes (configs/chuxin/tiny.yaml: 4 layers, hidden 256, 4 heads, FFN 688, vocab 4096,
batch 8 x 256 tokens) on the same built-in-corpus batches with AdamW and global-norm clipping, in this one
process, in alternating rounds so that both see the same machine state. Prints a table with the ratio.

    python benchmarks/bench_train.py [--steps 10] [--rounds 3] [-o Model.hidden_size=512 ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppzoo  # noqa: E402  (first: CPU threading defaults)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ppzoo.data.corpus import builtin_texts  # noqa: E402
from ppzoo.data.sampler import collate  # noqa: E402
from ppzoo.data.tokenizer import train_byte_level_bpe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_engine(args, tmp):
    tokenizer_path = REPO / "output/tokenizer/tokenizer.json"
    if not tokenizer_path.exists():
        tokenizer_path = Path(tmp) / "tokenizer.json"
        train_byte_level_bpe(builtin_texts("train", max_chars=2_000_000), vocab_size=4096).save(str(tokenizer_path))
    overrides = [
        f"Data.tokenizer={tokenizer_path}", f"Engine.output_dir={tmp}/run", "Engine.progress_bar=false",
        "Data.Train.max_chars=3000000", *args.override,
    ]
    cfg = ppzoo.load_config(REPO / "configs/chuxin/tiny.yaml", overrides)
    cfg.Data.Eval = None
    return ppzoo.Engine(cfg), cfg


def build_torch_model(cfg, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    m = cfg.Model
    hf_cfg = LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
        max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_cfg)
    o = cfg.Optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr.max_lr, betas=(o.beta1, o.beta2), eps=o.epsilon,
                            weight_decay=o.weight_decay)
    return model, opt


def torch_step(model, opt, batch, grad_clip):
    import torch

    # Same loss as ppzoo: labels already shifted by the dataset; HF shifts internally, so feed logits directly.
    logits = model(input_ids=torch.from_numpy(batch["input_ids"])).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(batch["labels"]).reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round and framework")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))

    with tempfile.TemporaryDirectory() as tmp:
        engine, cfg = build_engine(args, tmp)
        sampler = engine._sampler()
        batches = [collate([engine.train_dataset[i] for i in sampler.indices_for_step(s)[0]])
                   for s in range(args.steps)]
        tokens_per_step = cfg.Global.global_batch_size * cfg.Data.seq_len
        model, opt = build_torch_model(cfg, threads)

        # Warm-up (allocators, kernel selection) before anything is timed.
        engine.train_step(0, sampler)
        torch_step(model, opt, batches[0], cfg.Optimizer.grad_clip)

        times = {"ppzoo (Paddle)": [], "HF transformers (PyTorch)": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            for s in range(args.steps):
                engine.train_step(s, sampler)
            times["ppzoo (Paddle)"].append((time.perf_counter() - start) / args.steps)
            start = time.perf_counter()
            for s in range(args.steps):
                torch_step(model, opt, batches[s], cfg.Optimizer.grad_clip)
            times["HF transformers (PyTorch)"].append((time.perf_counter() - start) / args.steps)

    m = cfg.Model
    print(f"tiny ChuXin training: {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}, FFN "
          f"{m.intermediate_size}, vocab {m.vocab_size}, batch {cfg.Global.global_batch_size} x {cfg.Data.seq_len} "
          f"tokens, {threads} threads, best of {args.rounds} rounds x {args.steps} steps")
    reference = tokens_per_step / min(times["HF transformers (PyTorch)"])
    print("| implementation | ms/step | tokens/s | ratio vs HF |")
    print("| --- | --- | --- | --- |")
    result = {}
    for name, values in times.items():
        best = min(values)
        tps = tokens_per_step / best
        result[name] = {"ms_per_step": round(best * 1000, 1), "tokens_per_sec": round(tps), "ratio": round(tps / reference, 3)}
        print(f"| {name} | {best * 1000:.0f} | {tps:.0f} | {tps / reference:.2f}x |")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
