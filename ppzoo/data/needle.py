"""Needle-in-a-haystack token streams, shared by the retrieval fine-tuning data and the NIAH evaluation.

A case is built directly in token space, so its length is exact and the needle's position is known:

    [bos] haystack[:cut]  needle  haystack[cut:]  question        (the prompt, `length` tokens)
                                                        answer eos (training only)

* haystack: a contiguous window of the built-in corpus (one split, eos tokens removed) that starts at a
  line break; its size is whatever the prompt's length leaves after bos, needle and question;
* needle: "\\nThe secret passphrase for the <key> is <value>.", inserted at the line end nearest to
  `depth` x the haystack's size (0: before the window's first line break, 1: after the window), so it is a
  line of its own and the haystack's lines keep their indentation (this byte-level BPE merges a line break
  with the next line's indentation: "\\n   ");
* question: "\\nWhat is the secret passphrase for the <key>? The secret passphrase for the <key> is", so the
  answer is the continuation " <value>.".

Values come in two kinds (`value_kind`):
* "number" (the default): a random 4-digit number, e.g. 4817, several tokens long. Answering means copying
  token after token from the needle, the job of "induction heads" (a head that finds the earlier occurrence
  of the current context and one that copies what followed it);
* "token": one multi-digit token of the vocabulary (e.g. "25"), and the haystack's digit tokens are dropped,
  so the value is the only number in the context. Answering takes a single attention hop (find the number,
  copy it). This is for models too small or too briefly trained to have induction heads: tiny ChuXin does
  not form them within CPU minutes, even on drills of random tokens written twice, but learns this kind.

Training (NeedleRetrieval, the train split) and evaluation (ppzoo.eval.niah, the validation split) build
cases the same way, so the tokens a model is asked about look like the ones it was taught on; only the
haystack text and the random keys and values differ.
"""
import re
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ppzoo.data.corpus import SPLITS
from ppzoo.data.datasets import _builtin_stream, _require_eos
from ppzoo.errors import DataError
from ppzoo.registry import register_dataset

NEEDLE_KEYS = ("vault", "garden", "archive", "harbor", "tower", "cellar", "library", "station")
VALUE_RANGE = (1000, 10000)  # value_kind "number": 4-digit numbers
VALUE_KINDS = ("number", "token")


def needle_sentence(key, value):
    return f"\nThe secret passphrase for the {key} is {value}."


def question_text(key):
    return f"\nWhat is the secret passphrase for the {key}? The secret passphrase for the {key} is"


def answer_text(value):
    return f" {value}."


def is_correct(continuation, value):
    """Exact match: the continuation's first run of letters and digits is the value (" 4817." and
    " 4817 and" match 4817; " 48170", " 481" and " 4817a" do not)."""
    found = re.match(r"\s*([0-9A-Za-z]+)", continuation)
    return found is not None and found.group(1) == str(value)


def _ids_where(tokenizer, predicate):
    return [i for i in range(tokenizer.vocab_size) if predicate(tokenizer.decode([i]))]


def check_value_kind(value_kind):
    if value_kind not in VALUE_KINDS:
        raise DataError(f"value_kind must be one of {', '.join(VALUE_KINDS)}, got {value_kind!r}.")


class Haystack:
    """The tokens of one split of the built-in corpus as one contiguous text, and where its lines end."""

    def __init__(self, tokenizer, split="validation", max_chars=None, drop_digits=False):
        if split not in SPLITS:
            raise DataError(f"haystack split {split!r} is unknown; use one of: {', '.join(SPLITS)}.")
        _require_eos(tokenizer.eos_id)
        stream = _builtin_stream(tokenizer, split, max_chars)
        # Documents run on into each other: an eos inside the haystack would be a token the model never
        # sees mid-document (training rows mask across eos).
        self.tokens = np.asarray(stream[stream != tokenizer.eos_id], dtype=np.int64)
        if drop_digits:  # value_kind "token": the needle's value is to be the only number in the context
            self.tokens = self.tokens[~np.isin(self.tokens, _ids_where(tokenizer, lambda t: any(c.isdigit() for c in t)))]
        newline_ids = [i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])]
        # A line ends where a token with a line break begins (the break may carry the next indentation).
        self.line_ends = np.flatnonzero(np.isin(self.tokens, newline_ids))
        self.split = split

    def window(self, rng, size):
        """(tokens[s:s+size], line ends inside the window relative to s) for a random line end s."""
        last_start = len(self.tokens) - size
        starts = self.line_ends[self.line_ends <= last_start]
        if size < 0 or len(starts) == 0:
            raise DataError(
                f"the {self.split} haystack has {len(self.tokens)} tokens, too few for a {size}-token window; "
                "use a larger max_chars (or null for the whole split)."
            )
        start = int(starts[rng.integers(len(starts))])
        inside = self.line_ends[(self.line_ends >= start) & (self.line_ends < start + size)] - start
        return self.tokens[start:start + size], inside


