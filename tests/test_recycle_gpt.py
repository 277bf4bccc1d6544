"""RecycleGPT: the recyclable module's training path against step-by-step decoding, joint and frozen-base
training through the Engine, and the two decoding strategies against references computed without any cache:
verified decoding must reproduce base greedy exactly, alternating decoding the plain alternation of full
model and module."""
import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401
from generation_helpers import CharTokenizer
from ppzoo import Engine, load_config
from ppzoo.errors import CheckpointError, PpzooError
from ppzoo.inference import DenseKVCache, Generator, PreallocatedKVCache, SamplingConfig
from ppzoo.inference.recycle import RecycleGenerator, make_generator
from ppzoo.models.chuxin.module import ChuXinModule
from ppzoo.models.recycle_gpt.model import RecycleGPT, RecycleGPTConfig, recycled_states
from ppzoo.models.recycle_gpt.module import RecycleGPTModule, soft_cross_entropy

from conftest import last_json_line, run_tool

PROMPTS = ["def f(x):", "hello world", "a", "import numpy as np", "  return x + 1", "class Cache(object):",
           "for i in range(10):", "# comment", "x = [1, 2, 3]", "while True:", "print('hi')", "if a == b:",
           "z", "lambda y: y * 2", "try:", "with open(p) as f:"]


def small_recycle_gpt(seed=0, **fields):
    """A seeded RecycleGPT over CharTokenizer's vocabulary (grouped KV heads, weights large enough that greedy
    choices are not ties), in eval mode."""
    paddle.seed(seed)
    config = RecycleGPTConfig(vocab_size=CharTokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, intermediate_size=128, max_position_embeddings=256,
                              initializer_range=0.2, **fields)
    module = RecycleGPTModule(config)
    module.eval()
    return module


@pytest.fixture(scope="module")
def module():
    return small_recycle_gpt()


def greedy(sampling_tokens=24):
    return SamplingConfig(max_new_tokens=sampling_tokens, stop_token_ids=[])


# ------------------------------------------------------------------------------------------------- model


def test_training_logits_equal_step_by_step_decoding(module):
    """Position t of the module's training forward (every position at once, recycled states shifted in) equals
    decoding it alone: h_{t-1} from the full model, token t embedded, the module's own cache."""
    rng = np.random.default_rng(0)
    ids = paddle.to_tensor(rng.integers(3, 259, (2, 12)), dtype="int64")
    with paddle.no_grad():
        _, training_logits = module._logits({"input_ids": ids})
        model = module.recyclable_model()
        hidden = model.base.hidden_states(ids)
        cache = DenseKVCache()
        for t in range(12):
            recycled = hidden[:, t - 1:t] if t > 0 else paddle.zeros_like(hidden[:, :1])
            step = model.recycle_step(recycled, ids[:, t:t + 1], None, None, cache)
            cache.advance(1)
            np.testing.assert_allclose(step.numpy(), training_logits[:, t].numpy(), rtol=1e-4, atol=1e-4)


def test_recycled_state_does_not_cross_a_document_boundary(module):
    """In a packed row the second document's module logits equal those of that document alone."""
    first, second = [5, 9, 14, 2], [7, 8, 30, 41, 12]
    packed = paddle.to_tensor([first + second], dtype="int64")
    doc_ids = paddle.to_tensor([[0] * len(first) + [1] * len(second)], dtype="int64")
    with paddle.no_grad():
        _, packed_logits = module._logits({"input_ids": packed, "doc_ids": doc_ids})
        _, alone_logits = module._logits({"input_ids": paddle.to_tensor([second], dtype="int64")})
    # RoPE depends on relative positions only, so the shifted positions do not matter.
    np.testing.assert_allclose(packed_logits[0, len(first):].numpy(), alone_logits[0].numpy(), rtol=1e-4, atol=1e-4)


def test_recycled_states_shift_and_zero():
    hidden = paddle.arange(12, dtype="float32").reshape([1, 4, 3])
    keep = paddle.to_tensor([[False, True, False, True]])
    out = recycled_states(hidden, keep).numpy()[0]
    np.testing.assert_array_equal(out, [[0, 0, 0], [0, 1, 2], [0, 0, 0], [6, 7, 8]])


