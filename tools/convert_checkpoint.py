"""Convert checkpoints between Hugging Face LLaMA directories and ppzoo checkpoints.

    python tools/convert_checkpoint.py --from-hf path/to/llama --out output/llama_ppzoo
    python tools/convert_checkpoint.py --to-hf output/chuxin_tiny/step_00000300 --out output/chuxin_tiny_hf

--from-hf writes a ppzoo checkpoint directory (model weights, config, tokenizer, manifest) that
tools/infer.py and tools/eval.py read; it has no optimizer state, so tools/train.py cannot resume from it.
--to-hf writes config.json, safetensors weights, generation_config.json and the tokenizer, loadable with
transformers' LlamaForCausalLM.from_pretrained. Prints the written directory as the last JSON line.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import ppzoo  # noqa: E402  (first: sets CPU threading defaults before Paddle loads)

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import paddle  # noqa: E402

from ppzoo.cli import print_result, run  # noqa: E402
from ppzoo.config import config_from_dict, config_to_dict  # noqa: E402
from ppzoo.core import checkpoint as ckpt  # noqa: E402
from ppzoo.errors import CheckpointError  # noqa: E402
from ppzoo.inference import load_checkpoint_for_inference  # noqa: E402
from ppzoo.models.chuxin.hf_checkpoint import (  # noqa: E402
    config_dict_for,
    load_hf_for_inference,
    save_hf_checkpoint,
    write_tokenizer_files,
)
from ppzoo.models.chuxin.model import ChuXinForCausalLM  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face LLaMA directory to read")
    direction.add_argument("--to-hf", metavar="CKPT_DIR", help="ppzoo checkpoint directory to read")
    parser.add_argument("--out", required=True, help="directory to write (created; must not hold other files)")
    parser.add_argument("--max-shard-mb", type=float, default=None,
                        help="--to-hf: split the weights into safetensors shards of at most this size")
    return parser.parse_args(argv)


def _check_out(out, source):
    if os.path.abspath(out) == os.path.abspath(source):
        raise CheckpointError(f"--out {out} is the checkpoint being converted; choose another directory.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"--out {out} already exists and is not an empty directory; choose a new one.")


def from_hf(source, out):
    """Write a ppzoo checkpoint: model.mp0.pdparams, trainer_state.json (with the config), tokenizer files
    and the manifest, using the Engine's crash-safe layout (ppzoo.core.checkpoint)."""
    module, tokenizer, cfg = load_hf_for_inference(source)
    # The config a ppzoo checkpoint stores: the tokenizer now lives inside the checkpoint.
    cfg = config_from_dict(config_dict_for(cfg.Model, os.path.join(os.path.abspath(out), "tokenizer.json")
                                           if tokenizer is not None else None), source=str(out))
    state = {
        "step": 0,
        "consumed_samples": 0,
        "mp_size": 1,
        "config": config_to_dict(cfg),
        "converted_from": os.path.abspath(source),
    }
    # begin/commit write under a staging root as step_00000000 (checksums, manifest, fsync), which is then
    # renamed to --out: the output is complete or absent.
    out = os.path.abspath(out)
    staging = os.path.join(os.path.dirname(out), f".tmp-convert-{os.path.basename(out)}-{os.getpid()}")
    try:
        tmp = ckpt.begin(staging, 0)
        paddle.save(module.state_dict(), os.path.join(tmp, "model.mp0.pdparams"))
        ckpt.write_json(os.path.join(tmp, ckpt.TRAINER_STATE), state)
        if tokenizer is not None:
            write_tokenizer_files(tokenizer, tmp)
        written = ckpt.commit(staging, 0, keep_last=1)
        if os.path.isdir(out):  # an empty directory (checked by _check_out)
            os.rmdir(out)
        os.rename(written, out)
        ckpt.fsync_path(os.path.dirname(out))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, cfg.Model


def to_hf(source, out, max_shard_mb):
    module, tokenizer, cfg = load_checkpoint_for_inference(source)
    model = module.language_model() if cfg.model_module == "ChuXin" else None
    if not isinstance(model, ChuXinForCausalLM):
        raise CheckpointError(
            f"{source} holds a {cfg.model_module} model; only ChuXin (LLaMA) checkpoints convert to Hugging Face."
        )
    max_shard_bytes = int(max_shard_mb * 2**20) if max_shard_mb else None
    path = save_hf_checkpoint(model, cfg.Model, out, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    return str(path), cfg.Model


def main(argv=None):
    args = parse_args(argv)
    source = args.from_hf or args.to_hf
    _check_out(args.out, source)
    if args.from_hf:
        out, model_config = from_hf(source, args.out)
        kind = "ppzoo"
    else:
        out, model_config = to_hf(source, args.out, args.max_shard_mb)
        kind = "huggingface"
    print(f"{source} -> {out} ({kind} checkpoint: {model_config.num_layers} layers, "
          f"hidden {model_config.hidden_size}, vocab {model_config.vocab_size})")
    print_result({"source": source, "out": out, "format": kind})
    return 0


if __name__ == "__main__":
    run(main)
