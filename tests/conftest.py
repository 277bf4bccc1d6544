"""Shared fixtures and helpers for the engine, distributed and command line tests.

- `tokenizer_file`: a small byte-level BPE tokenizer (vocab 512) trained once per session on the built-in
  corpus;
- `write_config`: writes a shrunken copy of configs/chuxin/tiny.yaml (via `_base_`) that trains in seconds;
- `run_tool`: runs a command line tool of tools/ in a subprocess;
- `start_launch` / `wait_launch` / `run_launch`: `python -m paddle.distributed.launch` jobs with a timeout
  that kills the launcher and all its workers, and a failure report that shows the workers' logs;
- `read_metrics`: the records of a run's metrics.jsonl.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ppzoo  # noqa: F401  (first: CPU threading defaults before paddle loads)
from ppzoo.data.corpus import builtin_texts
from ppzoo.data.tokenizer import train_byte_level_bpe

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs" / "chuxin" / "tiny.yaml"
TOKENIZER_VOCAB = 512
TOKENIZER_CHARS = 300_000
LAUNCH_TIMEOUT_SECONDS = 180


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and configs


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    tokenizer = train_byte_level_bpe(builtin_texts("train", TOKENIZER_CHARS), TOKENIZER_VOCAB)
    assert tokenizer.vocab_size == TOKENIZER_VOCAB
    return tokenizer.save(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


def deep_merge(base, update):
    """`update` over `base`: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def small_config_sections(tokenizer_path, output_dir):
    """The sections written over tiny.yaml: a 2-layer model of width 64 on 64-token windows."""
    return {
        "Global": {"seed": 1234, "device": "cpu", "global_batch_size": 8, "micro_batch_size": 8},
        "Engine": {
            "max_steps": 20,
            "output_dir": str(output_dir),
            "logging_freq": 1,
            "eval_freq": 0,
            "eval_iters": 2,
            "save_steps": 0,
            "keep_last": 2,
            "progress_bar": False,
        },
        "Model": {
            "module": "ChuXin",
            "vocab_size": 512,
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "intermediate_size": 176,
            "max_position_embeddings": 128,
        },
        "Data": {
            "tokenizer": str(tokenizer_path),
            "seq_len": 64,
            "Train": {"dataset": "BuiltinCorpus", "split": "train", "max_chars": 200_000},
            "Eval": {"dataset": "BuiltinCorpus", "split": "validation", "max_chars": 50_000},
        },
        # decay_steps is explicit so that a run stopped early (smaller max_steps) has the same schedule.
        "Optimizer": {"lr": {"warmup_steps": 5, "decay_steps": 20}},
    }


@pytest.fixture(scope="session")
def write_config(tokenizer_file):
    """write_config(directory, name="config.yaml", **sections) -> path of a YAML config.

    The file inherits configs/chuxin/tiny.yaml (absolute `_base_`) and shrinks it; `sections` are deep-merged
    over the shrunken values, e.g. write_config(tmp_path, Engine={"max_steps": 5}). Engine.output_dir
    defaults to directory/out.
    """

    def write(directory, name="config.yaml", **sections):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = deep_merge(small_config_sections(tokenizer_file, directory / "out"), sections)
        path = directory / name
        path.write_text(yaml.safe_dump({"_base_": str(TINY_CONFIG), **data}, sort_keys=False))
        return path

    return write


def read_metrics(output_dir):
    """The records of output_dir/metrics.jsonl, in file order."""
    with open(Path(output_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses_by_step(records):
    return {record["step"]: record["loss"] for record in records}


# ---------------------------------------------------------------------------------------------------------
# Subprocesses


def subprocess_env(threads=None):
    env = dict(os.environ)
    # CUDA_VISIBLE_DEVICES="" makes paddle.distributed.launch treat the empty string as one GPU label and fail
    # with an IndexError for two processes; on a CPU-only build, leaving it unset selects CPU and gloo.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_tool(tool, args, timeout=300, cwd=REPO_ROOT):
    """Run tools/<tool>.py with `args`; returns the CompletedProcess (text stdout and stderr)."""
    command = [sys.executable, str(REPO_ROOT / "tools" / f"{tool}.py"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def last_json_line(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_failure_report(log_dir, launcher_output, reason):
    parts = [reason, "--- launcher output (tail) ---", launcher_output[-3000:]]
    for path in sorted(glob.glob(os.path.join(str(log_dir), "workerlog.*"))):
        with open(path, errors="replace") as f:
            parts += [f"--- {path} (tail) ---", f.read()[-4000:]]
    return "\n".join(parts)


def start_launch(args, nproc, log_dir, launch_args=()):
    """Start `python -m paddle.distributed.launch --nproc_per_node nproc ... args` in a new session (so a
    timeout can kill the launcher and its workers together: a rank that died leaves the others blocked in a
    collective). Each worker gets one thread: the processes share the machine's cores."""
    command = [
        sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--max_restart", "0",
        "--log_dir", str(log_dir), *map(str, launch_args), *map(str, args),
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(threads=1), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    process.log_dir = str(log_dir)
    return process


def kill_launch(process):
    """Kill a started launch (the launcher and its workers: its whole process group) if it still runs. An
    exited launcher is left alone: once reaped, its process group id may belong to someone else."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def wait_launch(process, timeout=LAUNCH_TIMEOUT_SECONDS, check=True):
    """Wait for a started launch; returns its output. Fails the test (showing the worker logs) on a timeout
    or, with check=True, on a non-zero exit."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(launch_failure_report(process.log_dir, output, f"launch timed out after {timeout} s"))
    finally:
        kill_launch(process)
    if check and process.returncode != 0:
        pytest.fail(launch_failure_report(process.log_dir, output, f"launch exited with {process.returncode}"))
    return output


def run_launch(args, nproc, log_dir, timeout=LAUNCH_TIMEOUT_SECONDS, launch_args=(), check=True):
    """Launch `args` (a script and its arguments) on nproc local processes and wait; returns
    (returncode, launcher output)."""
    process = start_launch(args, nproc, log_dir, launch_args)
    output = wait_launch(process, timeout, check)
    return process.returncode, output
