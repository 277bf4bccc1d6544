"""Mixture of experts: gates, dispatch, topology, expert parallelism and MoE-GPT through the engine.

- gates against plain-numpy references (GShard capacity and first-before-second priority, Switch, naive
  top-k), GShard's random routing against its probability, the topology-aware loss's minimum;
- the MoE layer's gather/scatter dispatch against a per-token loop over the experts (outputs, gradients);
- the exchange plan against the layout of Paddle's global_scatter (its documented example);
- topologies from YAML and matrix files, target proportions, modelled all-to-all time, bad files;
- ep=2 (two processes, gloo) equals ep=1 in outputs and gradients, for GShard, Switch and TA-MoE gates;
- tools/train.py at ep=2 follows the single-process run step for step, with per-link traffic logged.
"""
import json
import math

import numpy as np
import paddle
import pytest
import yaml

from ppzoo import Engine, load_config
from ppzoo.distributed.env import ParallelEnv
from ppzoo.distributed.expert_parallel import ExchangePlan
from ppzoo.distributed.topology import load_topology, traffic_by_link_class
from ppzoo.errors import ConfigError
from ppzoo.models.moe_gpt.model import MoEGPTConfig
from ppzoo.models.moe_gpt.module import MoEGPTModule
from ppzoo.nn.moe import GShardGate, MoELayer, NaiveGate, SwitchGate, load_balance_loss

from conftest import REPO_ROOT, read_metrics, run_launch

MOE_TINY = REPO_ROOT / "configs" / "moe_gpt" / "tiny.yaml"
TOPOLOGY_2X2 = REPO_ROOT / "configs" / "moe_gpt" / "topology_2x2.yaml"
EP_CHECK = REPO_ROOT / "tests" / "dist_scripts" / "moe_ep_check.py"
TRAIN = REPO_ROOT / "tools" / "train.py"


# ---------------------------------------------------------------------------------------------------------
# Gates


def _gshard_reference(probs, capacity, keep_second):
    """Plain-loop GShard top-2 routing: first choices take slots in token order, then second choices."""
    tokens, experts = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
    fill = np.zeros(experts, dtype=int)
    chosen = -np.ones((tokens, 2), dtype=int)
    for t in range(tokens):
        e = order[t, 0]
        if fill[e] < capacity:
            chosen[t, 0], fill[e] = e, fill[e] + 1
    for t in range(tokens):
        e = order[t, 1]
        if keep_second[t] and fill[e] < capacity:
            chosen[t, 1], fill[e] = e, fill[e] + 1
    top = np.take_along_axis(probs, order, axis=1)
    weights = top / top.sum(axis=1, keepdims=True) * (chosen >= 0)
    return chosen, weights


def test_gshard_gate_capacity_and_priority():
    paddle.seed(3)
    gate = GShardGate(8, 4, capacity_factor=0.5, random_routing=False)
    x = paddle.randn([24, 8])
    routing = gate(x)
    probs = paddle.nn.functional.softmax(x @ gate.weight, axis=-1).numpy()
    capacity = math.ceil(0.5 * 24 * 2 / 4)
    expected_experts, expected_weights = _gshard_reference(probs, capacity, np.ones(24, bool))
    np.testing.assert_array_equal(routing.experts.numpy(), expected_experts)
    np.testing.assert_allclose(routing.weights.numpy(), expected_weights, rtol=1e-5, atol=1e-6)
    assert (expected_experts < 0).any(), "the capacity must bind in this example"
    # GShard's loss: E * sum_e (fraction of first choices of e) * (mean probability of e).
    fraction = np.bincount(probs.argmax(1), minlength=4) / 24
    assert float(routing.aux_loss) == pytest.approx(4 * (fraction * probs.mean(0)).sum(), rel=1e-5)
    # At evaluation the larger eval_capacity_factor applies.
    gate.eval()
    assert gate.capacity(24) == math.ceil(2.0 * 24 * 2 / 4)


def test_gshard_random_routing_keeps_second_expert_with_probability_2g2():
    paddle.seed(5)
    gate = GShardGate(8, 4, capacity_factor=100.0, random_routing=True)
    x = paddle.randn([4000, 8]) * 0.3
    routing = gate(x)
    probs = paddle.nn.functional.softmax(x @ gate.weight, axis=-1).numpy()
    top2 = np.sort(probs, axis=1)[:, ::-1][:, :2]
    g2 = top2[:, 1] / top2.sum(1)
    kept = (routing.experts.numpy()[:, 1] >= 0).mean()
    assert kept == pytest.approx(np.minimum(1.0, 2 * g2).mean(), abs=0.03)
    assert (routing.weights.numpy()[routing.experts.numpy()[:, 1] < 0, 1] == 0).all()


