"""Multi-process training on CPU (gloo) under `python -m paddle.distributed.launch`, checked against one process.

- data parallel (dp=2, micro 4 per rank) trains exactly like one process with the same global batch;
- tensor parallel (mp=2): the ChuXin module's init, logits, loss and gradients equal mp=1 (worker script
  tests/dist_scripts/chuxin_mp_check.py), and tools/train.py at mp=2 follows the mp=1 run step for step;
- two launchers on one machine acting as two nodes (--nnodes 2 --master 127.0.0.1:PORT --rank r) train
  like one process.
Launches run one at a time: the machine has two cores.
"""
import json

import numpy as np
import paddle
import pytest

from ppzoo import Engine, load_config
from ppzoo.models.chuxin.model import ChuXinConfig
from ppzoo.models.chuxin.module import ChuXinModule

from conftest import (
    REPO_ROOT,
    free_port,
    kill_launch,
    losses_by_step,
    read_metrics,
    run_launch,
    start_launch,
    wait_launch,
)

pytestmark = pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks the CPU (gloo) implementation")

TRAIN = REPO_ROOT / "tools" / "train.py"
CHUXIN_MP_CHECK = REPO_ROOT / "tests" / "dist_scripts" / "chuxin_mp_check.py"
REFERENCE_STEPS = 5


def _load_params(path):
    return {name: np.asarray(value) for name, value in paddle.load(str(path)).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, write_config):
    """One process, global batch 8 = micro 8: the run every distributed run must reproduce."""
    directory = tmp_path_factory.mktemp("reference")
    config = write_config(directory, Engine={"max_steps": REFERENCE_STEPS})
    engine = Engine(load_config(config))
    summary = engine.fit()
    return {
        "config": config,
        "records": read_metrics(engine.output_dir),
        "weights": _load_params(f"{summary['checkpoint']}/model.mp0.pdparams"),
    }


def _assert_losses_match(records, reference_records, steps, atol):
    ours, theirs = losses_by_step(records), losses_by_step(reference_records)
    assert sorted(ours) == list(range(1, steps + 1)), f"logged steps {sorted(ours)}"
    for step in range(1, steps + 1):
        assert abs(ours[step] - theirs[step]) <= atol, (
            f"step {step}: loss {ours[step]} vs single-process {theirs[step]}")
    # The logged gradient norm is that of the whole model's (averaged) gradient: split shards count once each.
    for record, reference_record in zip(records, reference_records[:steps]):
        assert record["grad_norm"] == pytest.approx(reference_record["grad_norm"], rel=1e-4), record


# ---------------------------------------------------------------------------------------------------------
# Data parallel


def test_dp2_matches_single_process(tmp_path, reference):
    out = tmp_path / "out"
    _, output = run_launch([TRAIN, "-c", reference["config"], "-o", f"Engine.output_dir={out}",
                            "-o", "Distributed.dp_degree=2", "-o", "Global.micro_batch_size=4"],
                           nproc=2, log_dir=tmp_path / "log")
    assert "world 2 (dp 2, mp 1) | global batch 8 = micro 4 x accumulate 1 x dp 2" in output
    records = read_metrics(out)
    _assert_losses_match(records, reference["records"], REFERENCE_STEPS, atol=1e-5)
    # The gradients were averaged over both ranks: the trained weights are the single-process ones.
    weights = _load_params(out / f"step_{REFERENCE_STEPS:08d}" / "model.mp0.pdparams")
    assert sorted(weights) == sorted(reference["weights"])
    for name, value in weights.items():
        np.testing.assert_allclose(value, reference["weights"][name], rtol=0, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Tensor parallel: the module itself


MODEL_VARIANTS = [
    # grouped KV heads (4 query heads, 2 KV heads: one of each per rank), untied head
    {"name": "gqa", "seed": 21, "config": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                           "num_kv_heads": 2, "intermediate_size": 48,
                                           "max_position_embeddings": 64}},
    # the lm head is the (vocab-parallel) embedding
    {"name": "tied", "seed": 22, "config": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                            "intermediate_size": 48, "max_position_embeddings": 64,
                                            "tie_word_embeddings": True}},
]


def _mp_problem():
    rng = np.random.default_rng(2024)
    batch, seq = 2, 12
    vocab = MODEL_VARIANTS[0]["config"]["vocab_size"]
    problem = {
        "input_ids": rng.integers(0, vocab, size=(batch, seq)).astype("int64"),
        "labels": rng.integers(0, vocab, size=(batch, seq)).astype("int64"),
        # two documents in the first row, one in the second: the packed mask is exercised
        "doc_ids": np.array([[0] * 5 + [1] * 7, [0] * 12], dtype="int32"),
    }
    for variant in MODEL_VARIANTS:
        module = ChuXinModule(ChuXinConfig(**variant["config"]))
        for name, param in module.state_dict().items():
            shape = tuple(param.shape)
            # Not the init distribution: larger matrices and norms away from 1, so every weight matters.
            value = 0.2 * rng.standard_normal(shape) if len(shape) == 2 else 1.0 + 0.2 * rng.standard_normal(shape)
            problem[f"{variant['name']}/weight/{name}"] = value.astype("float32")
    return problem


