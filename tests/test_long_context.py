"""Long-context pieces: chunked prefill, Engine.init_from, RoPE position interpolation, length upsampling."""
import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401
from generation_helpers import CharTokenizer, small_chuxin
from ppzoo.config import load_config
from ppzoo.core.engine import Engine
from ppzoo.data.datasets import LengthUpsampled, LengthUpsampledConfig
from ppzoo.data.tokenizer import Tokenizer
from ppzoo.errors import CheckpointError
from ppzoo.inference import Generator, SamplingConfig
from ppzoo.inference import cache as cache_module
from ppzoo.models.chuxin.model import ChuXinConfig, ChuXinForCausalLM
from ppzoo.nn.rope import rope_cos_sin


@pytest.fixture(scope="module")
def model():
    return small_chuxin(max_position_embeddings=256)


PROMPTS = ["def chunked_prefill(model, prompt, chunk):\n    return model(prompt)", "short one", "x = 1"]


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_matches_one_forward_with_left_padding(model, chunk):
    tok = CharTokenizer()
    full = Generator(model, tok).prompt_logits(PROMPTS)
    chunked = Generator(model, tok, prefill_chunk=chunk).prompt_logits(PROMPTS)
    np.testing.assert_allclose(chunked, full, atol=1e-4, rtol=0)
    # Each row alone (no padding) gives the same logits as in the left-padded batch.
    alone = np.concatenate([Generator(model, tok, prefill_chunk=chunk).prompt_logits([p]) for p in PROMPTS])
    np.testing.assert_allclose(alone, full, atol=1e-4, rtol=0)
    sampling = SamplingConfig(max_new_tokens=10, stop_token_ids=[])
    assert Generator(model, tok, prefill_chunk=chunk).generate(PROMPTS, sampling) == \
        Generator(model, tok).generate(PROMPTS, sampling)


def test_chunked_prefill_never_attends_over_the_whole_prompt(model, monkeypatch):
    shapes = []
    original = cache_module.attention  # with a cache, the model attends through cache.attend()

    def recording(q, k, v, additive_mask=None, causal=True, scale=None):
        shapes.append((q.shape[1], k.shape[1], tuple(additive_mask.shape)))
        return original(q, k, v, additive_mask, causal, scale)

    monkeypatch.setattr(cache_module, "attention", recording)
    tok = CharTokenizer()
    width = len(PROMPTS[0]) + 1  # bos; the other rows are left-padded to it
    Generator(model, tok, prefill_chunk=16).prompt_logits(PROMPTS)
    per_layer = shapes[:: model.config.num_layers]
    assert [q for q, _, _ in per_layer] == [16] * (width // 16) + ([width % 16] if width % 16 else [])
    past = 0
    for q, k, mask in per_layer:
        assert k == past + q and mask[-2:] == (q, past + q)  # scores are [chunk, past + chunk]
        past += q


def test_prefill_chunk_must_be_positive(model):
    with pytest.raises(ppzoo.PpzooError, match="prefill_chunk"):
        Generator(model, CharTokenizer(), prefill_chunk=0)


def test_position_interpolation_half_scale_at_twice_the_position_is_the_identity():
    p = paddle.arange(0, 300, dtype="int64").unsqueeze(0)
    cos_a, sin_a = rope_cos_sin(2 * p, 32, theta=10000.0, position_scale=0.5)
    cos_b, sin_b = rope_cos_sin(p, 32, theta=10000.0, position_scale=1.0)
    np.testing.assert_allclose(cos_a.numpy(), cos_b.numpy(), atol=1e-5)
    np.testing.assert_allclose(sin_a.numpy(), sin_b.numpy(), atol=1e-5)
    # And through the whole model: the same weights, scale 0.5 at positions 2p == scale 1 at positions p.
    config = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, initializer_range=0.2)
    paddle.seed(1)
    plain = ChuXinForCausalLM(ChuXinConfig(**config))
    scaled = ChuXinForCausalLM(ChuXinConfig(rope_position_scale=0.5, **config))
    scaled.set_state_dict(plain.state_dict())
    ids = paddle.to_tensor(np.random.default_rng(0).integers(0, 64, size=(2, 24)), dtype="int64")
    positions = paddle.arange(0, 24, dtype="int64").unsqueeze(0).expand([2, 24])
    np.testing.assert_allclose(scaled(ids, position_ids=2 * positions).numpy(),
                               plain(ids, position_ids=positions).numpy(), atol=1e-4)


