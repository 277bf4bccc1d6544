"""ERNIE 3.0 Titan: relative attention against a plain reference, recurrence memory against the concatenated
sequence, generation through the cache interface (dense, preallocated, KCache) with memory, the tasks' data
invariants (span masking, attribute dropping), online distillation (no teacher gradient, ALD removed on
export) and short engine runs of the three configs."""
import itertools

import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401
from ppzoo.data.ernie_tasks import (
    IGNORE, TOPIC_CLASSES, ErnieTitanTasks, ErnieTitanTasksConfig, TitanTopics, TitanTopicsConfig, entity_spans,
    format_control_prompt, sample_control,
)
from ppzoo.data.sampler import collate
from ppzoo.data.tokenizer import Tokenizer
from ppzoo.inference import DenseKVCache, Generator, PreallocatedKVCache, SamplingConfig
from ppzoo.inference.kcache import KCacheConfig, cache_factory
from ppzoo.methods.distill import (
    OnlineDistillConfig, OnlineDistillModule, StudentSize, attention_kl, export_student, load_student, soft_target_kl,
)
from ppzoo.errors import ConfigError, DataError
from ppzoo.models.ernie_titan import (
    ErnieTitanConfig, ErnieTitanModel, ErnieTitanModule, ErnieTitanNLUModule, TitanCausalLM,
)
from ppzoo.models.ernie_titan.model import RelativeSelfAttention, parameter_count, additive_mask, relative_index, segment_mask, sinusoid
from tests.conftest import REPO_ROOT, last_json_line, run_tool

SEQ = 48


def tiny_config(**overrides):
    values = dict(vocab_size=520, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, task_hidden_size=24,
                  task_num_layers=2, task_num_heads=4, task_intermediate_size=48, mem_len=64,
                  max_relative_distance=40, adversarial_refresh_every=2, adversarial_new_tokens=6)
    values.update(overrides)
    return ErnieTitanConfig(**values)


def batch_of(samples):
    return {k: paddle.to_tensor(v) for k, v in collate(samples).items()}


@pytest.fixture(scope="module")
def tasks(tokenizer_file):
    tokenizer = Tokenizer.from_file(tokenizer_file)
    return ErnieTitanTasks.build(ErnieTitanTasksConfig(max_chars=60_000), tokenizer, SEQ)


# ------------------------------------------------------------------------------------------- attention
def reference_relative_attention(attn, x, q_pos, k_pos, allowed):
    """Transformer-XL's score written out pair by pair in numpy: ((q_i + u).k_j + (q_i + v).W_r R(i - j)) / sqrt(d)."""
    w = attn.qkv.weight.numpy()
    bias = attn.qkv.bias.numpy()
    h, d = attn.heads, attn.head_dim
    qkv = x @ w + bias
    q, k, v = (qkv[..., i * h * d:(i + 1) * h * d].reshape(*x.shape[:2], h, d) for i in range(3))
    u, vb, wr = attn.u.numpy(), attn.v.numpy(), attn.r_proj.weight.numpy()
    K = attn.max_distance
    b, s = x.shape[:2]
    out = np.zeros((b, s, h, d))
    for bi in range(b):
        for i in range(s):
            for head in range(h):
                scores = np.full(k.shape[1], -np.inf)
                for j in range(k.shape[1]):
                    if not allowed[bi, i, j]:
                        continue
                    dist = int(np.clip(q_pos[bi, i] - k_pos[bi, j], -K, K))
                    r = (sinusoid([dist], attn.hidden) @ wr)[0].reshape(h, d)[head]
                    scores[j] = ((q[bi, i, head] + u[head]) @ k[bi, j, head] + (q[bi, i, head] + vb[head]) @ r) / np.sqrt(d)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[bi, i, head] = p @ v[bi, :, head]
    o = out.reshape(b, s, h * d) @ attn.out.weight.numpy() + attn.out.bias.numpy()
    return o


