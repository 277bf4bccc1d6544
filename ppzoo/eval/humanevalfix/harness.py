"""HumanEvalFix (HumanEvalPack, Python): fix the bug in a function, with its tests in view.

Each problem has a function with a subtle bug (`declaration` + `buggy_solution`), its test program (`test`,
which ends by calling check(entry_point)) and a bug type. The prompt shows the buggy function and the
tests, then the instruction "Fix bugs in {entry_point}."; the response begins with the function's
declaration, which the model continues with a new body. A candidate passes when declaration + body + tests
runs to the end in the sandbox.

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c pass,
pass@k = 1 - C(n - c, k) / C(n, k), averaged over problems (computed as a product, without large binomials).
"""
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ppzoo.errors import DataError

REQUIRED_FIELDS = ("task_id", "declaration", "buggy_solution", "canonical_solution", "test", "entry_point", "bug_type")
DATA_FILE = "../shared/data/humanevalfix/humanevalpack_python.jsonl"  # relative to the repository root

INSTRUCTION_HEADER = "### Instruction\n"
RESPONSE_HEADER = "### Response\n"
# A completed function body ends where a line starts at column 0 (the next definition, test code, ...).
STOP_STRINGS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n@", "\nassert ", "\n###", "\n```"]


def instruction_prompt(instruction, response_prefix=""):
    """The one prompt format of ppzoo's instruction data and of this harness."""
    return f"{INSTRUCTION_HEADER}{instruction}\n{RESPONSE_HEADER}{response_prefix}"


def fix_instruction(buggy_code, entry_point, tests=None):
    """"Fix bugs in {entry_point}." after the buggy code (and the tests, when there are any)."""
    context = buggy_code.rstrip("\n") + "\n"
    if tests:
        context += "\n" + tests.strip("\n") + "\n"
    return f"{context}\nFix bugs in {entry_point}."


def load_problems(path=DATA_FILE):
    """The problems of a HumanEvalPack-format JSONL file, checked for the fields the harness needs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"HumanEvalFix file {path} does not exist. Point --data at humanevalpack_python.jsonl "
                        "(one JSON object per line with the HumanEvalPack fields).")
    problems = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg}).") from exc
            missing = [f for f in REQUIRED_FIELDS if not isinstance(record, dict) or not isinstance(record.get(f), str)]
            if missing:
                raise DataError(f"{path}, line {number}: missing or non-string field(s) {', '.join(missing)}; a "
                                f"HumanEvalFix record needs {', '.join(REQUIRED_FIELDS)}.")
            problems.append(record)
    if not problems:
        raise DataError(f"{path} holds no problems.")
    return problems


def build_prompt(problem):
    """The model's prompt: buggy function + tests + "Fix bugs in f.", then the response's declaration."""
    instruction = fix_instruction(problem["declaration"] + problem["buggy_solution"], problem["entry_point"],
                                  problem["test"])
    return instruction_prompt(instruction, problem["declaration"])


def truncate_completion(text):
    """The generated body up to the first stop string."""
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut]


def build_program(problem, body):
    """declaration + body + the problem's test program (which calls check(entry_point) itself)."""
    return problem["declaration"] + body + "\n" + problem["test"] + "\n"


def pass_at_k(n, c, k):
    """Unbiased pass@k for one problem with n samples of which c pass."""
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def score(problems, passed, ks=(1,)):
    """pass@k overall and per bug type; `passed[i]` lists the pass/fail of problem i's samples."""
    n_samples = {len(p) for p in passed}
    ks = [k for k in ks if k <= min(n_samples)]
    groups = OrderedDict([("all", list(range(len(problems))))])
    for bug_type in sorted({p["bug_type"] for p in problems}):
        groups[bug_type] = [i for i, p in enumerate(problems) if p["bug_type"] == bug_type]
    table = OrderedDict()
    for name, members in groups.items():
        row = {"problems": len(members), "passed_samples": int(sum(sum(passed[i]) for i in members))}
        for k in ks:
            row[f"pass@{k}"] = float(np.mean([pass_at_k(len(passed[i]), sum(passed[i]), k) for i in members]))
        table[name] = row
    return table


def run_candidates(problems, bodies, sandbox):
    """Run every candidate body (bodies[i]: problem i's samples) in the sandbox; returns pass/fail lists."""
    flat = [(i, build_program(problems[i], body)) for i, samples in enumerate(bodies) for body in samples]
    results = sandbox.run_many(program for _, program in flat)
    passed = [[] for _ in problems]
    for (i, _), result in zip(flat, results):
        passed[i].append(result.passed)
    return passed, results


def generate_bodies(generator, problems, n, temperature=0.2, top_p=0.95, max_new_tokens=256, batch_size=8,
                    seed=0):
    """n sampled bodies per problem (greedy when temperature is 0, which needs n == 1)."""
    from ppzoo.inference.generate import SamplingConfig

    if temperature == 0 and n > 1:
        raise DataError("greedy decoding (temperature 0) gives one answer per problem: use n=1 or a temperature > 0.")
    prompts = [build_prompt(p) for p in problems for _ in range(n)]
    bodies = []
    for start in range(0, len(prompts), batch_size):
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  stop_strings=STOP_STRINGS, seed=seed + start)
        texts = generator.generate(prompts[start:start + batch_size], sampling, truncate=True)
        bodies.extend(truncate_completion(t) for t in texts)
    return [bodies[i * n:(i + 1) * n] for i in range(len(problems))]


def markdown_table(table):
    ks = [key for key in next(iter(table.values())) if key.startswith("pass@")]
    lines = ["| bug type | problems | " + " | ".join(ks) + " |", "| --- | --- | " + " | ".join("---" for _ in ks) + " |"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['problems']} | " + " | ".join(f"{row[k]:.3f}" for k in ks) + " |")
    return "\n".join(lines)
