"""Generate text from a trained checkpoint or an exported model, streaming it to the terminal.

    python tools/infer.py --ckpt output/chuxin_tiny/step_00000300 --prompt "def fibonacci(n):"
    python tools/infer.py --ckpt ... --prompts prompts.txt --temperature 0.8 --top-p 0.9
    python tools/infer.py --model exported/chuxin_tiny --prompt "def fibonacci(n):"   (from tools/export.py)
    python tools/infer.py --ckpt output/ernie_vilg_tiny --prompt "two small red circles on the left" --out samples
    python tools/infer.py --ckpt output/ernie_vilg_tiny --image samples/000.png --beam 3   (ERNIE-ViLG captioning)
    python tools/infer.py --ckpt output/recycle_gpt_tiny --prompt "def f(x):" --strategy verified   (RecycleGPT)
    python tools/infer.py --ckpt output/helixfold_tiny --fold T1026.fasta --recycles 3 --chunk-size 64 \
        --num-predictions 2 --out predictions/T1026   (HelixFold: PDB with pLDDT, JSON, plot)
    python tools/infer.py --ckpt output/ernie_titan_tiny --prompt "" --topic asyncio --keywords loop,future \
        --length 40 --genre code --rerank 4 --temperature 0.9   (ERNIE Titan: controllable, credibility-reranked)
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import ppzoo  # noqa: E402  (first: sets CPU threading defaults before Paddle loads)
from ppzoo.cli import print_result, run  # noqa: E402
from ppzoo.errors import PpzooError  # noqa: E402
from ppzoo.inference import (  # noqa: E402
    Generator, SamplingConfig, load_checkpoint_for_inference,
)
from ppzoo.inference.kcache import KCacheConfig, cache_factory, parse_top_n  # noqa: E402
from ppzoo.inference.predictor import ExportedKVCache, ExportedLanguageModel, load_exported  # noqa: E402
from ppzoo.inference.recycle import STRATEGIES, make_generator  # noqa: E402
from ppzoo.inference.folding_export import is_exported_folding_model  # noqa: E402
from ppzoo.inference.loading import checkpoint_module_name  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint directory written by tools/train.py")
    model.add_argument("--model", help="exported model directory written by tools/export.py (Paddle Inference)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="a text file with one prompt per line")
    source.add_argument("--image", action="append", help="ERNIE-ViLG: an image file to caption (repeatable)")
    source.add_argument("--fold", metavar="FILE", help="HelixFold: a FASTA, features .npz or PDB/mmCIF file to fold")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--truncate", action="store_true", help="cut prompts longer than the context from the left")
    parser.add_argument("--strategy", choices=STRATEGIES, default="base",
                        help="decoding: base (the model alone), or with a RecycleGPT checkpoint's recyclable module "
                             "alternating (module and full model take turns; lossy) or verified (the module drafts, "
                             "the full model checks: greedy output identical to base)")
    kcache = parser.add_argument_group("KCache (keys in fast memory, values offloaded, each decode step fetches "
                                       "the top-N values per head; see ppzoo/inference/kcache.py)")
    kcache.add_argument("--kcache-top-n", default=None,
                        help="enable KCache with this many value rows per head and step: a count (64) or a fraction "
                             "of the positions so far (0.125)")
    kcache.add_argument("--kcache-dense-layers", type=int, default=KCacheConfig.dense_layers,
                        help="the first this many layers keep a dense cache")
    kcache.add_argument("--kcache-renormalize", action="store_true", help="rescale the selected weights to sum to 1")
    vilg = parser.add_argument_group("ERNIE-ViLG checkpoints (prompts are captions; --top-k / --temperature "
                                     "sample image codes, 0 meaning 32 / 1.0)")
    vilg.add_argument("--out", help="output directory: ERNIE-ViLG's PNGs (default <checkpoint>/samples), HelixFold's "
                                    "predictions (see below)")
    vilg.add_argument("--candidates", type=int, default=4,
                      help="images sampled per caption, reranked by the model's image-to-text likelihood")
    vilg.add_argument("--beam", type=int, default=1, help="captioning beam size (1: greedy)")
    folding = parser.add_argument_group("HelixFold checkpoints (--fold FILE; ranked_*.pdb with pLDDT B-factors, "
                                        "ranking.json, prediction.json and plddt.png go to --out, default "
                                        "<checkpoint>/predictions/<name>)")
    folding.add_argument("--recycles", type=int, default=None, help="recycling iterations (default Model.num_recycle)")
    folding.add_argument("--chunk-size", type=int, default=None,
                         help="attention and transitions over this many rows at a time: lower peak memory, same result")
    folding.add_argument("--num-predictions", type=int, default=1,
                         help="predictions with different MSA samples, ranked by mean pLDDT")
    folding.add_argument("--dap-degree", type=int, default=1,
                         help="dynamic axial parallelism: split the Evoformer over this many processes launched "
                              "with paddle.distributed.launch (all of them)")
    titan = parser.add_argument_group("ERNIE Titan checkpoints (controllable generation; any attribute may be left out)")
    titan.add_argument("--topic", help="topic attribute, e.g. a stdlib package (asyncio) or a pydoc title")
    titan.add_argument("--keywords", help="comma-separated keywords the text should contain")
    titan.add_argument("--sentiment", choices=("positive", "negative", "neutral"))
    titan.add_argument("--length", type=int, help="about this many words")
    titan.add_argument("--genre", choices=("prose", "code"), help="soft genre prompt")
    titan.add_argument("--rerank", type=int, default=1,
                       help="sample this many candidates and order them by the credibility discriminator")
    titan.add_argument("--context", help="a text file the generation module reads first (recurrence memory)")
    return parser.parse_args(argv)


def run_vilg(args):
    """ERNIE-ViLG: text-to-image (PNG files written here) or captioning of --image files."""
    import numpy as np
    from PIL import Image

    from ppzoo.data.images import load_image_file, to_uint8
    from ppzoo.models.ernie_vilg import ImageSampling, caption_images, load_vilg_for_inference, text_to_image

    module, _ = load_vilg_for_inference(args.ckpt)
    if args.image:
        images = np.stack([load_image_file(path) for path in args.image])
        captions = caption_images(module, images, beam_size=args.beam)
        for path, caption in zip(args.image, captions):
            print(f"{path}: {caption}")
        outputs = [{"image": path, "caption": caption} for path, caption in zip(args.image, captions)]
        print_result({"checkpoint": args.ckpt, "outputs": outputs})
        return 0
    sampling = ImageSampling(top_k=args.top_k or 32, temperature=args.temperature or 1.0,
                             num_candidates=args.candidates, seed=args.seed or 0)
    prompts = read_prompts(args)
    result = text_to_image(module, prompts, sampling)
    out = Path(args.out or Path(args.ckpt) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    outputs = []
    for i, (prompt, image, score) in enumerate(zip(prompts, to_uint8(result["images"]), result["scores"])):
        path = out / f"{i:03d}_{'_'.join(prompt.split())[:60]}.png"
        Image.fromarray(image).save(path)
        print(f"{prompt} -> {path} (log p(caption | image) {score:.2f}, best of {args.candidates})")
        outputs.append({"prompt": prompt, "image": str(path), "caption_log_likelihood": float(score)})
    print_result({"checkpoint": args.ckpt, "outputs": outputs})
    return 0


def kcache_config(args):
    """KCacheConfig from the --kcache-* flags (None without --kcache-top-n: the dense cache)."""
    if args.kcache_top_n is None:
        return None
    return KCacheConfig(top_n=parse_top_n(args.kcache_top_n), dense_layers=args.kcache_dense_layers,
                        renormalize=args.kcache_renormalize)


def run_titan(args):
    """ERNIE Titan: controllable generation (attributes, genre prompt, context as recurrence memory),
    candidates reranked by the credibility discriminator."""
    from ppzoo.data.ernie_tasks import GENRES
    from ppzoo.models.ernie_titan import controllable_generate

    module, tokenizer, _ = load_checkpoint_for_inference(args.ckpt)
    lm = module.language_model()
    # Memory: the genre's soft prompt first, then the context read after it, segment by segment.
    lm.memory = lm.genre_memory(GENRES.index(args.genre)) if args.genre else None
    if args.context:
        context = Path(args.context)
        if not context.is_file():
            raise PpzooError(f"--context {context}: no such file (expected a text file to read as memory).")
        lm.memory = lm.read_context([tokenizer.encode(context.read_text(encoding="utf-8"))], lm.memory)
    if args.rerank < 1:
        raise PpzooError(f"--rerank must be a number of candidates >= 1, got {args.rerank}.")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_strings=args.stop,
                              seed=args.seed)
    keywords = [k.strip() for k in args.keywords.split(",") if k.strip()] if args.keywords else None
    outputs = []
    for prompt in read_prompts(args):  # --prompt "": the attributes alone
        candidates = controllable_generate(
            lm, tokenizer, prompt, topic=args.topic, keywords=keywords, sentiment=args.sentiment, length=args.length,
            sampling=sampling, num_candidates=args.rerank,
            rerank=args.rerank > 1, cls_id=tokenizer.token_to_id("[CLS]"),
            cache_factory=cache_factory(kcache_config(args)))
        print(f"\n>>> {prompt}")
        for rank, candidate in enumerate(candidates):
            score = f" (credibility {candidate['credibility']:.3f})" if "credibility" in candidate else ""
            print(f"[{rank}]{score} {prompt}{candidate['text']}")
        outputs.append({"prompt": prompt, "completion": candidates[0]["text"], "candidates": candidates})
    print_result({"checkpoint": args.ckpt, "outputs": outputs})
    return 0


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


def run_folding(args):
    """HelixFold: fold --fold FILE and write the structures, their confidence and its plot."""
    from ppzoo.inference.folding import FoldingOptions, fold_file

    source = args.ckpt or args.model  # a checkpoint (eager) or an exported folding program
    if args.fold is None:
        raise PpzooError(f"{source} is a HelixFold model: give the protein to fold with --fold FILE "
                         "(FASTA, features .npz or PDB/mmCIF).")
    name = Path(args.fold).name.split(".")[0]
    out = args.out or str(Path(source) / "predictions" / name)
    options = FoldingOptions(recycles=args.recycles, chunk_size=args.chunk_size, num_predictions=args.num_predictions,
                             dap_degree=args.dap_degree)
    if args.dap_degree > 1:  # the launched processes form the axial-parallel group(s)
        import paddle

        from ppzoo.config.schema import DistributedConfig
        from ppzoo.distributed.env import init_parallel_env

        world = paddle.distributed.get_world_size()
        init_parallel_env(DistributedConfig(dp_degree=world), "gpu" if paddle.is_compiled_with_cuda() else "cpu")
    result = fold_file(source, args.fold, out, options)
    if "files" not in result:  # not the first process of an axial-parallel run: it wrote nothing
        return 0
    print(f"{result['name']}: {len(result['sequence'])} residues, mean pLDDT {result['mean_plddt']:.1f} "
          f"(best of {args.num_predictions}); wrote {result['files']['pdb'][0]}, {result['files']['json']}, "
          f"{result['files']['png']}")
    print_result({"checkpoint": source, **{k: v for k, v in result.items() if k != "plddt"}})
    return 0


def exported_generator(model, tokenizer, strategy, model_dir):
    """The generator of an exported text model: RecycleGPT's (any strategy), or the plain Generator."""
    from ppzoo.inference.export_families import ExportedRecycleGPT, ExportedTitanLM
    from ppzoo.inference.recycle import RecycleGenerator

    if isinstance(model, ExportedRecycleGPT):
        if strategy == "base":
            return Generator(model.lm, tokenizer, cache_factory=ExportedKVCache)
        return RecycleGenerator(model, tokenizer, strategy, cache_factory=ExportedKVCache)
    if strategy != "base":
        raise PpzooError(f"--strategy {strategy} needs a RecycleGPT model; {model_dir} is not one.")
    if isinstance(model, ExportedTitanLM):
        model.vocab_limit = tokenizer.vocab_size  # as controllable_generate: ids beyond the tokenizer never come out
    elif not isinstance(model, ExportedLanguageModel):
        raise PpzooError(f"{model_dir} is an exported {model.metadata['kind']} model, which does not generate text "
                         "token by token; load it with ppzoo.inference.load_exported in Python.")
    if tokenizer is None:
        raise PpzooError(f"{model_dir} has no tokenizer.json; export the model again")
    return Generator(model, tokenizer, cache_factory=ExportedKVCache)


