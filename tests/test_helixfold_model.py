"""HelixFold's model (AlphaFold2 in Paddle) and its optimizations.

- the Evoformer's updates against NumPy transcriptions of AF2's algorithms (einsum form), with random
  weights (AF2 zero-initializes output projections, which would hide errors);
- HelixFold's optimizations against their plain paths: chunked attention and subbatched MLPs / outer
  product mean give the same outputs and gradients; recompute from a start block gives the same gradients;
  tensor fusion gives the same AdamW update (directly and through the Engine); the fused gated attention is
  chosen only where Paddle registers its kernel, and the plain path computes the kernel's documented formula;
- recycling: no gradient through earlier iterations, the training-time number of recycles drawn in range;
- training through the engine on real data (T1026's AF2 features, ../shared/data): the loss falls.
  The overfitting run (lDDT-Ca >= 0.8 on one small protein) takes minutes: benchmarks/overfit_helixfold.py.
"""
import copy
from pathlib import Path

import numpy as np
import paddle
import pytest

from ppzoo import Engine, load_config
from ppzoo.core.recompute import apply_recompute
from ppzoo.core.tensor_fusion import TensorFusionOptimizer
from ppzoo.config.schema import OptimizerConfig, LRScheduleConfig
from ppzoo.core.optim import build_optimizer
from ppzoo.data.protein import residue_constants as rc
from ppzoo.models.helixfold.config import HelixFoldConfig
from ppzoo.models.helixfold.embedders import InputEmbedder
from ppzoo.models.helixfold.evoformer import OuterProductMean, TriangleAttention, TriangleMultiplication
from ppzoo.models.helixfold.model import AlphaFold
from ppzoo.models.helixfold.module import HelixFoldModule
from ppzoo.models.helixfold.primitives import GatedAttention, GlobalAttention
from ppzoo.models.helixfold.structure_module import StructureModuleConfig

from conftest import REPO_ROOT, read_metrics, run_tool, last_json_line

CONFIG_DIR = REPO_ROOT / "configs" / "helixfold"
SHARED_PROTEINS = REPO_ROOT.parent / "shared" / "data" / "proteins"


def tiny_config(**overrides):
    """A few thousand parameters: every part of the model, at widths of 4 to 16."""
    fields = dict(
        msa_channel=16, pair_channel=8, extra_msa_channel=8, single_channel=16, template_channel=8,
        evoformer_blocks=2, extra_msa_blocks=1, template_pair_blocks=1, msa_row_heads=2, msa_row_head_dim=4,
        msa_column_heads=2, msa_column_head_dim=4, extra_msa_row_heads=2, extra_msa_row_head_dim=4,
        extra_msa_column_heads=2, extra_msa_column_head_dim=4, triangle_heads=2, triangle_head_dim=4,
        template_triangle_heads=2, template_triangle_head_dim=4, template_pointwise_heads=2,
        template_pointwise_head_dim=4, outer_product_channel=4, triangle_mult_channel=8,
        template_triangle_mult_channel=8, num_recycle=1, plddt_hidden=8, msa_dropout=0.0, pair_dropout=0.0,
        structure_module=StructureModuleConfig(c_s=16, c_z=8, c_ipa=4, num_heads_ipa=2, num_layers=2, c_resnet=8,
                                               dropout=0.0),
    )
    fields.update(overrides)
    return HelixFoldConfig(**fields)


