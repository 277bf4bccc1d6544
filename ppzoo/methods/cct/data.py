"""Code instruction data from the standard library, with no download: the instruction-tuning samples, CCT's
comparison pairs and its sequence-level bug-fix samples.

Functions come from the standard library's sources that the built-in corpus reads (ppzoo.data.corpus),
each normalized by ast.unparse without its docstring and decorators (its first docstring line, if any, is
kept as a summary) and deduplicated by code. Held out for evaluation (`is_heldout`): the functions of the
corpus's validation files and 1 in 20 of the others by a stable hash; the rest train.

Samples use one prompt format (ppzoo.eval.humanevalfix.harness.instruction_prompt):
  * instruction tuning: one of INSTRUCTION_TEMPLATES (our own wording) asks for the function, the response
    is its code;
  * sequence level (CCT): "Fix bugs in {name}." after an injected-bug copy, the response is the original;
  * token level (CCT): the same instruction sample twice, once with the original response and once with the
    erroneous one, with the span [first differing token, longer length) that the hinge loss compares.

Rows: each row (index i, seeded by (seed, i)) packs whole samples into seq_len tokens (doc_ids keep them
apart; labels only on responses and their eos); CCT rows add a packed row of fix samples and
`pairs_per_row` comparison pairs. Any training function that shares a 13-token run with HumanEval /
HumanEvalFix (ppzoo.methods.cct.overlap) is dropped before sampling.
"""
import ast
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ppzoo.data.corpus import SPLITS, builtin_documents
from ppzoo.errors import DataError
from ppzoo.eval.humanevalfix.harness import fix_instruction, instruction_prompt
from ppzoo.methods.cct.inject import BUG_TYPES, inject
from ppzoo.methods.cct.overlap import OverlapIndex
from ppzoo.registry import register_dataset

INSTRUCTION_TEMPLATES = (
    "Write a Python function `{signature}`.{summary}",
    "Implement {name} in Python. Its signature is:\n{def_line}{summary}",
    "Complete this function so that it works:\n{def_line}\n    ...",
    "Give the code of the function {name}.{summary}",
)
MIN_LINES, MAX_LINES = 3, 16
FUNCTION_SPLITS = ("train", "heldout")
HELDOUT_ONE_IN = 20


@dataclass(frozen=True)
class Function:
    name: str
    code: str  # normalized: ast.unparse, without docstring and decorators
    def_line: str  # "def name(args):"
    summary: str  # first line of the docstring, or ""
    source: str  # "stdlib:<path>"


def _strip(node):
    """Remove `node`'s decorators and docstring (in place); returns the docstring's first line or ""."""
    node.decorator_list = []
    doc = ast.get_docstring(node)
    if doc is not None:
        node.body = node.body[1:] or [ast.Pass()]
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""


_NESTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.Yield, ast.YieldFrom)


def _functions_in(text, origin, max_chars):
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        # Cheap size filter on the raw span first (a docstring may take some lines): unparsing is the cost.
        if node.end_lineno - node.lineno + 1 > MAX_LINES + 30:
            continue
        if any(isinstance(inner, _NESTED) for inner in ast.walk(node) if inner is not node):
            continue  # keep plain functions: no nested definitions, lambdas or generators
        name = node.name
        summary = _strip(node)
        if isinstance(node.body[0], ast.Pass):
            continue
        code = ast.unparse(node)
        lines = code.count("\n") + 1
        if not MIN_LINES <= lines <= MAX_LINES or len(code) > max_chars:
            continue
        def_line = code.splitlines()[0]
        yield Function(name, code, def_line, summary if len(summary) <= 120 else "", origin)


def is_heldout(function, corpus_split):
    """Held out: every function of a validation-split file, and 1 in HELDOUT_ONE_IN of the others (by a
    stable hash of the code), so the held-out set is large enough to measure on."""
    digest = int(hashlib.sha256(f"cct-heldout:{function.code}".encode("utf-8")).hexdigest()[:12], 16)
    return corpus_split == "validation" or digest % HELDOUT_ONE_IN == 0


def _scan(max_chars):
    """Yield (function, held out?) for every stdlib function, deduplicated by code, in corpus order."""
    seen = set()
    for corpus_split in SPLITS:
        for name, text in builtin_documents(corpus_split):
            if not name.startswith("stdlib:"):
                continue
            for function in _functions_in(text, name, max_chars):
                if function.code not in seen:
                    seen.add(function.code)
                    yield function, is_heldout(function, corpus_split)