def test_switch_and_naive_gates():
    paddle.seed(7)
    x = paddle.randn([16, 8])
    switch = SwitchGate(8, 4, capacity_factor=1.0)
    routing = switch(x)
    probs = paddle.nn.functional.softmax(x @ switch.weight, axis=-1).numpy()
    first = probs.argmax(1)
    fill, expected = np.zeros(4, int), -np.ones(16, int)
    for t, e in enumerate(first):
        if fill[e] < 4:  # capacity ceil(1.0 * 16 / 4)
            expected[t], fill[e] = e, fill[e] + 1
    np.testing.assert_array_equal(routing.experts.numpy()[:, 0], expected)
    np.testing.assert_allclose(routing.weights.numpy()[:, 0], probs.max(1) * (expected >= 0), rtol=1e-5)

    naive = NaiveGate(8, 4, top_k=3)
    routing = naive(x)
    logits = (x @ naive.weight).numpy()
    top = np.sort(logits, axis=1)[:, ::-1][:, :3]
    np.testing.assert_array_equal(routing.experts.numpy(), np.argsort(-logits, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(routing.weights.numpy(), np.exp(top) / np.exp(top).sum(1, keepdims=True), rtol=1e-5)
    assert routing.aux_loss is None


def test_topology_aware_loss_is_smallest_at_the_target():
    """sum_e w_e f_e m_e with w_e = 1 / (E c_e): over distributions f = m it is smallest at f = c, and with
    equal weights it is GShard's loss."""
    target = np.array([8, 8, 1, 1], dtype=np.float64) / 18
    weights = paddle.to_tensor((1.0 / (4 * target)).astype("float32"))

    def loss_at(distribution):
        tokens = 1800
        counts = np.round(distribution * tokens).astype(int)
        first = paddle.to_tensor(np.repeat(np.arange(4), counts))
        probs = paddle.to_tensor(np.tile(distribution.astype("float32"), (counts.sum(), 1)))
        return float(load_balance_loss(first, probs, weights)), float(load_balance_loss(first, probs))

    at_target, gshard_at_target = loss_at(target)
    at_uniform, gshard_at_uniform = loss_at(np.full(4, 0.25))
    assert at_target == pytest.approx(1.0, rel=1e-3) and at_target < at_uniform
    assert gshard_at_uniform == pytest.approx(1.0, rel=1e-3) and gshard_at_uniform < gshard_at_target


# ---------------------------------------------------------------------------------------------------------
# The MoE layer's dispatch


def test_moe_layer_dispatch_equals_per_token_loop():
    paddle.seed(11)
    layer = MoELayer(16, 24, num_experts=4, gate="gshard", capacity_factor=0.75, random_routing=False)
    with paddle.no_grad():
        for param in layer.parameters():
            param.set_value(paddle.randn(param.shape) * 0.3)
    x = paddle.randn([2, 10, 16])
    x.stop_gradient = False
    y, stats = layer(x)
    assert 0 < stats.dropped_fraction < 1  # capacity 5 of 20 tokens x 2 choices: some dropped

    routing = layer.gate(x.reshape([-1, 16]))
    tokens = x.reshape([-1, 16])
    rows = []
    for t in range(20):
        out = paddle.zeros([16])
        for choice in range(2):
            e = int(routing.experts[t, choice])
            if e >= 0:
                out = out + routing.weights[t, choice] * layer.expert(e)(tokens[t:t + 1])[0]
        rows.append(out)
    reference = paddle.stack(rows).reshape([2, 10, 16])
    np.testing.assert_allclose(y.numpy(), reference.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.tokens_between_ranks, [[int((routing.experts.numpy() >= 0).sum())]])

    params = [x] + list(layer.parameters())
    grads = paddle.grad([(y * y).sum()], params)
    reference_grads = paddle.grad([(reference * reference).sum()], params)
    for g, r in zip(grads, reference_grads):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-4, atol=1e-5)


def test_exchange_plan_matches_global_scatter_layout():
    """Paddle's global_scatter docstring example (2 ranks, 2 experts each), replayed through the plan's
    pieces: each rank receives its experts' rows grouped by expert, then by source rank."""
    x = np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]])
    plan = ExchangePlan(np.array([[2, 1, 1, 1], [1, 1, 2, 1]]), ep_rank=0)
    buffers = [x, x]

    def received(rank):
        return np.concatenate([buffers[src][start:start + n] for src, start, n in plan.dispatch_pieces(rank)])

    np.testing.assert_array_equal(received(0), [[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]])
    np.testing.assert_array_equal(received(1), [[7, 8], [5, 6], [7, 8], [9, 10], [9, 10]])
    assert plan.rows_per_local_expert() == [3, 2]
    # Combine sends every row back to where it came from.
    recv = [received(0), received(1)]
    for rank in (0, 1):
        back = np.concatenate([recv[dst][start:start + n] for dst, start, n in plan.combine_pieces(rank)])
        np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(plan.tokens_between_ranks(), [[3, 2], [2, 3]])


