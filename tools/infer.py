"""Generate text from a trained checkpoint or an exported model, streaming it to the terminal.

    python tools/infer.py --ckpt output/chuxin_tiny/step_00000300 --prompt "def fibonacci(n):"
    python tools/infer.py --ckpt ... --prompts prompts.txt --temperature 0.8 --top-p 0.9
    python tools/infer.py --model exported/chuxin_tiny --prompt "def fibonacci(n):"   (from tools/export.py)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import ppzoo  # noqa: E402  (first: sets CPU threading defaults before Paddle loads)
from ppzoo.cli import print_result, run  # noqa: E402
from ppzoo.errors import PpzooError  # noqa: E402
from ppzoo.inference import (  # noqa: E402
    Generator, PreallocatedKVCache, SamplingConfig, load_checkpoint_for_inference,
)
from ppzoo.inference.predictor import ExportedKVCache, load_exported  # noqa: E402

import argparse  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint directory written by tools/train.py")
    model.add_argument("--model", help="exported model directory written by tools/export.py (Paddle Inference)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="a text file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--truncate", action="store_true", help="cut prompts longer than the context from the left")
    return parser.parse_args(argv)


def read_prompts(args):
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts)
    if not path.is_file():
        raise PpzooError(f"--prompts {path}: no such file (expected a text file with one prompt per line).")
    prompts = [line.rstrip("\n").replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise PpzooError(f"--prompts {path} has no non-empty lines.")
    return prompts


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args)
    if args.model is not None:
        model, tokenizer, _ = load_exported(args.model)
        generator = Generator(model, tokenizer, cache_factory=ExportedKVCache)
        source = {"model": args.model}
    else:
        module, tokenizer, cfg = load_checkpoint_for_inference(args.ckpt)
        if tokenizer is None:
            raise PpzooError(f"{args.ckpt} has no tokenizer.json; it was trained without Data.tokenizer.")
        # Keys/values written in place rather than concatenated every step (see ppzoo/inference/cache.py).
        generator = Generator(module.language_model(), tokenizer, cache_factory=PreallocatedKVCache)
        source = {"checkpoint": args.ckpt}
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop_strings=args.stop, seed=args.seed,
    )
    outputs = []
    for prompt in prompts:
        # One prompt at a time so the continuation streams as it is decoded.
        print(f"\n>>> {prompt}", flush=True)
        sys.stdout.write(prompt)
        text = ""
        for pieces in generator.stream([prompt], sampling, truncate=args.truncate):
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
            text += pieces[0]
        print("\n", flush=True)
        outputs.append({"prompt": prompt, "completion": text})
    print_result({**source, "outputs": outputs})
    return 0


if __name__ == "__main__":
    run(main)
