"""Packed language-model datasets.

Documents are tokenized, each is followed by eos, and all are concatenated into one token stream. Sample i
is the window stream[i*seq_len : i*seq_len + seq_len + 1]: inputs are its first seq_len tokens and labels its
last seq_len. Consecutive windows share their boundary token, so every stream token except the first is a
label exactly once and no token is wasted; the final partial window is dropped.

Each sample carries `doc_ids`, the document segment of every input position within the window (0 at
position 0, +1 on the token after each eos; an eos belongs to the document it ends). A model turns it into a
block-diagonal causal mask so tokens attend only within their own document.

Configs name datasets by their registered name; each registered class has a `config_class` dataclass of its
arguments and a `build(args, tokenizer, seq_len)` classmethod.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from ppzoo.data.corpus import SPLITS, builtin_texts
from ppzoo.errors import DataError
from ppzoo.registry import DATASETS, register_dataset

ENCODE_CHUNK_CHARS = 4_000_000  # texts are sent to the batch encoder in chunks of about this many characters
_STREAM_CACHE_ENTRIES = 4


def pack_documents(token_docs, eos_id):
    """One stream of all documents' tokens, each followed by eos_id. Empty documents are skipped."""
    pieces = []
    eos = np.array([eos_id], dtype=np.int64)
    for tokens in token_docs:
        if len(tokens) == 0:
            continue  # would only add a lone eos: a "document" with nothing in it
        pieces.append(np.asarray(tokens, dtype=np.int64))
        pieces.append(eos)
    if not pieces:
        return np.zeros(0, dtype=np.int32)
    stream = np.concatenate(pieces)
    # int32 halves the memory of large corpora; ids beyond its range would need int64.
    if stream.max() < np.iinfo(np.int32).max:
        stream = stream.astype(np.int32)
    return stream


def _require_eos(eos_id):
    if eos_id is None:
        raise DataError(
            "The tokenizer has no end-of-sequence token, which packing needs to separate documents. Use a "
            "tokenizer whose vocabulary has one of </s>, <|endoftext|>, <eos>, <|end_of_text|>, or name it "
            "as eos_token in a tokenizer_config.json next to tokenizer.json."
        )


class PackedLMDataset:
    """Map-style dataset of fixed-length windows over a packed token stream."""

    def __init__(self, token_docs, seq_len, eos_id, name=None):
        _require_eos(eos_id)
        self._init_from_stream(pack_documents(token_docs, eos_id), seq_len, eos_id, name)

    @classmethod
    def from_stream(cls, stream, seq_len, eos_id, name=None):
        """A dataset over an already packed stream (documents already followed by eos)."""
        _require_eos(eos_id)
        dataset = cls.__new__(cls)
        dataset._init_from_stream(np.asarray(stream), seq_len, eos_id, name)
        return dataset

    def _init_from_stream(self, stream, seq_len, eos_id, name):
        if seq_len < 1:
            raise DataError(f"seq_len must be at least 1, got {seq_len}.")
        self.stream = stream
        self.seq_len = int(seq_len)
        self.eos_id = int(eos_id)
        self.name = name or type(self).__name__
        if len(stream) < self.seq_len + 1:
            raise DataError(
                f"The dataset {self.name} is empty or too small: it has {len(stream)} tokens, but one sample "
                f"needs seq_len + 1 = {self.seq_len + 1}. Add more text (e.g. raise max_chars or add files), "
                f"or lower Data.seq_len."
            )
        self._num_samples = (len(stream) - 1) // self.seq_len

    @property
    def num_tokens(self):
        return len(self.stream)

    def __len__(self):
        return self._num_samples

    def __getitem__(self, index):
        index = int(index)
        if index < 0:
            index += self._num_samples
        if not 0 <= index < self._num_samples:
            raise IndexError(f"sample {index} out of range for {self.name} with {self._num_samples} samples")
        start = index * self.seq_len
        window = self.stream[start : start + self.seq_len + 1].astype(np.int64)
        input_ids = window[:-1]
        labels = window[1:]
        ends_document = input_ids == self.eos_id
        # The segment number rises on the token after an eos, so shift the running count right by one.
        doc_ids = np.zeros(self.seq_len, dtype=np.int32)
        doc_ids[1:] = np.cumsum(ends_document[:-1], dtype=np.int32)
        return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}

    def __repr__(self):
        return f"<{self.name}: {len(self)} samples, {self.num_tokens} tokens, seq_len {self.seq_len}>"