def test_losses_are_the_lm_loss_plus_lambda_times_the_recycle_loss(module):
    """L_lm is ChuXin's own loss on the same weights; the total is L_lm + lambda * L_recycle."""
    rng = np.random.default_rng(1)
    batch = {"input_ids": paddle.to_tensor(rng.integers(3, 259, (2, 10)), dtype="int64"),
             "labels": paddle.to_tensor(rng.integers(3, 259, (2, 10)), dtype="int64")}
    chuxin = ChuXinModule(module.config)
    chuxin.model.set_state_dict(module.model.state_dict())
    with paddle.no_grad():
        losses = module.training_step(batch)
        np.testing.assert_allclose(float(losses["lm_loss"]), float(chuxin.training_step(batch)["loss"]), rtol=1e-5)
        weighted = small_recycle_gpt(recycle_loss_weight=0.25)
        weighted.set_state_dict(module.state_dict())
        w = weighted.training_step(batch)
    np.testing.assert_allclose(float(w["loss"]), float(losses["lm_loss"]) + 0.25 * float(losses["recycle_loss"]),
                               rtol=1e-5)


def test_soft_cross_entropy_against_numpy():
    rng = np.random.default_rng(2)
    logits, target = rng.normal(size=(2, 3, 7)).astype("float32"), rng.normal(size=(2, 3, 7)).astype("float32")
    labels = np.array([[1, -100, 2], [3, 4, 5]])
    log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(target) / np.exp(target).sum(-1, keepdims=True)
    expected = -(p * log_q).sum(-1) * (labels != -100)
    got = soft_cross_entropy(paddle.to_tensor(logits), paddle.to_tensor(target), paddle.to_tensor(labels))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="recycle_layers must be at least 1"):
        RecycleGPTConfig(recycle_layers=0)
    with pytest.raises(ValueError, match="recycle_target must be 'labels' or 'base'"):
        RecycleGPTConfig(recycle_target="teacher")


# ---------------------------------------------------------------------------------------------- decoding


class OracleDrafts(RecycleGPT):
    """The real module's forward (so its cache fills as usual), but the draft it returns is, by a seeded coin
    with P(right) = `p_right`, the base's true greedy token or a wrong one: verified decoding then meets every
    mix of accepted and rejected drafts within a batch."""

    def __init__(self, module, truth, prompt_lengths, p_right, seed=0):
        super().__init__(module.model, module.recycler)
        self.truth, self.prompt_lengths = truth, prompt_lengths
        self.p_right, self.rng = p_right, np.random.default_rng(seed)

    def recycle_step(self, recycled, input_ids, position_ids, attn_mask, cache):
        logits = super().recycle_step(recycled, input_ids, position_ids, attn_mask, cache)
        drafts = []
        for row, position in enumerate(position_ids.numpy()[:, -1]):
            index = position + 1 - self.prompt_lengths[row]  # the drafted token's index in the continuation
            true = self.truth[row][index] if index < len(self.truth[row]) else 3
            drafts.append(true if self.rng.random() < self.p_right else 3 + (true - 2) % 256)
        return paddle.nn.functional.one_hot(paddle.to_tensor(drafts), logits.shape[-1]) * 100.0


def ids_of(text):
    return [ord(c) + 3 for c in text]


@pytest.mark.parametrize("cache_factory", [DenseKVCache, PreallocatedKVCache])
def test_verified_equals_base_greedy_on_many_prompts(module, cache_factory):
    tok = CharTokenizer()
    base = Generator(module.language_model(), tok, cache_factory=cache_factory)
    expected = base.generate(PROMPTS, greedy())
    # The module as it is (random weights: almost every draft rejected), batched and alone.
    verified = RecycleGenerator(module.recyclable_model(), tok, "verified", cache_factory=cache_factory)
    assert verified.generate(PROMPTS, greedy()) == expected
    assert [verified.generate(p, greedy()) for p in PROMPTS[:4]] == expected[:4]
    # Drafts right with probability 0.2, 0.6 and 1.0: accepted and rejected rows side by side in a batch.
    truth = [ids_of(text) for text in expected]
    lengths = [len(tok.encode(p, add_bos=True)) for p in PROMPTS]
    for p_right in (0.2, 0.6, 1.0):
        oracle = RecycleGenerator(OracleDrafts(module, truth, lengths, p_right), tok, "verified", cache_factory)
        assert oracle.generate(PROMPTS, greedy()) == expected, p_right
        stats = oracle.stats
        assert stats["drafts"] > 0 and abs(stats["accepted"] / stats["drafts"] - p_right) < 0.12
        if p_right == 1.0:  # the prefill gives 1 token, then every full-model forward 2
            assert stats["base_forwards"] == 1 + 12


