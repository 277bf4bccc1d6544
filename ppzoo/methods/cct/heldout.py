"""The held-out injected-bugs evaluation: can a model tell, and fix, subtle bugs in functions it never saw?

Cases: held-out stdlib functions (ppzoo.methods.cct.data.is_heldout; never trained on, and checked against
HumanEval / HumanEvalFix like the training data), each with one injected bug, the bug types taken in turn.
Metrics (per bug type and overall):
  * lm_ranking    log p(original) > log p(buggy) as the response to the same "write this function"
                  instruction: does the language model prefer correct code?
  * fix_ranking   given "Fix bugs in f." after the buggy code, log p(original) > log p(buggy copied back)
  * exact_fix     greedy decoding of that fix prompt reproduces the original (compared after ast.unparse)
  * score_ranking (models with CCT's scoring head) the head's summed score over the compared span is higher
                  for the original
Tiny models score near zero on HumanEvalFix; these rankings still separate methods.
"""
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from ppzoo.eval.humanevalfix.harness import fix_instruction, instruction_prompt
from ppzoo.methods.cct.data import INSTRUCTION_TEMPLATES, SampleTokenizer, decontaminate, first_difference, stdlib_functions
from ppzoo.methods.cct.inject import BUG_TYPES, inject, normalize
from ppzoo.methods.cct.overlap import OverlapIndex

@dataclass
class Case:
    name: str
    original: str
    buggy: str
    bug_type: str
    edit: str
    write_prompt: str
    fix_prompt: str


def write_instruction(function):
    """The first instruction template, filled deterministically (no random wording at evaluation)."""
    signature = function.def_line[len("def "):].rstrip(":")
    summary = f" {function.summary}" if function.summary else ""
    return INSTRUCTION_TEMPLATES[0].format(signature=signature, name=function.name, summary=summary)


def build_cases(max_cases=240, max_code_chars=500, decontaminate_against=None, seed=0):
    """Up to max_cases held-out cases, bug types in turn (a function lacking the turn's type gets another)."""
    # Four functions a case are plenty (few fail decontamination or injection), and a short scan is quick.
    functions = stdlib_functions("heldout", max_code_chars, 4 * max_cases)
    if decontaminate_against:
        functions, _ = decontaminate(functions, OverlapIndex.from_humanevalfix(decontaminate_against))
    cases = []
    for i, function in enumerate(functions):
        if len(cases) >= max_cases:
            break
        preferred = BUG_TYPES[len(cases) % len(BUG_TYPES)]
        variant = inject(function.code, preferred, seed=seed + i) or inject(function.code, None, seed=seed + i)
        if variant is None:
            continue
        cases.append(Case(function.name, variant.original, variant.buggy, variant.edit.bug_type,
                          variant.edit.description, instruction_prompt(write_instruction(function)),
                          instruction_prompt(fix_instruction(variant.buggy, function.name))))
    return cases


