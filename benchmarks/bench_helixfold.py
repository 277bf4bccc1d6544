"""Training step time and peak memory of tiny HelixFold (configs/helixfold/tiny.yaml) under HelixFold's
optimizations, side by side with the plain run: tensor fusion (Optimizer.tensor_fusion), recompute of every
Evoformer block (Engine.recompute), chunked attention and subbatched MLPs / outer product mean
(Model.chunk_size), and all three together.

Each setting trains in a fresh process (so its peak memory is its own) on the same data, seed and drawn
recycle counts; settings run in alternating rounds and each keeps its best round, so all see about the same
machine state. Step time is the median of the timed steps after warmup. Memory is the growth of the
process's peak resident set (VmHWM) from the built engine to the end of the timed steps: activations,
gradients and optimizer state, without Paddle's own footprint. The fused gated attention and bf16 have no
CPU kernels and are not measured here (see the README). Prints a markdown table of ratios against the
plain run and, last, one JSON line.

    python benchmarks/bench_helixfold.py [--steps 8] [--warmup 3] [--rounds 2] [-o Data.Train.crop_size=64]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "helixfold" / "tiny.yaml"
SETTINGS = {
    "plain": [],
    "tensor fusion": ["Optimizer.tensor_fusion=true"],
    "recompute": ["Engine.recompute=true", "Model.recompute_start_block=0"],
    "chunked (8 rows)": ["Model.chunk_size=8"],
    "all three": ["Optimizer.tensor_fusion=true", "Engine.recompute=true", "Model.chunk_size=8"],
}


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(overrides, steps, warmup):
    """Train warmup + steps steps in this process; print one JSON line of measurements."""
    import ppzoo  # noqa: F401  (first: CPU threading defaults)
    import numpy as np
    from ppzoo import Engine, load_config

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(CONFIG, [f"Engine.output_dir={out}", "Engine.progress_bar=false", *overrides])
        engine = Engine(cfg)
        sampler = engine._sampler()
        optimizer = getattr(engine.optimizer, "inner", engine.optimizer)
        base = peak_rss_mb()
        times, losses = [], []
        for step in range(warmup + steps):
            start = time.perf_counter()
            logged = engine.train_step(step, sampler)
            times.append(time.perf_counter() - start)
            losses.append(logged["loss"])
        print(json.dumps({
            "step_s": float(np.median(times[warmup:])), "peak_growth_mb": peak_rss_mb() - base,
            "peak_rss_mb": peak_rss_mb(), "optimizer_tensors": len(optimizer._parameter_list),
            "model_tensors": len(engine.module.parameters()), "losses": losses,
        }))


def run_setting(overrides, args):
    command = [sys.executable, __file__, "--child", json.dumps(overrides), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"setting {overrides} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("-o", "--override", action="append", default=[], help="config override for every setting")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(json.loads(args.child), args.steps, args.warmup)

    runs = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, overrides in SETTINGS.items():
            runs[name].append(run_setting(args.override + overrides, args))
    best = {}
    for name, results in runs.items():
        best[name] = {**min(results, key=lambda r: r["step_s"]),
                      "peak_growth_mb": min(r["peak_growth_mb"] for r in results)}
    plain = best["plain"]
    print(f"tiny HelixFold ({CONFIG.relative_to(REPO)}{' ' + ' '.join(args.override) if args.override else ''}), "
          f"{args.steps} timed steps after {args.warmup} warmup, best of {args.rounds} rounds\n")
    print("| setting | step ms | step time vs plain | peak memory growth MB | memory vs plain | optimizer tensors | "
          "same losses as plain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in best.items():
        same = all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(r["losses"], plain["losses"]))
        print(f"| {name} | {r['step_s'] * 1000:.0f} | {r['step_s'] / plain['step_s']:.2f}x | "
              f"{r['peak_growth_mb']:.0f} | {r['peak_growth_mb'] / max(plain['peak_growth_mb'], 1e-9):.2f}x | "
              f"{r['optimizer_tensors']} of {r['model_tensors']} | {'yes' if same else 'no'} |")
    print(json.dumps({name: {"step_ms": round(r["step_s"] * 1000, 1),
                             "step_ratio": round(r["step_s"] / plain["step_s"], 3),
                             "peak_growth_mb": round(r["peak_growth_mb"], 1),
                             "memory_ratio": round(r["peak_growth_mb"] / max(plain["peak_growth_mb"], 1e-9), 3)}
                      for name, r in best.items()}))


if __name__ == "__main__":
    main()
