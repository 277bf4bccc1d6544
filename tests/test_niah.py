"""Needle in a haystack: the grid's prompts, exact-match scoring, the heatmap, the retrieval training rows and
tools/eval.py --task niah."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import ppzoo  # noqa: F401
from ppzoo.config import load_config
from ppzoo.core.engine import Engine
from ppzoo.data.needle import (
    Haystack,
    NeedleBuilder,
    NeedleRetrieval,
    NeedleRetrievalConfig,
    is_correct,
    needle_sentence,
)
from ppzoo.data.corpus import builtin_texts
from ppzoo.data.tokenizer import Tokenizer, train_byte_level_bpe
from ppzoo.eval import niah
from tests.conftest import last_json_line, run_tool

LENGTHS = [160, 320]
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return Tokenizer.from_file(tokenizer_file)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return NeedleBuilder(tokenizer, Haystack(tokenizer, "validation"))


@pytest.fixture(scope="module")
def number_tokenizer():
    """A small vocabulary with enough multi-digit tokens for value_kind "token" (the session tokenizer has
    two: its training text is mostly prose and code)."""
    numbers = ",".join(str(n) for n in range(10, 30))  # no spaces: tokens "10", not " 10"
    return train_byte_level_bpe(list(builtin_texts("train", 200_000)) + [numbers] * 2000, 512)


@pytest.fixture(scope="module")
def grid(builder):
    return niah.build_grid(builder, LENGTHS, DEPTHS, trials=3, seed=5)


def test_grid_prompts_have_the_length_and_the_needle_at_its_depth(grid, builder, tokenizer):
    assert len(grid) == len(LENGTHS) * len(DEPTHS) * 3
    newline_ids = {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}
    for case in grid:
        assert len(case.prompt) == case.length
        assert case.prompt[0] == tokenizer.bos_id
        needle = case.prompt[case.needle_start:case.needle_start + len(case.needle_tokens)]
        assert needle == case.needle_tokens
        assert tokenizer.decode(needle) == needle_sentence(case.key, case.value)
        text = tokenizer.decode(case.prompt)
        assert text.count(f" is {case.value}.") == 1
        assert text.endswith(f"? The secret passphrase for the {case.key} is")
        # The needle sits at the line end (a line-break token, or the haystack's end) nearest the depth.
        haystack = case.prompt[case.haystack_start:case.needle_start] + \
            case.prompt[case.needle_start + len(case.needle_tokens):case.haystack_start + case.haystack_size + len(needle)]
        assert len(haystack) == case.haystack_size
        candidates = [i for i, t in enumerate(haystack) if t in newline_ids] + [case.haystack_size]
        cut = case.needle_start - case.haystack_start
        assert cut in candidates
        target = case.depth * case.haystack_size
        assert abs(cut - target) == min(abs(c - target) for c in candidates)
        if case.depth == 0.0:
            assert cut == 0  # the window starts at a line break
        if case.depth == 1.0:
            assert cut == case.haystack_size  # right before the question
    # Deterministic per cell: the same cell in another grid has the same cases.
    again = niah.build_grid(builder, [LENGTHS[1]], [0.5], trials=3, seed=5)
    assert [c.prompt for c in again] == [c.prompt for c in grid if c.length == LENGTHS[1] and c.depth == 0.5]
    assert len({c.value for c in grid}) > len(grid) // 2  # values differ between trials


def test_exact_match():
    assert is_correct(" 4817.", "4817") and is_correct("4817 and more", "4817")
    assert not is_correct(" 48170.", "4817") and not is_correct(" 481", "4817") and not is_correct(" the", "4817")
    assert is_correct("25.", "25") and not is_correct("255.", "25")


def test_token_values_are_one_token_in_a_digit_free_haystack(number_tokenizer):
    tok = number_tokenizer
    haystack = Haystack(tok, "validation", drop_digits=True)
    assert not any(ch.isdigit() for ch in tok.decode(haystack.tokens[:20000].tolist()))
    builder = NeedleBuilder(tok, haystack, "token", num_values=8)
    assert len(builder.value_ids) == 8
    cases = niah.build_grid(builder, [200], [0.0, 0.5, 1.0], trials=4, seed=1)
    for case in cases:
        assert len(case.prompt) == 200
        assert case.value.isdigit() and case.answer[0] in builder.value_ids and len(case.answer) == 2
        assert tok.decode(case.needle_tokens) == needle_sentence(case.key, case.value)
        text = tok.decode(case.prompt)
        assert sum(ch.isdigit() for ch in text) == len(case.value)  # the value is the only number
        assert text.endswith(f"The secret passphrase for the {case.key} is ")
        assert is_correct(tok.decode(case.answer), case.value)


def _oracle(tokenizer):
    def answer(prompts):
        out = []
        for prompt in prompts:
            value = re.search(r"The secret passphrase for the \w+ is (\d+)\.", tokenizer.decode(prompt)).group(1)
            out.append(f" {value}.")
        return out

    return answer


def test_scoring_with_scripted_models(grid, tokenizer):
    right = niah.summarize(grid, niah.run_cases(_oracle(tokenizer), grid, batch_size=4), LENGTHS, DEPTHS)
    assert right["overall_accuracy"] == 1.0
    assert np.array(right["accuracy"]).shape == (len(DEPTHS), len(LENGTHS))
    assert np.all(np.array(right["accuracy"]) == 1.0)
    assert all(cell["trials"] == 3 for cell in right["cells"])
    wrong = niah.summarize(grid, niah.run_cases(lambda prompts: [" 0000."] * len(prompts), grid), LENGTHS, DEPTHS)
    assert wrong["overall_accuracy"] == 0.0 and np.all(np.array(wrong["accuracy"]) == 0.0)
    assert "| 0.25 | 1.00 | 1.00 |" in niah.markdown_table(right)


def test_heatmap_png(tmp_path, grid, tokenizer):
    result = niah.summarize(grid, niah.run_cases(_oracle(tokenizer), grid), LENGTHS, DEPTHS)
    result["accuracy"][2][1] = 0.5
    path = niah.write_heatmap(result, tmp_path / "grid.png")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == niah.heatmap_size(len(LENGTHS), len(DEPTHS))
        # The cell colors follow the accuracy: green for 1.0, amber for 0.5.
        cell = lambda row, col: image.convert("RGB").getpixel(
            (niah.MARGIN_LEFT + col * niah.CELL_W + 4, niah.MARGIN_TOP + row * niah.CELL_H + 4))
        assert cell(0, 0) == niah._accuracy_color(1.0) and cell(2, 1) == niah._accuracy_color(0.5)


def test_needle_retrieval_rows(tokenizer):
    args = NeedleRetrievalConfig(max_chars=300_000, num_samples=16, min_length=120, seed=3)
    dataset = NeedleRetrieval(args, tokenizer, seq_len=512)
    for index in (0, 7):
        sample = dataset[index]
        tokens, _, docs, cases = dataset.row(index)
        assert sample["input_ids"].shape == sample["labels"].shape == sample["doc_ids"].shape == (512,)
        assert len(cases) >= 1 and all(120 <= c.length <= 512 for c in cases)
        # Only the answers (and their eos) are labels, in order.
        answers = [t for t in sample["labels"] if t != -100]
        assert answers == [t for c in cases for t in c.answer + [tokenizer.eos_id]]
        assert tokenizer.decode([t for c in cases for t in c.answer]) == "".join(f" {c.value}." for c in cases)
        # Each case is its own document.
        assert sample["doc_ids"][0] == 0 and sample["doc_ids"][-1] >= len(cases) - 1
    np.testing.assert_array_equal(dataset[3]["input_ids"], dataset[3]["input_ids"])
    everything = NeedleRetrieval(NeedleRetrievalConfig(max_chars=300_000, loss="all", seed=3), tokenizer, 512)
    assert (everything[0]["labels"] != -100).sum() > 400
    short_first = NeedleRetrieval(NeedleRetrievalConfig(max_chars=300_000, min_length=120, length_sampling="log_uniform"),
                                  tokenizer, 512)
    many = np.mean([len(short_first.row(i)[3]) for i in range(20)])
    assert many > np.mean([len(dataset.row(i)[3]) for i in range(16)])  # shorter cases: more per row


def test_eval_tool_niah_on_a_random_checkpoint(tmp_path, write_config):
    config = write_config(tmp_path, Data={"Train": None})
    checkpoint = Engine(load_config(config)).save_checkpoint()
    out = tmp_path / "niah"
    # 192 is beyond the model's max_position_embeddings (128): NIAH probes past the trained context.
    result = run_tool("eval", ["-c", config, "--ckpt", checkpoint, "--task", "niah", "--lengths", "128", "192",
                               "--depths", "0", "0.5", "1", "--trials", "2", "--prefill-chunk", "64",
                               "--max-new-tokens", "4", "--out", out], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    assert summary["task"] == "niah" and summary["lengths"] == [128, 192] and summary["depths"] == [0.0, 0.5, 1.0]
    assert 0.0 <= summary["overall_accuracy"] <= 1.0
    saved = json.loads((out / "niah.json").read_text())
    assert len(saved["trials"]) == 2 * 3 * 2 and saved["settings"]["prefill_chunk"] == 64
    with Image.open(out / "niah.png") as image:
        assert image.size == niah.heatmap_size(2, 3)
