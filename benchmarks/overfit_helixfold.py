"""Does the whole HelixFold model learn? Train configs/helixfold/tiny_overfit.yaml (crambin, 46 residues,
single sequence) through tools/train.py and print its evaluated lDDT-Ca along the run, against the 0.8 that
issue "HelixFold" asks for. A few minutes on an idle 2-core machine (1,200 steps); too long for the test suite,
whose tests/test_helixfold_model.py checks that the tiny config's loss falls.

    python benchmarks/overfit_helixfold.py [--out output/helixfold_overfit] [-o Engine.max_steps=600]

Prints a markdown table of step -> lDDT-Ca and, last, one JSON line; exits 1 when the final lDDT-Ca is
below the target.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "helixfold" / "tiny_overfit.yaml"
TARGET = 0.8


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="output/helixfold_overfit", help="the run's output directory")
    parser.add_argument("-o", "--override", action="append", default=[], help="config override")
    args = parser.parse_args()
    command = [sys.executable, str(REPO / "tools" / "train.py"), "-c", str(CONFIG),
               "-o", f"Engine.output_dir={args.out}", "-o", "Engine.progress_bar=false"]
    for override in args.override:
        command += ["-o", override]
    subprocess.run(command, check=True, cwd=REPO)
    with open(Path(REPO, args.out, "metrics.jsonl"), encoding="utf-8") as f:
        evaluated = [r for r in map(json.loads, f) if "eval_lddt_ca" in r]
    print("| step | " + " | ".join(str(r["step"]) for r in evaluated) + " |")
    print("| --- | " + " | ".join("---" for _ in evaluated) + " |")
    print("| eval lDDT-Ca | " + " | ".join(f"{r['eval_lddt_ca']:.3f}" for r in evaluated) + " |")
    final = evaluated[-1]["eval_lddt_ca"]
    print(json.dumps({"final_lddt_ca": final, "target": TARGET, "reached": final >= TARGET}))
    return 0 if final >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
