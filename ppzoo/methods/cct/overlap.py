"""The evaluation-overlap check: no training text may share a long token run with HumanEval / HumanEvalFix.

Code is compared as Python tokens (comments, line breaks and indentation dropped, so formatting cannot hide
a copy), and two texts overlap when they share a run of NGRAM consecutive tokens (13, the length GPT-3's
decontamination used). The evaluation side is every problem's prompt (HumanEval's prompt: declaration and
docstring), canonical solution, buggy solution and tests; HumanEvalPack's prompts and canonical solutions
are HumanEval's, so one file covers both benchmarks.
"""
import io
import tokenize

from ppzoo.eval.humanevalfix.harness import load_problems

NGRAM = 13
EVAL_FIELDS = ("prompt", "declaration", "canonical_solution", "buggy_solution", "test")
_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING,
            tokenize.ENDMARKER}


def code_tokens(text):
    """The Python tokens of `text` without layout; text that does not tokenize falls back to whitespace words."""
    try:
        return [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type not in _SKIPPED]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return text.split()


def ngrams(text, n=NGRAM):
    tokens = code_tokens(text)
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class OverlapIndex:
    """The n-grams of an evaluation set; `overlaps(text)` lists the ones `text` shares with it."""

    def __init__(self, texts, n=NGRAM, source="evaluation set"):
        self.n = n
        self.source = source
        self.grams = set()
        for text in texts:
            self.grams |= ngrams(text, n)

    @classmethod
    def from_humanevalfix(cls, path, n=NGRAM):
        problems = load_problems(path)
        texts = [p[field] for p in problems for field in EVAL_FIELDS if isinstance(p.get(field), str)]
        texts += [p["declaration"] + p["canonical_solution"] for p in problems]  # across the field boundary
        return cls(texts, n, source=str(path))

    def overlaps(self, text):
        return sorted(ngrams(text, self.n) & self.grams)

    def check(self, texts):
        """(number of texts checked, [(index, first shared n-gram), ...]) over `texts`."""
        hits, count = [], 0
        for i, text in enumerate(texts):
            count += 1
            shared = self.overlaps(text)
            if shared:
                hits.append((i, " ".join(shared[0])))
        return count, hits