def main(argv=None):
    args = parse_args(argv)
    if args.ckpt is not None and checkpoint_module_name(args.ckpt) == "HelixFold":
        return run_folding(args)
    if args.model is not None and is_exported_folding_model(args.model):
        return run_folding(args)
    if args.fold is not None:
        raise PpzooError("--fold folds a protein with a HelixFold checkpoint (--ckpt); this model is not one.")
    if args.ckpt is not None and checkpoint_module_name(args.ckpt) == "ErnieViLG":
        return run_vilg(args)
    if args.ckpt is not None and checkpoint_module_name(args.ckpt) == "ErnieTitan":
        return run_titan(args)
    titan_flags = [flag for flag, value in (("--topic", args.topic), ("--keywords", args.keywords),
                   ("--sentiment", args.sentiment), ("--length", args.length), ("--genre", args.genre),
                   ("--context", args.context), ("--rerank", args.rerank != 1)) if value]
    if titan_flags:
        raise PpzooError(f"{', '.join(titan_flags)} apply to ERNIE Titan checkpoints (--ckpt); this model is not one.")
    if args.image:
        raise PpzooError("--image captions images with an ERNIE-ViLG checkpoint (--ckpt); this model is not one.")
    prompts = read_prompts(args)
    if args.model is not None:
        if args.kcache_top_n is not None:
            raise PpzooError("--kcache-top-n runs from a checkpoint (--ckpt): an exported model keeps its attention "
                             "and cache inside the program, where no cache policy can plug in.")
        model, tokenizer, _ = load_exported(args.model)
        generator = exported_generator(model, tokenizer, args.strategy, args.model)
        source = {"model": args.model, "strategy": args.strategy}
    else:
        module, tokenizer, cfg = load_checkpoint_for_inference(args.ckpt)
        if tokenizer is None:
            raise PpzooError(f"{args.ckpt} has no tokenizer.json; it was trained without Data.tokenizer.")
        # Keys/values written in place rather than concatenated every step (see ppzoo/inference/cache.py).
        generator = make_generator(module, tokenizer, args.strategy, cache_factory=cache_factory(kcache_config(args)))
        source = {"checkpoint": args.ckpt, "strategy": args.strategy}
        if args.kcache_top_n is not None:
            source["kcache"] = kcache_config(args).describe()
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