# ---------------------------------------------------------------------------------------------------------
# Topology


def test_topology_yaml_targets_and_modelled_time():
    topology = load_topology(str(TOPOLOGY_2X2), world_size=4)
    assert topology.node_of == [0, 0, 1, 1]
    assert topology.link_class(0, 1) == "intra_node" and topology.link_class(1, 2) == "inter_node"
    target = topology.target_proportions()
    np.testing.assert_allclose(target[0], np.array([8, 8, 1, 1]) / 18)
    np.testing.assert_allclose(target.sum(1), 1.0)
    # Each link finishes at the same time under the target pattern: bytes_ij / B_ij is constant.
    np.testing.assert_allclose((target / topology.bandwidth)[0, 1:], target[0, 1] / topology.bandwidth[0, 1])
    np.testing.assert_allclose(topology.loss_weights()[2], 1.0 / (4 * np.array([1, 1, 8, 8]) / 18))
    # 100 tokens to each peer, 1000 bytes each: the slowest link is inter-node, 1e5 B at 10 GB/s, twice.
    tokens = np.full((4, 4), 100.0)
    stats = traffic_by_link_class(tokens, 1000, topology)
    assert stats["tokens_inter_node"] == 2 * 800 and stats["tokens_intra_node"] == 2 * 400
    assert stats["tokens_local"] == 2 * 400 and stats["bytes_inter_node"] == 2 * 800 * 1000
    assert stats["alltoall_ms"] == pytest.approx(2 * 1e3 * 1e5 / 10e9)


def test_topology_matrix_file_and_bad_files(tmp_path):
    matrix = tmp_path / "bw.txt"
    matrix.write_text("# GB/s\n50 50 5 5 5 5\n50 50 5 5 5 5\n5 5 50 50 5 5\n5 5 50 50 5 5\n"
                      "5 5 5 5 50 50\n5 5 5 5 50 50\n")
    topology = load_topology(str(matrix))
    assert topology.node_of == [0, 0, 1, 1, 2, 2]
    assert topology.subset([1, 2, 3]).node_of == [0, 1, 1]
    with pytest.raises(ConfigError, match="square"):
        (tmp_path / "bad.txt").write_text("1 2\n3\n")
        load_topology(str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError, match="exactly once"):
        (tmp_path / "bad.yaml").write_text("nodes: [[0, 1], [1, 2]]\nintra_node_bandwidth: 8\ninter_node_bandwidth: 1\n")
        load_topology(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="inter_node_bandwidth"):
        (tmp_path / "bad2.yaml").write_text("ranks_per_node: 2\nnum_nodes: 2\nintra_node_bandwidth: 8\n")
        load_topology(str(tmp_path / "bad2.yaml"))
    with pytest.raises(ConfigError, match="describes 4 ranks but the job has 8"):
        load_topology(str(TOPOLOGY_2X2), world_size=8)
    with pytest.raises(ConfigError, match="Distributed.topology is not"):
        MoEGPTModule(MoEGPTConfig(vocab_size=32, hidden_size=16, num_heads=2, topology_aware=True))


# ---------------------------------------------------------------------------------------------------------
# Expert parallelism: the module on two processes


VARIANT_MODEL = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 48,
                 "max_position_embeddings": 64, "num_experts": 4, "expert_intermediate_size": 24,
                 "random_routing": False, "capacity_factor": 0.75, "aux_loss_coef": 0.1}
EP_VARIANTS = [
    {"name": "gshard", "seed": 31, "config": {**VARIANT_MODEL, "gate": "gshard"}},
    {"name": "switch", "seed": 32, "config": {**VARIANT_MODEL, "gate": "switch", "capacity_factor": 1.0}},
    {"name": "ta", "seed": 33, "config": {**VARIANT_MODEL, "gate": "gshard", "topology_aware": True}},
    # A zero gate ties every logit, so top-2 picks experts 0 and 1 for every token: rank 1's experts get no
    # rows, and it must still take part in every exchange, forward and backward.
    {"name": "skewed", "seed": 34, "config": {**VARIANT_MODEL, "gate": "naive"}, "zero_gate": True},
]