# ----------------------------------------------------------------------------------------------- init_from


def _params(module):
    return {name: p.numpy().copy() for name, p in module.state_dict().items()}


def test_init_from_loads_the_weights_and_trains_a_new_run(tmp_path, write_config):
    source = Engine(load_config(write_config(tmp_path / "a", Data={"Train": None})))
    checkpoint = source.save_checkpoint()
    expected = _params(source.module)
    # Continual pretraining: a longer seq_len and another RoPE base, in a new output directory. lr 0 keeps
    # the weights as loaded, so the trained run's weights show that fit() initialized from the checkpoint.
    config = write_config(tmp_path / "b", Data={"seq_len": 96}, Global={"seed": 99},  # another initialization
                          Model={"rope_theta": 40000.0, "max_position_embeddings": 256},
                          Engine={"init_from": str(tmp_path / "a" / "out"), "max_steps": 1},
                          Optimizer={"weight_decay": 0.0, "lr": {"max_lr": 0.0, "min_lr": 0.0, "warmup_steps": 0}})
    engine = Engine(load_config(config))
    assert any(not np.array_equal(v, expected[k]) for k, v in _params(engine.module).items())
    summary = engine.fit()
    assert summary["step"] == 1  # a fresh run: step, optimizer and schedule start at 0
    for name, value in _params(engine.module).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert checkpoint.endswith("step_00000000")


def test_init_from_with_another_shape_names_the_tensor(tmp_path, write_config):
    Engine(load_config(write_config(tmp_path / "a", Data={"Train": None}))).save_checkpoint()
    config = write_config(tmp_path / "b", Model={"intermediate_size": 96},
                          Engine={"init_from": str(tmp_path / "a" / "out" / "step_00000000")})
    engine = Engine(load_config(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \[64, 176\] in the checkpoint"):
        engine.fit()


def test_init_from_a_damaged_checkpoint_is_refused(tmp_path, write_config):
    path = Engine(load_config(write_config(tmp_path / "a", Data={"Train": None}))).save_checkpoint()
    with open(f"{path}/model.mp0.pdparams", "ab") as f:
        f.write(b"x")
    engine = Engine(load_config(write_config(tmp_path / "b", Engine={"init_from": path})))
    with pytest.raises(CheckpointError, match="checksum"):
        engine.fit()


# ---------------------------------------------------------------------------------------- LengthUpsampled


def test_length_upsampled_repeats_long_documents(tmp_path, tokenizer_file):
    tokenizer = Tokenizer.from_file(tokenizer_file)
    texts = [("word " * n).strip() for n in (5, 300, 12, 500, 40, 260)]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text)
    lengths = [len(tokenizer.encode(t)) for t in texts]
    args = LengthUpsampledConfig(source="files", paths=[str(f) for f in files], min_doc_tokens=200,
                                 upsample_factor=3, seed=7)
    dataset = LengthUpsampled.build(args, tokenizer, seq_len=64)
    counts = np.bincount(dataset.doc_order, minlength=len(texts))
    assert counts.tolist() == [3 if n >= 200 else 1 for n in lengths]
    assert sorted(dataset.long_documents.tolist()) == [i for i, n in enumerate(lengths) if n >= 200]
    assert dataset.num_tokens == sum(c * (n + 1) for c, n in zip(counts, lengths))  # each doc + eos
    # Deterministic, and the seed shuffles.
    assert LengthUpsampled.build(args, tokenizer, 64).doc_order.tolist() == dataset.doc_order.tolist()
    args.upsample_factor = 1
    assert np.bincount(LengthUpsampled.build(args, tokenizer, 64).doc_order).tolist() == [1] * len(texts)


def test_length_upsampled_builtin_corpus(tokenizer_file):
    tokenizer = Tokenizer.from_file(tokenizer_file)
    args = LengthUpsampledConfig(split="validation", max_chars=60_000, min_doc_tokens=1000, upsample_factor=2)
    dataset = LengthUpsampled.build(args, tokenizer, seq_len=128)
    counts = np.bincount(dataset.doc_order, minlength=dataset.num_documents)
    assert set(counts[dataset.long_documents].tolist()) <= {2} and len(dataset.long_documents) > 0
    assert counts.sum() == dataset.num_documents + len(dataset.long_documents)
    sample = dataset[0]
    assert sample["input_ids"].shape == (128,) and sample["doc_ids"].shape == (128,)
