"""TA-MoE against GShard routing on a simulated 2 nodes x 2 ranks topology (intra-node links 8x faster).

Trains tiny MoE-GPT with tools/train.py on 4 processes (paddle.distributed.launch, gloo, expert parallelism
over all 4: 2 of the 8 experts per rank): configs/moe_gpt/gshard_2x2.yaml (GShard's load-balance loss),
configs/moe_gpt/ta_moe_2x2.yaml (the topology-aware loss, each rank's own gate) and, as an ablation, the latter
with one gate shared by all ranks (Model.rank_local_gate=false), with the same seed, data and steps. The
processes share one machine, so the topology is simulated: every step's traffic is classified by the link
it would take on configs/moe_gpt/topology_2x2.yaml and its all-to-all time modelled there (max over links
of bytes / bandwidth). Prints, per run and as TA-MoE / GShard ratios: the final validation loss, inter-node
bytes per step, modelled all-to-all time per step (both averaged over the second half of training, once
routing has settled), and measured tokens/s (on CPU gloo, where the exchange is an all_gather stand-in: it
says nothing about network time, the modelled time does).

    python benchmarks/bench_ta_moe.py [--steps 200] [-o Model.aux_loss_coef=0.01 ...]

paddle.distributed.launch with 4 gloo processes sometimes fails to connect its groups while the machine is
loaded (gloo "Connection refused" / TIMEOUT during fleet.init, before any training); such a start is retried.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (name, config, extra overrides). The third run is an ablation: the TA-MoE loss with one gate shared by all
# ranks (averaged like any dense weight) instead of each rank's own.
RUNS = [("GShard", "configs/moe_gpt/gshard_2x2.yaml", []), ("TA-MoE", "configs/moe_gpt/ta_moe_2x2.yaml", []),
        ("TA-MoE shared gate", "configs/moe_gpt/ta_moe_2x2.yaml", ["Model.rank_local_gate=false"])]


def tokenizer_path(tmp):
    path = REPO / "output/tokenizer/tokenizer.json"
    if path.exists():
        return path
    sys.path.insert(0, str(REPO))
    from ppzoo.data.corpus import builtin_texts
    from ppzoo.data.tokenizer import train_byte_level_bpe

    path = Path(tmp) / "tokenizer.json"
    train_byte_level_bpe(builtin_texts("train", max_chars=2_000_000), vocab_size=4096).save(str(path))
    return path


def launch(config, extra, out, log_dir, args, tokenizer, retries):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "4", "--max_restart", "0",
               "--log_dir", str(log_dir), str(REPO / "tools/train.py"), "-c", str(REPO / config),
               "-o", f"Engine.output_dir={out}", "-o", f"Engine.max_steps={args.steps}",
               "-o", f"Optimizer.lr.decay_steps={args.steps}", "-o", f"Engine.eval_freq={args.steps}",
               "-o", "Engine.logging_freq=1", "-o", "Engine.save_steps=0", "-o", "Engine.progress_bar=false",
               "-o", f"Engine.eval_iters={args.eval_iters}", "-o", f"Data.tokenizer={tokenizer}"]
    for override in [*extra, *args.override]:
        command += ["-o", override]
    for attempt in range(retries + 1):
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        metrics = Path(out) / "metrics.jsonl"
        if result.returncode == 0:
            return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        logs = "".join(p.read_text(errors="replace") for p in Path(log_dir).glob("workerlog.*"))
        started = metrics.exists()
        if started or "gloo/transport" not in logs or attempt == retries:
            sys.stderr.write(result.stdout[-3000:] + logs[-6000:])
            raise SystemExit(f"{config} failed (exit {result.returncode})")
        print(f"  {config}: gloo could not connect the 4 processes at start-up; retrying", flush=True)
        subprocess.run(["rm", "-rf", str(out), str(log_dir)])


def summarize(records):
    settled = records[len(records) // 2:]

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    return {
        "eval_loss": records[-1]["eval_loss"],
        "inter_node_MB": mean("moe_bytes_inter_node", settled) / 1e6,
        "intra_node_MB": mean("moe_bytes_intra_node", settled) / 1e6,
        "alltoall_ms": mean("moe_alltoall_ms", settled),
        "inter_node_share": mean("moe_tokens_inter_node", settled) / mean("moe_tokens_total", settled),
        "tokens_per_sec": mean("tokens_per_sec", records[1:]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-iters", type=int, default=16)
    parser.add_argument("--retries", type=int, default=10)
    parser.add_argument("-o", "--override", action="append", default=[], help="Section.key=value for both runs")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tokenizer_path(tmp)
        for index, (name, config, extra) in enumerate(RUNS):
            print(f"training {name} ({config} {' '.join(extra)}), {args.steps} steps on 4 processes ...", flush=True)
            records = launch(config, extra, Path(tmp) / f"run{index}", Path(tmp) / f"run{index}.log", args, tokenizer,
                             args.retries)
            for r in records:
                r["moe_tokens_total"] = r["moe_tokens_local"] + r["moe_tokens_intra_node"] + r["moe_tokens_inter_node"]
            results[name] = summarize(records)
    base, ta, shared = results["GShard"], results["TA-MoE"], results["TA-MoE shared gate"]
    rows = [
        ("validation loss", "eval_loss", "{:.4f}"),
        ("inter-node MB / step", "inter_node_MB", "{:.3f}"),
        ("intra-node MB / step", "intra_node_MB", "{:.3f}"),
        ("inter-node share of rows", "inter_node_share", "{:.3f}"),
        ("modelled all-to-all ms / step", "alltoall_ms", "{:.4f}"),
        ("tokens/s (CPU gloo, measured)", "tokens_per_sec", "{:.0f}"),
    ]
    print(f"\nTA-MoE vs GShard, tiny MoE-GPT, 2 nodes x 2 ranks (intra 8x inter), {args.steps} steps, ep 4")
    print("| metric | GShard | TA-MoE | TA-MoE / GShard | TA-MoE shared gate | shared / GShard |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, key, fmt in rows:
        print(f"| {label} | {fmt.format(base[key])} | {fmt.format(ta[key])} | {ta[key] / base[key]:.3f} | "
              f"{fmt.format(shared[key])} | {shared[key] / base[key]:.3f} |")
    inter_cut = 1 - ta["inter_node_MB"] / base["inter_node_MB"]
    loss_change = ta["eval_loss"] / base["eval_loss"] - 1
    print(f"inter-node bytes {inter_cut:.1%} lower (target >= 30%), validation loss {loss_change:+.2%} "
          f"(target within 1%)")
    print(json.dumps({"gshard": base, "ta_moe": ta, "ta_moe_shared_gate": shared, "inter_node_reduction": inter_cut,
                      "eval_loss_change": loss_change}))


if __name__ == "__main__":
    main()