@pytest.mark.parametrize("causal", [True, False])
def test_relative_attention_matches_plain_reference(causal):
    paddle.seed(0)
    attn = RelativeSelfAttention(16, 2, max_distance=5)
    for p in (attn.u, attn.v):
        p.set_value(paddle.randn(p.shape))
    x = np.random.default_rng(0).normal(size=(2, 9, 16)).astype(np.float32)
    pos = np.tile(np.arange(9), (2, 1))
    valid = np.ones((2, 9), dtype=bool)
    valid[1, 7:] = False  # padding
    allowed = segment_mask(paddle.to_tensor(valid), 9, causal)
    out, _ = attn(paddle.to_tensor(x), None, relative_index(paddle.to_tensor(pos), paddle.to_tensor(pos), 5),
                  additive_mask(allowed))
    expected = reference_relative_attention(attn, x, pos, pos, allowed.numpy())
    np.testing.assert_allclose(out.numpy()[valid], expected[valid], atol=1e-4)


def test_memory_recurrence_equals_concatenated_sequence():
    """Causal attention: a segment read with the previous segment as memory (holding all of it) gives what
    the concatenated sequence gives, in every layer, because memory states are exactly the concatenation's."""
    paddle.seed(1)
    model = ErnieTitanModel(tiny_config())
    model.eval()
    ids = paddle.to_tensor(np.random.default_rng(1).integers(4, 500, (2, 30)))
    full, _ = model.lm_segment(ids)
    first, memory = model.lm_segment(ids[:, :12])
    second, _ = model.lm_segment(ids[:, 12:], memory=memory)
    np.testing.assert_allclose(paddle.concat([first, second], axis=1).numpy(), full.numpy(), atol=1e-4)
    # A memory shorter than the history drops the oldest states: then the results must differ.
    short = ErnieTitanModel(tiny_config(mem_len=4))
    short.set_state_dict(model.state_dict())
    short.eval()
    _, memory = short.lm_segment(ids[:, :12])
    truncated, _ = short.lm_segment(ids[:, 12:], memory=memory)
    assert np.abs(truncated.numpy() - second.numpy()).max() > 1e-3


@pytest.mark.parametrize("policy", ["dense", "preallocated", "kcache_all"])
def test_generator_with_memory_matches_full_forward(policy, tokenizer_file):
    """Logits the Generator gets through a cache (memory written into it first) equal one causal forward of
    context + prompt; KCache with every value selected is exact too."""
    paddle.seed(2)
    model = ErnieTitanModel(tiny_config())
    model.eval()
    tokenizer = Tokenizer.from_file(tokenizer_file)
    lm = TitanCausalLM(model)
    context = tokenizer.encode("The for statement is used to iterate over the elements of a sequence.")
    prompt = tokenizer.encode("An iterator is created for the result of")
    lm.memory = lm.read_context([context])
    factory = {"dense": DenseKVCache, "preallocated": PreallocatedKVCache,
               "kcache_all": cache_factory(KCacheConfig(top_n=1.0))}[policy]
    generator = Generator(lm, tokenizer, cache_factory=factory, decode_tail=3)
    got = generator.prompt_logits([prompt, prompt[2:]])
    lm.memory = None
    with paddle.no_grad():
        full = lm(paddle.to_tensor([context + prompt]))[:, -1].numpy()
        full_short = lm(paddle.to_tensor([context + prompt[2:]]))[:, -1].numpy()
    np.testing.assert_allclose(got[0], full[0], atol=2e-4)
    np.testing.assert_allclose(got[1], full_short[0], atol=2e-4)  # left-padded row: its own positions


def test_generator_decodes_like_incremental_full_forwards(tokenizer_file):
    paddle.seed(3)
    model = ErnieTitanModel(tiny_config())
    model.eval()
    tokenizer = Tokenizer.from_file(tokenizer_file)
    lm = TitanCausalLM(model)
    lm.memory = lm.genre_memory(1)
    text = Generator(lm, tokenizer, cache_factory=PreallocatedKVCache).generate(
        "def f(x):", SamplingConfig(max_new_tokens=6, stop_token_ids=[]))
    ids = tokenizer.encode("def f(x):", add_bos=True)
    with paddle.no_grad():
        for _ in range(6):
            ids.append(int(lm(paddle.to_tensor([ids]))[0, -1].argmax()))
    assert text == tokenizer.decode(ids[-6:])