@functools.lru_cache(maxsize=2)
def _all_functions(max_chars):
    return tuple(_scan(max_chars))


def stdlib_functions(split, max_chars=500, max_functions=None):
    """The plain functions of the standard library's sources in `split` ("train" or "heldout"), in corpus
    order; the first max_functions of them (which reads only as many files as needed) or all (scanned once
    per process)."""
    if split not in FUNCTION_SPLITS:
        raise DataError(f"function split {split!r} is unknown; use one of: {', '.join(FUNCTION_SPLITS)}.")
    wanted = split == "heldout"
    if max_functions is None:
        return tuple(f for f, heldout in _all_functions(max_chars) if heldout == wanted)
    found = []
    for function, heldout in _scan(max_chars):
        if heldout == wanted:
            found.append(function)
            if len(found) >= max_functions:
                break
    return tuple(found)


def decontaminate(functions, index):
    """(kept functions, dropped functions) by the overlap index."""
    kept, dropped = [], []
    for function in functions:
        (dropped if index.overlaps(function.code) else kept).append(function)
    return kept, dropped


def generation_instruction(function, rng):
    template = INSTRUCTION_TEMPLATES[rng.integers(len(INSTRUCTION_TEMPLATES))]
    signature = function.def_line[len("def "):].rstrip(":")
    summary = f" {function.summary}" if function.summary and "{summary}" in template else ""
    return template.format(signature=signature, name=function.name, def_line=function.def_line, summary=summary)


class SampleTokenizer:
    """Tokenizes (prompt, response) pairs into ids with labels on the response and its eos."""

    def __init__(self, tokenizer):
        if tokenizer.eos_id is None:
            raise DataError("code instruction data needs a tokenizer with an end-of-sequence token.")
        self.tokenizer = tokenizer
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id

    def sample(self, prompt, response):
        """(ids, is_label) of bos + prompt + response + eos; labels on response and eos."""
        prompt_ids = self.bos + self.tokenizer.encode(prompt)
        response_ids = self.tokenizer.encode(response) + [self.tokenizer.eos_id]
        return prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)


def pack_row(samples, seq_len, pad_id):
    """input_ids, labels, doc_ids of one row from (ids, is_label) samples (those that fit, in order)."""
    total = seq_len + 1
    ids, targets, docs = [], [], []
    for number, (sample_ids, is_label) in enumerate(samples):
        if len(ids) + len(sample_ids) > total:
            break
        ids += sample_ids
        targets += is_label
        docs += [number] * len(sample_ids)
    rest = total - len(ids)
    ids += [pad_id] * rest
    targets += [False] * rest
    docs += [len(set(docs))] * rest
    ids, targets, docs = np.array(ids, dtype=np.int64), np.array(targets), np.array(docs, dtype=np.int32)
    labels = np.where(targets[1:] & (docs[1:] == docs[:-1]), ids[1:], -100)
    return ids[:-1], labels.astype(np.int64), docs[:-1]