def _ep_problem(topology_file):
    rng = np.random.default_rng(2025)
    batch, seq = 4, 12
    problem = {
        "input_ids": rng.integers(0, 64, size=(batch, seq)).astype("int64"),
        "labels": rng.integers(0, 64, size=(batch, seq)).astype("int64"),
        "doc_ids": np.array([[0] * 5 + [1] * 7, [0] * 12, [0] * 8 + [1] * 4, [0] * 12], dtype="int32"),
    }
    env = ParallelEnv(topology=load_topology(str(topology_file)))
    for variant in EP_VARIANTS:
        module = MoEGPTModule(MoEGPTConfig(**variant["config"]), env)
        for name, param in module.state_dict().items():
            shape = tuple(param.shape)
            value = 0.3 * rng.standard_normal(shape) if len(shape) == 2 else 1.0 + 0.2 * rng.standard_normal(shape)
            if variant.get("zero_gate") and ".gate." in name:
                value = np.zeros(shape)
            problem[f"{variant['name']}/weight/{name}"] = value.astype("float32")
    return problem


def _ep1_reference(variant, problem, topology_file):
    """One process, all experts: each half of the batch is one rank's micro-batch; dense and expert gradients
    are the mean over the halves, a topology-aware gate's gradient is each half's own (rank-local)."""
    topology = load_topology(str(topology_file))
    paddle.seed(variant["seed"])
    module = MoEGPTModule(MoEGPTConfig(**variant["config"]), ParallelEnv(topology=topology))
    name = variant["name"]
    results = {f"{name}/init/{key}": value.numpy() for key, value in module.state_dict().items()}
    prefix = f"{name}/weight/"
    module.set_state_dict({key[len(prefix):]: value for key, value in problem.items() if key.startswith(prefix)})
    per_rank = {}
    for rank in (0, 1):
        if variant["config"].get("topology_aware"):
            weights = np.repeat(topology.subset([0, 1]).loss_weights()[rank], 2).astype("float32")
            for moe in module.model.moe_layers():
                moe.expert_loss_weights = paddle.to_tensor(weights)
        rows = slice(rank * 2, rank * 2 + 2)
        batch = {key: paddle.to_tensor(problem[key][rows]) for key in ("input_ids", "labels", "doc_ids")}
        with paddle.no_grad():
            logits, _ = module.model(batch["input_ids"], doc_ids=batch["doc_ids"])
        losses = module.training_step(batch)
        grads = paddle.grad([losses["loss"]], module.parameters())
        per_rank[rank] = {"logits": logits.numpy(), "loss": losses["loss"].numpy(),
                          "lm_loss": losses["lm_loss"].numpy(),
                          "grads": {key: g.numpy() for (key, _), g in zip(module.named_parameters(), grads)}}
    gate_local = bool(variant["config"].get("topology_aware"))
    raw = {rank: per_rank[rank]["grads"] for rank in (0, 1)}
    for rank in (0, 1):
        per_rank[rank]["grads"] = {key: (raw[rank][key] if gate_local and ".gate." in key
                                         else (raw[0][key] + raw[1][key]) / 2) for key in raw[rank]}
    return results, per_rank


def test_moe_ep2_equals_ep1(tmp_path):
    topology_file = tmp_path / "two_nodes.yaml"
    topology_file.write_text("nodes: [[0], [1]]\nintra_node_bandwidth: 80\ninter_node_bandwidth: 10\n")
    problem = _ep_problem(topology_file)
    prefix, out = tmp_path / "problem", tmp_path / "out"
    np.savez(f"{prefix}.npz", **problem)
    (tmp_path / "problem.json").write_text(json.dumps({"variants": EP_VARIANTS, "topology": str(topology_file)}))
    run_launch([EP_CHECK, prefix, out], nproc=2, log_dir=tmp_path / "log")
    ranks = [dict(np.load(f"{out}.rank{r}.npz")) for r in (0, 1)]

    for variant in EP_VARIANTS:
        name = variant["name"]
        init, reference = _ep1_reference(variant, problem, topology_file)
        for rank, results in enumerate(ranks):
            own = {key[len(f"{name}/grad/"):] for key in results if key.startswith(f"{name}/grad/")}
            experts = {key for key in own if ".experts." in key}
            # Each rank holds half the experts, named by their global index.
            expected_experts = {f"model.layers.1.mlp.experts.{g}.{w}" for g in (2 * rank, 2 * rank + 1)
                                for w in ("w_gate", "w_up", "w_down")}
            assert experts == expected_experts, (name, rank, sorted(experts))
            for key in own:  # the same initial values as the ep=1 model made with the same seed
                np.testing.assert_array_equal(results[f"{name}/init/{key}"], init[f"{name}/init/{key}"],
                                              err_msg=f"{name} rank {rank} init {key}")
            ref = reference[rank]
            np.testing.assert_allclose(results[f"{name}/logits"], ref["logits"], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} rank {rank} logits")
            for key in ("loss", "lm_loss"):
                np.testing.assert_allclose(results[f"{name}/{key}"], ref[key], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name} rank {rank} {key}")
            for key in own:
                np.testing.assert_allclose(results[f"{name}/grad/{key}"], ref["grads"][key], rtol=1e-4, atol=1e-6,
                                           err_msg=f"{name} rank {rank} grad {key}")
        # The two ranks sit on different nodes: everything sent to the other rank is inter-node traffic.
        inter_node = float(ranks[0][f"{name}/inter_node_tokens"])
        assert inter_node == (2 * 2 * 12 * 2 if variant.get("zero_gate") else inter_node) and inter_node > 0


