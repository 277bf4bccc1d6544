"""The Engine on a tiny ChuXin model and the built-in corpus: training, metrics, gradient accumulation, exact
resume, checkpoint retention and checksums, recompute, the LR schedule, gradient clipping, mixed precision on
CPU, and the parallel degrees CPU cannot run.

Most runs are in-process (an Engine per run); the resume check and the refusals also go through
tools/train.py. Every run is seeded, so two runs that should be the same computation are compared number
for number.
"""
import hashlib
import json
import math
import os
import shutil

import numpy as np
import paddle
import pytest
from paddle import nn

from ppzoo import Engine, load_config
from ppzoo.core.checkpoint import MANIFEST, list_checkpoints
from ppzoo.core.engine import to_tensors
from ppzoo.core.optim import CosineWarmup, clip_grad_norm
from ppzoo.data.sampler import collate

from conftest import last_json_line, losses_by_step, read_metrics, run_tool

BASELINE_STEPS = 30
SCHEDULE = {"lr": {"max_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 5, "decay_steps": BASELINE_STEPS}}


def make_engine(write_config, directory, **sections):
    sections["Optimizer"] = {**SCHEDULE, **sections.get("Optimizer", {})}
    return Engine(load_config(write_config(directory, **sections)))


def params_of(path):
    return {name: np.asarray(value) for name, value in paddle.load(str(path)).items()}


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cosine_warmup_lr(step, max_lr, min_lr, warmup, decay):
    """The schedule's closed form at 0-based optimizer step `step` (the lr the step applies)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= decay:
        return min_lr
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup)))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, write_config):
    """30 steps, evaluated every 10, checkpoints every 10 (the last 2 kept)."""
    directory = tmp_path_factory.mktemp("baseline")
    engine = make_engine(write_config, directory,
                         Engine={"max_steps": BASELINE_STEPS, "eval_freq": 10, "save_steps": 10})
    summary = engine.fit()
    return {"engine": engine, "summary": summary, "records": read_metrics(engine.output_dir),
            "config": directory / "config.yaml"}


# ---------------------------------------------------------------------------------------------------------
# Training and metrics


def test_loss_decreases_and_metrics_are_logged_every_step(baseline):
    records, summary = baseline["records"], baseline["summary"]
    assert [r["step"] for r in records] == list(range(1, BASELINE_STEPS + 1))
    for record in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(record), record
        assert math.isfinite(record["loss"]) and record["tokens_per_sec"] > 0 and record["grad_norm"] > 0
        has_eval = record["step"] % 10 == 0
        assert ("eval_loss" in record) == has_eval and ("eval_ppl" in record) == has_eval, record
        if has_eval:
            assert record["eval_ppl"] == pytest.approx(math.exp(record["eval_loss"]), rel=1e-6)

    losses = [r["loss"] for r in records]
    # A 512-token vocabulary starts near ln(512) = 6.24; 30 steps on the corpus must clearly improve on it.
    assert abs(np.mean(losses[:3]) - math.log(512)) < 0.1
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.4, losses
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[0] > evals[1] > evals[2], evals

    assert summary["step"] == BASELINE_STEPS and summary["loss"] == pytest.approx(losses[-1], abs=1e-7)
    assert summary["eval_loss"] == pytest.approx(evals[-1], abs=1e-7)
    assert summary["checkpoint"].endswith("step_00000030") and os.path.isdir(summary["checkpoint"])
    # Evaluation uses the same batches every time: evaluating again gives the logged number.
    assert baseline["engine"].evaluate()["eval_loss"] == pytest.approx(evals[-1], abs=1e-6)


def test_eval_tool_reproduces_the_final_eval_loss(baseline):
    result = run_tool("eval", ["-c", baseline["config"], "--ckpt", baseline["summary"]["checkpoint"]])
    assert result.returncode == 0, result.stderr
    metrics = last_json_line(result.stdout)
    assert metrics["eval_loss"] == pytest.approx(baseline["records"][-1]["eval_loss"], abs=1e-5)


def test_evaluation_between_logging_steps(tmp_path, write_config, baseline):
    # eval_freq 3 with logging_freq 4: step 3 is evaluated (and logged, without a throughput figure since no
    # logging window ends there), step 4 is a logging step, step 6 is both (and the last).
    engine = make_engine(write_config, tmp_path, Engine={"max_steps": 6, "logging_freq": 4, "eval_freq": 3})
    engine.fit()
    records = read_metrics(engine.output_dir)
    assert [r["step"] for r in records] == [3, 4, 6]
    assert "eval_loss" in records[0] and "tokens_per_sec" not in records[0]
    assert "eval_loss" not in records[1] and records[1]["tokens_per_sec"] > 0
    assert "eval_loss" in records[2] and records[2]["tokens_per_sec"] > 0
    reference = losses_by_step(baseline["records"])
    for record in records:
        assert abs(record["loss"] - reference[record["step"]]) <= 1e-6


def test_gradient_accumulation_equals_one_big_micro_batch(tmp_path, write_config, baseline):
    steps = 4
    engine = make_engine(write_config, tmp_path, Global={"micro_batch_size": 4},
                         Engine={"max_steps": steps, "accumulate_steps": 2})
    assert (engine.cfg.Global.micro_batch_size, engine.cfg.Engine.accumulate_steps) == (4, 2)
    engine.fit()
    records = read_metrics(engine.output_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for ours, reference in zip(records, baseline["records"][:steps]):
        assert abs(ours["loss"] - reference["loss"]) <= 1e-5, (ours, reference)
        assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)
        assert ours["lr"] == reference["lr"]


# ---------------------------------------------------------------------------------------------------------
# Resume


def test_resume_with_the_train_tool_continues_exactly(tmp_path, write_config):
    config = write_config(tmp_path, Engine={"max_steps": 20, "save_steps": 5, "keep_last": 3})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"

    result = run_tool("train", ["-c", config, "-o", f"Engine.output_dir={straight}"])
    assert result.returncode == 0, result.stderr
    result = run_tool("train", ["-c", config, "-o", f"Engine.output_dir={resumed}", "-o", "Engine.max_steps=10"])
    assert result.returncode == 0, result.stderr
    assert last_json_line(result.stdout)["step"] == 10
    result = run_tool("train", ["-c", config, "-o", f"Engine.output_dir={resumed}", "--resume", "auto"])
    assert result.returncode == 0, result.stderr
    assert last_json_line(result.stdout)["step"] == 20

    reference, records = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in records] == list(range(1, 21))  # each step once, in order
    for ours, theirs in zip(records, reference):
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-6, (ours, theirs)
        assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-6)
    final = "step_00000020/model.mp0.pdparams"
    ours, theirs = params_of(resumed / final), params_of(straight / final)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)


def test_resuming_a_finished_run_trains_nothing(tmp_path, write_config):
    config = write_config(tmp_path, Engine={"max_steps": 2})
    assert run_tool("train", ["-c", config]).returncode == 0
    metrics_before = (tmp_path / "out" / "metrics.jsonl").read_text()
    result = run_tool("train", ["-c", config, "--resume", "auto"])  # e.g. a retried job script
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert summary["step"] == 2 and summary["loss"] is None
    assert summary["checkpoint"] == str(tmp_path / "out" / "step_00000002")
    assert "nothing left to train" in result.stdout
    assert (tmp_path / "out" / "metrics.jsonl").read_text() == metrics_before


def test_resume_in_process_from_an_older_checkpoint_relogs_later_steps(tmp_path, write_config, baseline):
    # Resume the baseline from step 20 in a copy of its output directory: steps 21..30 are trained again,
    # replacing their metrics lines and the step 30 checkpoint, with the same numbers.
    output_dir = tmp_path / "copy"
    shutil.copytree(baseline["engine"].output_dir, output_dir)
    engine = make_engine(write_config, tmp_path, Engine={"max_steps": BASELINE_STEPS, "eval_freq": 10,
                                                         "save_steps": 10, "output_dir": str(output_dir)})
    summary = engine.fit(resume=str(output_dir / "step_00000020"))
    assert summary["step"] == BASELINE_STEPS
    records = read_metrics(output_dir)
    assert [r["step"] for r in records] == list(range(1, BASELINE_STEPS + 1))
    for ours, theirs in zip(records, baseline["records"]):
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-6, (ours, theirs)
    assert abs(records[-1]["eval_loss"] - baseline["records"][-1]["eval_loss"]) <= 1e-6
    ours = params_of(output_dir / "step_00000030" / "model.mp0.pdparams")
    theirs = params_of(os.path.join(baseline["summary"]["checkpoint"], "model.mp0.pdparams"))
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


def test_keep_last_and_manifest_checksums(tmp_path, write_config):
    engine = make_engine(write_config, tmp_path, Engine={"max_steps": 7, "save_steps": 2, "keep_last": 2})
    engine.fit()  # saves at 2, 4, 6 and at the last step, 7
    root = engine.output_dir
    assert sorted(os.listdir(root)) == ["metrics.jsonl", "step_00000006", "step_00000007"]
    assert [os.path.basename(p) for p in list_checkpoints(root)] == ["step_00000006", "step_00000007"]
    for step in (6, 7):
        path = os.path.join(root, f"step_{step:08d}")
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
        assert manifest["step"] == step
        files = sorted(name for name in os.listdir(path) if name != MANIFEST)
        assert files == ["model.mp0.pdparams", "optimizer.mp0.pdopt", "rng.mp0.pdrng", "tokenizer.json",
                         "trainer_state.json"]
        assert sorted(manifest["files"]) == files
        for name in files:
            assert manifest["files"][name] == sha256(os.path.join(path, name)), name
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        assert state["step"] == step and state["consumed_samples"] == 8 * step


# ---------------------------------------------------------------------------------------------------------
# Recompute


def test_recompute_gives_the_same_loss_and_gradients(tmp_path, write_config):
    engines = [make_engine(write_config, tmp_path / name, Engine={"recompute": flag})
               for name, flag in (("plain", False), ("recompute", True))]
    plain, recomputed = (dict(e.module.state_dict()) for e in engines)
    for name in plain:  # same seed, same weights
        np.testing.assert_array_equal(plain[name].numpy(), recomputed[name].numpy())

    results = []
    for engine in engines:
        calls = []
        for layer in engine.module.recompute_units():
            layer.mlp.register_forward_post_hook(lambda *args, calls=calls: calls.append(1))
        batch = to_tensors(collate([engine.train_dataset[i] for i in range(8)]))
        loss = engine.model(batch)["loss"]
        loss.backward()
        grads = {name: p.grad.numpy() for name, p in engine.module.named_parameters()}
        results.append((float(loss), grads, len(calls)))

    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    layers = len(engines[0].module.recompute_units())
    # Recompute really happened: each decoder layer's forward ran again during backward.
    assert (calls_a, calls_b) == (layers, 2 * layers)
    assert abs(loss_a - loss_b) <= 1e-6
    assert sorted(grads_a) == sorted(grads_b)
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=0, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# LR schedule and gradient clipping


def test_cosine_warmup_matches_closed_form_and_resumes():
    max_lr, min_lr, warmup, decay, steps = 1e-3, 1e-4, 5, 25, 31
    schedule = CosineWarmup(max_lr, min_lr, warmup, decay)
    values = []
    for _ in range(steps):
        values.append(schedule.get_lr())
        schedule.step()
    expected = [cosine_warmup_lr(s, max_lr, min_lr, warmup, decay) for s in range(steps)]
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    # Landmarks: linear warmup reaches max_lr on its last step, half way through the cosine is the midpoint,
    # and from decay_steps on the rate stays at min_lr.
    assert values[0] == pytest.approx(max_lr / warmup) and values[warmup - 1] == pytest.approx(max_lr)
    assert values[warmup + (decay - warmup) // 2] == pytest.approx((max_lr + min_lr) / 2, rel=1e-3)
    assert values[decay:] == [pytest.approx(min_lr)] * (steps - decay)
    assert all(a >= b for a, b in zip(values[warmup - 1:], values[warmup:]))

    # The state_dict carries the position: a new schedule continues where the old one was.
    schedule = CosineWarmup(max_lr, min_lr, warmup, decay)
    for _ in range(9):
        schedule.step()
    restored = CosineWarmup(max_lr, min_lr, warmup, decay)
    restored.set_state_dict(schedule.state_dict())
    assert restored.get_lr() == pytest.approx(expected[9])


def test_engine_logs_the_lr_of_the_schedule(baseline):
    lr = SCHEDULE["lr"]
    for record in baseline["records"]:
        expected = cosine_warmup_lr(record["step"] - 1, lr["max_lr"], lr["min_lr"], lr["warmup_steps"],
                                    lr["decay_steps"])
        assert record["lr"] == pytest.approx(expected, rel=0, abs=1e-8), record  # logged with 8 decimals


def _layers_with_gradients(seed):
    paddle.seed(seed)
    layers = nn.LayerList([nn.Linear(6, 5), nn.Linear(5, 3), nn.Embedding(7, 3), nn.Linear(3, 2)])
    x = paddle.randn([4, 6])
    ids = paddle.to_tensor([[1, 2], [3, 3]])
    loss = (layers[1](paddle.tanh(layers[0](x))) ** 2).sum() * 10 + layers[2](ids).sum()
    loss.backward()  # layers[3] takes no part: its parameters have no gradient
    return list(layers.parameters())


def test_clip_grad_norm_against_numpy():
    params = _layers_with_gradients(3)
    with_grad = [p for p in params if p.grad is not None]
    assert len(with_grad) == 5
    grads = [p.grad.numpy().copy() for p in with_grad]
    norm = float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads)))
    assert norm > 1.0

    returned = clip_grad_norm(params, max_norm=0.5)
    assert returned == pytest.approx(norm, rel=1e-5)
    clipped = [p.grad.numpy() for p in with_grad]
    assert float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in clipped))) == pytest.approx(0.5, rel=1e-5)
    for before, after in zip(grads, clipped):  # one common scale: directions are kept
        np.testing.assert_allclose(after, before * (0.5 / norm), rtol=1e-5, atol=1e-8)

    # Below the limit, and with clipping disabled (0), gradients are left alone and the norm is returned.
    for max_norm in (10 * norm, 0):
        params = _layers_with_gradients(3)
        with_grad = [p for p in params if p.grad is not None]
        assert clip_grad_norm(params, max_norm=max_norm) == pytest.approx(norm, rel=1e-5)
        for before, p in zip(grads, with_grad):
            np.testing.assert_array_equal(p.grad.numpy(), before)


# ---------------------------------------------------------------------------------------------------------
# Mixed precision on CPU and what CPU cannot run


@pytest.mark.parametrize("dtype,level", [("bfloat16", "O1"), ("float16", "O2")])
def test_mixed_precision_on_cpu_warns_once_and_trains_in_float32(tmp_path, write_config, baseline, dtype, level):
    steps = 2
    with pytest.warns(UserWarning, match="mix_precision") as record:
        engine = make_engine(write_config, tmp_path, Engine={
            "max_steps": steps, "mix_precision": {"enable": True, "dtype": dtype, "level": level}})
        engine.fit()
    assert len([w for w in record if "mix_precision" in str(w.message)]) == 1
    assert "float32" in str(next(w for w in record if "mix_precision" in str(w.message)).message)
    assert engine.scaler is None and not engine.amp["enable"]
    assert {str(p.dtype) for p in engine.module.parameters()} == {"paddle.float32"}
    # float32 training: exactly the baseline's first steps
    for ours, theirs in zip(read_metrics(engine.output_dir), baseline["records"][:steps]):
        assert abs(ours["loss"] - theirs["loss"]) <= 1e-6


@pytest.mark.parametrize("degree,reason", [
    ("pp_degree", "pipeline parallelism sends activations"),
    ("sharding_degree", "group sharding"),
])
def test_pipeline_and_sharding_are_refused_on_cpu(tmp_path, write_config, degree, reason):
    config = write_config(tmp_path, Distributed={degree: 2})
    result = run_tool("train", ["-c", config])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    assert f"Distributed.{degree}=2 cannot run on CPU" in message and reason in message
    assert f"Set {degree}: 1 for CPU runs" in message
    assert not (tmp_path / "out").exists()  # refused before anything was written
