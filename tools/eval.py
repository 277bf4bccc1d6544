"""Evaluate a checkpoint: validation loss and perplexity on the config's Data.Eval set (--task loss, the
default), or needle-in-a-haystack retrieval over context lengths x depths (--task niah).

    python tools/eval.py -c configs/chuxin/tiny.yaml --ckpt output/chuxin_tiny/step_00000300
    python tools/eval.py -c configs/chuxin/tiny_long.yaml --ckpt output/chuxin_tiny_long --task niah \
        --lengths 256 512 1024 2048 --depths 0 0.25 0.5 0.75 1 --trials 5 --out output/niah_long

For niah the model is built from the config (so `-o Model.rope_theta=...` evaluates a checkpoint under
another RoPE base) and the checkpoint's weights are loaded into it; niah.json and niah.png go to --out
(default: <run directory>/niah_<step>).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import ppzoo  # noqa: E402  (first: sets CPU threading defaults before Paddle loads)
from ppzoo.cli import config_parser, print_result, run  # noqa: E402
from ppzoo.errors import CheckpointError, ConfigError  # noqa: E402


def parse_args(argv):
    from ppzoo.eval.niah import DEFAULT_DEPTHS, DEFAULT_LENGTHS

    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (output_dir/step_XXXXXXXX)")
    parser.add_argument("--task", choices=("loss", "niah"), default="loss",
                        help="loss (default): validation loss and perplexity; niah: needle in a haystack")
    parser.add_argument("--batches", type=int, default=None, help="loss: number of eval batches (default Engine.eval_iters)")
    niah = parser.add_argument_group("niah")
    niah.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="context lengths (tokens)")
    niah.add_argument("--depths", type=float, nargs="+", default=list(DEFAULT_DEPTHS), help="needle depths in [0, 1]")
    niah.add_argument("--trials", type=int, default=5, help="prompts per cell, each with its own key and value")
    niah.add_argument("--seed", type=int, default=0)
    niah.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward")
    niah.add_argument("--max-new-tokens", type=int, default=8)
    niah.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    niah.add_argument("--haystack-chars", type=int, default=None,
                      help="use only the first N characters of the validation split as haystack (default: all)")
    niah.add_argument("--value-kind", choices=("number", "token"), default="number",
                      help="number: 4-digit values; token: one number token in a digit-free haystack (see "
                           "ppzoo/data/needle.py; for models without induction heads, e.g. tiny ChuXin)")
    niah.add_argument("--num-values", type=int, default=None,
                      help="--value-kind token: draw values from the first N number tokens (default: the "
                           "config's Data.Train.num_values when it trains on NeedleRetrieval, else all)")
    niah.add_argument("--out", default=None, help="directory for niah.json and niah.png")
    return parser.parse_args(argv)


def evaluate_loss(args, cfg):
    if cfg.Data.Eval is None:
        raise ConfigError(f"{args.config} has no Data.Eval section: there is nothing to evaluate on.")
    cfg.Data.Train = None  # evaluation needs no training data
    engine = ppzoo.Engine(cfg)
    ppzoo.load_module_weights(engine.module, args.ckpt, engine.env.mp_rank)
    metrics = engine.evaluate(max_batches=args.batches)
    if engine.is_main:
        print(f"{args.ckpt}: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}")
    return {"checkpoint": args.ckpt, **metrics}


def load_for_niah(path, cfg):
    """(module with the checkpoint's weights in the config's architecture, tokenizer, checkpoint path)."""
    import paddle

    from ppzoo.core import checkpoint as ckpt
    from ppzoo.core.engine import resolve_device
    from ppzoo.data.tokenizer import Tokenizer
    from ppzoo.inference.loading import merged_state_dict
    from ppzoo.registry import MODULES

    if os.path.isdir(path) and not os.path.exists(os.path.join(path, ckpt.MANIFEST)) and ckpt.list_checkpoints(path):
        path = ckpt.list_checkpoints(path)[-1]  # a run's output directory: its newest checkpoint
    if not os.path.isdir(path):
        raise CheckpointError(f"--ckpt {path} is not a checkpoint directory (expected output_dir/step_XXXXXXXX).")
    ckpt.verify(path)
    state = ckpt.read_trainer_state(path)
    paddle.set_device(resolve_device(cfg.Global.device))
    module = MODULES.get(cfg.model_module)(cfg.Model, None)
    weights = merged_state_dict(path, module, state.get("mp_size", 1))
    for name, param in module.state_dict().items():
        if name not in weights or list(weights[name].shape) != list(param.shape):
            found = list(weights[name].shape) if name in weights else "nothing"
            raise CheckpointError(
                f"{path} does not fit the model of {cfg.source}: {name} is {found} there and {list(param.shape)} "
                "here. Use the config the checkpoint was trained with."
            )
    module.set_state_dict(weights)
    module.eval()
    tokenizer_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tokenizer_file):
        tokenizer_file = cfg.Data.tokenizer
    if not tokenizer_file:
        raise ConfigError(f"{path} has no tokenizer.json and {cfg.source} sets no Data.tokenizer.")
    return module, Tokenizer.from_file(tokenizer_file), path


def evaluate_niah(args, cfg):
    from ppzoo.eval import niah

    module, tokenizer, path = load_for_niah(args.ckpt, cfg)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), f"niah_{os.path.basename(path)}")
    model_cfg = cfg.Model
    num_values = args.num_values
    train = cfg.Data.Train
    if num_values is None and train is not None and train.dataset == "NeedleRetrieval":
        num_values = train.args.num_values  # the value pool the model was taught with
    settings = {"checkpoint": path, "config": str(args.config), "rope_theta": getattr(model_cfg, "rope_theta", None),
                "rope_position_scale": getattr(model_cfg, "rope_position_scale", None),
                "trained_seq_len": cfg.Data.seq_len}
    title = f"NIAH {os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)} " \
            f"(theta {settings['rope_theta']:g}, trained at {cfg.Data.seq_len})"
    result = niah.evaluate_niah(
        module.language_model(), tokenizer, lengths=args.lengths, depths=args.depths, trials=args.trials,
        seed=args.seed, prefill_chunk=args.prefill_chunk, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, haystack_chars=args.haystack_chars, value_kind=args.value_kind, num_values=num_values, out_dir=out,
        settings=settings, title=title,
    )
    print(niah.markdown_table(result))
    print(f"overall accuracy {result['overall_accuracy']:.3f}; wrote {result['files']['json']} and {result['files']['png']}")
    return {key: result[key] for key in ("task", "settings", "lengths", "depths", "accuracy", "per_length",
                                         "overall_accuracy", "files")}


def main(argv=None):
    args = parse_args(argv)
    cfg = ppzoo.load_config(args.config, args.override)
    result = evaluate_niah(args, cfg) if args.task == "niah" else evaluate_loss(args, cfg)
    print_result(result)
    return 0


if __name__ == "__main__":
    run(main)
