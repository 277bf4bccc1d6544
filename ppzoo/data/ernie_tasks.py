"""ERNIE 3.0 Titan's pretraining tasks and an NLU task, built from the built-in corpus.

`ErnieTitanTasks` gives every sample the inputs of all pretraining tasks, from one chunk (consecutive whole
sentences) of one document:
  * knowledge-masked LM (`mlm_*`): whole entities, phrases and words are masked as units (ERNIE 1.0's
    knowledge masking) until about `mask_ratio` of the tokens are masked; 80% of the masked spans' tokens
    become [MASK], 10% a random token, 10% stay (BERT's recipe);
  * document LM (`lm_*`): 2 * seq_len + 1 tokens of the document from the chunk on; the model reads them as
    two segments, the second with the first's recurrence memory;
  * sentence reordering (`reorder_*`): three consecutive sentences permuted, the label is the permutation;
  * sentence distance (`distance_*`): a sentence and the next one (0), a later one of the same document (1)
    or one of another document (2);
  * controllable LM (`ctrl_*`): eos, then with probability `p_condition` the prompt
    `[t]topic[/t] [k]kw0, kw1[/k] [senti]label[/senti] [w]About L words[/w] ` (each attribute dropped with
    probability `p_drop`) and the soft prompt of its genre, then the chunk; the loss covers the text only;
  * adversarial (`adv_*`): the chunk after [CLS] and the length of its 1-3 sentence prefix, from which the
    model generates its own negatives.

Rules (documented here because the results depend on them):
  * Sentences: prose (pydoc topics) splits at blank lines and after . ! ? : before a capital, quote or
    parenthesis; code (stdlib sources) takes each non-empty line.
  * Entities (taken from the corpus itself): glossary terms the docs mark up, i.e. text in double quotes or
    *asterisks* of at most 30 characters on one line; and identifiers that name things: CamelCase names,
    __dunder__ names, dotted names (os.path.join), names of Python builtins and keywords.
  * Phrases: runs of 2-3 consecutive words on one line that are not entities.
  * Topic: a pydoc topic's title (its first line, e.g. 'The "for" statement'); a stdlib file's package (its
    first path component, e.g. asyncio) or, for a single-file module, the module's name.
  * Keywords: the chunk's two words of 4-20 identifier characters with the highest tf-idf (document
    frequency over the dataset's chunks), stop words and Python keywords excluded, best first.
  * Length: whitespace-separated words of the text, rounded to the nearest ten ("About L words").
  * Sentiment: counts of POSITIVE_WORDS and NEGATIVE_WORDS (lowercased words): positive if more positive,
    negative if more negative, neutral otherwise.
  * Genre: prose (pydoc) = 0, code (stdlib) = 1.

`TitanTopics` (the NLU task and the judge of topic control): windows of stdlib sources labelled with their
package (TOPIC_CLASSES); documents are split 3:1 into train and validation by a salted hash, so validation
windows come from files never trained on.
"""
import builtins
import hashlib
import itertools
import keyword
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ppzoo.data.corpus import SPLITS, builtin_documents
from ppzoo.errors import DataError
from ppzoo.registry import register_dataset

TITAN_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]")
GENRES = ("prose", "code")
TOPIC_CLASSES = ("asyncio", "email", "tkinter", "xml", "multiprocessing", "unittest")
IGNORE = -100
POSITIVE_WORDS = frozenset(
    "success successful successfully valid correct correctly safe safely easy simple useful efficient fast "
    "supported true good better best recommended works guaranteed preferred convenient".split())
NEGATIVE_WORDS = frozenset(
    "error errors fail fails failed failure invalid exception exceptions raise raises deprecated warning "
    "warnings bad wrong incorrect unsafe cannot never unsupported broken slow abort".split())
