"""A thin wrapper over a Hugging Face `tokenizers.Tokenizer` (any tokenizer.json, ours or a checkpoint's).

What the wrapper adds:
  * errors a user can act on (missing or corrupt file) instead of Rust exception strings;
  * bos/eos/pad ids, found from the tokenizer_config.json / special_tokens_map.json that checkpoints ship
    next to tokenizer.json, or else from well-known token names;
  * encoding that never adds special tokens and treats special-token strings inside the text as plain text,
    so a document that happens to contain "</s>" cannot inject an end-of-document marker into the stream;
  * `train_byte_level_bpe`, the tokenizer trained on the built-in corpus.
"""
import hashlib
import json
from pathlib import Path

from ppzoo.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
HOW_TO_GET_ONE = (
    "train one with `python tools/train_tokenizer.py --out PATH`, "
    "or point Data.tokenizer at a checkpoint's tokenizer.json"
)

# Tried in order when no config file names the special tokens.
KNOWN_EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
KNOWN_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>")
KNOWN_PAD_TOKENS = ("<pad>", "<|pad|>")

# Our own trained tokenizers put these first, so their ids are 0..3.
BPE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

_SPECIAL_TOKEN_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:  # a packaging problem, but one the user fixes with pip
        raise DataError("The `tokenizers` package is required: pip install tokenizers") from exc
    return tokenizers


def _token_content(value):
    """Special-token config values are a string or a dict like {"content": "</s>", "lstrip": false, ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens_from_config_files(directory):
    """{"bos_token": "<s>", ...} as named by the config files next to tokenizer.json (first file wins)."""
    named = {}
    for filename in _SPECIAL_TOKEN_CONFIG_FILES:
        path = directory / filename
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"Cannot read {path}: it is not valid JSON ({exc}). Fix or delete the file.") from exc
        if not isinstance(data, dict):
            continue
        for key in ("bos_token", "eos_token", "pad_token"):
            content = _token_content(data.get(key))
            if content is not None and key not in named:
                named[key] = content
    return named


class Tokenizer:
    """Text <-> token ids, with the special ids a language model needs."""

    def __init__(self, hf_tokenizer, source=None, bos_token=None, eos_token=None, pad_token=None):
        """Wrap `hf_tokenizer`; special tokens given by name win over discovery by well-known names."""
        self.hf = hf_tokenizer
        self.source = str(source) if source is not None else None
        # Text is data: "</s>" written in a document is encoded as ordinary characters, not as eos.
        self.hf.encode_special_tokens = True
        self.eos_id = self._resolve(eos_token, KNOWN_EOS_TOKENS)
        self.bos_id = self._resolve(bos_token, KNOWN_BOS_TOKENS)
        pad_id = self._resolve(pad_token, KNOWN_PAD_TOKENS)
        self.pad_id = pad_id if pad_id is not None else self.eos_id

    def _resolve(self, configured, known_names):
        if configured is not None:
            token_id = self.hf.token_to_id(configured)
            if token_id is not None:
                return token_id
            # A config naming a token the vocabulary lacks is inconsistent; the known names are a better guess.
        for name in known_names:
            token_id = self.hf.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @classmethod
    def from_file(cls, path):
        """Load a tokenizer.json, given its path or the directory that holds it."""
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"No tokenizer found at {file}. To get one, {HOW_TO_GET_ONE}.")
        tokenizers = _import_tokenizers()
        try:
            hf_tokenizer = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises a bare Exception for every parse problem
            raise DataError(
                f"Cannot load tokenizer file {file}: it is not a valid Hugging Face tokenizer.json ({exc}). "
                f"Replace it: {HOW_TO_GET_ONE}."
            ) from exc
        named = _special_tokens_from_config_files(file.parent)
        return cls(
            hf_tokenizer,
            source=file,
            bos_token=named.get("bos_token"),
            eos_token=named.get("eos_token"),
            pad_token=named.get("pad_token"),
        )

    @property
    def vocab_size(self):
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_bos=False):
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise DataError(f"add_bos=True, but the tokenizer {self.source or ''} has no beginning-of-sequence token.")
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts):
        """Token ids of each text; the Rust encoder runs the batch in parallel. No special tokens added."""
        encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids, skip_special_tokens=True):
        # Accepts numpy arrays and paddle tensors' .tolist() alike: the Rust side wants Python ints.
        return self.hf.decode([int(token_id) for token_id in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id):
        return self.hf.id_to_token(int(token_id))

    def save(self, path):
        """Write tokenizer.json to `path` (or into it, if it is an existing directory); returns the file path."""
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        blocking_file = next((p for p in file.parents if p.exists() and not p.is_dir()), None)
        if blocking_file is not None:
            raise DataError(f"Cannot write the tokenizer to {file}: {blocking_file} is a file, not a directory.")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            self.hf.save(str(file))
        except Exception as exc:  # OSError from mkdir; the Rust writer raises a bare Exception
            raise DataError(f"Cannot write the tokenizer to {file}: {exc}") from exc
        return file

    def fingerprint(self):
        """A hash of the full tokenizer definition; equal fingerprints tokenize identically."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()[:16]

    def __repr__(self):
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, source={self.source!r})"
        )


def train_byte_level_bpe(texts, vocab_size, min_frequency=2):
    """Train a byte-level BPE tokenizer on an iterable of strings.

    Byte-level means every input byte has a token, so any text (code, whitespace runs, any unicode)
    round-trips exactly and there are no unknown tokens. "<pad>", "<s>", "</s>", "<unk>" get ids 0..3.
    """
    tokenizers = _import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = len(BPE_SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise DataError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least {minimum} "
            f"(4 special tokens + 256 byte tokens). Use e.g. 4096."
        )
    hf_tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    # add_prefix_space=False: a space is not invented in front of the text, which would break round-trips.
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those unseen in `texts`
        show_progress=False,
    )
    seen_text = False

    def texts_with_check():
        nonlocal seen_text
        for text in texts:
            if text:
                seen_text = True
                yield text

    hf_tokenizer.train_from_iterator(texts_with_check(), trainer=trainer)
    if not seen_text:
        raise DataError("Cannot train a tokenizer on no text: the texts given were empty.")
    return Tokenizer(hf_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
