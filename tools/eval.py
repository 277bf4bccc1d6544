"""Evaluate a checkpoint: validation loss and perplexity on the config's Data.Eval set.

    python tools/eval.py -c configs/chuxin/tiny.yaml --ckpt output/chuxin_tiny/step_00000300
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import ppzoo  # noqa: E402  (first: sets CPU threading defaults before Paddle loads)
from ppzoo.cli import config_parser, print_result, run  # noqa: E402
from ppzoo.errors import ConfigError  # noqa: E402


def main(argv=None):
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (output_dir/step_XXXXXXXX)")
    parser.add_argument("--batches", type=int, default=None, help="number of eval batches (default Engine.eval_iters)")
    args = parser.parse_args(argv)
    cfg = ppzoo.load_config(args.config, args.override)
    if cfg.Data.Eval is None:
        raise ConfigError(f"{args.config} has no Data.Eval section: there is nothing to evaluate on.")
    cfg.Data.Train = None  # evaluation needs no training data
    engine = ppzoo.Engine(cfg)
    ppzoo.load_module_weights(engine.module, args.ckpt, engine.env.mp_rank)
    metrics = engine.evaluate(max_batches=args.batches)
    result = {"checkpoint": args.ckpt, **metrics}
    if engine.is_main:
        print(f"{args.ckpt}: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}")
    print_result(result)
    return 0


if __name__ == "__main__":
    run(main)