def reference_alternating(module, prompt_ids, steps):
    """Alternating decoding recomputed from scratch each step, no cache: the full model over the whole
    sequence gives one token, the module over the whole sequence (training path) the next."""
    ids = list(prompt_ids)
    with paddle.no_grad():
        for step in range(steps):
            batch = {"input_ids": paddle.to_tensor([ids], dtype="int64")}
            lm_logits, recycle_logits = module._logits(batch)
            logits = lm_logits if step % 2 == 0 else recycle_logits
            ids.append(int(np.argmax(logits.numpy()[0, -1])))
    return ids[len(prompt_ids):]


def test_alternating_equals_a_recomputed_reference(module):
    tok = CharTokenizer()
    alternating = make_generator(module, tok, "alternating", cache_factory=PreallocatedKVCache)
    outputs = alternating.generate(PROMPTS[:6], greedy(13))
    for prompt, text in zip(PROMPTS[:6], outputs):
        assert text == tok.decode(reference_alternating(module, tok.encode(prompt, add_bos=True), 13)), prompt
    # The prefill and the module give 2 tokens, then every full-model forward and module forward 2 more.
    assert alternating.stats["base_forwards"] == 1 + 6
    assert alternating.generate(PROMPTS[2], greedy(13)) == outputs[2]  # a row does not depend on its batch


def test_stop_tokens_and_strings_end_recycled_decoding(module):
    tok = CharTokenizer()
    full = make_generator(module, tok, "verified").generate("abc", greedy(12))
    stop = full[3:5]
    for strategy in ("verified", "alternating"):
        generator = make_generator(module, tok, strategy)
        text = generator.generate("abc", SamplingConfig(max_new_tokens=12, stop_token_ids=[], stop_strings=[stop]))
        assert stop not in text
    assert make_generator(module, tok, "verified").generate(
        "abc", SamplingConfig(max_new_tokens=12, stop_strings=[stop])) == full[:3]


def test_strategy_errors(module):
    tok = CharTokenizer()
    with pytest.raises(PpzooError, match="needs temperature 0"):
        make_generator(module, tok, "verified").generate("a", SamplingConfig(temperature=0.8))
    with pytest.raises(PpzooError, match="ChuXinModule has none"):
        make_generator(ChuXinModule(module.config), tok, "alternating")
    with pytest.raises(PpzooError, match="unknown decoding strategy 'fast'"):
        make_generator(module, tok, "fast")
    sampled = make_generator(module, tok, "alternating")  # sampling: reproducible with a seed
    s = dict(max_new_tokens=10, temperature=1.0, top_k=20, stop_token_ids=[])
    assert sampled.generate("x", SamplingConfig(seed=3, **s)) == sampled.generate("x", SamplingConfig(seed=3, **s))


# ----------------------------------------------------------------------------------- engine and the tools


def _params(layer):
    return {name: p.numpy().copy() for name, p in layer.state_dict().items()}