# ------------------------------------------------------------------------------------------------ data
def test_span_masking_invariants(tasks):
    tok = tasks.tok
    masked_fraction = []
    for index in range(40):
        sample = tasks[index]
        ids, labels, valid = sample["mlm_ids"], sample["mlm_labels"], sample["mlm_valid"]
        masked = labels != IGNORE
        assert ids[0] == tok.cls and not masked[0] and not masked[~valid].any()
        assert masked.any()
        # Unmasked positions keep their token; most masked ones show [MASK].
        d, i, j = tasks.chunks[index]
        doc = tasks.docs[d]
        t0 = doc.sentences[i][2]
        original = doc.tokens[t0:t0 + int(valid.sum()) - 1]
        np.testing.assert_array_equal(ids[1:len(original) + 1][~masked[1:len(original) + 1]],
                                      original[~masked[1:len(original) + 1]])
        np.testing.assert_array_equal(labels[1:len(original) + 1][masked[1:len(original) + 1]],
                                      original[masked[1:len(original) + 1]])
        masked_fraction.append(masked.sum() / (valid.sum() - 1))
        # Whole entities: every entity of the chunk is masked completely or not at all.
        text_start = int(doc.starts[t0])
        text = doc.text[text_start:int(doc.ends[t0 + len(original) - 1])]
        for a, b in entity_spans(text):
            t_a = int(np.searchsorted(doc.ends[t0:t0 + len(original)], a + text_start, side="right"))
            t_b = int(np.searchsorted(doc.starts[t0:t0 + len(original)], b + text_start, side="left"))
            flags = masked[1 + t_a:1 + t_b]
            # A token shared with a neighbouring span can belong to another masked unit; otherwise all-or-none.
            inner = flags[1:-1] if len(flags) > 2 else flags[:0]
            assert inner.all() or not inner.any()
    assert 0.08 < np.mean(masked_fraction) <= 0.16


def test_attribute_masking_probabilities():
    rng = np.random.default_rng(0)
    attributes = {"topic": "asyncio", "keywords": ["loop", "future"], "sentiment": "neutral", "length": 40}
    draws = [sample_control(attributes, rng, 0.5, 0.5) for _ in range(8000)]
    conditioned = [d for d in draws if d is not None]
    assert abs(len(conditioned) / len(draws) - 0.5) < 0.025
    for key in attributes:
        kept = np.mean([d[key] is not None for d in conditioned])
        assert abs(kept - 0.5) < 0.03, key
    # independence of two attributes' drops
    both = np.mean([d["topic"] is not None and d["length"] is not None for d in conditioned])
    assert abs(both - 0.25) < 0.03
    assert format_control_prompt("asyncio", ["loop", "future"], "neutral", 40) == \
        "[t]asyncio[/t] [k]loop, future[/k] [senti]neutral[/senti] [w]About 40 words[/w] "


def test_task_samples_are_consistent(tasks):
    tok = tasks.tok
    perms = list(itertools.permutations(range(3)))
    for index in range(30):
        s = tasks[index]
        assert s["reorder_ids"][0] == tok.cls and (s["reorder_ids"] == tok.sep).sum() == 2
        assert 0 <= s["reorder_label"] < len(perms) and s["distance_label"] in (0, 1, 2)
        prompt_len = int((s["ctrl_labels"][: int(s["ctrl_valid"].sum())] == IGNORE).sum())
        assert s["ctrl_ids"][0] == tok.eos
        text = tasks.tokenizer.decode(s["ctrl_ids"][1: int(s["ctrl_valid"].sum())], skip_special_tokens=False)
        if s["ctrl_conditioned"] and prompt_len > 1:
            assert text.startswith(("[t]", "[k]", "[senti]", "[w]"))
        if not s["ctrl_conditioned"]:
            assert prompt_len == 1  # only the opening eos carries no label
        assert s["adv_prefix_len"] >= 1 and s["adv_length"] > s["adv_prefix_len"]


def test_topic_task_labels_and_document_split(tokenizer_file):
    tokenizer = Tokenizer.from_file(tokenizer_file)
    train = TitanTopics.build(TitanTopicsConfig(split="train", max_per_class=6), tokenizer, SEQ)
    val = TitanTopics.build(TitanTopicsConfig(split="validation", max_per_class=3), tokenizer, SEQ)
    assert not set(train.sources) & set(val.sources)  # validation windows come from files never trained on
    for dataset in (train, val):
        labels = [int(dataset[i]["label"]) for i in range(len(dataset))]
        assert sorted(set(labels)) == list(range(len(TOPIC_CLASSES)))
        for source, label in zip(dataset.sources, labels):
            package = source.split(":", 1)[1].split("/")[0]
            assert package == TOPIC_CLASSES[label]
        assert dataset[0]["input_ids"][0] == tokenizer.token_to_id("[CLS]")