def _mp1_reference(variant, problem):
    paddle.seed(variant["seed"])
    module = ChuXinModule(ChuXinConfig(**variant["config"]))
    name = variant["name"]
    results = {f"{name}/init/{key}": value.numpy() for key, value in module.state_dict().items()}
    prefix = f"{name}/weight/"
    module.set_state_dict({key[len(prefix):]: value for key, value in problem.items() if key.startswith(prefix)})
    batch = {key: paddle.to_tensor(problem[key]) for key in ("input_ids", "labels", "doc_ids")}
    with paddle.no_grad():
        results[f"{name}/logits"] = module.model(batch["input_ids"], doc_ids=batch["doc_ids"]).numpy()
    loss = module.training_step(batch)["loss"]
    loss.backward()
    results[f"{name}/loss"] = loss.numpy()
    for key, param in module.named_parameters():
        results[f"{name}/grad/{key}"] = param.grad.numpy()
    return results


def test_chuxin_mp2_equals_mp1(tmp_path):
    problem = _mp_problem()
    problem_prefix, out_prefix = tmp_path / "problem", tmp_path / "out"
    np.savez(f"{problem_prefix}.npz", **problem)
    (tmp_path / "problem.json").write_text(json.dumps({"variants": MODEL_VARIANTS}))
    run_launch([CHUXIN_MP_CHECK, problem_prefix, out_prefix], nproc=2, log_dir=tmp_path / "log")
    ranks = [dict(np.load(f"{out_prefix}.rank{r}.npz")) for r in (0, 1)]

    reference = {}
    for variant in MODEL_VARIANTS:
        reference.update(_mp1_reference(variant, problem))
    assert sorted(ranks[0]) == sorted(reference)
    for key in sorted(reference):
        for rank, results in enumerate(ranks):
            if "/init/" in key:
                # The shards are cut from the same full draw as the mp=1 weights: equal, not just close.
                np.testing.assert_array_equal(results[key], reference[key], err_msg=f"rank {rank}: {key}")
            else:
                np.testing.assert_allclose(results[key], reference[key], rtol=1e-5, atol=1e-5,
                                           err_msg=f"rank {rank}: {key}")
        # Replicated weights (the norms) must get the same gradient on both ranks, or the replicas drift.
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=f"ranks differ: {key}")


# ---------------------------------------------------------------------------------------------------------
# Tensor parallel: the engine


def test_train_tool_at_mp2_matches_mp1(tmp_path, reference):
    out = tmp_path / "out"
    run_launch([TRAIN, "-c", reference["config"], "-o", f"Engine.output_dir={out}", "-o", "Distributed.mp_degree=2"],
               nproc=2, log_dir=tmp_path / "log")
    records = read_metrics(out)
    _assert_losses_match(records, reference["records"], REFERENCE_STEPS, atol=1e-4)
    # Same micro batch (8) and eval batches as the reference, so the same validation loss.
    assert abs(records[-1]["eval_loss"] - reference["records"][-1]["eval_loss"]) <= 1e-4

    # Each rank saved its own shards; put together along their split axes they are the mp=1 run's weights.
    checkpoint = out / f"step_{REFERENCE_STEPS:08d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["mp_size"] == 2
    shards = [_load_params(checkpoint / f"model.mp{r}.pdparams") for r in (0, 1)]
    axes = {name: getattr(p, "mp_split_axis", None)
            for name, p in ChuXinModule(load_config(reference["config"]).Model).named_parameters()}
    assert sorted(axes) == sorted(reference["weights"]) == sorted(shards[0]) == sorted(shards[1])
    for name, axis in axes.items():
        if axis is None:
            np.testing.assert_array_equal(shards[0][name], shards[1][name], err_msg=f"replicas differ: {name}")
            full = shards[0][name]
        else:
            full = np.concatenate([shards[0][name], shards[1][name]], axis=axis)
        np.testing.assert_allclose(full, reference["weights"][name], rtol=0, atol=1e-4, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Two nodes on one machine


def test_two_node_launch_on_one_machine(tmp_path, reference):
    """Two launchers, one process each, meeting at an HTTP master on 127.0.0.1 (the first launcher to bind
    the port serves it). --rank fixes which launcher's worker is rank 0. Micro batch 2 x accumulate 2 per
    rank also checks that gradients accumulate locally and are averaged once per step."""
    steps = 3
    out, master = tmp_path / "out", f"127.0.0.1:{free_port()}"
    args = [TRAIN, "-c", reference["config"], "-o", f"Engine.output_dir={out}", "-o", f"Engine.max_steps={steps}",
            "-o", "Distributed.dp_degree=2", "-o", "Global.micro_batch_size=2"]
    launchers = [
        start_launch(args, nproc=1, log_dir=tmp_path / f"node{rank}",
                     launch_args=["--nnodes", "2", "--master", master, "--rank", rank])
        for rank in (0, 1)
    ]
    try:
        outputs = [wait_launch(process) for process in launchers]
    finally:  # if one node failed, the other waits for it forever
        for process in launchers:
            kill_launch(process)
    assert [process.returncode for process in launchers] == [0, 0]
    for rank in (0, 1):  # --rank r made launcher r's worker global rank r
        assert f"PADDLE_TRAINER_ID={rank}\n" in (tmp_path / f"node{rank}" / "envlog.0").read_text()
    assert "world 2 (dp 2, mp 1) | global batch 8 = micro 2 x accumulate 2 x dp 2" in outputs[0]
    records = read_metrics(out)
    _assert_losses_match(records, reference["records"][:steps], steps, atol=1e-5)