# ---------------------------------------------------------------------------------------------------------
# The engine and tools


def _moe_config(directory, tokenizer_file, **overrides):
    data = {
        "_base_": str(MOE_TINY),
        "Global": {"device": "cpu", "global_batch_size": 8, "micro_batch_size": 4},
        "Engine": {"max_steps": 3, "output_dir": str(directory / "out"), "logging_freq": 1, "eval_iters": 2,
                   "progress_bar": False},
        "Model": {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                  "num_experts": 4, "expert_intermediate_size": 32, "random_routing": False},
        "Data": {"tokenizer": str(tokenizer_file), "seq_len": 32,
                 "Train": {"dataset": "BuiltinCorpus", "split": "train", "max_chars": 60_000},
                 "Eval": {"dataset": "BuiltinCorpus", "split": "validation", "max_chars": 20_000}},
        "Optimizer": {"lr": {"warmup_steps": 1, "decay_steps": 3}},
        "Distributed": {"topology": str(TOPOLOGY_2X2)},
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_train_tool_at_ep2_matches_single_process(tmp_path, tokenizer_file):
    """ep=2 (dp 2, micro 4 per rank) against one process with micro 4 x accumulate 2: the same samples and
    capacity groups, so the same losses, gradient norms, evaluation and trained weights."""
    config = _moe_config(tmp_path, tokenizer_file)
    engine = Engine(load_config(config))
    summary = engine.fit()
    reference = read_metrics(engine.output_dir)
    reference_weights = {k: np.asarray(v) for k, v in paddle.load(f"{summary['checkpoint']}/model.mp0.pdparams").items()}

    out = tmp_path / "ep2"
    run_launch([TRAIN, "-c", config, "-o", f"Engine.output_dir={out}", "-o", "Distributed.dp_degree=2",
                "-o", "Distributed.ep_degree=2"], nproc=2, log_dir=tmp_path / "log")
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for ours, theirs in zip(records, reference):
        for key in ("loss", "lm_loss", "balance_loss", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4), (ours["step"], key)
        # Rank 0 and 1 of the topology share a node: at ep 2 half the dispatched rows go to the peer.
        assert ours["moe_tokens_intra_node"] > 0 and ours["moe_tokens_inter_node"] == 0
        assert theirs["moe_tokens_intra_node"] == 0 and "moe_alltoall_ms" in ours
    assert records[-1]["eval_loss"] == pytest.approx(reference[-1]["eval_loss"], rel=1e-5)

    checkpoint = out / "step_00000003"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["ep_size"] == 2
    shards = [{k: np.asarray(v) for k, v in paddle.load(str(checkpoint / f"model.mp0.ep{r}.pdparams")).items()}
              for r in (0, 1)]
    merged = {**shards[0], **shards[1]}
    assert sorted(merged) == sorted(reference_weights)
    for name, value in merged.items():
        np.testing.assert_allclose(value, reference_weights[name], rtol=0, atol=2e-5, err_msg=name)
        if ".experts." not in name:  # dense weights are replicated
            np.testing.assert_array_equal(shards[0][name], shards[1][name], err_msg=name)


def test_ep_degree_errors(tmp_path, tokenizer_file):
    config = _moe_config(tmp_path, tokenizer_file, Model={"num_experts": 3})
    cfg = load_config(config)
    from ppzoo.distributed.env import check_degrees

    cfg.Distributed.dp_degree, cfg.Distributed.ep_degree = 2, 4
    with pytest.raises(ConfigError, match="ep_degree=4 spreads the experts"):
        check_degrees(cfg.Distributed, 2, "cpu")
    with pytest.raises(ConfigError, match="Model.gate='top3' is not a gate"):
        MoEGPTConfig(gate="top3")
