"""ERNIE-ViLG end to end against two stages, on held-out synthetic scenes.

Trains, through the Engine and the configs in configs/ernie_vilg/: the VQ-VAE image tokenizer
(tiny_vqvae.yaml), the attribute classifier that judges the images (tiny_classifier.yaml), and the generator
twice from the same tokenizer, seed, data and schedule: end to end (tiny.yaml) and two-stage
(tiny_two_stage.yaml). Both are then measured on scenes whose attribute combinations never occur in
training (the validation split): attribute accuracy of generated images, FID on the classifier's features,
caption attribute accuracy and BLEU-4 (greedy and beam), and reconstruction PSNR. Prints the table with
the ratio end-to-end / two-stage, and writes results.json and samples.png (captions, real images, and both
models' images) to --out.

    python benchmarks/bench_vilg.py [--out output/bench_vilg] [--vilg-steps 300] [--reuse]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ppzoo  # noqa: E402  (first: CPU threading defaults)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import paddle  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ppzoo.core import checkpoint as ckpt  # noqa: E402
from ppzoo.data.images import SyntheticScenes, SyntheticScenesConfig, to_uint8  # noqa: E402
from ppzoo.eval.image_metrics import evaluate_vilg  # noqa: E402
from ppzoo.models.ernie_vilg import ImageSampling, load_vilg_for_inference  # noqa: E402
from ppzoo.models.ernie_vilg.attribute_classifier import SceneAttributeClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "ernie_vilg"


def train(config, output_dir, steps, overrides, reuse):
    """Train `config` for `steps` into output_dir through the Engine (or reuse a finished run there)."""
    existing = ckpt.list_checkpoints(output_dir) if os.path.isdir(output_dir) else []
    if existing and reuse and existing[-1].endswith(ckpt.step_dir_name(steps)):
        print(f"reusing {existing[-1]}", flush=True)
        return existing[-1], None
    if existing:
        raise SystemExit(f"{output_dir} holds an earlier run; pass --reuse to use it or choose another --out.")
    cfg = ppzoo.load_config(config, [f"Engine.output_dir={output_dir}", f"Engine.max_steps={steps}",
                                     f"Engine.save_steps={steps}", "Engine.progress_bar=false", *overrides])
    started = time.perf_counter()
    summary = ppzoo.Engine(cfg).fit()
    seconds = time.perf_counter() - started
    print(f"trained {Path(config).name} for {steps} steps in {seconds:.0f} s", flush=True)
    return summary["checkpoint"], seconds


def load_classifier(path):
    cfg = ppzoo.load_config(CONFIGS / "tiny_classifier.yaml")
    classifier = SceneAttributeClassifier(cfg.Model)
    ppzoo.load_module_weights(classifier, path)
    classifier.eval()
    return classifier


def sample_grid(result_by_name, path, rows=8):
    """A PNG: one row per distinct caption (caption text, a real image, each model's generated image)."""
    names = list(result_by_name)
    samples = result_by_name[names[0]]["samples"]
    first_of_caption = {}
    for index, caption in enumerate(samples["captions"]):
        first_of_caption.setdefault(caption, index)
    picked = list(first_of_caption.values())[:rows]
    rows = len(picked)
    cell, text_width = 32 * 3, 250
    columns = ["held-out real"] + names
    width, height = text_width + cell * len(columns), 20 + (cell + 4) * rows
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((text_width + c * cell + 2, 4), name, fill=(0, 0, 0))
    for r, index in enumerate(picked):
        y = 20 + r * (cell + 4)
        draw.text((4, y + cell // 2 - 5), samples["captions"][index], fill=(0, 0, 0))
        images = [samples["real"][index]] + [result_by_name[n]["samples"]["generated"][index] for n in names]
        for c, image in enumerate(images):
            tile = Image.fromarray(to_uint8(image)).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (text_width + c * cell, y))
    canvas.save(path)
    return path


ROWS = [
    ("t2i attribute accuracy (all 5)", lambda r: r["t2i_attribute_accuracy"]["all"], True),
    ("t2i shape accuracy", lambda r: r["t2i_attribute_accuracy"]["shape"], True),
    ("t2i color accuracy", lambda r: r["t2i_attribute_accuracy"]["color"], True),
    ("t2i size accuracy", lambda r: r["t2i_attribute_accuracy"]["size"], True),
    ("t2i count accuracy", lambda r: r["t2i_attribute_accuracy"]["count"], True),
    ("t2i position accuracy", lambda r: r["t2i_attribute_accuracy"]["position"], True),
    ("FID (classifier features)", lambda r: r["fid"], False),
    ("reconstruction PSNR (dB)", lambda r: r["reconstruction_psnr"], True),
    ("caption attribute accuracy, greedy", lambda r: r["caption_greedy_attribute_accuracy"]["all"], True),
    ("caption attribute accuracy, beam", lambda r: r["caption_beam_attribute_accuracy"]["all"], True),
    ("caption BLEU-4, greedy", lambda r: r["bleu_greedy"], True),
    ("caption BLEU-4, beam", lambda r: r["bleu_beam"], True),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="output/bench_vilg")
    parser.add_argument("--vq-steps", type=int, default=400)
    parser.add_argument("--classifier-steps", type=int, default=400)
    parser.add_argument("--vilg-steps", type=int, default=300)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --out instead of retraining")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    vq, vq_seconds = train(CONFIGS / "tiny_vqvae.yaml", out / "vqvae", args.vq_steps, [], args.reuse)
    classifier_path, _ = train(CONFIGS / "tiny_classifier.yaml", out / "classifier", args.classifier_steps, [],
                               args.reuse)
    classifier = load_classifier(classifier_path)
    runs = {"end-to-end": "tiny.yaml", "two-stage": "tiny_two_stage.yaml"}
    held_out = SyntheticScenes.build(SyntheticScenesConfig(split="validation", num_samples=args.eval_samples, seed=7))
    sampling = ImageSampling(top_k=32, temperature=1.0, num_candidates=args.candidates, seed=0)
    results, seconds = {}, {}
    for name, config in runs.items():
        path, seconds[name] = train(CONFIGS / config, out / name, args.vilg_steps,
                                    [f"Model.tokenizer_checkpoint={vq}"], args.reuse)
        module, _ = load_vilg_for_inference(path)
        paddle.seed(0)
        results[name] = evaluate_vilg(module, classifier, held_out, args.eval_samples, sampling, args.beam)

    e2e, two = results["end-to-end"], results["two-stage"]
    print(f"\nERNIE-ViLG on {args.eval_samples} held-out scenes (unseen attribute combinations); generator "
          f"{args.vilg_steps} steps, tokenizer {args.vq_steps} steps (held-out PSNR of the tokenizer's own "
          f"decoder {two['tokenizer_psnr']:.2f} dB; the end-to-end run retrains its copy to read hidden states), "
          f"{args.candidates} candidates reranked, beam {args.beam}")
    print(f"attribute classifier on the real held-out images: all-5 accuracy "
          f"{e2e['classifier_accuracy_on_real']['all']:.3f}\n")
    print("| metric | end-to-end | two-stage | ratio e2e / two-stage |")
    print("| --- | --- | --- | --- |")
    for label, get, _ in ROWS:
        a, b = get(e2e), get(two)
        ratio = f"{a / b:.2f}x" if b else "n/a"
        print(f"| {label} | {a:.3f} | {b:.3f} | {ratio} |")
    if all(seconds.values()):
        print(f"| training time (s) | {seconds['end-to-end']:.0f} | {seconds['two-stage']:.0f} | "
              f"{seconds['end-to-end'] / seconds['two-stage']:.2f}x |")
    grid = sample_grid(results, out / "samples.png")
    summary = {name: {k: v for k, v in r.items() if k != "samples"} for name, r in results.items()}
    summary["examples"] = [
        {"caption": c, "e2e_greedy": g1, "two_stage_greedy": g2}
        for c, g1, g2 in zip(e2e["samples"]["captions"][:8], e2e["samples"]["greedy_captions"][:8],
                             two["samples"]["greedy_captions"][:8])
    ]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\nsamples: {grid}; results: {out / 'results.json'}")
    for example in summary["examples"][:4]:
        print(f"  {example['caption']!r}: e2e captions {example['e2e_greedy']!r}, "
              f"two-stage {example['two_stage_greedy']!r}")
    print(json.dumps({"samples_png": str(grid), **{n: {label: get(r) for label, get, _ in ROWS}
                                                   for n, r in results.items()}}))


if __name__ == "__main__":
    main()
