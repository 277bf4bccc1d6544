"""The built-in corpus: text and code that ship with Python itself, so nothing is ever downloaded.

Two kinds of document:
  * "pydoc:<topic>"       every topic of the interactive help (`pydoc_data.topics`), English prose;
  * "stdlib:<rel/path>"   the standard library's own `.py` sources, Python code.

Documents are ordered by a stable hash of their name (sha256, never the salted built-in `hash()`), which
interleaves prose and code and makes the order identical in every process and run of the same Python. A
second, independently salted hash puts about 1 in 50 documents into "validation"; the rest are "train".
Only the list of names is built eagerly; file contents are read one at a time as they are yielded, so
taking a small `max_chars` prefix is cheap.
"""
import functools
import hashlib
import os
import sys
import sysconfig
import tokenize
from pathlib import Path

from ppzoo.errors import DataError

SPLITS = ("train", "validation")
VALIDATION_ONE_IN = 50
MAX_SOURCE_BYTES = 200_000  # bigger files are mostly generated tables, not representative code

# Directories that are not the standard library proper (third-party installs) or that are dominated by
# test fixtures and legacy code we do not want to train on.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def _stable_hash(text, salt=""):
    return hashlib.sha256((salt + text).encode("utf-8")).hexdigest()


def _split_of(name):
    # Salted so that membership in validation is unrelated to the position in the ordering.
    return "validation" if int(_stable_hash(name, "split:")[:12], 16) % VALIDATION_ONE_IN == 0 else "train"


def _stdlib_dir():
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_source_files():
    """(relative posix path, absolute path) of every eligible stdlib .py file, in sorted walk order."""
    root = _stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; sorting makes the walk order reproducible.
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath) / filename
            try:
                if path.stat().st_size > MAX_SOURCE_BYTES:
                    continue
            except OSError:
                continue
            found.append((path.relative_to(root).as_posix(), path))
    return found


def _pydoc_topics():
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds leave pydoc_data out
        return {}
    return topics


@functools.lru_cache(maxsize=None)
def _document_index():
    """All documents as (name, loader) pairs sorted by stable hash, with their split; built once per process."""
    entries = []
    topics = _pydoc_topics()
    for key in topics:
        entries.append((f"pydoc:{key}", ("pydoc", key)))
    for relative, path in _stdlib_source_files():
        entries.append((f"stdlib:{relative}", ("file", str(path))))
    entries.sort(key=lambda entry: (_stable_hash(entry[0]), entry[0]))
    return tuple((name, source, _split_of(name)) for name, source in entries)


def _read_source(path):
    """A .py file's text, honouring its PEP 263 encoding declaration; None if it cannot be decoded."""
    try:
        with tokenize.open(path) as handle:
            return handle.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _check_split(split):
    if split not in SPLITS:
        raise DataError(f"Unknown built-in corpus split {split!r}; use one of: {', '.join(SPLITS)}.")


def builtin_documents(split):
    """Yield (name, text) for every document of `split` ("train" or "validation"), in the fixed order."""
    _check_split(split)
    topics = _pydoc_topics()
    for name, (kind, key), document_split in _document_index():
        if document_split != split:
            continue
        text = topics[key] if kind == "pydoc" else _read_source(key)
        if text:  # undecodable or empty files carry nothing to learn from
            yield name, text


def builtin_texts(split, max_chars=None):
    """Yield the texts of `split` in order, stopping once at least `max_chars` characters have been yielded.

    The document that crosses the limit is yielded whole, so the total can exceed max_chars by one
    document; None means the whole split.
    """
    if max_chars is not None and max_chars <= 0:
        raise DataError(f"max_chars must be positive or None, got {max_chars}.")
    total = 0
    for _name, text in builtin_documents(split):
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def corpus_fingerprint():
    """A short string that changes whenever the corpus could: the Python version and document count.

    The count is of indexed documents, so it includes the few empty files (blank __init__.py files) that
    builtin_documents skips.
    """
    return f"python-{sys.version.split()[0]}-docs-{len(_document_index())}"
