"""User mistakes through the command line tools: exit code 2, one paragraph on stderr that names the problem
(and how to fix it), never a traceback, and nothing on disk damaged."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from ppzoo import Engine, load_config

from conftest import run_tool


def assert_user_error(result, *fragments):
    """Exit 2; stderr is exactly one paragraph starting with `error: ` and containing every fragment."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), result.stderr
    assert all(line.strip() for line in lines), f"more than one paragraph:\n{result.stderr}"
    message = " ".join(lines)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in: {message}"
    return message


# ---------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("tool", ["train", "eval"])
def test_missing_config_file(tmp_path, tool):
    missing = tmp_path / "nope.yaml"
    extra = ["--ckpt", tmp_path] if tool == "eval" else []
    assert_user_error(run_tool(tool, ["-c", missing, *extra]), "Config file not found", missing)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    config = tmp_path / "broken.yaml"
    # The flow sequence opened on line 4 is never closed; the parser notices at the `:` of line 5, which
    # follows the two-space indent and the 10 characters of `output_dir` (column 13, counting from 1).
    config.write_text("Global:\n  seed: 1\nEngine:\n  max_steps: [1, 2\n  output_dir: x\n")
    assert_user_error(run_tool("train", ["-c", config]), "YAML syntax error", config, "line 5, column 13")


def test_unknown_module_lists_the_valid_ones(tmp_path, write_config):
    config = write_config(tmp_path, Model={"module": "ChuXn"})
    assert_user_error(run_tool("train", ["-c", config]),
                      "Unknown module 'ChuXn'", "Did you mean 'ChuXin'?", "Valid names: ", "ChuXin, ")


def test_unknown_key_suggests_the_closest(tmp_path, write_config):
    config = write_config(tmp_path, Engine={"max_step": 3})
    assert_user_error(run_tool("train", ["-c", config]),
                      config, "unknown key `Engine.max_step`", "did you mean `Engine.max_steps`?")
    # the same from a command line override, which the message names
    config = write_config(tmp_path)
    assert_user_error(run_tool("train", ["-c", config, "-o", "Optimizer.lr.max_rl=1e-3"]),
                      "override `Optimizer.lr.max_rl=1e-3`", "did you mean `Optimizer.lr.max_lr`?")


# ---------------------------------------------------------------------------------------------------------
# Data and tokenizer


def test_empty_dataset(tmp_path, write_config):
    data = tmp_path / "tiny.jsonl"
    data.write_text('{"text": "hello"}\n')
    # A config derived from the small one that switches Data.Train to TextFiles: BuiltinCorpus's `split` and
    # `max_chars` are not inherited by the other dataset.
    base = write_config(tmp_path, name="base.yaml")
    config = tmp_path / "own_data.yaml"
    config.write_text(f"_base_: {base}\nData:\n  Train:\n    dataset: TextFiles\n    paths: [{data}]\n")
    assert_user_error(run_tool("train", ["-c", config]),
                      "TextFiles is empty or too small", "seq_len + 1 = 65", "Add more text")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_says_how_to_train_one(tmp_path, write_config):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    config = write_config(tmp_path, Data={"tokenizer": str(missing)})
    assert_user_error(run_tool("train", ["-c", config]),
                      f"No tokenizer found at {missing}", "python tools/train_tokenizer.py --out")


def test_vocab_smaller_than_the_tokenizer(tmp_path, write_config):
    config = write_config(tmp_path, Model={"vocab_size": 256})
    assert_user_error(run_tool("train", ["-c", config]),
                      "Model.vocab_size=256 is smaller than the tokenizer's vocabulary (512 tokens",
                      "set Model.vocab_size to at least 512")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, write_config):
    """Four steps with checkpoints at steps 2 and 4."""
    directory = tmp_path_factory.mktemp("trained")
    config = write_config(directory, Engine={"max_steps": 4, "save_steps": 2, "keep_last": 3})
    Engine(load_config(config)).fit()
    assert sorted(os.listdir(directory / "out")) == ["metrics.jsonl", "step_00000002", "step_00000004"]
    return config, directory / "out"


def tree_checksums(root):
    """relative path -> sha256 of every file under root."""
    sums = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            sums[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "all_damaged"])
def test_damaged_checkpoint_on_resume(tmp_path, trained_run, damage):
    config, trained = trained_run
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    newest, older = out / "step_00000004", out / "step_00000002"
    if damage == "flip":
        _flip_bytes(newest / "model.mp0.pdparams")
    elif damage == "truncate":
        _truncate(newest / "model.mp0.pdparams")
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        _truncate(newest / "model.mp0.pdparams")
        _flip_bytes(older / "optimizer.mp0.pdopt")
    before = tree_checksums(out)

    result = run_tool("train", ["-c", config, "-o", f"Engine.output_dir={out}", "-o", "Engine.max_steps=6",
                                "--resume", "auto"])
    if damage == "no_manifest":
        expected = [f"Cannot resume from {newest}", "has no manifest.json"]
    else:
        expected = [f"Cannot resume from {newest}", "model.mp0.pdparams does not match its checksum"]
    if damage == "all_damaged":
        expected.append("No good checkpoint was found beside it; start a new run without --resume")
    else:
        expected.append(f"The last good checkpoint is {older}: resume from it with --resume {older}")
    assert_user_error(result, *expected)
    # Nothing was written, renamed or removed: not the damaged checkpoint, not the good one, not the metrics.
    assert tree_checksums(out) == before


def test_resume_of_a_path_that_does_not_exist(tmp_path, trained_run):
    config, trained = trained_run
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = tree_checksums(out)
    missing = out / "step_00000099"
    result = run_tool("train", ["-c", config, "-o", f"Engine.output_dir={out}", "--resume", missing])
    assert_user_error(result, f"--resume {missing}: no such checkpoint directory")
    assert tree_checksums(out) == before


def test_resume_past_max_steps(tmp_path, trained_run):
    config, trained = trained_run
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = tree_checksums(out)
    result = run_tool("train", ["-c", config, "-o", f"Engine.output_dir={out}", "-o", "Engine.max_steps=3",
                                "--resume", "auto"])
    assert_user_error(result, f"{out / 'step_00000004'} is at step 4, past Engine.max_steps=3",
                      "Set Engine.max_steps above 4")
    assert tree_checksums(out) == before


def test_new_run_into_an_output_dir_with_checkpoints(tmp_path, trained_run):
    # Without --resume this would be a second run whose checkpoints mix with the first one's.
    config, trained = trained_run
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = tree_checksums(out)
    result = run_tool("train", ["-c", config, "-o", f"Engine.output_dir={out}", "-o", "Engine.max_steps=2"])
    assert_user_error(result, f"Engine.output_dir {out} already holds checkpoints of an earlier run",
                      f"newest: {out / 'step_00000004'}", "--resume auto", "another Engine.output_dir")
    assert tree_checksums(out) == before


def test_eval_tool_refuses_a_damaged_checkpoint(tmp_path, trained_run):
    config, trained = trained_run
    checkpoint = tmp_path / "step_00000004"
    shutil.copytree(trained / "step_00000004", checkpoint)
    _flip_bytes(checkpoint / "model.mp0.pdparams")
    assert_user_error(run_tool("eval", ["-c", config, "--ckpt", checkpoint]),
                      checkpoint / "model.mp0.pdparams", "does not match its checksum")
