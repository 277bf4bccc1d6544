"""Two Nebula-I clusters as tools/train.py processes (optionally each inside a network namespace)."""
import subprocess
import sys

import paddle

from conftest import REPO_ROOT, last_json_line, subprocess_env

TRAIN = str(REPO_ROOT / "tools" / "train.py")


def cluster_sections(certs, name, role, address, language, output_dir, max_steps=20, **cross_cluster):
    """Config sections (over conftest's tiny model) of one cluster that trains on `language`."""
    return {
        "Engine": {"max_steps": max_steps, "output_dir": str(output_dir), "logging_freq": 5, "eval_freq": 10,
                   "eval_iters": 2},
        "Data": {"seq_len": 64,
                 "Train": {"dataset": "BuiltinLanguage", "language": language, "split": "train", "max_chars": 150_000},
                 "Eval": {"dataset": "BuiltinLanguage", "language": language, "split": "validation",
                          "max_chars": 30_000}},
        "Optimizer": {"lr": {"warmup_steps": 2, "decay_steps": max_steps}},
        "Distributed": {"cross_cluster": {
            "enable": True, "role": role, "address": address, "cert": certs[f"{name}_cert"],
            "key": certs[f"{name}_key"], "ca_cert": certs["ca_cert"], "reconnect_timeout": 60.0, **cross_cluster}},
    }


def start_cluster(config, wrap=(), nproc=1, log_dir=None):
    """tools/train.py on `config` (under paddle.distributed.launch when nproc > 1), as a Popen."""
    if nproc > 1:
        command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
                   "--log_dir", str(log_dir), TRAIN, "-c", str(config)]
    else:
        command = [sys.executable, TRAIN, "-c", str(config)]
    return subprocess.Popen([*wrap, *command], cwd=REPO_ROOT, env=subprocess_env(threads=1), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(processes, timeout=300):
    """Wait for every process; (returncode, stdout, stderr) each. Kills them all on timeout."""
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def check_ok(results):
    for code, out, err in results:
        assert code == 0, f"a cluster failed (exit {code}):\n{out[-3000:]}\n{err[-5000:]}"
    return [last_json_line(out) for _code, out, _err in results]


def final_weights(summary):
    """{name: array} of the model weights in the checkpoint a run's summary names."""
    checkpoint = REPO_ROOT / summary["checkpoint"]  # an absolute checkpoint path stays as it is
    return {name: value.numpy() for name, value in paddle.load(str(checkpoint / "model.mp0.pdparams")).items()}