RECYCLE_MODEL = {"module": "RecycleGPT", "recycle_layers": 1, "recycle_loss_weight": 1.0}


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory, write_config):
    """A ChuXin checkpoint (8 steps), then the recyclable module trained over it with the base frozen."""
    root = tmp_path_factory.mktemp("recycle")
    chuxin = Engine(load_config(write_config(root / "chuxin", Engine={"max_steps": 8})))
    chuxin_summary = chuxin.fit()
    config = write_config(root / "recycle", Model={**RECYCLE_MODEL, "freeze_base": True, "recycle_target": "base"},
                          Engine={"max_steps": 12, "init_from": chuxin_summary["checkpoint"]},
                          Optimizer={"lr": {"max_lr": 3e-3, "warmup_steps": 2, "decay_steps": 12}})
    engine = Engine(load_config(config))
    fresh_recycler = _params(engine.module.recycler)
    summary = engine.fit()
    return {"chuxin": _params(chuxin.module), "engine": engine, "fresh_recycler": fresh_recycler,
            "summary": summary, "chuxin_checkpoint": chuxin_summary["checkpoint"]}


def test_frozen_base_keeps_the_chuxin_weights_and_trains_the_module(frozen_run):
    module = frozen_run["engine"].module
    for name, value in _params(module.model).items():
        np.testing.assert_array_equal(value, frozen_run["chuxin"]["model." + name], err_msg=name)
    trained = _params(module.recycler)
    assert all(not np.array_equal(v, frozen_run["fresh_recycler"][k]) for k, v in trained.items())
    summary = frozen_run["summary"]
    # The base is the ChuXin checkpoint's, so its eval loss is ChuXin's (eval_loss is the base's LM loss).
    assert 0.0 <= summary["eval_recycle_agreement"] <= 1.0 and summary["eval_recycle_loss"] > 0
    records = [r for r in frozen_run["engine"].module.parameters() if not r.stop_gradient]
    assert len(records) == len(trained)


def test_joint_training_from_scratch_updates_base_and_module(tmp_path, write_config):
    engine = Engine(load_config(write_config(tmp_path, Model=RECYCLE_MODEL, Engine={"max_steps": 2})))
    before = _params(engine.module)
    engine.fit()
    after = _params(engine.module)
    for name in ("model.model.layers.0.mlp.up_proj.weight", "model.lm_head.weight", "recycler.input_proj.weight",
                 "recycler.layers.0.self_attn.q_proj.weight"):
        assert not np.array_equal(before[name], after[name]), name


def test_init_from_requires_every_base_tensor(tmp_path, write_config, frozen_run):
    """Only the recyclable module may be missing from an init_from checkpoint: a ChuXin config cannot start
    from a RecycleGPT checkpoint (unexpected recycler tensors)."""
    config = write_config(tmp_path, Engine={"max_steps": 1, "init_from": frozen_run["summary"]["checkpoint"]})
    with pytest.raises(CheckpointError, match="unexpected .*recycler"):
        Engine(load_config(config)).fit()


def test_verified_equals_base_greedy_for_the_trained_module(frozen_run):
    """The Engine-trained module over its ChuXin base, on 24 windows of the corpus's validation split."""
    from ppzoo.data.corpus import builtin_texts

    engine = frozen_run["engine"]
    module, tokenizer = engine.module, engine.tokenizer
    module.eval()
    stream = tokenizer.encode("\n".join(builtin_texts("validation", 40_000)))
    prompts = [stream[start:start + 24] for start in range(0, 24 * 200, 200)]
    expected = make_generator(module, tokenizer, "base").generate(prompts, greedy(20))
    verified = make_generator(module, tokenizer, "verified", cache_factory=PreallocatedKVCache)
    assert verified.generate(prompts, greedy(20)) == expected
    assert verified.stats["accepted"] > 0  # the trained module's drafts are accepted at times


def test_infer_tool_strategies(frozen_run):
    checkpoint = frozen_run["summary"]["checkpoint"]
    args = ["--ckpt", checkpoint, "--prompt", "def main(", "--max-new-tokens", "16"]
    outputs = {}
    for strategy in ("base", "verified", "alternating"):
        result = run_tool("infer", args + ["--strategy", strategy])
        assert result.returncode == 0, result.stderr
        outputs[strategy] = last_json_line(result.stdout)["outputs"][0]["completion"]
    assert outputs["verified"] == outputs["base"]
    assert outputs["alternating"]
    refused = run_tool("infer", ["--ckpt", frozen_run["chuxin_checkpoint"], "--prompt", "x", "--strategy", "verified"])
    assert refused.returncode == 2 and "recyclable module" in refused.stderr