# --------------------------------------------------------------------------------------------- training
def test_pretraining_step_refreshes_self_generated_negatives(tasks):
    paddle.seed(4)
    module = ErnieTitanModule(tiny_config())
    batch = batch_of([tasks[i] for i in range(4)])
    out = module.training_step(batch)
    for name in ("mlm", "doc_lm", "reorder", "distance", "controllable", "adversarial"):
        assert np.isfinite(float(out[name])) and float(out[name]) > 0, (name, float(out[name]))
    out["loss"].backward()
    negatives = module._negatives[0].copy()
    # The negatives are the prefix followed by generated tokens.
    prefix_len = batch["adv_prefix_len"].numpy()
    for r, n in enumerate(prefix_len):
        np.testing.assert_array_equal(negatives[r, :1 + n], batch["adv_ids"].numpy()[r, :1 + n])
    module.training_step(batch)  # step 1: the buffer is reused
    np.testing.assert_array_equal(module._negatives[0], negatives)
    module.training_step(batch)  # step 2 (refresh_every 2): regenerated, other samples
    assert module._negatives[0].shape != negatives.shape or (module._negatives[0] != negatives).any()


def test_bad_input_is_named(tasks):
    module = ErnieTitanModule(tiny_config(vocab_size=300))
    with pytest.raises(ConfigError, match="vocab_size=300"):
        module.training_step(batch_of([tasks[0]]))
    with pytest.raises(ConfigError, match="num_labels"):
        ErnieTitanNLUModule(tiny_config())
    with pytest.raises(DataError, match="seq_len"):
        ErnieTitanTasks.build(ErnieTitanTasksConfig(max_chars=1000), tasks.tokenizer, 16)


# ------------------------------------------------------------------------------------------- distillation
def distill_config():
    return OnlineDistillConfig(
        teacher=tiny_config(),
        assistant=StudentSize(24, 2, 2, 48),
        students=[StudentSize(16, 2, 2, 32), StudentSize(16, 1, 2, 32)],
    )


def test_distillation_divergences_match_numpy():
    rng = np.random.default_rng(7)
    target, logits = rng.normal(size=(2, 5, 11)), rng.normal(size=(2, 5, 11))
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    for temperature in (1.0, 2.0):
        t = np.exp(target / temperature) / np.exp(target / temperature).sum(-1, keepdims=True)
        p = np.exp(logits / temperature) / np.exp(logits / temperature).sum(-1, keepdims=True)
        expected = (t * np.log(t / p)).sum(-1)[valid].mean() * temperature ** 2
        got = soft_target_kl(paddle.to_tensor(target, "float32"), paddle.to_tensor(logits, "float32"),
                             paddle.to_tensor(valid), temperature)
        np.testing.assert_allclose(float(got), expected, rtol=1e-4)
    probs_t = rng.dirichlet(np.ones(5), size=(2, 3, 5))  # [b, heads, s, s]
    probs_s = rng.dirichlet(np.ones(5), size=(2, 2, 5))
    mt, ms = probs_t.mean(1), probs_s.mean(1)
    expected = (mt * np.log(mt / ms)).sum(-1)[valid].mean()
    got = attention_kl(paddle.to_tensor(probs_t, "float32"), paddle.to_tensor(probs_s, "float32"), paddle.to_tensor(valid))
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)


def test_ofd_gives_no_gradient_to_the_teacher(tasks):
    paddle.seed(5)
    module = OnlineDistillModule(distill_config())
    batch = batch_of([tasks[i] for i in range(4)])
    losses = module.compute_losses(batch)
    student_loss = sum(losses[name] for name in losses if name.startswith(("assistant", "student")))
    student_loss.backward()
    teacher_grads = [p.grad for p in module.teacher.parameters() if p.grad is not None]
    assert all(float(g.abs().max()) == 0.0 for g in teacher_grads)
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in module.students[0].parameters())
    module.clear_gradients()
    losses["teacher"].backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in module.teacher.parameters())
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in module.students[1].parameters())


