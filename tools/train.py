"""Train a model from a YAML config.

    python tools/train.py -c configs/chuxin/tiny.yaml [-o Engine.max_steps=20 ...] [--resume auto|PATH]
    python -m paddle.distributed.launch --nproc_per_node 2 tools/train.py -c ... -o Distributed.dp_degree=2
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import ppzoo  # noqa: E402  (first: sets CPU threading defaults before Paddle loads)
from ppzoo.cli import config_parser, print_result, run  # noqa: E402

import yaml  # noqa: E402


def main(argv=None):
    parser = config_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--resume", metavar="auto|PATH", help="continue from a checkpoint (auto: the newest)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    args = parser.parse_args(argv)
    cfg = ppzoo.load_config(args.config, args.override)
    if args.print_config:
        print(yaml.safe_dump(ppzoo.config_to_dict(cfg), sort_keys=False), end="")
        return 0
    engine = ppzoo.Engine(cfg)
    if engine.is_main:
        params = sum(int(p.size) for p in engine.module.parameters())
        print(f"{cfg.model_module}: {params / 1e6:.2f}M parameters (this rank) | device {engine.device} | "
              f"world {engine.env.world_size} (dp {engine.env.dp_size}, mp {engine.env.mp_size}) | "
              f"global batch {cfg.Global.global_batch_size} = micro {cfg.Global.micro_batch_size} x accumulate "
              f"{cfg.Engine.accumulate_steps} x dp {engine.env.dp_size} | output {cfg.Engine.output_dir}", flush=True)
    result = engine.fit(resume=args.resume)
    if engine.is_main:
        print(f"done: step {result['step']}"
              + (f", loss {result['loss']:.4f}" if result["loss"] is not None else " (nothing left to train)")
              + (f", eval loss {result['eval_loss']:.4f} (ppl {result['eval_ppl']:.1f})" if "eval_loss" in result else "")
              + f", checkpoint {result['checkpoint']}", flush=True)
    print_result(result)
    return 0


if __name__ == "__main__":
    run(main)
