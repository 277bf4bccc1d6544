"""Tensor-parallel layers and the distributed environment checks.

Single-process tests cover the mp=1 path (must equal plain paddle layers) and the degree checks; one test
launches two CPU processes and compares an mp=2 model with the same model computed here at mp=1.
"""
import importlib.util
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from ppzoo.config.schema import DistributedConfig
from ppzoo.distributed.env import ParallelEnv, check_degrees, init_parallel_env, use_fleet_tensor_parallel
from ppzoo.distributed.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _VocabParallelCrossEntropy,
    gather_state_dict,
    mean_over_tokens,
    parallel_cross_entropy,
    shard_state_dict,
)
from ppzoo.errors import ConfigError, PpzooError

from conftest import REPO_ROOT, launch_failure_report, run_launch

MP_CHECK_SCRIPT = REPO_ROOT / "tests" / "dist_scripts" / "mp_check.py"


def _load_mp_check():
    spec = importlib.util.spec_from_file_location("mp_check", MP_CHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_close(actual, expected, what, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=atol, err_msg=what)


# ---------------------------------------------------------------------------------------------------------
# mp size 1: exactly the plain layers


def test_column_and_row_linear_at_mp1_equal_nn_linear():
    paddle.seed(7)
    x_np = np.random.default_rng(0).standard_normal((3, 4, 6)).astype("float32")
    for layer, plain in [
        (ColumnParallelLinear(6, 10, has_bias=True), nn.Linear(6, 10)),
        (RowParallelLinear(6, 10, has_bias=True, input_is_parallel=False), nn.Linear(6, 10)),
        (ColumnParallelLinear(6, 10, gather_output=True), nn.Linear(6, 10, bias_attr=False)),
    ]:
        plain.set_state_dict(layer.state_dict())
        assert sorted(layer.state_dict()) == sorted(plain.state_dict())
        outputs, grads = [], []
        for module in (layer, plain):
            x = paddle.to_tensor(x_np, stop_gradient=False)
            out = module(x)
            (out * out).sum().backward()
            outputs.append(out.numpy())
            grads.append([x.grad.numpy()] + [p.grad.numpy() for p in module.parameters()])
        np.testing.assert_array_equal(outputs[0], outputs[1])
        for ours, theirs in zip(grads[0], grads[1]):
            np.testing.assert_array_equal(ours, theirs)


def test_mp1_initialization_draws_like_nn_linear_and_embedding():
    # Same seed, same RNG draws: an mp=1 model built from these layers matches one built from plain layers.
    paddle.seed(11)
    ours = [ColumnParallelLinear(5, 7, has_bias=True), VocabParallelEmbedding(9, 4)]
    paddle.seed(11)
    plain = [nn.Linear(5, 7), nn.Embedding(9, 4)]
    for a, b in zip(ours, plain):
        for pa, pb in zip(a.parameters(), b.parameters()):
            np.testing.assert_array_equal(pa.numpy(), pb.numpy())


def test_vocab_parallel_embedding_at_mp1_equals_nn_embedding():
    paddle.seed(3)
    layer, plain = VocabParallelEmbedding(11, 4), nn.Embedding(11, 4)
    plain.set_state_dict(layer.state_dict())
    ids = paddle.to_tensor([[0, 3, 3, 10], [7, 1, 0, 2]])
    results = []
    for module in (layer, plain):
        out = module(ids)
        (out * out).sum().backward()
        results.append((out.numpy(), module.weight.grad.numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def _logits_and_labels():
    rng = np.random.default_rng(5)
    logits = (4.0 * rng.standard_normal((2, 6, 13))).astype("float32")
    labels = rng.integers(0, 13, size=(2, 6)).astype("int64")
    labels[0, 0] = labels[1, 4] = -100
    return logits, labels


def _reference_mean_loss(logits, labels, ignore_index):
    # Not reduction="mean": for a negative ignore_index Paddle 3.3 divides by all tokens, ignored ones too.
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / float((labels.numpy() != ignore_index).sum())


def test_parallel_cross_entropy_at_mp1_equals_f_cross_entropy():
    logits_np, labels_np = _logits_and_labels()
    labels = paddle.to_tensor(labels_np)
    ours_logits = paddle.to_tensor(logits_np, stop_gradient=False)
    per_token = parallel_cross_entropy(ours_logits, labels)
    assert per_token.shape == labels.shape
    assert float(per_token[0, 0]) == 0.0 and float(per_token[1, 4]) == 0.0
    loss = mean_over_tokens(per_token, labels)
    loss.backward()

    ref_logits = paddle.to_tensor(logits_np, stop_gradient=False)
    ref_loss = _reference_mean_loss(ref_logits, labels, ignore_index=-100)
    ref_loss.backward()
    _assert_close(loss.numpy(), ref_loss.numpy(), "mean loss")
    _assert_close(ours_logits.grad.numpy(), ref_logits.grad.numpy(), "logits gradient")


def test_collective_cross_entropy_math_in_one_process():
    # The gloo implementation with no group (collectives are no-ops): its forward and hand-written backward
    # must match F.cross_entropy, including ignored tokens and logits large enough to overflow a naive exp.
    logits_np, labels_np = _logits_and_labels()
    logits_np = logits_np + 200.0
    labels = paddle.to_tensor(labels_np)
    ours_logits = paddle.to_tensor(logits_np, stop_gradient=False)
    per_token = _VocabParallelCrossEntropy.apply(ours_logits, labels, -100, None)
    (per_token * paddle.arange(12, dtype="float32").reshape([2, 6])).sum().backward()

    ref_logits = paddle.to_tensor(logits_np, stop_gradient=False)
    ref = F.cross_entropy(ref_logits, labels, ignore_index=-100, reduction="none")
    (ref * paddle.arange(12, dtype="float32").reshape([2, 6])).sum().backward()
    assert np.isfinite(per_token.numpy()).all()
    _assert_close(per_token.numpy(), ref.numpy(), "per-token loss")
    _assert_close(ours_logits.grad.numpy(), ref_logits.grad.numpy(), "logits gradient")


def test_split_axes_and_shard_state_dict():
    model = nn.LayerDict({
        "col": ColumnParallelLinear(4, 6, has_bias=True),
        "row": RowParallelLinear(6, 4, has_bias=True),
        "emb": VocabParallelEmbedding(8, 4),
        "norm": nn.LayerNorm(4),
    })
    axes = {name: getattr(p, "mp_split_axis", None) for name, p in model.named_parameters()}
    assert axes == {
        "col.weight": 1, "col.bias": 0, "row.weight": 0, "row.bias": None, "emb.weight": 0,
        "norm.weight": None, "norm.bias": None,
    }
    full = {name: np.arange(np.prod(p.shape), dtype="float32").reshape(p.shape)
            for name, p in model.named_parameters()}
    rank1 = shard_state_dict(full, model, mp_rank=1, mp_size=2)
    np.testing.assert_array_equal(rank1["col.weight"], full["col.weight"][:, 3:])
    np.testing.assert_array_equal(rank1["col.bias"], full["col.bias"][3:])
    np.testing.assert_array_equal(rank1["row.weight"], full["row.weight"][3:, :])
    np.testing.assert_array_equal(rank1["row.bias"], full["row.bias"])
    np.testing.assert_array_equal(rank1["emb.weight"], full["emb.weight"][4:, :])
    # paddle Tensors are sliced the same way
    tensor_shard = shard_state_dict({"col.weight": paddle.to_tensor(full["col.weight"])}, model, 0, 2)
    np.testing.assert_array_equal(tensor_shard["col.weight"].numpy(), full["col.weight"][:, :3])
    # at mp=1, gathering is the identity
    gathered = gather_state_dict(model, None)
    assert sorted(gathered) == sorted(model.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Degree checks (pure: any world size without launching)


def test_degree_product_must_equal_world_size():
    with pytest.raises(ConfigError) as excinfo:
        check_degrees(DistributedConfig(dp_degree=2, mp_degree=2), world_size=2, device="cpu")
    message = str(excinfo.value)
    assert "multiply to 4" in message and "2 process(es)" in message and "--nproc_per_node 4" in message
    check_degrees(DistributedConfig(dp_degree=2, mp_degree=2), world_size=4, device="cpu")


def test_pipeline_and_sharding_are_refused_on_cpu_with_the_reason():
    with pytest.raises(PpzooError) as excinfo:
        check_degrees(DistributedConfig(pp_degree=2), world_size=2, device="cpu")
    assert "send/recv on the calculation stream" in str(excinfo.value)
    assert "PipelineLayer" in str(excinfo.value)
    with pytest.raises(PpzooError) as excinfo:
        check_degrees(DistributedConfig(sharding_degree=2), world_size=2, device="cpu")
    assert "only gpu, xpu and custom devices" in str(excinfo.value)
    assert "group_sharded_parallel" in str(excinfo.value)
    # the same degrees are accepted on GPU
    check_degrees(DistributedConfig(pp_degree=2), world_size=2, device="gpu")


def test_init_parallel_env_single_process_needs_no_launcher():
    env = init_parallel_env(DistributedConfig(), "cpu")
    assert (env.world_size, env.mp_size, env.dp_size, env.hcg, env.mp_group) == (1, 1, 1, None, None)
    assert env.backend == "gloo" and not use_fleet_tensor_parallel(env)
    assert use_fleet_tensor_parallel(ParallelEnv(world_size=2, mp_size=2, device="gpu", backend="nccl"))
    assert not use_fleet_tensor_parallel(ParallelEnv(world_size=2, mp_size=2, device="cpu", backend="gloo"))
    with pytest.raises(ConfigError):
        init_parallel_env(DistributedConfig(mp_degree=2), "cpu")


# ---------------------------------------------------------------------------------------------------------
# Two processes: mp=2 over gloo against mp=1 computed here


def _reference_at_mp1(problem):
    """The mp_check model with plain paddle layers."""
    weights, ids, labels = problem.make_problem()
    layers = {
        "embed": nn.Embedding(problem.VOCAB, problem.HIDDEN),
        "up": nn.Linear(problem.HIDDEN, problem.FFN),
        "down": nn.Linear(problem.FFN, problem.HIDDEN),
        "head": nn.Linear(problem.HIDDEN, problem.VOCAB, bias_attr=False),
        "aux_up": nn.Linear(problem.HIDDEN, problem.AUX),
        "aux_down": nn.Linear(problem.AUX, problem.HIDDEN, bias_attr=False),
    }
    model = nn.LayerDict(layers)
    model.set_state_dict(weights)
    labels_t = paddle.to_tensor(labels)
    h = model["embed"](paddle.to_tensor(ids))
    h2 = model["down"](F.gelu(model["up"](h))) + h
    logits = model["head"](h2)
    aux = model["aux_down"](model["aux_up"](h))
    per_token = F.cross_entropy(logits, labels_t, ignore_index=problem.IGNORE_INDEX, reduction="none")
    loss = _reference_mean_loss(logits, labels_t, ignore_index=problem.IGNORE_INDEX)
    total = loss + (aux * aux).mean()
    total.backward()
    results = {"logits": logits.numpy(), "per_token_loss": per_token.numpy(), "loss": loss.numpy(),
               "aux": aux.numpy(), "total": total.numpy()}
    for name, param in model.named_parameters():
        results["grad/" + name] = param.grad.numpy()
    for name, value in weights.items():
        results["state/" + name] = value
    return results


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks the CPU (gloo) implementation")
def test_mp2_under_launch_matches_mp1(tmp_path):
    log_dir, out_prefix = tmp_path / "log", tmp_path / "out"
    returncode, launcher_output = run_launch([MP_CHECK_SCRIPT, out_prefix], nproc=2, log_dir=log_dir)
    output_file = Path(str(out_prefix) + ".npz")
    assert returncode == 0 and output_file.exists(), launch_failure_report(log_dir, launcher_output, f"no {output_file}")

    distributed = dict(np.load(output_file))
    reference = _reference_at_mp1(_load_mp_check())
    assert sorted(distributed) == sorted(reference)
    for key in sorted(reference):
        _assert_close(distributed[key], reference[key], key)