def random_batch(batch=1, n=10, s=4, e=5, t=2, seed=0):
    """A batch in ppzoo.data.protein's contract with random features and a random (extended) chain."""
    rng = np.random.default_rng(seed)
    f = np.float32
    aatype = rng.integers(0, 20, size=(batch, n))
    target_feat = np.zeros((batch, n, 22), f)
    target_feat[np.arange(batch)[:, None], np.arange(n)[None], aatype + 1] = 1.0
    positions = (rng.normal(size=(batch, n, 37, 3)) + np.arange(n)[None, :, None, None] * [3.8, 0, 0]).astype(f)
    atom_mask = rc.restype_atom37_mask[aatype].astype(f)
    template_aatype = rng.integers(0, 22, size=(batch, t, n))
    template_positions = (rng.normal(size=(batch, t, n, 37, 3)) * 5).astype(f)
    return {
        "aatype": aatype.astype(np.int64), "residue_index": np.tile(np.arange(n), (batch, 1)).astype(np.int64),
        "seq_mask": np.ones((batch, n), f), "target_feat": target_feat,
        "msa_feat": rng.normal(size=(batch, s, n, 49)).astype(f), "msa_mask": np.ones((batch, s, n), f),
        "true_msa": rng.integers(0, 22, size=(batch, s, n)).astype(np.int64),
        "bert_mask": (rng.random((batch, s, n)) < 0.15).astype(f),
        "extra_msa": rng.integers(0, 23, size=(batch, e, n)).astype(np.int64),
        "extra_msa_mask": np.ones((batch, e, n), f), "extra_has_deletion": np.zeros((batch, e, n), f),
        "extra_deletion_value": np.zeros((batch, e, n), f),
        "template_aatype": template_aatype.astype(np.int64), "template_all_atom_positions": template_positions,
        "template_all_atom_masks": rc.restype_atom37_mask[np.minimum(template_aatype, 20)].astype(f),
        "template_mask": np.ones((batch, t), f), "template_pseudo_beta": template_positions[:, :, :, 3],
        "template_pseudo_beta_mask": np.ones((batch, t, n), f),
        "atom14_atom_exists": rc.restype_atom14_mask[aatype].astype(f),
        "residx_atom14_to_atom37": rc.restype_atom14_to_atom37[aatype].astype(np.int64),
        "residx_atom37_to_atom14": rc.restype_atom37_to_atom14[aatype].astype(np.int64),
        "atom37_atom_exists": atom_mask, "all_atom_positions": positions, "all_atom_mask": atom_mask,
        "resolution": np.full((batch,), 2.0, f), "pseudo_beta": positions[:, :, 3],
        "pseudo_beta_mask": np.ones((batch, n), f),
    }


def tensors(batch):
    return {key: paddle.to_tensor(value) for key, value in batch.items()}


def randomize(layer, seed=0, scale=0.3):
    """Random values for every parameter (AF2's zero-initialized outputs and gates would hide errors)."""
    rng = np.random.default_rng(seed)
    for param in layer.parameters():
        param.set_value(rng.normal(scale=scale, size=param.shape).astype("float32"))
    return layer


def np_(x):
    return x.numpy() if isinstance(x, paddle.Tensor) else x


def layer_norm(x, norm):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm._epsilon) * np_(norm.weight) + np_(norm.bias)


def linear(x, layer):
    out = x @ np_(layer.weight)
    return out + np_(layer.bias) if layer.bias is not None else out


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# The Evoformer's updates against AF2's formulas


def reference_gated_attention(att, q_data, m_data, mask, bias):
    """The formula of fused_gate_attention's documentation (AF2's Attention module), in einsum form."""
    d = att.head_dim
    q = np.einsum("brqa,ahc->brqhc", q_data, np_(att.query_w)) * d ** -0.5
    k = np.einsum("brka,ahc->brkhc", m_data, np_(att.key_w))
    v = np.einsum("brka,ahc->brkhc", m_data, np_(att.value_w))
    logits = np.einsum("brqhc,brkhc->brhqk", q, k) + ((mask - 1.0) * 1e9)[:, :, None, None, :]
    if bias is not None:
        logits = logits + bias[:, None]
    avg = np.einsum("brhqk,brkhc->brqhc", softmax(logits), v)
    if att.gating:
        avg = avg * sigmoid(np.einsum("brqa,ahc->brqhc", q_data, np_(att.gating_w)) + np_(att.gating_b))
    return np.einsum("brqhc,hco->brqo", avg, np_(att.output_w)) + np_(att.output_b)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gated_attention_matches_the_fused_kernels_formula(chunk_size):
    rng = np.random.default_rng(1)
    att = randomize(GatedAttention(6, 6, num_heads=3, head_dim=4, out_dim=5, chunk_size=chunk_size))
    x = rng.normal(size=(2, 5, 7, 6)).astype("float32")
    mask = (rng.random((2, 5, 7)) > 0.2).astype("float32")
    bias = rng.normal(size=(2, 3, 7, 7)).astype("float32")
    x_t = paddle.to_tensor(x)
    assert not att.uses_fused_kernel(x_t, x_t)  # no fused_gate_attention kernel on CPU: the plain path runs
    out = att(x_t, x_t, paddle.to_tensor(mask), paddle.to_tensor(bias))
    np.testing.assert_allclose(out.numpy(), reference_gated_attention(att, x, x, mask, bias), rtol=1e-4, atol=1e-5)


