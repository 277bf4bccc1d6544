"""Evaluate a checkpoint: validation loss and perplexity on the config's Data.Eval set (--task loss, the
default), or needle-in-a-haystack retrieval over context lengths x depths (--task niah).

    python tools/eval.py -c configs/chuxin/tiny.yaml --ckpt output/chuxin_tiny/step_00000300
    python tools/eval.py -c configs/chuxin/tiny_long.yaml --ckpt output/chuxin_tiny_long --task niah \
        --lengths 256 512 1024 2048 --depths 0 0.25 0.5 0.75 1 --trials 5 --out output/niah_long
    python tools/eval.py -c configs/chuxin/tiny.yaml --ckpt output/chuxin_tiny --task kcache --measures ppl \
        --top-n 0.0625 0.125 0.25
    python tools/eval.py -c configs/chuxin/tiny_long.yaml --ckpt output/chuxin_tiny_long --task kcache \
        --measures niah --top-n 64 128 --value-kind token --lengths 1024 2048 --trials 2

    python tools/eval.py -c configs/cct/tiny.yaml --ckpt output/cct_tiny --task humanevalfix --samples 1
    python tools/eval.py -c configs/cct/tiny.yaml --ckpt output/cct_tiny --task injected_bugs --cases 240

--task humanevalfix runs HumanEvalFix (--data, default ../shared/data/humanevalfix/humanevalpack_python.jsonl):
--samples completions per problem, each run against the tests in the sandbox (ppzoo/eval/humanevalfix), pass@k
per bug type. --task injected_bugs ranks and fixes injected bugs in held-out stdlib functions
(ppzoo/methods/cct/heldout.py).

    python tools/eval.py --task structure --pred predictions/T1026/ranked_0.pdb \
        --native ../shared/data/proteins/casp14/T1026.pdb --chain A

--task structure needs no config or checkpoint: it scores a predicted PDB/mmCIF against a native one
(TM-score, GDT-TS, GDT-HA, lDDT-Ca, RMSD; see ppzoo/eval/structure).

--task kcache compares the dense cache with KCache at each --top-n, on decode steps: perplexity of validation
text teacher-forced through the cache one token at a time, and the NIAH grid with the question's tail decoded
(see ppzoo/eval/cache_policy.py); one table.

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

    parser = config_parser(__doc__.strip().splitlines()[0], config_required=False)  # structure needs no config
    parser.add_argument("--ckpt", default=None, help="checkpoint directory (output_dir/step_XXXXXXXX); every task "
                                                     "but structure needs -c and --ckpt")
    parser.add_argument("--task", choices=("loss", "niah", "kcache", "humanevalfix", "injected_bugs", "structure"), default="loss",
                        help="loss (default): validation loss and perplexity; niah: needle in a haystack; kcache: "
                             "dense cache against KCache (decode perplexity and NIAH)")
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
    kcache = parser.add_argument_group("kcache")
    kcache.add_argument("--top-n", nargs="+", default=["0.0625", "0.125", "0.25"],
                        help="KCache value rows per head and decode step: counts (64) or fractions of the "
                             "positions (0.125)")
    kcache.add_argument("--dense-layers", type=int, default=None, help="layers kept dense (default: KCacheConfig's)")
    kcache.add_argument("--renormalize", action="store_true", help="rescale the selected weights to sum to 1")
    kcache.add_argument("--measures", nargs="+", choices=("ppl", "niah"), default=["ppl", "niah"])
    kcache.add_argument("--ppl-windows", type=int, default=8, help="validation documents for decode perplexity")
    kcache.add_argument("--ppl-len", type=int, default=None, help="tokens per window (default Data.seq_len)")
    kcache.add_argument("--ppl-prefill", type=int, default=16, help="tokens of each window prefilled before decoding")
    code = parser.add_argument_group("humanevalfix and injected_bugs")
    code.add_argument("--data", default=None, help="humanevalfix: a HumanEvalPack-format JSONL file")
    code.add_argument("--samples", type=int, default=1, help="humanevalfix: completions per problem (n)")
    code.add_argument("--k", type=int, nargs="+", default=[1], help="humanevalfix: pass@k for these k (<= n)")
    code.add_argument("--temperature", type=float, default=None, help="humanevalfix: default 0 (greedy) for n=1, else 0.2")
    code.add_argument("--fix-max-new-tokens", type=int, default=256, help="tokens generated per fix")
    code.add_argument("--limit", type=int, default=None, help="humanevalfix: only the first N problems")
    code.add_argument("--workers", type=int, default=2, help="humanevalfix: sandboxed programs run at once")
    code.add_argument("--timeout", type=float, default=10.0, help="humanevalfix: wall-clock seconds per program")
    code.add_argument("--cases", type=int, default=240, help="injected_bugs: held-out cases")
    code.add_argument("--no-generate", action="store_true", help="injected_bugs: rankings only, no exact-fix decoding")
    structure = parser.add_argument_group("structure (no config or checkpoint: scores structure files)")
    structure.add_argument("--pred", default=None, help="structure: predicted PDB/mmCIF file (optionally .gz)")
    structure.add_argument("--native", default=None, help="structure: native PDB/mmCIF file (optionally .gz)")
    structure.add_argument("--chain", default=None, help="structure: native chain id (default: its first protein chain)")
    structure.add_argument("--pred-chain", default=None, help="structure: predicted chain id (default: its first)")
    args = parser.parse_args(argv)
    if args.task == "structure":
        if not args.pred or not args.native:
            parser.error("--task structure needs --pred PREDICTED.pdb and --native NATIVE.pdb")
    elif not args.config or not args.ckpt:
        parser.error(f"--task {args.task} needs -c CONFIG and --ckpt CHECKPOINT")
    return args


def evaluate_structure(args):
    from ppzoo.eval.structure import score_files

    result = score_files(args.pred, args.native, chain=args.chain, pred_chain=args.pred_chain)
    print(f"{result['pred']} (chain {result['pred_chain']}) against {result['native']} (chain "
          f"{result['native_chain']}): {result['aligned_residues']} of {result['native_residues']} native residues "
          f"paired by {result['correspondence']}")
    print("| TM-score | GDT-TS | GDT-HA | lDDT-Ca | RMSD (A) |\n| --- | --- | --- | --- | --- |")
    print(f"| {result['tm_score']:.4f} | {result['gdt_ts']:.4f} | {result['gdt_ha']:.4f} | {result['lddt_ca']:.4f} "
          f"| {result['rmsd']:.3f} |")
    return {"task": "structure", **result}


def evaluate_humanevalfix(args, cfg):
    from ppzoo.eval import humanevalfix as hef
    from ppzoo.inference.generate import Generator

    sandbox = hef.Sandbox(hef.SandboxLimits(timeout=args.timeout, cpu_seconds=max(int(args.timeout), 1)), args.workers)
    problems = hef.load_problems(args.data or hef.DATA_FILE)[:args.limit]
    module, tokenizer, path = load_for_niah(args.ckpt, cfg)
    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.2)
    bodies = hef.generate_bodies(Generator(module.language_model(), tokenizer), problems, args.samples, temperature,
                                 max_new_tokens=args.fix_max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    passed, _ = hef.run_candidates(problems, bodies, sandbox)
    table = hef.score(problems, passed, args.k)
    print(f"HumanEvalFix {path}: {len(problems)} problems x {args.samples} samples (temperature {temperature})")
    print(hef.markdown_table(table))
    return {"task": "humanevalfix", "checkpoint": path, "samples": args.samples, "temperature": temperature,
            "pass_at_k": table}


def evaluate_injected_bugs(args, cfg):
    from ppzoo.methods.cct import heldout

    module, tokenizer, path = load_for_niah(args.ckpt, cfg)
    train = cfg.Data.Train.args if cfg.Data.Train is not None and cfg.Data.Train.dataset == "CodeInstructions" else None
    cases = heldout.build_cases(args.cases, decontaminate_against=train.decontaminate_against if train else None,
                                **({"max_code_chars": train.max_code_chars} if train else {}))
    result = heldout.evaluate_injected_bugs(module, tokenizer, cases, generate=not args.no_generate,
                                            batch_size=args.batch_size)
    print(f"Injected bugs in held-out functions, {path}:")
    print(heldout.markdown_table(result))
    return {"task": "injected_bugs", "checkpoint": path, **result}


def evaluate_loss(args, cfg):
    if cfg.Data.Eval is None:
        raise ConfigError(f"{args.config} has no Data.Eval section: there is nothing to evaluate on.")
    cfg.Data.Train = None  # evaluation needs no training data
    engine = ppzoo.Engine(cfg)
    ppzoo.load_module_weights(engine.module, args.ckpt, engine.env.mp_rank)
    metrics = engine.evaluate(max_batches=args.batches)
    if engine.is_main and "eval_loss" in metrics:
        print(f"{args.ckpt}: eval loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_ppl']:.2f}")
    elif engine.is_main:  # models whose validation reports other metrics (e.g. HelixFold's lDDT-Ca)
        print(f"{args.ckpt}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
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


def niah_num_values(args, cfg):
    """--num-values, or the value pool the model was taught with when it trained on NeedleRetrieval."""
    train = cfg.Data.Train
    if args.num_values is None and train is not None and train.dataset == "NeedleRetrieval":
        return train.args.num_values
    return args.num_values


def evaluate_niah(args, cfg):
    from ppzoo.eval import niah

    module, tokenizer, path = load_for_niah(args.ckpt, cfg)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), f"niah_{os.path.basename(path)}")
    model_cfg = cfg.Model
    num_values = niah_num_values(args, cfg)
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


def evaluate_kcache(args, cfg):
    from ppzoo.eval import cache_policy
    from ppzoo.inference.kcache import KCacheConfig, cache_factory, parse_top_n

    module, tokenizer, path = load_for_niah(args.ckpt, cfg)
    dense_layers = KCacheConfig.dense_layers if args.dense_layers is None else args.dense_layers
    policies = {"dense": cache_factory(None)}
    for text in args.top_n:
        config = KCacheConfig(top_n=parse_top_n(text), dense_layers=dense_layers, renormalize=args.renormalize)
        policies[config.describe()] = cache_factory(config)
    windows = niah = None
    if "ppl" in args.measures:
        windows = cache_policy.document_windows(tokenizer, args.ppl_len or cfg.Data.seq_len, args.ppl_windows)
    if "niah" in args.measures:
        niah = {"lengths": args.lengths, "depths": args.depths, "trials": args.trials, "seed": args.seed,
                "value_kind": args.value_kind, "num_values": niah_num_values(args, cfg),
                "prefill_chunk": args.prefill_chunk, "max_new_tokens": args.max_new_tokens,
                "haystack_chars": args.haystack_chars}
    rows = cache_policy.compare_policies(module.language_model(), tokenizer, policies, windows, args.ppl_prefill,
                                         niah, args.batch_size)
    print(cache_policy.markdown_table(rows))
    return {"task": "kcache", "checkpoint": path, "ppl_windows": None if windows is None else list(windows.shape),
            "niah": niah, "rows": rows}


def main(argv=None):
    args = parse_args(argv)
    if args.task == "structure":  # scores two files: no config, no model
        print_result(evaluate_structure(args))
        return 0
    cfg = ppzoo.load_config(args.config, args.override)
    tasks = {"loss": evaluate_loss, "niah": evaluate_niah, "kcache": evaluate_kcache,
             "humanevalfix": evaluate_humanevalfix, "injected_bugs": evaluate_injected_bugs}
    result = tasks[args.task](args, cfg)
    print_result(result)
    return 0


if __name__ == "__main__":
    run(main)
