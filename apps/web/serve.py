"""Run the web service.

    python apps/web/serve.py -c serve.yaml [--host 127.0.0.1] [--port 8000]
    python apps/web/serve.py --demo       (make serve: the tiny demo models, trained first where missing)

The serve config (YAML/JSON) lists the models (checkpoint or export paths) and the limits; see
apps/web/config.py. --demo serves the tiny models of `make demo` and of the model families' tiny configs,
training each (with few steps, a few minutes in all on a CPU) only when its output directory is missing.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import ppzoo  # noqa: E402,F401  (first: sets CPU threading defaults before Paddle loads)
from ppzoo.errors import PpzooError  # noqa: E402

from apps.web.config import Limits, ModelSpec, ServeConfig, load_serve_config  # noqa: E402

TOKENIZER = "output/tokenizer/tokenizer.json"
# name, the run directory it serves, and the trainings that make it, in order: (config, max_steps, the run
# directory that config writes). Steps are cut from the configs' so that a fresh clone gets every demo in
# minutes; they make working, not good, models. A training whose run directory has a checkpoint is skipped.
DEMOS = [
    ("chuxin", "output/chuxin_tiny", [("configs/chuxin/tiny.yaml", None, "output/chuxin_tiny")]),
    ("recycle_gpt", "output/recycle_gpt_tiny_from_chuxin",
     [("configs/recycle_gpt/tiny_from_chuxin.yaml", 60, "output/recycle_gpt_tiny_from_chuxin")]),
    ("cct", "output/cct_tiny", [("configs/cct/tiny.yaml", 40, "output/cct_tiny")]),
    ("ernie_vilg", "output/ernie_vilg_tiny", [("configs/ernie_vilg/tiny_vqvae.yaml", 100, "output/ernie_vilg_vqvae"),
                                              ("configs/ernie_vilg/tiny.yaml", 80, "output/ernie_vilg_tiny")]),
    ("helixfold", "output/helixfold_tiny", [("configs/helixfold/tiny.yaml", 10, "output/helixfold_tiny")]),
]
NEEDS_SHARED_DATA = {"helixfold": "../shared/data/proteins"}  # its training set is real PDB structures


def has_checkpoint(run_dir):
    return (REPO / run_dir).is_dir() and any((REPO / run_dir).glob("step_*"))


def train(config, max_steps):
    command = [sys.executable, "tools/train.py", "-c", config, "--resume", "auto"]
    if max_steps is not None:
        command += ["-o", f"Engine.max_steps={max_steps}", "-o", "Engine.eval_freq=0"]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO).returncode == 0


def prepare_demo():
    """The demo models' specs, training those that are missing; a demo that cannot be made is reported and
    left out (the page shows its panel as unavailable)."""
    if not (REPO / TOKENIZER).is_file():
        subprocess.run([sys.executable, "tools/train_tokenizer.py", "--out", TOKENIZER], cwd=REPO, check=True)
    specs = []
    for name, run_dir, trainings in DEMOS:
        if not has_checkpoint(run_dir):
            shared = NEEDS_SHARED_DATA.get(name)
            if shared and not (REPO / shared).is_dir():
                print(f"[serve] demo {name}: left out, its training data {shared} is absent", flush=True)
                continue
            start = time.time()
            for config, steps, writes in trainings:
                if not has_checkpoint(writes) and not train(config, steps):
                    break
            print(f"[serve] demo {name}: trained in {time.time() - start:.0f} s", flush=True)
        if has_checkpoint(run_dir):
            specs.append(ModelSpec(name=name, checkpoint=run_dir))
        else:
            print(f"[serve] demo {name}: left out, training it failed (see above)", flush=True)
    return ServeConfig(models=specs, limits=Limits())


def load_all(config):
    from apps.web.models import load_model

    models = []
    for spec in config.models:
        start = time.time()
        models.append(load_model(spec))
        print(f"[serve] loaded {spec.name} ({models[-1].kind}) from {spec.path} in {time.time() - start:.1f} s",
              flush=True)
    return models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", help="serve config (YAML or JSON) with models and limits")
    source.add_argument("--demo", action="store_true", help="the tiny demo models, trained first where missing")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-batching", action="store_true", help="decode every generation request alone")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the configs' and demos' relative paths (output/..., ../shared/data) are from the repo root
    try:
        config = prepare_demo() if args.demo else load_serve_config(args.config)
        if args.no_batching:
            config.limits.batching = False
        models = load_all(config)
    except PpzooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from apps.web.app import create_app

    print(f"[serve] http://{args.host}:{args.port}/  (API schema at /docs and /openapi.json)", flush=True)
    uvicorn.run(create_app(models, config.limits), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
