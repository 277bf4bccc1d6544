"""Export a trained checkpoint as a Paddle inference model (for tools/infer.py --model or paddle.inference).

    python tools/export.py --ckpt output/chuxin_tiny/step_00000300 --out exported/chuxin_tiny
    python tools/export.py -c configs/chuxin/tiny.yaml --ckpt output/chuxin_tiny --out exported/chuxin_tiny
    python tools/export.py --ckpt output/helixfold_tiny --out exported/helixfold_tiny --recycles 1
        (HelixFold: see ppzoo/inference/folding_export.py for what is traced and what stays eager)
    RecycleGPT, MoE-GPT, ERNIE Titan, ERNIE-ViLG: see ppzoo/inference/export_families.py

The model's config comes from the checkpoint. `-c` (with `-o` overrides) is optional; when given, its
Model section must equal the checkpoint's, so a script that names the wrong config fails loudly.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout
# Paddle logs INFO lines while it serializes a traced program; keep warnings and errors only. Read by
# Paddle when it loads, so set before ppzoo imports it; a value the user set wins.
os.environ.setdefault("GLOG_minloglevel", "1")

import ppzoo  # noqa: E402  (first: sets CPU threading defaults before Paddle loads)
from ppzoo.cli import print_result, run  # noqa: E402
from ppzoo.config import config_to_dict  # noqa: E402
from ppzoo.errors import ConfigError  # noqa: E402
from ppzoo.inference import load_checkpoint_for_inference  # noqa: E402
from ppzoo.inference.export import export_language_model  # noqa: E402
from ppzoo.inference.export_families import EXPORTERS, export_family  # noqa: E402
from ppzoo.inference.loading import checkpoint_module_name  # noqa: E402
from ppzoo.models.ernie_vilg import load_vilg_for_inference  # noqa: E402

import argparse  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-c", "--config", help="YAML config; optional, checked against the checkpoint's Model section")
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="Section.key=value",
        help="override one value of -c's config; repeatable",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (output_dir/step_XXXXXXXX or output_dir)")
    parser.add_argument("--out", required=True, help="directory to write the exported model to")
    parser.add_argument("--recycles", type=int, default=None,
                        help="HelixFold: recycles unrolled into the program (default Model.num_recycle)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip running the exported program once against the eager model")
    return parser.parse_args(argv)


def model_differences(config_model, checkpoint_model, prefix="Model"):
    """Lines 'Model.key: config X, checkpoint Y' for every key whose values differ."""
    lines = []
    for key in sorted(set(config_model) | set(checkpoint_model)):
        mine, theirs = config_model.get(key, "<unset>"), checkpoint_model.get(key, "<unset>")
        if isinstance(mine, dict) and isinstance(theirs, dict):
            lines += model_differences(mine, theirs, f"{prefix}.{key}")
        elif mine != theirs:
            lines.append(f"{prefix}.{key}: config {mine!r}, checkpoint {theirs!r}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.override and not args.config:
        raise ConfigError("-o overrides apply to a -c config; without -c the checkpoint's own config is used")
    if checkpoint_module_name(args.ckpt) == "ErnieViLG":  # its VQ-VAE weights are in the checkpoint itself
        (module, cfg), tokenizer = load_vilg_for_inference(args.ckpt), None
    else:
        module, tokenizer, cfg = load_checkpoint_for_inference(args.ckpt)
    if args.config:
        given = ppzoo.load_config(args.config, args.override)
        differences = model_differences(config_to_dict(given)["Model"], config_to_dict(cfg)["Model"])
        if differences:
            raise ConfigError(
                f"the Model section of {args.config} does not match the checkpoint {args.ckpt}: "
                + "; ".join(differences)
                + ". Export uses the checkpoint's own config: drop -c, or pass the config it was trained with."
            )
    if cfg.model_module == "HelixFold":  # a folding program: features in, structure and pLDDT out
        from ppzoo.inference.folding_export import export_folding

        written = export_folding(module, cfg, args.out, recycles=args.recycles, check=not args.no_check)
    elif cfg.model_module in EXPORTERS:  # the other families: ppzoo/inference/export_families.py
        written = export_family(module, cfg, tokenizer, args.out, check=not args.no_check)
    else:
        written = export_language_model(module, cfg, tokenizer, args.out, check=not args.no_check)
    out = str(Path(args.out).expanduser().resolve())
    total = sum(written.values())
    for name, size in written.items():
        print(f"  {name:24s} {size / 1e6:10.2f} MB")
    print(f"exported {args.ckpt} to {out} ({total / 1e6:.2f} MB)")
    print_result({"checkpoint": args.ckpt, "out": out, "files": written, "total_bytes": total})
    return 0


if __name__ == "__main__":
    run(main)