@dataclass
class NeedleCase:
    length: int  # prompt tokens, bos and question included
    depth: float  # requested depth in [0, 1]
    key: str
    value: str
    prompt: List[int]  # the prompt's token ids
    needle_start: int  # index of the needle's first token in `prompt`
    needle_tokens: List[int]
    answer: List[int]  # the answer's token ids (without eos)
    haystack_start: int  # index of the haystack's first token (after bos)
    haystack_size: int  # haystack tokens around the needle

    @property
    def needle_depth(self):
        """Where the needle actually sits: the fraction of the haystack before it."""
        return (self.needle_start - self.haystack_start) / self.haystack_size


class NeedleBuilder:
    """Builds NeedleCases from a Haystack; the tokenizer's texts are cached (they repeat)."""

    def __init__(self, tokenizer, haystack, value_kind="number", num_values=None):
        check_value_kind(value_kind)
        self.tokenizer = tokenizer
        self.haystack = haystack
        self.value_kind = value_kind
        self.bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self._encoded = {}
        if value_kind == "token":
            self.value_ids = _ids_where(tokenizer, lambda t: re.fullmatch(r"\d{2,4}", t) is not None)[:num_values]
            if len(self.value_ids) < 8:
                raise DataError(
                    f"value_kind token needs number tokens in the vocabulary; {tokenizer.source or 'the tokenizer'} has only "
                    f"{len(self.value_ids)} multi-digit tokens. Use value_kind number."
                )

    def encode(self, text):
        if text not in self._encoded:
            self._encoded[text] = list(self.tokenizer.encode(text))
        return self._encoded[text]

    def needle_question_answer(self, key, rng, value=None):
        """(value, needle tokens, question tokens, answer tokens) for a key; a random value unless given."""
        if self.value_kind == "number":
            value = str(value if value is not None else rng.integers(*VALUE_RANGE))
            return (value, self.encode(needle_sentence(key, value)), self.encode(question_text(key)),
                    self.encode(answer_text(value)))
        # "token": the value is one vocabulary token, inserted as a token after the space that ends
        # "... is " (in needle and question alike), so the text reads like the number kind's.
        value_id = self.value_ids[rng.integers(len(self.value_ids))] if value is None else self.tokenizer.token_to_id(str(value))
        if value_id not in self.value_ids:
            raise DataError(f"value {value!r} is not one of the number tokens value_kind token draws from")
        prefix, suffix = needle_sentence(key, "\0").split("\0")  # "\nThe secret ... is ", "."
        needle = self.encode(prefix) + [value_id] + self.encode(suffix)
        answer = [value_id] + self.encode(suffix)
        return self.tokenizer.decode([value_id]), needle, self.encode(question_text(key) + " "), answer

    def overhead(self):
        """The most prompt tokens besides the haystack (bos, needle, question) any key and value take."""
        rng = np.random.default_rng(0)
        return len(self.bos) + max(
            len(needle) + len(question) for key in NEEDLE_KEYS
            for _, needle, question, _ in [self.needle_question_answer(key, rng)]
        ) + 2  # a value may take a token or two more than this one

    def case(self, length, depth, rng, key=None, value=None):
        """A prompt of exactly `length` tokens with the needle near `depth` (at a line end)."""
        if not 0.0 <= depth <= 1.0:
            raise DataError(f"needle depth must be within [0, 1], got {depth}")
        key = key if key is not None else NEEDLE_KEYS[rng.integers(len(NEEDLE_KEYS))]
        value, needle, question, answer = self.needle_question_answer(key, rng, value)
        size = length - len(self.bos) - len(needle) - len(question)
        if size < 1:
            raise DataError(
                f"a {length}-token needle prompt has no room for a haystack: bos, needle and question take "
                f"{length - size} tokens. Use lengths of at least {length - size + 16}."
            )
        window, line_ends = self.haystack.window(rng, size)
        # The needle goes to the line end nearest the requested depth: the window starts with one, and its
        # end is one too (the question begins with a line break).
        candidates = np.concatenate([line_ends, [size]])
        cut = int(candidates[np.argmin(np.abs(candidates - depth * size))])
        prompt = self.bos + window[:cut].tolist() + needle + window[cut:].tolist() + question
        return NeedleCase(length, float(depth), key, value, prompt, len(self.bos) + cut, needle, answer,
                          len(self.bos), size)


# ----------------------------------------------------------------------------------------------------------
# Training rows