def test_fused_gate_attention_is_chosen_by_registered_kernel(monkeypatch):
    from ppzoo.models.helixfold import primitives

    att = GatedAttention(4, 4, 2, 2, 4, fuse=True)
    x = paddle.zeros([1, 1, 3, 4])
    assert att.uses_fused_kernel(x, x) == primitives.fused_gate_attention_available()
    monkeypatch.setattr(primitives, "fused_gate_attention_available", lambda: True)
    assert att.uses_fused_kernel(x, x)
    assert not GatedAttention(4, 4, 2, 2, 4, fuse=False).uses_fused_kernel(x, x)
    assert not att.uses_fused_kernel(x, paddle.zeros([1, 1, 3, 4]))  # cross-attention: the kernel cannot
    assert not GatedAttention(4, 4, 2, 2, 4, gating=False).uses_fused_kernel(x, x)


def test_global_column_attention_matches_algorithm_19():
    rng = np.random.default_rng(2)
    att = randomize(GlobalAttention(6, num_heads=2, head_dim=3))
    x = rng.normal(size=(1, 4, 5, 6)).astype("float32")
    mask = (rng.random((1, 4, 5)) > 0.3).astype("float32")
    out = att(paddle.to_tensor(x), paddle.to_tensor(mask)).numpy()
    q_avg = (x * mask[..., None]).sum(2) / (mask.sum(2)[..., None] + 1e-10)
    q = linear(q_avg, att.query).reshape(1, 4, 2, 3) * 3 ** -0.5
    k, v = linear(x, att.key), linear(x, att.value)
    w = softmax(np.einsum("brhc,brkc->brhk", q, k) + ((mask - 1) * 1e9)[:, :, None, :])
    avg = np.einsum("brhk,brkc->brhc", w, v)
    gate = sigmoid(linear(x, att.gate)).reshape(1, 4, 5, 2, 3)
    expected = linear((gate * avg[:, :, None]).reshape(1, 4, 5, 6), att.output)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("outgoing", [True, False])
def test_triangle_multiplication_matches_algorithms_11_and_12(outgoing):
    rng = np.random.default_rng(3)
    layer = randomize(TriangleMultiplication(6, 5, outgoing=outgoing))
    z = rng.normal(size=(2, 7, 7, 6)).astype("float32")
    mask = (rng.random((2, 7, 7)) > 0.2).astype("float32")
    out = layer(paddle.to_tensor(z), paddle.to_tensor(mask)).numpy()
    zn = layer_norm(z, layer.norm)
    a = mask[..., None] * sigmoid(linear(zn, layer.left_gate)) * linear(zn, layer.left_proj)
    b = mask[..., None] * sigmoid(linear(zn, layer.right_gate)) * linear(zn, layer.right_proj)
    x = np.einsum("bikc,bjkc->bijc", a, b) if outgoing else np.einsum("bkic,bkjc->bijc", a, b)
    expected = sigmoid(linear(zn, layer.output_gate)) * linear(layer_norm(x, layer.output_norm), layer.output)
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_outer_product_mean_matches_algorithm_10(chunk_size):
    rng = np.random.default_rng(4)
    layer = randomize(OuterProductMean(6, 5, channel=3, chunk_size=chunk_size))
    m = rng.normal(size=(2, 4, 7, 6)).astype("float32")
    mask = (rng.random((2, 4, 7)) > 0.2).astype("float32")
    out = layer(paddle.to_tensor(m), paddle.to_tensor(mask)).numpy()
    mn = layer_norm(m, layer.norm)
    a, b = linear(mn, layer.left) * mask[..., None], linear(mn, layer.right) * mask[..., None]
    outer = np.einsum("bsic,bsjd->bijcd", a, b).reshape(2, 7, 7, 9)
    norm = np.einsum("bsi,bsj->bij", mask, mask)[..., None]
    np.testing.assert_allclose(out, linear(outer, layer.output) / (norm + 1e-3), rtol=1e-4, atol=1e-5)


