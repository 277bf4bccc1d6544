"""CCT: error injection (bug types, reproducibility, recorded edits, behaviour checked by the tests of
HumanEvalFix), the token-level hinge loss against its formula, the comparison data, the overlap check, and
training and evaluation end to end through the engine and tools."""
import ast
from pathlib import Path

import numpy as np
import paddle
import pytest
import yaml

from conftest import last_json_line, read_metrics, run_tool
from ppzoo.data.tokenizer import Tokenizer
from ppzoo.errors import ConfigError
from ppzoo.eval import humanevalfix as hef
from ppzoo.eval.humanevalfix import sandbox as sandbox_module
from ppzoo.methods.cct import BUG_TYPES, inject, token_hinge_loss
from ppzoo.methods.cct.data import CodeInstructions, CodeInstructionsConfig, first_difference, stdlib_functions
from ppzoo.methods.cct.overlap import OverlapIndex

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / hef.DATA_FILE
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"HumanEvalFix data not found at {hef.DATA_FILE}")
CAPS = sandbox_module.capabilities()
needs_sandbox = pytest.mark.skipif(not CAPS["namespaces"] or CAPS["landlock_abi"] < 1,
                                   reason="this kernel cannot isolate programs (see test_humanevalfix)")
SMALL_POOL = 300  # functions: the first files of the corpus suffice and load in a second


# --------------------------------------------------------------------------------------- error injection
def test_every_bug_type_is_injected_reproducibly_and_recorded():
    functions = stdlib_functions("train", 500, SMALL_POOL)
    made = {t: 0 for t in BUG_TYPES}
    for function in functions[:80]:
        for bug_type in BUG_TYPES:
            variant = inject(function.code, bug_type, seed=7)
            if variant is None:
                continue
            made[bug_type] += 1
            assert variant == inject(function.code, bug_type, seed=7)  # same seed, same edit
            assert variant.edit.bug_type == bug_type and variant.buggy != variant.original
            ast.parse(variant.buggy)  # every variant parses
            assert variant.original == ast.unparse(ast.parse(function.code))
            # The recorded edit is where the texts differ.
            old_lines, new_lines = variant.original.splitlines(), variant.buggy.splitlines()
            first = next(i for i, (a, b) in enumerate(zip(old_lines + [""], new_lines + [""])) if a != b)
            assert first >= variant.edit.line - 1  # nothing above the recorded line changed
            flat = lambda text: " ".join(text.split())  # noqa: E731  (a node's text is unparsed unindented)
            assert flat(variant.edit.before) in flat(variant.original)
            if variant.edit.after:
                assert flat(variant.edit.after) in flat(variant.buggy)
    assert all(count >= 5 for count in made.values()), made
    seeds = {inject(functions[0].code, None, seed=s).buggy for s in range(12)}
    assert len(seeds) > 1  # the seed chooses the edit


@needs_data
@needs_sandbox
def test_variants_fail_the_tests_that_the_original_passes():
    sandbox = hef.Sandbox(hef.SandboxLimits(timeout=4.0, cpu_seconds=3), workers=2)
    problems = hef.load_problems(DATA)[:6]
    made = 0
    for problem in problems:
        def passes(code, problem=problem):
            return sandbox.run(code + "\n" + problem["test"] + "\n").passed

        original = problem["declaration"] + problem["canonical_solution"]
        assert passes(original)
        for bug_type in ("operator misuse", "value misuse", "variable misuse", "missing logic"):
            variant = inject(original, bug_type, seed=1, check=passes, max_tries=3)
            if variant is not None:
                made += 1
                assert not passes(variant.buggy), variant.edit
    assert made >= 12


# ------------------------------------------------------------------------------------------ token loss
def _reference_hinge(chosen, rejected, spans, margin):
    losses = []
    for c, r, (start, end) in zip(chosen, rejected, spans):
        terms = [max(0.0, margin - c[i] + r[i]) for i in range(start, end)]
        losses.append(sum(terms) / max(end - start, 1))
    return float(np.mean(losses))


def test_token_hinge_loss_matches_its_formula_and_pushes_the_original_up():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    spans = np.array([[0, 12], [3, 9], [5, 6], [11, 12], [4, 10]])
    for margin in (1.0, 0.5):
        got = token_hinge_loss(paddle.to_tensor(chosen), paddle.to_tensor(rejected), paddle.to_tensor(spans), margin)
        assert float(got) == pytest.approx(_reference_hinge(chosen, rejected, spans, margin), rel=1e-6)
    scores = paddle.to_tensor(chosen, stop_gradient=False)
    token_hinge_loss(scores, paddle.to_tensor(rejected), paddle.to_tensor(spans)).backward()
    grad = scores.grad.numpy()
    assert (grad <= 0).all()  # raising an original's score never raises the loss
    assert np.all(grad[1, :3] == 0) and np.all(grad[1, 9:] == 0)  # outside [I, M) nothing is compared


# -------------------------------------------------------------------------------------------- the data
@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return Tokenizer.from_file(tokenizer_file)