class SequenceScorer:
    """Summed log-probabilities of responses (and CCT head scores) under a module's language model."""

    def __init__(self, module, tokenizer, batch_size=16):
        self.module = module
        self.lm = module.language_model()
        self.tokens = SampleTokenizer(tokenizer)
        self.batch_size = batch_size

    def _padded(self, rows):
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.tokens.pad_id, dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        return paddle.to_tensor(ids)

    @paddle.no_grad()
    def log_probs(self, pairs):
        """Sum of log p(response tokens and eos | prompt) for each (prompt, response)."""
        totals = []
        for start in range(0, len(pairs), self.batch_size):
            samples = [self.tokens.sample(p, r) for p, r in pairs[start:start + self.batch_size]]
            ids = self._padded([s[0] for s in samples])
            logp = F.log_softmax(self.lm(ids).astype("float32"), axis=-1)
            picked = paddle.take_along_axis(logp[:, :-1], ids[:, 1:].unsqueeze(-1), axis=-1).squeeze(-1).numpy()
            for row, (_, is_label) in enumerate(samples):
                mask = np.asarray(is_label[1:], dtype=bool)
                totals.append(float(picked[row, :len(mask)][mask].sum()))
        return np.array(totals)

    @paddle.no_grad()
    def head_margins(self, triples):
        """For (prompt, original, buggy): summed r(original) - r(buggy) over [first difference, longer length)."""
        margins = []
        for start in range(0, len(triples), self.batch_size):
            chunk = triples[start:start + self.batch_size]
            chosen = [self.tokens.sample(p, a)[0] for p, a, _ in chunk]
            rejected = [self.tokens.sample(p, b)[0] for p, _, b in chunk]
            width = max(len(r) for r in chosen + rejected)
            scores = self.module.scores(self._padded(chosen + rejected + [[self.tokens.pad_id] * width])).numpy()
            for i, (a, b) in enumerate(zip(chosen, rejected)):
                lo, hi = first_difference(a, b), max(len(a), len(b))
                margins.append(float((scores[i, lo:hi] - scores[len(chunk) + i, lo:hi]).sum()))
        return np.array(margins)


def exact_fixes(module, tokenizer, cases, batch_size=16, max_new_tokens=200):
    """Whether greedy decoding of each case's fix prompt gives back the original function."""
    from ppzoo.inference.generate import Generator, SamplingConfig

    generator = Generator(module.language_model(), tokenizer)
    fixed = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        longest = max(len(tokenizer.encode(c.original)) for c in chunk)
        sampling = SamplingConfig(max_new_tokens=min(longest + 16, max_new_tokens), temperature=0.0,
                                  stop_strings=["\n###"])
        for case, text in zip(chunk, generator.generate([c.fix_prompt for c in chunk], sampling, truncate=True)):
            try:
                fixed.append(normalize(text) == case.original)
            except (SyntaxError, ValueError):
                fixed.append(False)
    return np.array(fixed)


def evaluate_injected_bugs(module, tokenizer, cases, generate=True, batch_size=16):
    """{"overall": {metric: value}, "per_bug_type": {type: {...}}, "cases": n} for a trained module."""
    was_training = module.training
    module.eval()
    scorer = SequenceScorer(module, tokenizer, batch_size)
    per_case = OrderedDict()
    per_case["lm_ranking"] = (scorer.log_probs([(c.write_prompt, c.original) for c in cases])
                              > scorer.log_probs([(c.write_prompt, c.buggy) for c in cases]))
    per_case["fix_ranking"] = (scorer.log_probs([(c.fix_prompt, c.original) for c in cases])
                               > scorer.log_probs([(c.fix_prompt, c.buggy) for c in cases]))
    if hasattr(module, "scores"):
        per_case["score_ranking"] = scorer.head_margins([(c.write_prompt, c.original, c.buggy) for c in cases]) > 0
    if generate:
        per_case["exact_fix"] = exact_fixes(module, tokenizer, cases, batch_size)
    if was_training:
        module.train()
    types = np.array([c.bug_type for c in cases])
    result = {"cases": len(cases), "overall": {k: float(v.mean()) for k, v in per_case.items()}, "per_bug_type": {}}
    for bug_type in BUG_TYPES:
        members = types == bug_type
        if members.any():
            result["per_bug_type"][bug_type] = {"cases": int(members.sum()),
                                                **{k: float(v[members].mean()) for k, v in per_case.items()}}
    return result


def markdown_table(result):
    metrics = list(result["overall"])
    lines = ["| bug type | cases | " + " | ".join(metrics) + " |", "| --- | --- |" + " --- |" * len(metrics)]
    rows = [("all", {"cases": result["cases"], **result["overall"]})] + list(result["per_bug_type"].items())
    for name, row in rows:
        lines.append(f"| {name} | {row['cases']} | " + " | ".join(f"{row[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines)