@dataclass
class NeedleRetrievalConfig:
    split: str = "train"  # haystack text: train here; the NIAH evaluation uses validation
    max_chars: Optional[int] = 2_000_000  # the haystack pool: the split's first max_chars characters
    num_samples: int = 4096  # rows per epoch; row i is built from (seed, i), the same every time
    min_length: int = 96  # prompt tokens of the shortest case
    max_length: Optional[int] = None  # of the longest; default seq_len
    # uniform: lengths uniform in [min_length, max_length] | log_uniform: short cases more common (more of
    # them fit a row, and a near needle is the easy start a small model first learns to copy from)
    length_sampling: str = "uniform"
    loss: str = "answer"  # answer: only the answers (and their eos) are labels | all: every token
    value_kind: str = "number"  # number: 4-digit values | token: one number token, digit-free haystack (see above)
    num_values: Optional[int] = None  # token kind: draw values from the first num_values number tokens only
    seed: int = 0


@register_dataset()
class NeedleRetrieval:
    """Rows of packed needle-in-a-haystack cases with their answers, to teach a small model to retrieve.

    Each row is filled with cases of random length in [min_length, max_length] and random depth, each
    `prompt + answer + eos` and its own document (doc_ids: the causal mask keeps cases apart); a rest too
    short for another case is plain haystack. With loss "answer" only the answer tokens and their eos are
    labels (-100 elsewhere): the copying signal is not drowned by the haystack's language-model loss."""

    config_class = NeedleRetrievalConfig

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        return cls(args if args is not None else NeedleRetrievalConfig(), tokenizer, seq_len)

    def __init__(self, args, tokenizer, seq_len):
        if args.loss not in ("answer", "all"):
            raise DataError(f"NeedleRetrieval loss must be answer or all, got {args.loss!r}.")
        if args.length_sampling not in ("uniform", "log_uniform"):
            raise DataError(f"NeedleRetrieval length_sampling must be uniform or log_uniform, got {args.length_sampling!r}.")
        if args.num_samples < 1:
            raise DataError(f"NeedleRetrieval num_samples must be at least 1, got {args.num_samples}.")
        self.args = args
        self.seq_len = int(seq_len)
        self.max_length = min(args.max_length or self.seq_len, self.seq_len)
        self.eos_id = tokenizer.eos_id
        check_value_kind(args.value_kind)
        haystack = Haystack(tokenizer, args.split, args.max_chars, drop_digits=args.value_kind == "token")
        self.builder = NeedleBuilder(tokenizer, haystack, args.value_kind, args.num_values)
        self.reserve = 8  # answer (" dddd." is at most 5 tokens) + eos, with room to spare
        shortest = self.builder.overhead() + 8
        if not shortest <= args.min_length <= self.max_length - self.reserve:
            raise DataError(
                f"NeedleRetrieval min_length={args.min_length} must be at least {shortest} (needle and question "
                f"take {shortest - 8} tokens) and at most max_length - {self.reserve} = {self.max_length - self.reserve} "
                f"(max_length {self.max_length}, seq_len {self.seq_len})."
            )
        self.name = f"NeedleRetrieval({args.split})"

    def __len__(self):
        return self.args.num_samples

    def _sample_length(self, rng, longest):
        if self.args.length_sampling == "log_uniform":
            return int(np.exp(rng.uniform(np.log(self.args.min_length), np.log(longest + 1))))
        return int(rng.integers(self.args.min_length, longest + 1))

    def row(self, index):
        """(tokens [seq_len + 1], is_target [seq_len + 1], doc [seq_len + 1], cases) of row `index`."""
        rng = np.random.default_rng([self.args.seed, int(index)])
        total = self.seq_len + 1
        tokens, targets, docs, cases = [], [], [], []
        while total - len(tokens) >= self.args.min_length + self.reserve:
            room = total - len(tokens) - self.reserve
            length = self._sample_length(rng, min(self.max_length, room))
            case = self.builder.case(length, float(rng.uniform()), rng)
            piece = case.prompt + case.answer + [self.eos_id]
            tokens += piece
            targets += [False] * len(case.prompt) + [True] * (len(case.answer) + 1)
            docs += [len(cases)] * len(piece)
            cases.append(case)
        rest = total - len(tokens)
        if rest:
            filler, _ = self.builder.haystack.window(rng, rest)
            tokens += filler.tolist()
            targets += [False] * rest
            docs += [len(cases)] * rest
        return np.array(tokens, dtype=np.int64), np.array(targets), np.array(docs, dtype=np.int32), cases

    def __getitem__(self, index):
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {self.name} with {len(self)} samples")
        tokens, targets, docs, _ = self.row(index)
        labels = tokens[1:].copy()
        if self.args.loss == "answer":
            labels[~targets[1:]] = -100
        else:
            # A label that starts the next case is unpredictable from the previous one: leave it out.
            labels[docs[1:] != docs[:-1]] = -100
        return {"input_ids": tokens[:-1], "labels": labels, "doc_ids": docs[:-1]}

    def __repr__(self):
        return f"<{self.name}: {len(self)} rows, seq_len {self.seq_len}, cases of {self.args.min_length}-{self.max_length} tokens>"
