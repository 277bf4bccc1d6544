"""The models the service holds, one wrapper a kind, over ppzoo's public inference API:

- TextModel: a causal LM (ChuXin, CCT, RecycleGPT, MoE, ... checkpoint, or an exported ChuXin) for /generate
  and /codefix, decoded by ppzoo.inference.Generator (RecycleGPT strategies, KCache as options);
- VilgModel: ERNIE-ViLG text-to-image and captioning;
- FoldingModel: HelixFold, FASTA text in, PDB and per-residue pLDDT out.

Every method here runs on the scheduler's single worker thread (Paddle on CPU uses every core for one op).
"""
import ast
import base64
import io
import os
from dataclasses import dataclass

from ppzoo.errors import CheckpointError, DataError, PpzooError
from ppzoo.inference import Generator, SamplingConfig, load_checkpoint_for_inference
from ppzoo.inference.kcache import KCacheConfig, cache_factory
from ppzoo.inference.recycle import STRATEGIES, make_generator


@dataclass(frozen=True)
class DecodeOptions:
    """Everything that decides how a batch decodes: requests with equal options share one batched decode."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple = ()
    seed: int = None
    strategy: str = "base"
    kcache_top_n: float = None  # None: dense cache; a count (>= 1) or a fraction of the positions so far

    def sampling(self):
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty,
                              stop_strings=list(self.stop), seed=self.seed)

    def kcache(self):
        if self.kcache_top_n is None:
            return None
        top_n = int(self.kcache_top_n) if self.kcache_top_n >= 1 else float(self.kcache_top_n)
        return KCacheConfig(top_n=top_n)


class TextModel:
    kind = "text"

    def __init__(self, name, source, module=None, tokenizer=None, exported_model=None, module_name=None):
        self.name, self.source = name, source
        self.module, self.tokenizer = module, tokenizer
        self.exported_model = exported_model
        self.module_name = module_name or ("exported" if exported_model is not None else type(module).__name__)
        self._generators = {}

    @property
    def strategies(self):
        if self.exported_model is not None:
            return ["base"]
        return [s for s in STRATEGIES if s == "base" or hasattr(self.module, "recyclable_model")]

    @property
    def supports_kcache(self):
        return self.exported_model is None  # an exported program keeps its cache inside the program

    def describe(self):
        return {"name": self.name, "kind": self.kind, "module": self.module_name, "source": self.source,
                "tasks": ["generate", "codefix"], "strategies": self.strategies, "kcache": self.supports_kcache,
                "max_length": self.generator(DecodeOptions()).max_length}

    def generator(self, options: DecodeOptions):
        key = (options.strategy, options.kcache_top_n)
        if key not in self._generators:
            if self.exported_model is not None:
                from ppzoo.inference.predictor import ExportedKVCache

                self._generators[key] = Generator(self.exported_model, self.tokenizer, cache_factory=ExportedKVCache)
            else:
                self._generators[key] = make_generator(self.module, self.tokenizer, options.strategy,
                                                       cache_factory=cache_factory(options.kcache()))
        return self._generators[key]

    def check(self, prompt, options: DecodeOptions):
        """Refuse, before queueing, what the decode would fail on (so one bad request never fails a batch)."""
        if options.strategy not in self.strategies:
            raise PpzooError(f"model {self.name!r} ({self.module_name}) decodes with strategies "
                             f"{', '.join(self.strategies)}; {options.strategy!r} needs a RecycleGPT checkpoint.")
        if options.kcache_top_n is not None and not self.supports_kcache:
            raise PpzooError(f"model {self.name!r} is an exported program: KCache needs a checkpoint.")
        options.sampling().check()
        generator = self.generator(options)
        ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.bos_id is not None)
        if not ids:
            raise PpzooError("the prompt is empty: there is nothing to continue from.")
        if generator.max_length is not None and len(ids) + options.max_new_tokens > generator.max_length:
            raise PpzooError(f"the prompt has {len(ids)} tokens; with max_new_tokens={options.max_new_tokens} that "
                             f"exceeds model {self.name!r}'s context of {generator.max_length} tokens. Shorten the "
                             "prompt or lower max_new_tokens.")

    def stream(self, prompts, options: DecodeOptions):
        """Per decoding step, each prompt's newly decoded text (Generator.stream over the batch)."""
        return self.generator(options).stream(prompts, options.sampling())

    def count_tokens(self, text):
        return len(self.tokenizer.encode(text, add_bos=False)) if text else 0


# ------------------------------------------------------------------------------------------------ code fixing
def codefix_prompt(code, entry_point=None, tests=None):
    """(prompt, declaration, entry point) of a HumanEvalFix-style request: the buggy function (and tests),
    "Fix bugs in f.", then the response starting with f's declaration (its lines before the body), which the
    model continues with a new body (ppzoo.eval.humanevalfix's prompt format)."""
    from ppzoo.eval.humanevalfix.harness import fix_instruction, instruction_prompt

    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise DataError(f"the code does not parse as Python (line {exc.lineno}: {exc.msg}); give the buggy function "
                        "as valid Python.") from None
    functions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if entry_point is not None:
        functions = [f for f in functions if f.name == entry_point]
    if not functions:
        raise DataError(f"the code has no top-level function{' named ' + repr(entry_point) if entry_point else ''}; "
                        "give a function definition to fix.")
    function = functions[0]
    lines = code.splitlines(keepends=True)
    # Everything before the function (imports) and its header up to the first body statement.
    declaration = "".join(lines[: function.body[0].lineno - 1])
    if not declaration.endswith("\n"):
        declaration += "\n"
    prompt = instruction_prompt(fix_instruction(code, function.name, tests), declaration)
    return prompt, declaration, function.name