def test_triangle_attention_starting_and_ending_node():
    rng = np.random.default_rng(5)
    start = randomize(TriangleAttention(6, num_heads=2, head_dim=3, starting=True, fuse=True, chunk_size=None))
    end = TriangleAttention(6, num_heads=2, head_dim=3, starting=False, fuse=True, chunk_size=None)
    end.set_state_dict(start.state_dict())
    z = rng.normal(size=(1, 6, 6, 6)).astype("float32")
    mask = (rng.random((1, 6, 6)) > 0.2).astype("float32")
    out = start(paddle.to_tensor(z), paddle.to_tensor(mask)).numpy()
    zn = layer_norm(z, start.norm)
    bias = linear(zn, start.bias).transpose(0, 3, 1, 2)  # b[h, j, k] from edge jk
    np.testing.assert_allclose(out, reference_gated_attention(start.attention, zn, zn, mask, bias),
                               rtol=1e-4, atol=1e-5)
    # Around the ending node is the same update on the transposed pair.
    out_end = end(paddle.to_tensor(z), paddle.to_tensor(mask)).numpy()
    transposed = start(paddle.to_tensor(z.transpose(0, 2, 1, 3)), paddle.to_tensor(mask.transpose(0, 2, 1)))
    np.testing.assert_allclose(out_end, transposed.numpy().transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-6)


def test_relative_positions_are_clipped_at_32():
    embedder = randomize(InputEmbedder(tiny_config()))
    target = paddle.zeros([1, 4, 22])
    msa = paddle.zeros([1, 1, 4, 49])
    _, pair = embedder(target, msa, paddle.to_tensor([[0, 1, 40, 100]], dtype="int64"))
    pair = pair.numpy()[0]
    assert not np.allclose(pair[0, 1], pair[0, 2])  # offsets -1 and -40 differ
    np.testing.assert_allclose(pair[0, 2], pair[0, 3], rtol=1e-6)  # -40 and -100 are both clipped to -32
    np.testing.assert_allclose(pair[3, 0], pair[2, 0], rtol=1e-6)  # +100 and +40: both +32


# ---------------------------------------------------------------------------------------------------------
# The whole model; recycling


def grads_of(layer):
    return {name: p.grad.numpy().copy() for name, p in layer.named_parameters() if p.grad is not None}


def model_loss(outputs):
    """A scalar touching every output head and the coordinates."""
    return sum(outputs[key].square().mean() for key in
               ("distogram_logits", "masked_msa_logits", "plddt_logits", "experimentally_resolved_logits",
                "final_atom37_positions", "angles"))


@pytest.fixture(scope="module")
def model_and_batch():
    paddle.seed(0)
    model = randomize(AlphaFold(tiny_config()), scale=0.2)
    return model, tensors(random_batch())


def test_model_outputs_and_every_parameter_gets_a_gradient(model_and_batch):
    model, batch = model_and_batch
    outputs = model(batch, num_recycle=1)
    shapes = {key: list(value.shape) for key, value in outputs.items()}
    assert shapes["distogram_logits"] == [1, 10, 10, 64]
    assert shapes["masked_msa_logits"] == [1, 4, 10, 23]  # the MSA rows only, not the template angle rows
    assert shapes["plddt_logits"] == [1, 10, 50] and shapes["experimentally_resolved_logits"] == [1, 10, 37]
    assert shapes["final_atom37_positions"] == [1, 10, 37, 3] and shapes["frames"] == [2, 1, 10, 7]
    logits = outputs["distogram_logits"].numpy()
    np.testing.assert_allclose(logits, logits.transpose(0, 2, 1, 3), rtol=1e-5)
    # One iteration fed a previous structure with realistic distances (a random model's first prediction
    # sits near the origin, all distances in no recycling bin), so every parameter takes part.
    model.clear_gradients()
    with paddle.no_grad():
        _, prev = model.iteration(batch, model.initial_prev(batch))
    prev["pseudo_beta"] = batch["pseudo_beta"]
    outputs, _ = model.iteration(batch, prev)
    model_loss(outputs).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not np.any(p.grad.numpy())]
    assert not missing, f"parameters without gradient: {missing}"


