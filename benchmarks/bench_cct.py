"""CCT against plain instruction tuning, trained side by side through the engine and evaluated the same way.

    python benchmarks/bench_cct.py [--steps 200] [--cases 120] [--humanevalfix-limit 164] [--ablation] [--reuse]

Runs (tools/train.py, one after the other, same model size, seed, rows and steps):
  baseline   configs/cct/tiny_baseline.yaml   plain instruction tuning (ChuXin, no comparison data)
  cct_seq    (--ablation) configs/cct/tiny.yaml with Model.token_loss_weight=0: + the "Fix bugs" samples only
  cct        configs/cct/tiny.yaml: + the token-level hinge loss as well (full CCT)
then tools/eval.py --task injected_bugs (held-out functions, injected bugs) and --task humanevalfix (greedy
pass@1) on each, and prints one table with each run's metrics and their ratio to the baseline. --reuse keeps
a run's checkpoint from an earlier invocation (same --steps) instead of training again.
Needs the tokenizer (trained here with tools/train_tokenizer.py if missing) and ../shared/data/humanevalfix.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "output" / "tokenizer" / "tokenizer.json"
OUT = ROOT / "output" / "bench_cct"
RUNS = (
    ("baseline", "configs/cct/tiny_baseline.yaml", []),
    ("cct_seq", "configs/cct/tiny.yaml", ["-o", "Model.token_loss_weight=0"]),
    ("cct", "configs/cct/tiny.yaml", []),
)


def tool(name, args):
    """Run tools/<name>.py; returns (its last-line JSON result, seconds)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *args], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"tools/{name}.py {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(done.stdout.strip().splitlines()[-2] if len(done.stdout.strip().splitlines()) > 1 else "", flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cases", type=int, default=120, help="held-out injected-bug cases")
    parser.add_argument("--ablation", action="store_true", help="also train cct_seq (no token-level loss)")
    parser.add_argument("--reuse", action="store_true", help="reuse checkpoints of an earlier invocation")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    parser.add_argument("--humanevalfix-limit", type=int, default=164, help="HumanEvalFix problems (first N)")
    parser.add_argument("--fix-max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if not TOKENIZER.is_file():
        tool("train_tokenizer", ["--out", str(TOKENIZER)])
    rows = {}
    for name, config, overrides in RUNS:
        if name == "cct_seq" and not args.ablation:
            continue
        out = OUT / name
        common = ["-c", config, *overrides, "-o", f"Engine.output_dir={out}", "-o", f"Engine.max_steps={args.steps}",
                  "-o", "Engine.progress_bar=false"]
        summary = out / "bench_train.json"
        if args.reuse and summary.is_file():
            trained, train_seconds = json.loads(summary.read_text())
        else:
            shutil.rmtree(out, ignore_errors=True)  # this benchmark's own previous run
            print(f"== {name}: training {args.steps} steps", flush=True)
            trained, train_seconds = tool("train", common)
            summary.write_text(json.dumps([trained, train_seconds]))
        ckpt = trained["checkpoint"]
        print(f"== {name}: evaluating", flush=True)
        batch = ["--batch-size", str(args.batch_size)]
        bugs, _ = tool("eval", common + ["--ckpt", ckpt, "--task", "injected_bugs", "--cases", str(args.cases), *batch])
        fix, _ = tool("eval", common + ["--ckpt", ckpt, "--task", "humanevalfix", "--limit", str(args.humanevalfix_limit),
                                        "--fix-max-new-tokens", str(args.fix_max_new_tokens), *batch])
        rows[name] = {"train_s": train_seconds, "eval_loss": trained.get("eval_loss"), **bugs["overall"],
                      "humanevalfix_pass@1": fix["pass_at_k"]["all"]["pass@1"],
                      "per_bug_type": bugs["per_bug_type"]}
    metrics = ["train_s", "eval_loss", "lm_ranking", "fix_ranking", "score_ranking", "exact_fix", "humanevalfix_pass@1"]
    base = rows["baseline"]
    print(f"\nCCT vs plain instruction tuning: {args.steps} steps, {args.cases} held-out injected-bug cases, "
          f"HumanEvalFix first {args.humanevalfix_limit} problems (greedy, {args.fix_max_new_tokens} new tokens)")
    print("| metric | " + " | ".join(rows) + " | cct / baseline |")
    print("| --- |" + " --- |" * (len(rows) + 1))
    for metric in metrics:
        cells = [f"{rows[r][metric]:.3f}" if rows[r].get(metric) is not None else "-" for r in rows]
        ratio = (f"{rows['cct'][metric] / base[metric]:.2f}" if base.get(metric) not in (None, 0)
                 and rows["cct"].get(metric) is not None else "-")
        print(f"| {metric} | " + " | ".join(cells) + f" | {ratio} |")
    print("\nfix_ranking per bug type (held-out):")
    print("| bug type | " + " | ".join(rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for bug_type in base["per_bug_type"]:
        cells = [f"{rows[r]['per_bug_type'][bug_type]['fix_ranking']:.3f}" for r in rows]
        print(f"| {bug_type} ({base['per_bug_type'][bug_type]['cases']}) | " + " | ".join(cells) + " |")
    print(json.dumps({name: {k: v for k, v in row.items() if k != "per_bug_type"} for name, row in rows.items()}))


if __name__ == "__main__":
    main()
