"""Nebula-I data: one "language" per cluster for pretraining, and an English -> code translation task.

* BuiltinLanguage: the built-in corpus restricted to one language: `english` (the pydoc topics, prose) or
  `code` (the standard library's Python sources). Cluster A pretrains on one, cluster B on the other, like
  Nebula-I's clusters each holding their own language's data.
* DocToSignature: translation pairs built from the standard library with `ast` (nothing imported, nothing
  downloaded): the source sentence is the first line of a function's docstring (English), the target is the
  function's signature (`def name(arguments):`, Python). Why this pair: it is a real mapping between the two
  pretraining languages, built deterministically from what ships with Python, with a held-out split by file;
  a model must read the English to produce the name and arguments, which pure copying cannot do.
  Sample layout (one per window): `English: <doc>\nPython: <signature><eos><pad...>`; labels are -100 on the
  prompt and padding, so the loss is on the translation only.
"""
import ast
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ppzoo.data.corpus import builtin_documents
from ppzoo.data.datasets import PackedLMDataset, _require_eos, pack_documents, tokenize_texts
from ppzoo.errors import DataError
from ppzoo.registry import register_dataset

LANGUAGES = {"english": "pydoc:", "code": "stdlib:"}
IGNORE = -100


def language_texts(language, split, max_chars=None):
    if language not in LANGUAGES:
        raise DataError(f"BuiltinLanguage language {language!r} is unknown; use one of: {', '.join(LANGUAGES)}.")
    total = 0
    for name, text in builtin_documents(split):
        if name.startswith(LANGUAGES[language]):
            yield text
            total += len(text)
            if max_chars is not None and total >= max_chars:
                return


@dataclass
class BuiltinLanguageConfig:
    language: str = "english"  # english (pydoc topics) | code (stdlib sources)
    split: str = "train"
    max_chars: Optional[int] = None


@register_dataset()
class BuiltinLanguage(PackedLMDataset):
    """One language of the built-in corpus, packed into windows (see the module docstring)."""

    config_class = BuiltinLanguageConfig

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        args = args if args is not None else BuiltinLanguageConfig()
        _require_eos(tokenizer.eos_id)
        stream = pack_documents(tokenize_texts(tokenizer, language_texts(args.language, args.split, args.max_chars)),
                                tokenizer.eos_id)
        if stream.size <= seq_len:
            raise DataError(f"BuiltinLanguage({args.language}, {args.split}) has only {stream.size} tokens; raise "
                            f"max_chars above {args.max_chars} or lower Data.seq_len below {seq_len}.")
        return cls.from_stream(stream, seq_len, tokenizer.eos_id, name=f"BuiltinLanguage({args.language}, {args.split})")


def doc_signature_pairs(split, max_pairs=None):
    """(first docstring line, `def name(args):`) of the public functions in the stdlib sources of `split`."""
    pairs = []
    for name, text in builtin_documents(split):
        if not name.startswith("stdlib:"):
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if not 10 <= len(line) <= 120:
                continue
            pairs.append((line, f"def {node.name}({ast.unparse(node.args)}):"))
            if max_pairs is not None and len(pairs) >= max_pairs:
                return pairs
    return pairs


@dataclass
class DocToSignatureConfig:
    split: str = "train"
    max_pairs: Optional[int] = None


@register_dataset()
class DocToSignature:
    """English docstring -> Python signature pairs, one per window, loss on the signature only."""

    config_class = DocToSignatureConfig

    def __init__(self, samples, name):
        self.samples, self.name = samples, name

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        args = args if args is not None else DocToSignatureConfig()
        eos = tokenizer.eos_id
        _require_eos(eos)
        samples = []
        for doc, signature in doc_signature_pairs(args.split, args.max_pairs):
            prompt = tokenizer.encode(f"English: {doc}\nPython:")
            target = tokenizer.encode(f" {signature}") + [eos]
            tokens = (prompt + target)[:seq_len + 1]
            if len(prompt) >= len(tokens):
                continue  # the docstring alone fills the window: nothing left to translate into
            ids = np.full(seq_len + 1, eos, dtype=np.int64)
            ids[:len(tokens)] = tokens
            labels = np.full(seq_len + 1, IGNORE, dtype=np.int64)
            labels[len(prompt):len(tokens)] = tokens[len(prompt):]
            samples.append({"input_ids": ids[:-1], "labels": labels[1:], "doc_ids": np.zeros(seq_len, np.int32)})
        if not samples:
            raise DataError(f"DocToSignature({args.split}) found no pairs; raise max_pairs or Data.seq_len.")
        return cls(samples, f"DocToSignature({args.split})")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]