def _text_chunks(texts, chunk_chars=ENCODE_CHUNK_CHARS):
    """Group texts into lists of about chunk_chars characters, bounding the memory of one batch encode."""
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def tokenize_texts(tokenizer, texts):
    """Token id lists of `texts`, encoded in chunks by the tokenizer's parallel batch encoder."""
    for chunk in _text_chunks(texts):
        yield from tokenizer.encode_batch(chunk)


# In-process cache of packed built-in streams keyed by (tokenizer fingerprint, split, max_chars): the train
# and eval datasets, or repeated runs in one process (tests, notebooks), tokenize the corpus once.
_builtin_stream_cache = {}


def _builtin_stream(tokenizer, split, max_chars):
    key = (tokenizer.fingerprint(), split, max_chars)
    if key not in _builtin_stream_cache:
        if len(_builtin_stream_cache) >= _STREAM_CACHE_ENTRIES:
            _builtin_stream_cache.pop(next(iter(_builtin_stream_cache)))  # oldest first
        stream = pack_documents(tokenize_texts(tokenizer, builtin_texts(split, max_chars)), tokenizer.eos_id)
        stream.setflags(write=False)  # shared between datasets: nobody may modify it in place
        _builtin_stream_cache[key] = stream
    return _builtin_stream_cache[key]




@dataclass
class BuiltinCorpusConfig:
    split: str = "train"  # train | validation
    max_chars: Optional[int] = None  # use only the first max_chars characters of the split; None = all


@register_dataset()
class BuiltinCorpus(PackedLMDataset):
    """The built-in corpus (Python's own docs and stdlib sources; see ppzoo.data.corpus)."""

    config_class = BuiltinCorpusConfig

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        args = args if args is not None else BuiltinCorpusConfig()
        if args.split not in SPLITS:
            raise DataError(f"BuiltinCorpus split {args.split!r} is unknown; use one of: {', '.join(SPLITS)}.")
        if args.max_chars is not None and args.max_chars <= 0:
            raise DataError(f"BuiltinCorpus max_chars must be positive or null, got {args.max_chars}.")
        _require_eos(tokenizer.eos_id)
        stream = _builtin_stream(tokenizer, args.split, args.max_chars)
        return cls.from_stream(stream, seq_len, tokenizer.eos_id, name=f"BuiltinCorpus({args.split})")


def _read_text_file(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}). Convert it to UTF-8.") from exc
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc}") from exc