def first_difference(a, b):
    """Index of the first position where token lists a and b differ (the shorter's length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


@dataclass
class CodeInstructionsConfig:
    split: str = "train"  # train | heldout (see is_heldout)
    num_samples: int = 2000  # rows
    comparison: bool = False  # CCT: add fix samples (fix_*) and comparison pairs (chosen / rejected)
    pairs_per_row: int = 2
    pair_len: int = 192  # tokens of a comparison sequence (longer pairs are skipped)
    max_code_chars: int = 500
    max_functions: Optional[int] = None  # None: every eligible function
    # HumanEval / HumanEvalFix file whose prompts and solutions no training text may overlap (null: no check)
    decontaminate_against: Optional[str] = "../shared/data/humanevalfix/humanevalpack_python.jsonl"
    seed: int = 0


@register_dataset()
class CodeInstructions:
    """Instruction tuning on stdlib functions; with `comparison`, CCT's fix samples and comparison pairs."""

    config_class = CodeInstructionsConfig

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        return cls(args if args is not None else CodeInstructionsConfig(), tokenizer, seq_len)

    def __init__(self, args, tokenizer, seq_len):
        if args.num_samples < 1 or args.pairs_per_row < 1 or args.pair_len < 16:
            raise DataError(f"CodeInstructions needs num_samples >= 1, pairs_per_row >= 1 and pair_len >= 16; got "
                            f"{args.num_samples}, {args.pairs_per_row}, {args.pair_len}.")
        self.args = args
        self.seq_len = int(seq_len)
        self.tokens = SampleTokenizer(tokenizer)
        functions = stdlib_functions(args.split, args.max_code_chars, args.max_functions)
        self.dropped = []
        if args.decontaminate_against:
            if not Path(args.decontaminate_against).is_file():
                raise DataError(
                    f"CodeInstructions.decontaminate_against={args.decontaminate_against} does not exist (resolved "
                    "from the working directory). Point it at humanevalpack_python.jsonl, or set it to null to "
                    "train without the overlap check.")
            functions, self.dropped = decontaminate(functions, OverlapIndex.from_humanevalfix(args.decontaminate_against))
        if not functions:
            raise DataError(f"CodeInstructions found no eligible functions in the {args.split} split.")
        self.functions = tuple(functions)
        self.name = f"CodeInstructions({args.split}, {len(self.functions)} functions" + \
            (", comparison)" if args.comparison else ")")

    def __len__(self):
        return self.args.num_samples

    # ------------------------------------------------------------------------------------------ samples
    def _function(self, rng):
        return self.functions[rng.integers(len(self.functions))]

    def instruction_sample(self, function, rng):
        return self.tokens.sample(instruction_prompt(generation_instruction(function, rng)), function.code)

    def variant(self, function, rng):
        """An injected-bug variant of `function` (bug type drawn uniformly among those it has), or None."""
        types = list(BUG_TYPES)
        rng.shuffle(types)
        seed = int(rng.integers(1 << 30))
        for bug_type in types[:3]:
            variant = inject(function.code, bug_type, seed=seed)
            if variant is not None:
                return variant
        return None

    def fix_sample(self, function, rng):
        variant = self.variant(function, rng)
        if variant is None:
            return None
        return self.tokens.sample(instruction_prompt(fix_instruction(variant.buggy, function.name)), variant.original)

    def pair(self, function, rng):
        """(chosen ids, rejected ids, first difference, longer length) for the instruction sample of
        `function` with its original and an erroneous response, or None when it does not fit pair_len."""
        variant = self.variant(function, rng)
        if variant is None:
            return None
        prompt = instruction_prompt(generation_instruction(function, rng))
        chosen, _ = self.tokens.sample(prompt, variant.original)
        rejected, _ = self.tokens.sample(prompt, variant.buggy)
        if max(len(chosen), len(rejected)) > self.args.pair_len:
            return None
        return chosen, rejected, first_difference(chosen, rejected), max(len(chosen), len(rejected))

    def _packed(self, make, rng):
        samples, size, tries = [], 0, 0
        while size < self.seq_len and tries < 64:
            tries += 1
            sample = make(self._function(rng), rng)
            if sample is None or len(sample[0]) > self.seq_len + 1:
                continue
            if size + len(sample[0]) > self.seq_len + 1:
                break
            samples.append(sample)
            size += len(sample[0])
        return pack_row(samples, self.seq_len, self.tokens.pad_id)

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {self.name} with {len(self)} rows")
        rng = np.random.default_rng([self.args.seed, index])
        input_ids, labels, doc_ids = self._packed(self.instruction_sample, rng)
        row = {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}
        if not self.args.comparison:
            return row
        row["fix_input_ids"], row["fix_labels"], row["fix_doc_ids"] = self._packed(self.fix_sample, rng)
        length, pad = self.args.pair_len, self.tokens.pad_id
        chosen = np.full((self.args.pairs_per_row, length), pad, dtype=np.int64)
        rejected = np.full_like(chosen, pad)
        span = np.zeros((self.args.pairs_per_row, 2), dtype=np.int64)
        filled, tries = 0, 0
        while filled < self.args.pairs_per_row:
            tries += 1
            if tries > 64 * self.args.pairs_per_row:
                raise DataError(f"{self.name}: no comparison pair fits pair_len={self.args.pair_len} tokens in "
                                f"{tries} tries; raise pair_len or lower max_code_chars.")
            pair = self.pair(self._function(rng), rng)
            if pair is None:
                continue
            a, b, start, end = pair
            chosen[filled, :len(a)], rejected[filled, :len(b)], span[filled] = a, b, (start, end)
            filled += 1
        row.update(chosen_ids=chosen, rejected_ids=rejected, pair_span=span)
        return row

    def __repr__(self):
        return f"<{self.name}: {len(self)} rows, seq_len {self.seq_len}>"