def test_no_gradient_flows_through_earlier_recycles(model_and_batch):
    model, batch = model_and_batch
    model.clear_gradients()
    model_loss(model(batch, num_recycle=2)).backward()
    recycled = grads_of(model)
    # The same last iteration fed with the earlier iterations' outputs as constants.
    model.clear_gradients()
    prev = model.initial_prev(batch)
    with paddle.no_grad():
        for _ in range(2):
            _, prev = model.iteration(batch, prev)
    outputs, _ = model.iteration(batch, {k: paddle.to_tensor(v.numpy()) for k, v in prev.items()})
    model_loss(outputs).backward()
    constant = grads_of(model)
    assert recycled.keys() == constant.keys()
    for name in recycled:
        np.testing.assert_allclose(recycled[name], constant[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_training_draws_the_number_of_recycles_uniformly():
    model = AlphaFold(tiny_config(num_recycle=3))
    paddle.seed(7)
    draws = [model.sample_num_recycle() for _ in range(200)]
    assert set(draws) == {0, 1, 2, 3} and min(np.bincount(draws)) > 25
    paddle.seed(7)
    assert [model.sample_num_recycle() for _ in range(200)] == draws  # seeded: the same on every rank


# ---------------------------------------------------------------------------------------------------------
# HelixFold's optimizations against their plain paths


def test_chunked_attention_and_subbatching_give_the_same_outputs_and_gradients(model_and_batch):
    model, batch = model_and_batch
    chunked = AlphaFold(tiny_config(chunk_size=3))
    chunked.set_state_dict(model.state_dict())
    results = []
    for m in (model, chunked):
        m.clear_gradients()
        outputs = m(batch, num_recycle=1)
        model_loss(outputs).backward()
        results.append((outputs, grads_of(m)))
    (plain_out, plain_grads), (chunk_out, chunk_grads) = results
    for key in ("distogram_logits", "masked_msa_logits", "final_atom37_positions", "plddt_logits"):
        np.testing.assert_allclose(chunk_out[key].numpy(), plain_out[key].numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
    for name in plain_grads:
        np.testing.assert_allclose(chunk_grads[name], plain_grads[name], rtol=1e-3, atol=1e-6, err_msg=name)


def test_recompute_from_a_start_block_gives_the_same_gradients():
    paddle.seed(1)
    cfg = tiny_config(evoformer_blocks=3, recompute_start_block=1, num_recycle=0)
    plain = randomize(HelixFoldModule(cfg), seed=3, scale=0.2)
    recomputed = HelixFoldModule(cfg)
    recomputed.set_state_dict(plain.state_dict())
    units = apply_recompute(recomputed.recompute_units())
    assert units == list(recomputed.model.iteration.evoformer.blocks)[1:]
    batch = tensors(random_batch(seed=1))
    results = []
    for module in (plain, recomputed):
        batch = {k: v for k, v in batch.items()}
        model_loss(module.model(batch, num_recycle=0)).backward()
        results.append(grads_of(module))
    for name in results[0]:
        np.testing.assert_allclose(results[1][name], results[0][name], rtol=1e-5, atol=1e-7, err_msg=name)


def adamw_config(tensor_fusion):
    return OptimizerConfig(weight_decay=0.1, tensor_fusion=tensor_fusion,
                           lr=LRScheduleConfig(name="Constant", max_lr=1e-2, warmup_steps=0))


def test_tensor_fusion_gives_the_same_adamw_update(model_and_batch):
    model, batch = model_and_batch
    models = [copy.deepcopy(model), copy.deepcopy(model)]
    optimizers = [build_optimizer(adamw_config(fusion), m.parameters(), 10)[0] for fusion, m in zip((False, True), models)]
    fused = optimizers[1]
    assert isinstance(fused, TensorFusionOptimizer)
    assert {name.split(".")[0] for name in fused.fused.buffers} == {"decay", "no_decay"}
    assert len(fused.inner._parameter_list) == 2 and len(optimizers[0]._parameter_list) == len(model.parameters())
    for step in range(3):
        for m, opt in zip(models, optimizers):
            model_loss(m(batch, num_recycle=0)).backward()
            opt.step()
            opt.clear_grad(set_to_zero=False)
    for (name, p_plain), p_fused in zip(models[0].named_parameters(), models[1].parameters()):
        np.testing.assert_allclose(p_fused.numpy(), p_plain.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)
        assert p_fused.grad is None
    # The model's parameters are views into the buffers: the optimizer wrote them through the buffers.
    buffer = fused.fused.buffers["decay.float32"]
    param, start, end = fused.fused.offsets["decay.float32"][0]
    np.testing.assert_array_equal(buffer.numpy()[start:end], param.numpy().reshape(-1))


# ---------------------------------------------------------------------------------------------------------
# Configs and training through the engine


def test_presets_load_with_af2_sizes():
    expected = {"initial_training": 48, "finetuning": 48, **{f"model_{i}": 48 for i in range(1, 6)}}
    for name, blocks in expected.items():
        cfg = load_config(CONFIG_DIR / f"{name}.yaml")
        assert cfg.model_module == "HelixFold" and cfg.Model.evoformer_blocks == blocks, name
        assert (cfg.Model.msa_channel, cfg.Model.pair_channel, cfg.Model.single_channel) == (256, 128, 384)
    assert not load_config(CONFIG_DIR / "model_3.yaml").Model.templates  # models 3-5 have no templates
    # Fine-tuning adds the structural violation and experimentally resolved losses (AF2 Table 6).
    initial, finetuning = (load_config(CONFIG_DIR / f"{name}.yaml").Model.loss for name in ("initial_training", "finetuning"))
    assert (initial.violation_weight, initial.experimentally_resolved_weight) == (0.0, 0.0)
    assert (finetuning.violation_weight, finetuning.experimentally_resolved_weight) == (1.0, 0.01)
    assert load_config(CONFIG_DIR / "model_1.yaml").Model.templates


requires_shared_proteins = pytest.mark.skipif(
    not (SHARED_PROTEINS / "casp14" / "T1026.features.pkl").is_file(),
    reason="needs ../shared/data/proteins (the shared PDB chains and T1026's AF2 features) beside the checkout",
)

# The tiny config at a smaller crop and MSA so that a test step takes a fraction of a second.
FAST = ["Engine.progress_bar=false", "Engine.logging_freq=1", "Engine.eval_iters=1", "Engine.save_steps=0",
        "Data.Train.crop_size=24", "Data.Train.max_msa_clusters=4", "Data.Train.max_extra_msa=8",
        "Data.Eval.crop_size=24", "Data.Eval.max_msa_clusters=4", "Data.Eval.max_extra_msa=8",
        "Data.Eval.structures=[]", "Model.num_recycle=0"]


def tiny_engine(tmp_path, *overrides):
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"Engine.output_dir={tmp_path}", *FAST, *overrides])
    return Engine(cfg)


@requires_shared_proteins
def test_tensor_fusion_through_the_engine_trains_the_same_and_resumes(tmp_path):
    runs = {}
    for fusion in (False, True):
        engine = tiny_engine(tmp_path / f"fusion_{fusion}", "Engine.max_steps=3", f"Optimizer.tensor_fusion={fusion}")
        engine.fit()
        runs[fusion] = [record["loss"] for record in read_metrics(engine.output_dir)]
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-4)
    # A fused run stopped after 2 steps and resumed (optimizer state saved under the buffers' names) logs the
    # third step's loss of the uninterrupted run.
    first = tiny_engine(tmp_path / "resume", "Engine.max_steps=2", "Optimizer.tensor_fusion=true",
                        "Optimizer.lr.decay_steps=3")
    first.fit()
    resumed = tiny_engine(tmp_path / "resume", "Engine.max_steps=3", "Optimizer.tensor_fusion=true",
                          "Optimizer.lr.decay_steps=3")
    resumed.fit(resume="auto")
    third = [r["loss"] for r in read_metrics(resumed.output_dir) if r["step"] == 3]
    uninterrupted = tiny_engine(tmp_path / "straight", "Engine.max_steps=3", "Optimizer.tensor_fusion=true",
                                "Optimizer.lr.decay_steps=3")
    uninterrupted.fit()
    np.testing.assert_allclose(third, [read_metrics(uninterrupted.output_dir)[-1]["loss"]], rtol=1e-4)


@requires_shared_proteins
def test_tiny_config_trains_with_tools_and_its_loss_falls(tmp_path):
    steps = 24
    result = run_tool("train", ["-c", CONFIG_DIR / "tiny.yaml", "-o", f"Engine.output_dir={tmp_path}",
                                "-o", f"Engine.max_steps={steps}", "-o", f"Engine.eval_freq={steps}",
                                "-o", f"Optimizer.lr.warmup_steps=2", *[a for o in FAST for a in ("-o", o)]])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = last_json_line(result.stdout)
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == steps and all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.3, losses
    evaluated = [r for r in records if "eval_lddt_ca" in r]
    assert evaluated and 0.0 <= evaluated[-1]["eval_lddt_ca"] <= 1.0 and "eval_plddt" in evaluated[-1]
    assert summary["step"] == steps and 0.0 <= summary["eval_lddt_ca"] <= 1.0