@needs_data
def test_comparison_rows_and_overlap_check(tokenizer):
    args = CodeInstructionsConfig(comparison=True, num_samples=16, pair_len=256, max_code_chars=300,
                                  max_functions=SMALL_POOL, decontaminate_against=str(DATA))
    dataset = CodeInstructions(args, tokenizer, 256)
    index = OverlapIndex.from_humanevalfix(DATA)
    texts = []
    for i in range(len(dataset)):
        row = dataset[i]
        for ids, labels in ((row["input_ids"], row["labels"]), (row["fix_input_ids"], row["fix_labels"])):
            text = tokenizer.decode(ids.tolist())
            texts.append(text)
            # Labels are the responses (code and eos), never the instruction.
            labelled = tokenizer.decode(labels[labels >= 0].tolist())
            assert "### Instruction" not in labelled and "Fix bugs in" not in labelled
        assert "Fix bugs in " in tokenizer.decode(row["fix_input_ids"].tolist())
        for chosen, rejected, (start, end) in zip(row["chosen_ids"], row["rejected_ids"], row["pair_span"]):
            assert np.array_equal(chosen[:start], rejected[:start]) and chosen[start] != rejected[start] or start == end
            assert start < end <= args.pair_len
    # No training text shares a 13-token run with HumanEval / HumanEvalFix prompts, solutions or tests ...
    checked, hits = index.check(texts + [f.code for f in dataset.functions])
    assert checked > len(dataset.functions) and hits == []
    # ... and the check does see one: a training text that contains a HumanEval solution.
    problem = hef.load_problems(DATA)[10]
    leaked = "def helper(x):\n    return x\n" + problem["declaration"] + problem["canonical_solution"]
    assert index.overlaps(leaked)
    # The held-out functions used for evaluation are never training functions.
    heldout = {f.code for f in stdlib_functions("heldout", 300, 50)}
    assert heldout and not heldout & {f.code for f in stdlib_functions("train", 300, 2000)}


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 4]) == 2
    assert first_difference([1, 2], [1, 2, 5]) == 2


# ------------------------------------------------------------------------------ engine and tools end to end
def _write_config(tmp_path, tokenizer_file, **model):
    config = {
        "_base_": str(REPO_ROOT / "configs" / "cct" / "tiny.yaml"),
        "Global": {"device": "cpu"},
        "Engine": {"max_steps": 6, "output_dir": str(tmp_path / "out"), "logging_freq": 1, "eval_iters": 1,
                   "progress_bar": False},
        "Model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 1, "intermediate_size": 64,
                  "max_position_embeddings": 2048, **model},
        "Data": {"tokenizer": str(tokenizer_file), "seq_len": 192,
                 "Train": {"dataset": "CodeInstructions", "num_samples": 48, "pair_len": 224, "max_code_chars": 250,
                           "max_functions": SMALL_POOL, "decontaminate_against": str(DATA)},
                 "Eval": {"dataset": "CodeInstructions", "split": "heldout", "num_samples": 8, "pair_len": 224,
                          "max_code_chars": 250, "max_functions": 40, "decontaminate_against": str(DATA)}},
        "Optimizer": {"lr": {"warmup_steps": 1}},
    }
    path = tmp_path / "cct.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@needs_data
@needs_sandbox
def test_cct_trains_through_the_engine_and_evaluates(tmp_path, tokenizer_file):
    config = _write_config(tmp_path, tokenizer_file, token_loss_weight=0.5, sequence_loss_weight=0.25)
    trained = run_tool("train", ["-c", config])
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = read_metrics(tmp_path / "out")
    for record in records:
        # The optimized loss is the configured weighted sum of the named parts.
        expected = record["instruction_loss"] + 0.25 * record["sequence_loss"] + 0.5 * record["token_loss"]
        assert record["loss"] == pytest.approx(expected, rel=1e-4)
    ckpt = last_json_line(trained.stdout)["checkpoint"]

    bugs = run_tool("eval", ["-c", config, "--ckpt", ckpt, "--task", "injected_bugs", "--cases", "12"])
    assert bugs.returncode == 0, bugs.stderr[-3000:]
    result = last_json_line(bugs.stdout)
    assert result["cases"] == 12 and set(result["overall"]) == {"lm_ranking", "fix_ranking", "score_ranking", "exact_fix"}
    assert all(0.0 <= v <= 1.0 for v in result["overall"].values())

    fix = run_tool("eval", ["-c", config, "--ckpt", ckpt, "--task", "humanevalfix", "--limit", "4", "--samples", "2",
                            "--k", "1", "2", "--fix-max-new-tokens", "8", "--timeout", "4"])
    assert fix.returncode == 0, fix.stderr[-3000:]
    table = last_json_line(fix.stdout)["pass_at_k"]
    assert table["all"]["problems"] == 4 and "pass@2" in table["all"]


@needs_data
def test_token_loss_learns_to_rank_a_fixed_batch(tmp_path, tokenizer_file):
    import ppzoo

    cfg = ppzoo.load_config(_write_config(tmp_path, tokenizer_file), ["Model.instruction_loss_weight=0",
                                                                      "Model.sequence_loss_weight=0"])
    engine = ppzoo.Engine(cfg)
    batch = {k: paddle.to_tensor(np.stack([engine.train_dataset[i][k] for i in range(4)]))
             for k in engine.train_dataset[0]}
    optimizer = paddle.optimizer.Adam(learning_rate=3e-3, parameters=engine.module.parameters())
    first = engine.module.training_step(batch)
    for _ in range(25):
        losses = engine.module.training_step(batch)
        losses["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    last = engine.module.training_step(batch)
    assert float(last["token_loss"]) < 0.5 * float(first["token_loss"])
    assert float(last["pair_accuracy"]) == 1.0


@needs_data
def test_loss_weights_need_the_comparison_data(tmp_path, tokenizer_file):
    import ppzoo

    config = _write_config(tmp_path, tokenizer_file)
    cfg = ppzoo.load_config(config, ["Data.Train.comparison=false"])
    engine = ppzoo.Engine(cfg)
    batch = {k: paddle.to_tensor(np.stack([v])) for k, v in engine.train_dataset[0].items()}
    with pytest.raises(ConfigError, match="comparison: true"):
        engine.module.training_step(batch)