_STOP_WORDS = frozenset(
    "this that with from have will been were which when their there then than them they what into only also "
    "other such each more most some same these those does used using must should would could about after "
    "before where while given value values object objects return returns self none true false name names "
    "function functions method methods class classes type types default first second note example".split()
) | frozenset(w.lower() for w in keyword.kwlist)
_BUILTIN_NAMES = frozenset(name for name in dir(builtins) if not name.startswith("_")) | frozenset(keyword.kwlist)

_WORD = re.compile(r"\w+(?:\.\w+)*")
_GLOSSARY = re.compile(r'"[^"\n]{1,30}"|\*[^*\n]{1,30}\*')
_IDENTIFIER_ENTITY = re.compile(r"^(?:[A-Z][a-z0-9]+[A-Z]\w*|__\w+__|\w+(?:\.\w+)+)$")
_KEYWORD_CANDIDATE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{3,19}")
_SENTENCE_END = re.compile(r"(?<=[.!?:])\s+(?=[A-Z\"*(])")


# ----------------------------------------------------------------------------------------- tokens
@dataclass
class TitanTokens:
    cls: int
    sep: int
    mask: int
    pad: int
    eos: int
    vocab_size: int


def add_titan_tokens(tokenizer):
    """Add [CLS], [SEP], [MASK] to the tokenizer (once; they are then saved with checkpoints) -> their ids."""
    missing = [t for t in TITAN_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.hf.add_special_tokens(missing)
    if tokenizer.eos_id is None:
        raise DataError("ERNIE Titan's datasets need a tokenizer with an end-of-sequence token (e.g. </s>).")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return TitanTokens(*(tokenizer.token_to_id(t) for t in TITAN_SPECIAL_TOKENS), pad, tokenizer.eos_id,
                       tokenizer.vocab_size)


# ----------------------------------------------------------------------------------- text analysis
def genre_of(name):
    return 0 if name.startswith("pydoc:") else 1


def topic_of(name, text):
    """The topic attribute: a pydoc topic's title, a stdlib file's package (or module) name."""
    if name.startswith("pydoc:"):
        return text.strip().splitlines()[0].strip()[:40] if text.strip() else name[6:]
    relative = name.split(":", 1)[1]
    first = relative.split("/")[0]
    return first[:-3] if first.endswith(".py") else first


def split_sentences(text, genre):
    """Char spans (start, end) of the sentences of a document (see the module docstring for the rule)."""
    spans = []
    if genre == 1:
        position = 0
        for line in text.splitlines(keepends=True):
            if line.strip():
                spans.append((position, position + len(line.rstrip())))
            position += len(line)
        return spans
    for paragraph in re.finditer(r"[^\n]+(?:\n[^\n]+)*", text):
        start = paragraph.start()
        for piece in _SENTENCE_END.split(paragraph.group()):
            index = text.index(piece, start)
            if piece.strip():
                spans.append((index, index + len(piece)))
            start = index + len(piece)
    return spans


def entity_spans(text):
    """Char spans of the entities of `text` (glossary terms and naming identifiers)."""
    spans = [m.span() for m in _GLOSSARY.finditer(text)]
    for m in _WORD.finditer(text):
        word = m.group()
        if _IDENTIFIER_ENTITY.match(word) or word in _BUILTIN_NAMES:
            spans.append(m.span())
    return spans


def word_spans(text):
    return [m.span() for m in _WORD.finditer(text)]


def phrase_spans(text, rng):
    """Random chunking of each line's words into phrases of 2-3 words (char spans)."""
    spans = []
    for line in re.finditer(r"[^\n]+", text):
        words = [(line.start() + a, line.start() + b) for a, b in word_spans(line.group())]
        i = 0
        while i + 1 < len(words):
            n = int(rng.integers(2, 4))
            group = words[i:i + n]
            if len(group) >= 2:
                spans.append((group[0][0], group[-1][1]))
            i += n
    return spans


def count_words(text):
    return len(text.split())


def sentiment_of(text):
    words = Counter(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    positive = sum(words[w] for w in POSITIVE_WORDS)
    negative = sum(words[w] for w in NEGATIVE_WORDS)
    return "positive" if positive > negative else "negative" if negative > positive else "neutral"


def keyword_candidates(text):
    return [w for w in _KEYWORD_CANDIDATE.findall(text) if w.lower() not in _STOP_WORDS]


def extract_keywords(text, document_frequency, num_chunks, k=2):
    counts = Counter(keyword_candidates(text))
    scored = sorted(counts, key=lambda w: (-counts[w] * math.log((1 + num_chunks) / (1 + document_frequency[w])), w))
    return scored[:k]


def rounded_length(words):
    return max(10, int(round(words / 10.0)) * 10)


def format_control_prompt(topic=None, keywords=None, sentiment=None, length=None):
    """The controllable LM's textual prompt; attributes given as None are left out."""
    parts = []
    if topic:
        parts.append(f"[t]{topic}[/t]")
    if keywords:
        parts.append(f"[k]{', '.join(keywords)}[/k]")
    if sentiment:
        parts.append(f"[senti]{sentiment}[/senti]")
    if length:
        parts.append(f"[w]About {int(length)} words[/w]")
    return " ".join(parts) + " " if parts else ""


def sample_control(attributes, rng, p_condition=0.5, p_drop=0.5):
    """Which attributes condition this sample: None (no prompt, no soft prompt) with probability 1 -
    p_condition; else a copy of `attributes` (topic, keywords, sentiment, length) with each one independently
    dropped (None) with probability p_drop."""
    if rng.random() >= p_condition:
        return None
    return {key: (None if rng.random() < p_drop else value) for key, value in attributes.items()}


# ------------------------------------------------------------------------------------ the documents
class TokenizedDocument:
    """A document's tokens with their char offsets and its sentences as char and token spans."""

    def __init__(self, name, text, encoding):
        self.name, self.text, self.genre = name, text, genre_of(name)
        self.topic = topic_of(name, text)
        self.tokens = np.asarray(encoding.ids, dtype=np.int64)
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        self.starts, self.ends = offsets[:, 0], offsets[:, 1]
        self.sentences = []  # (char_start, char_end, token_start, token_end)
        for a, b in split_sentences(text, self.genre):
            t0 = int(np.searchsorted(self.ends, a, side="right"))
            t1 = int(np.searchsorted(self.starts, b, side="left"))
            if t1 > t0:
                self.sentences.append((a, b, t0, t1))


def _tokenize_documents(tokenizer, documents):
    documents = list(documents)
    encodings = tokenizer.hf.encode_batch([text for _, text in documents], add_special_tokens=False)
    return [TokenizedDocument(name, text, enc) for (name, text), enc in zip(documents, encodings)]


def _limited_documents(split, max_chars):
    total = 0
    for name, text in builtin_documents(split):
        yield name, text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def knowledge_mask(tokens, starts, ends, text, text_offset, rng, tokens_info, mask_ratio=0.15):
    """Knowledge masking of `tokens` (their char offsets `starts`/`ends` into the document, `text` the
    covered text starting at `text_offset`): -> (input ids, labels with IGNORE where unmasked, spans masked as
    token index ranges). Whole entities, phrases and words are masked; no span is split."""
    n = len(tokens)
    budget = max(1, int(round(mask_ratio * n)))
    candidates = [("entity", s) for s in entity_spans(text)] + [("phrase", s) for s in phrase_spans(text, rng)]
    candidates += [("word", s) for s in word_spans(text)]
    order = rng.permutation(len(candidates))
    taken = np.zeros(n, dtype=bool)
    spans = []
    for index in order:
        a, b = candidates[index][1]
        a, b = a + text_offset, b + text_offset
        t0 = int(np.searchsorted(ends, a, side="right"))
        t1 = int(np.searchsorted(starts, b, side="left"))
        if t1 <= t0 or taken[t0:t1].any() or taken.sum() + (t1 - t0) > budget:
            continue
        taken[t0:t1] = True
        spans.append((t0, t1))
        if taken.sum() >= budget:
            break
    if not spans:
        # Short chunks: every unit was over the budget (or there is no word at all); mask one token so every
        # sample has a target.
        t0 = int(rng.integers(0, n))
        taken[t0] = True
        spans.append((t0, t0 + 1))
    ids = tokens.copy()
    labels = np.where(taken, tokens, IGNORE)
    roll = rng.random(n)
    replace = taken & (roll < 0.8)
    randomize = taken & (roll >= 0.8) & (roll < 0.9)
    ids[replace] = tokens_info.mask
    ids[randomize] = rng.integers(0, tokens_info.cls, int(randomize.sum()))  # ordinary (non-task) tokens
    return ids, labels, spans


def _pad(values, length, fill):
    out = np.full(length, fill, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)[:length]
    out[: len(values)] = values
    return out


def _valid(count, length):
    return np.arange(length) < count


@dataclass
class ErnieTitanTasksConfig:
    split: str = "train"
    max_chars: Optional[int] = 2_000_000  # the first max_chars characters of the split
    mask_ratio: float = 0.15
    p_condition: float = 0.5  # controllable LM: probability the text is conditioned on prompts
    p_drop: float = 0.5  # each attribute dropped with this probability
    seed: int = 0


@register_dataset()
class ErnieTitanTasks:
    """Every pretraining task's inputs per sample (see the module docstring)."""

    config_class = ErnieTitanTasksConfig

    def __init__(self, documents, tokens_info, seq_len, args):
        if seq_len < 32:
            raise DataError(f"ErnieTitanTasks needs Data.seq_len >= 32 (a prompt and some text), got {seq_len}.")
        self.docs, self.tok, self.seq_len, self.args = documents, tokens_info, seq_len, args
        self.chunks = []  # (doc index, first sentence, end sentence)
        for d, doc in enumerate(documents):
            i = 0
            while i < len(doc.sentences):
                j, start = i, doc.sentences[i][2]
                while j < len(doc.sentences) and doc.sentences[j][3] - start <= seq_len - 1:
                    j += 1
                j = max(j, i + 1)
                self.chunks.append((d, i, j))
                i = j
        if not self.chunks:
            raise DataError("ErnieTitanTasks found no text: raise max_chars.")
        frequency = Counter()
        for chunk in self.chunks:
            frequency.update(set(keyword_candidates(self.chunk_text(chunk))))
        self.document_frequency = frequency

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        args = args if args is not None else ErnieTitanTasksConfig()
        if args.split not in SPLITS:
            raise DataError(f"ErnieTitanTasks split {args.split!r} is unknown; use one of: {', '.join(SPLITS)}.")
        if not (0 < args.mask_ratio < 1 and 0 <= args.p_condition <= 1 and 0 <= args.p_drop <= 1):
            raise DataError("ErnieTitanTasks: mask_ratio must lie in (0, 1), p_condition and p_drop in [0, 1].")
        tokens_info = add_titan_tokens(tokenizer)
        docs = [d for d in _tokenize_documents(tokenizer, _limited_documents(args.split, args.max_chars)) if d.sentences]
        dataset = cls(docs, tokens_info, seq_len, args)
        dataset.tokenizer = tokenizer
        return dataset

    def __len__(self):
        return len(self.chunks)

    def chunk_text(self, chunk):
        d, i, j = chunk
        doc = self.docs[d]
        return doc.text[doc.sentences[i][0]:doc.sentences[j - 1][1]]

    def attributes(self, chunk_text, doc):
        return {
            "topic": doc.topic,
            "keywords": extract_keywords(chunk_text, self.document_frequency, len(self.chunks)),
            "sentiment": sentiment_of(chunk_text),
            "length": rounded_length(count_words(chunk_text)),
        }

    def _sentence_tokens(self, doc, k, limit):
        return doc.tokens[doc.sentences[k][2]:doc.sentences[k][3]][:limit]

    def __getitem__(self, index):
        index = int(index)
        rng = np.random.default_rng([self.args.seed, index])
        d, i, j = self.chunks[index]
        doc, S, tok = self.docs[d], self.seq_len, self.tok
        t0, t1 = doc.sentences[i][2], min(doc.sentences[j - 1][3], doc.sentences[i][2] + S - 1)
        tokens = doc.tokens[t0:t1]
        sample = {}

        # knowledge-masked LM: [CLS] chunk
        text_start = int(doc.starts[t0])
        text = doc.text[text_start:int(doc.ends[t1 - 1])]
        ids, labels, _ = knowledge_mask(tokens, doc.starts[t0:t1], doc.ends[t0:t1], text, text_start, rng, tok,
                                        self.args.mask_ratio)
        sample["mlm_ids"] = _pad([tok.cls] + list(ids), S, tok.pad)
        sample["mlm_labels"] = _pad([IGNORE] + list(labels), S, IGNORE)
        sample["mlm_valid"] = _valid(len(ids) + 1, S)

        # document LM: two segments of S tokens from the chunk on (+1 for the last label)
        stream = np.concatenate([doc.tokens[t0:t0 + 2 * S], [tok.eos]])[: 2 * S + 1]
        sample["lm_ids"] = _pad(stream, 2 * S + 1, tok.pad)
        sample["lm_valid"] = _valid(len(stream), 2 * S + 1)

        # sentence reordering: three consecutive sentences (or thirds of the chunk)
        part = (S - 3) // 3
        if j - i >= 3:
            k = i + int(rng.integers(0, j - i - 2))
            pieces = [self._sentence_tokens(doc, k + n, part) for n in range(3)]
        else:
            third = max(1, len(tokens) // 3)
            pieces = [tokens[n * third:(n + 1) * third][:part] for n in range(3)]
        permutations = list(itertools.permutations(range(3)))
        label = int(rng.integers(0, len(permutations)))
        ids = [tok.cls]
        for n, p in enumerate(permutations[label]):
            ids += ([tok.sep] if n else []) + list(pieces[p])
        sample["reorder_ids"], sample["reorder_valid"] = _pad(ids, S, tok.pad), _valid(len(ids), S)
        sample["reorder_label"] = np.int64(label)

        # sentence distance
        half = (S - 2) // 2
        k = int(rng.integers(0, len(doc.sentences)))
        label = int(rng.integers(0, 3))
        if label == 0 and k + 1 < len(doc.sentences):
            other = self._sentence_tokens(doc, k + 1, half)
        elif label == 1 and k + 2 < len(doc.sentences):
            other = self._sentence_tokens(doc, int(rng.integers(k + 2, len(doc.sentences))), half)
        else:
            label = 2
            other_doc = self.docs[(d + 1 + int(rng.integers(0, len(self.docs) - 1))) % len(self.docs)] \
                if len(self.docs) > 1 else doc
            other = self._sentence_tokens(other_doc, int(rng.integers(0, len(other_doc.sentences))), half)
        ids = [tok.cls] + list(self._sentence_tokens(doc, k, half)) + [tok.sep] + list(other)
        sample["distance_ids"], sample["distance_valid"] = _pad(ids, S, tok.pad), _valid(len(ids), S)
        sample["distance_label"] = np.int64(label)

        # controllable LM: [prompt] text eos, loss on text and eos
        ctrl_text_budget = S - min(48, S // 2)  # room for the prompt (topics and keywords are length-capped)
        end = j
        while end > i + 1 and doc.sentences[end - 1][3] - t0 > ctrl_text_budget:
            end -= 1
        c1 = min(doc.sentences[end - 1][3], t0 + ctrl_text_budget)
        ctrl_text = doc.text[text_start:int(doc.ends[c1 - 1])]
        control = sample_control(self.attributes(ctrl_text, doc), rng, self.args.p_condition, self.args.p_drop)
        prompt = self.tokenizer.encode(format_control_prompt(**control)) if control else []
        body = list(doc.tokens[t0:c1]) + [tok.eos]
        # An eos opens every controllable sample ("a new text starts"), so generation has a first token to
        # stand on with or without a prompt.
        ids = ([tok.eos] + prompt + body)[:S]
        labels = ([IGNORE] * (1 + len(prompt)) + body)[:S]
        # inputs predict the next token: labels shifted left by one
        sample["ctrl_ids"] = _pad(ids, S, tok.pad)
        sample["ctrl_labels"] = _pad(labels[1:] + [IGNORE], S, IGNORE)
        sample["ctrl_valid"] = _valid(len(ids), S)
        sample["ctrl_genre"] = np.int64(doc.genre)
        sample["ctrl_conditioned"] = np.bool_(control is not None)

        # adversarial: [CLS] chunk, and the length of its 1-3 sentence prefix
        n_prefix = min(int(rng.integers(1, 4)), max(1, j - i - 1))
        prefix_len = min(doc.sentences[i + n_prefix - 1][3] - t0, S // 2)
        sample["adv_ids"] = _pad([tok.cls] + list(tokens), S, tok.pad)
        sample["adv_length"] = np.int64(len(tokens) + 1)
        sample["adv_prefix_len"] = np.int64(max(1, prefix_len))
        return sample


# ------------------------------------------------------------------------------------- the NLU task
@dataclass
class TitanTopicsConfig:
    split: str = "train"  # train | validation (3:1 by document)
    max_per_class: int = 300  # windows per class, at most
    seed: int = 0


def _topic_split_of(name):
    return "validation" if int(hashlib.sha256(("titan-topics:" + name).encode()).hexdigest()[:8], 16) % 4 == 0 else "train"


@register_dataset()
class TitanTopics:
    """Topic classification: a window of a stdlib source -> its package (TOPIC_CLASSES)."""

    config_class = TitanTopicsConfig
    classes = TOPIC_CLASSES

    def __init__(self, samples, seq_len):
        self.samples, self.seq_len = samples, seq_len

    @classmethod
    def build(cls, args, tokenizer, seq_len):
        args = args if args is not None else TitanTopicsConfig()
        if args.split not in SPLITS:
            raise DataError(f"TitanTopics split {args.split!r} is unknown; use one of: {', '.join(SPLITS)}.")
        tok = add_titan_tokens(tokenizer)
        documents = [(name, text) for name, text in builtin_documents("train")
                     if name.startswith("stdlib:") and topic_of(name, text) in TOPIC_CLASSES
                     and _topic_split_of(name) == args.split]
        per_class = {c: [] for c in TOPIC_CLASSES}
        for (name, _), ids in zip(documents, tokenizer.encode_batch([t for _, t in documents])):
            label = TOPIC_CLASSES.index(topic_of(name, ""))
            for start in range(0, max(1, len(ids) - 8), seq_len - 1):
                per_class[TOPIC_CLASSES[label]].append((ids[start:start + seq_len - 1], label, name))
        rng = np.random.default_rng(args.seed)
        samples = []
        for c in TOPIC_CLASSES:
            windows = per_class[c]
            if not windows:
                raise DataError(f"TitanTopics found no {c} sources in the {args.split} split of this Python.")
            chosen = rng.permutation(len(windows))[: args.max_per_class]
            samples += [windows[k] for k in chosen]
        order = rng.permutation(len(samples))
        dataset = cls([samples[k][:2] for k in order], seq_len)
        dataset.sources = [samples[k][2] for k in order]  # the document of each window
        dataset.tok = tok
        return dataset

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        ids, label = self.samples[int(index)]
        ids = [self.tok.cls] + list(ids)
        return {"input_ids": _pad(ids, self.seq_len, self.tok.pad), "valid": _valid(len(ids), self.seq_len),
                "label": np.int64(label)}