# ------------------------------------------------------------------------------------------------ ERNIE-ViLG
def png_base64(image_uint8_hwc):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_uint8_hwc).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VilgModel:
    kind = "vilg"

    def __init__(self, name, source, module):
        self.name, self.source, self.module = name, source, module

    def describe(self):
        return {"name": self.name, "kind": self.kind, "module": "ErnieViLG", "source": self.source,
                "tasks": ["text-to-image", "caption"], "image_size": self.module.config.vqvae.image_size}

    def text_to_image(self, prompt, candidates, top_k, temperature, seed):
        from ppzoo.data.images import to_uint8
        from ppzoo.models.ernie_vilg import ImageSampling, text_to_image

        result = text_to_image(self.module, [prompt], ImageSampling(top_k=top_k, temperature=temperature,
                                                                   num_candidates=candidates, seed=seed))
        image = to_uint8(result["images"])[0]  # [H, W, 3]
        return {"png_base64": png_base64(image),
                "caption_log_likelihood": float(result["scores"][0]), "candidates": candidates}

    def caption(self, image_bytes, beam):
        from ppzoo.data.images import load_image_file
        from ppzoo.models.ernie_vilg import caption_images

        from PIL import Image, UnidentifiedImageError

        try:  # checked here so the error names the request's field rather than an in-memory file object
            with Image.open(io.BytesIO(image_bytes)) as probe:
                probe.verify()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"image_base64 does not hold a readable PNG or JPEG image ({exc}).") from None
        image = load_image_file(io.BytesIO(image_bytes), size=self.module.config.vqvae.image_size)
        return {"caption": caption_images(self.module, image[None], beam_size=beam)[0]}


# ------------------------------------------------------------------------------------------------ HelixFold
class FoldingModel:
    kind = "folding"

    def __init__(self, name, source, cfg, predict_fn, recycles):
        self.name, self.source = name, source
        self.cfg, self.predict_fn, self.default_recycles = cfg, predict_fn, recycles

    def describe(self):
        return {"name": self.name, "kind": self.kind, "module": "HelixFold", "source": self.source,
                "tasks": ["fold"], "recycles": self.default_recycles}

    def fold(self, fasta, recycles=None, num_predictions=1, max_residues=None):
        from ppzoo.data.protein.pdb_writer import to_pdb
        from ppzoo.data.protein.raw_features import check_sequence, read_fasta, single_sequence_features
        from ppzoo.inference.folding import FoldingOptions, fold

        text = fasta if fasta.lstrip().startswith(">") else ">query\n" + fasta  # a bare sequence is accepted
        description, sequence = read_fasta(text, from_text=True)[0]
        sequence = check_sequence(sequence.upper(), where=f"FASTA record {description!r}")
        if max_residues is not None and len(sequence) > max_residues:
            raise DataError(f"the sequence has {len(sequence)} residues; this server folds at most {max_residues}.")
        name = (description.split() or ["query"])[0][:40]
        options = FoldingOptions(recycles=self.default_recycles if recycles is None else recycles,
                                 num_predictions=num_predictions)
        best = fold(self.predict_fn, self.cfg, single_sequence_features(sequence), name, options)[0]
        return {"name": name, "sequence": sequence, "pdb": to_pdb(best["protein"]),
                "plddt": [round(float(v), 2) for v in best["plddt"]], "mean_plddt": best["mean_plddt"],
                "recycles": options.recycles}


# ------------------------------------------------------------------------------------------------ loading
def load_model(spec):
    """The wrapper of one config entry (ModelSpec), by what its checkpoint or export holds."""
    path = spec.path
    if not os.path.exists(path):
        raise CheckpointError(f"model {spec.name!r}: {path} does not exist. Train it (tools/train.py) or export it "
                              "(tools/export.py), or fix the path in the serve config.")
    if spec.export is not None:
        from ppzoo.inference.folding_export import ExportedFolder, is_exported_folding_model
        from ppzoo.inference.predictor import load_exported

        if is_exported_folding_model(path):
            folder = ExportedFolder(path)
            return FoldingModel(spec.name, path, folder.cfg, folder.predict, folder.recycles)
        model, tokenizer, _ = load_exported(path)
        return TextModel(spec.name, path, tokenizer=tokenizer, exported_model=model)
    from ppzoo.inference.loading import checkpoint_module_name

    module_name = checkpoint_module_name(path)
    if module_name == "HelixFold":
        from ppzoo.inference.folding import load_folding_checkpoint, predict

        module, cfg = load_folding_checkpoint(path)
        return FoldingModel(spec.name, path, cfg, lambda example, recycles: predict(module, example, recycles),
                            cfg.Model.num_recycle)
    if module_name == "ErnieViLG":
        from ppzoo.models.ernie_vilg import load_vilg_for_inference

        module, _ = load_vilg_for_inference(path)
        return VilgModel(spec.name, path, module)
    module, tokenizer, _ = load_checkpoint_for_inference(path)
    if tokenizer is None:
        raise CheckpointError(f"model {spec.name!r}: {path} has no tokenizer.json (trained without Data.tokenizer), "
                              "so it cannot serve text.")
    return TextModel(spec.name, path, module=module, tokenizer=tokenizer, module_name=module_name)