def test_ald_layer_absent_from_exported_student(tasks, tmp_path):
    paddle.seed(6)
    module = OnlineDistillModule(distill_config())
    student = module.students[0]
    assert any(name.startswith("auxiliary") for name, _ in student.named_parameters())
    path = export_student(module, 0, tmp_path / "student0")
    state = paddle.load(str(path / "model.pdparams"))
    assert not any("auxiliary" in name for name in state)
    loaded = load_student(path)
    assert not any(name.startswith("auxiliary") for name, _ in loaded.named_parameters())
    batch = batch_of([tasks[i] for i in range(2)])
    student.eval()
    with paddle.no_grad():
        expected = student(batch["mlm_ids"], batch["mlm_valid"], use_auxiliary=False)[0]
        got = loaded(batch["mlm_ids"], batch["mlm_valid"])[0]
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
    with paddle.no_grad():
        with_aux = student(batch["mlm_ids"], batch["mlm_valid"], use_auxiliary=True)[0]
    assert np.abs(with_aux.numpy() - expected.numpy()).max() > 1e-4


def test_parameter_count_and_the_260b_recipe():
    config = tiny_config()
    model = ErnieTitanModel(config)
    assert parameter_count(config) == sum(int(np.prod(p.shape)) for p in model.parameters())
    recipe = ppzoo.load_config(REPO_ROOT / "configs" / "ernie_titan" / "titan_260b.yaml").Model
    assert (recipe.num_layers, recipe.hidden_size, recipe.num_heads, recipe.intermediate_size) == (48, 12288, 192, 196608)
    assert (recipe.task_num_layers, recipe.task_hidden_size) == (12, 768)
    assert 250e9 < parameter_count(recipe) < 275e9  # "260B"


# ------------------------------------------------------------------------------------- engine and tools
def tool(name, *args):
    proc = run_tool(name, args, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return last_json_line(proc.stdout)


def test_configs_train_through_the_engine(tokenizer_file, tmp_path):
    common = [f"Data.tokenizer={tokenizer_file}", "Model.vocab_size=520", "Global.device=cpu", "Engine.max_steps=2",
              "Engine.logging_freq=1", "Engine.eval_freq=2", "Engine.eval_iters=1", "Engine.save_steps=2",
              "Global.global_batch_size=4", "Global.micro_batch_size=4", "Data.seq_len=48",
              "Engine.progress_bar=false"]
    small = ["Model.hidden_size=32", "Model.intermediate_size=64", "Model.task_hidden_size=32",
             "Model.task_intermediate_size=64"]
    pre = tmp_path / "pre"
    result = tool("train", "-c", "configs/ernie_titan/tiny.yaml", *sum([["-o", o] for o in common + small + [
        f"Engine.output_dir={pre}", "Data.Train.max_chars=40000", "Data.Eval.max_chars=20000",
        "Model.adversarial_new_tokens=4"]], []))
    assert np.isfinite(result["loss"]) and "eval_reorder_acc" in result
    nlu = tool("train", "-c", "configs/ernie_titan/tiny_nlu.yaml", *sum([["-o", o] for o in common + small + [
        f"Engine.output_dir={tmp_path / 'nlu'}", f"Engine.init_from={pre}", "Data.Train.max_per_class=8",
        "Data.Eval.max_per_class=4"]], []))
    assert "eval_accuracy" in nlu
    distill = tool("train", "-c", "configs/ernie_titan/tiny_distill.yaml", *sum([["-o", o] for o in common + [
        f"Engine.output_dir={tmp_path / 'distill'}", "Data.Train.max_chars=40000", "Data.Eval.max_chars=20000",
        "Model.teacher.vocab_size=520", "Model.teacher.hidden_size=32", "Model.teacher.task_hidden_size=32"]
        if not o.startswith("Model.vocab_size")], []))
    assert "eval_student0_loss" in distill and "eval_student1_loss" in distill
    context = tmp_path / "context.txt"
    context.write_text("The while statement is used for repeated execution as long as an expression is true.")
    text = tool("infer", "--ckpt", str(pre), "--prompt", "The for statement", "--max-new-tokens", "5",
                "--context", str(context), "--topic", "asyncio", "--keywords", "loop,future", "--length", "20",
                "--genre", "prose", "--rerank", "3", "--temperature", "1.0", "--seed", "1", "--kcache-top-n", "0.5")
    assert len(text["outputs"][0]["candidates"]) == 3
    scores = [c["credibility"] for c in text["outputs"][0]["candidates"]]
    assert scores == sorted(scores, reverse=True)