def _read_jsonl_texts(path, text_key):
    """The `text_key` field of every JSON line of `path`; blank lines are skipped."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"Cannot read {path}: {exc}") from exc
    with handle:
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {line_number}: not valid JSON ({exc.msg}).") from exc
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}, line {line_number}: expected a JSON object with a {text_key!r} field, "
                        f"got {type(record).__name__}."
                    )
                if text_key not in record:
                    keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
                    raise DataError(
                        f"{path}, line {line_number}: no key {text_key!r} (keys present: {keys}). Set text_key "
                        f"to the field that holds the document text."
                    )
                text = record[text_key]
                if not isinstance(text, str):
                    raise DataError(
                        f"{path}, line {line_number}: {text_key!r} must be a string, got {type(text).__name__}."
                    )
                yield text
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text ({exc}). Convert it to UTF-8.") from exc


TEXT_FILE_READERS = {".txt": "whole file is one document", ".jsonl": "one JSON object per line"}


def read_text_files(paths, text_key="text"):
    """Yield the documents of every file in `paths`: a .txt file is one document, a .jsonl line is one."""
    files = [Path(p).expanduser() for p in paths]
    # Check every file up front, so a typo in the last path fails before minutes of tokenizing.
    for file in files:
        if file.suffix not in TEXT_FILE_READERS:
            supported = "; ".join(f"{ext}: {what}" for ext, what in TEXT_FILE_READERS.items())
            raise DataError(f"Unsupported data file {file}: the extension must be one of ({supported}).")
        if not file.is_file():
            raise DataError(f"Data file {file} does not exist (resolved from {Path.cwd()}).")
    for file in files:
        if file.suffix == ".txt":
            yield _read_text_file(file)
        else:
            yield from _read_jsonl_texts(file, text_key)


@dataclass
class TextFilesConfig:
    paths: List[str] = field(default_factory=list)  # .txt (one document per file) or .jsonl files
    text_key: str = "text"  # .jsonl: the field that holds the document text


@register_dataset()
class TextFiles(PackedLMDataset):
    """Your own text: .txt files (one document each) and .jsonl files (one document per line)."""

    config_class = TextFilesConfig

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        if args is None or not args.paths:
            raise DataError("TextFiles needs `paths`: a list of .txt or .jsonl files.")
        if isinstance(args.paths, str):
            raise DataError(f"TextFiles paths must be a list of files, got the single string {args.paths!r}.")
        _require_eos(tokenizer.eos_id)
        token_docs = tokenize_texts(tokenizer, read_text_files(args.paths, args.text_key))
        return cls(token_docs, seq_len, tokenizer.eos_id, name="TextFiles")


@dataclass
class LengthUpsampledConfig:
    source: str = "builtin"  # builtin: the built-in corpus (split, max_chars) | files: your files (paths, text_key)
    split: str = "train"
    max_chars: Optional[int] = None
    paths: List[str] = field(default_factory=list)
    text_key: str = "text"
    min_doc_tokens: int = 1024  # documents at least this long count as long
    upsample_factor: int = 4  # each long document occurs this many times (short ones once)
    seed: int = 0  # the document order's shuffle


@register_dataset()
class LengthUpsampled(PackedLMDataset):
    """A corpus (built-in or files) with its long documents repeated, for long-context continual pretraining.

    Length upsampling (Fu et al. 2024, used by ChuXin's 1M-context stage): packed rows of a natural corpus
    are mostly many short documents, so a model trained on them rarely sees dependencies spanning the whole
    row. Every document of at least `min_doc_tokens` tokens occurs `upsample_factor` times, and the
    document order is shuffled (seeded) so the copies land in different rows, far apart. `doc_order` is the
    packed order of document indices (into the corpus's order)."""

    config_class = LengthUpsampledConfig

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        args = args if args is not None else LengthUpsampledConfig()
        if args.upsample_factor < 1 or args.min_doc_tokens < 1:
            raise DataError(
                f"LengthUpsampled needs upsample_factor >= 1 and min_doc_tokens >= 1, got {args.upsample_factor} "
                f"and {args.min_doc_tokens}."
            )
        _require_eos(tokenizer.eos_id)
        if args.source == "builtin":
            if args.split not in SPLITS:
                raise DataError(f"LengthUpsampled split {args.split!r} is unknown; use one of: {', '.join(SPLITS)}.")
            texts, origin = builtin_texts(args.split, args.max_chars), f"builtin:{args.split}"
        elif args.source == "files":
            if not args.paths or isinstance(args.paths, str):
                raise DataError("LengthUpsampled with source: files needs `paths`: a list of .txt or .jsonl files.")
            texts, origin = read_text_files(args.paths, args.text_key), "files"
        else:
            raise DataError(f"LengthUpsampled source {args.source!r} is unknown; use builtin or files.")
        docs = [np.asarray(ids, dtype=np.int64) for ids in tokenize_texts(tokenizer, texts) if len(ids)]
        is_long = np.array([len(d) >= args.min_doc_tokens for d in docs], dtype=bool)
        copies = np.where(is_long, args.upsample_factor, 1)
        order = np.random.default_rng(args.seed).permutation(np.repeat(np.arange(len(docs)), copies))
        name = f"LengthUpsampled({origin}, {int(is_long.sum())} docs >= {args.min_doc_tokens} tokens x{args.upsample_factor})"
        dataset = cls([docs[i] for i in order], seq_len, tokenizer.eos_id, name=name)
        dataset.doc_order = order
        dataset.num_documents = len(docs)
        dataset.long_documents = np.flatnonzero(is_long)
        return dataset


def build_dataset(section, tokenizer, seq_len):
    """Build the dataset a config section (`.dataset` name, `.args` config_class instance) describes."""
    dataset_class = DATASETS.get(section.dataset, where="Data")
    args = section.args if section.args is not None else dataset_class.config_class()
    return dataset_class.build(args, tokenizer, seq_len)
