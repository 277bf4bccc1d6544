"""Exported inference models (ppzoo.inference.export / predictor) against the eager model they came from:
logits, presents and greedy generation, the files and their damage checks, and the command line chain
tools/train.py -> tools/export.py -> tools/infer.py --model."""
import json
import shutil

import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401  (first: CPU threading defaults before paddle loads)
from ppzoo.config import config_from_dict
from ppzoo.data.corpus import builtin_texts
from ppzoo.data.tokenizer import train_byte_level_bpe
from ppzoo.errors import CheckpointError, PpzooError
from ppzoo.inference import DenseKVCache, Generator, SamplingConfig
from ppzoo.inference.export import METADATA_FILE, cache_names, export_language_model, input_names, output_names
from ppzoo.inference.predictor import (
    ExportedKVCache,
    ExportedLanguageModel,
    Predictor,
    causal_mask,
    load_exported,
)
from ppzoo.registry import MODULES

from conftest import TINY_CONFIG, last_json_line, run_tool

SMALL_MODEL = [
    "Model.vocab_size=300", "Model.hidden_size=64", "Model.num_layers=2", "Model.num_heads=4",
    "Model.num_kv_heads=2", "Model.intermediate_size=128", "Model.max_position_embeddings=256",
    # Wide initial weights: logits far from flat, so greedy choices are not decided by float noise.
    "Model.initializer_range=0.2",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(module, cfg, tokenizer, export directory) of a small random ChuXin."""
    cfg = ppzoo.load_config(TINY_CONFIG, SMALL_MODEL)
    paddle.seed(0)
    module = MODULES.get(cfg.model_module)(cfg.Model, None)
    module.eval()
    tokenizer = train_byte_level_bpe(builtin_texts("train", 20_000), 300)
    out = tmp_path_factory.mktemp("export") / "model"
    export_language_model(module, cfg, tokenizer, out)
    return module, cfg, tokenizer, out


@pytest.fixture(scope="module")
def predictor(exported):
    return Predictor(exported[3], threads=1)


def eager_step(lm, ids, positions, mask, cache):
    with paddle.no_grad():
        logits = lm(paddle.to_tensor(ids), position_ids=paddle.to_tensor(positions),
                    attn_mask=paddle.to_tensor(mask), cache=cache)
    return logits[:, -1:, :].numpy()


def test_export_writes_the_files_and_metadata(exported):
    module, cfg, tokenizer, out = exported
    assert {"model.json", "model.pdiparams", METADATA_FILE, "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary directory left behind
    meta = json.loads((out / METADATA_FILE).read_text())
    assert [i["name"] for i in meta["inputs"]] == input_names(2) == [
        "input_ids", "position_ids", "attn_mask", "past_key_0", "past_key_1", "past_value_0", "past_value_1"]
    assert [o["name"] for o in meta["outputs"]] == output_names(2) == [
        "logits", "present_key_0", "present_key_1", "present_value_0", "present_value_1"]
    assert meta["format_version"] == 2
    assert meta["cache"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 16,
                             "layout": "per layer: [b, kv_heads, positions, head_dim]"}
    assert meta["inputs"][3]["shape"] == ["b", 2, "past", 16]
    assert config_from_dict(meta["config"]).Model == cfg.Model
    assert meta["files"]["model.pdiparams"]["bytes"] == (out / "model.pdiparams").stat().st_size


def test_prefill_and_decode_match_eager(exported, predictor):
    """Two rows, the second left-padded; a prefill, a two-token chunk and a one-token decode step through the
    exported program against the eager model with a DenseKVCache: last-position logits and the cache."""
    module, cfg, _, _ = exported
    lm = module.language_model()
    rng = np.random.default_rng(1)
    ids = rng.integers(4, 300, size=(2, 9)).astype(np.int64)
    valid = np.ones((2, 9), dtype=bool)
    valid[1, :4] = False  # row 1: 4 padding positions
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    mask = Generator._attention_mask(valid, 9).numpy()
    c = cfg.Model
    past_names = sum(cache_names("past", c.num_layers), [])
    present_names = sum(cache_names("present", c.num_layers), [])
    empty = np.zeros((2, c.num_kv_heads, 0, c.head_dim), dtype=np.float32)
    feeds = {"input_ids": ids, "position_ids": positions, "attn_mask": mask, **{name: empty for name in past_names}}
    cache = DenseKVCache()
    for step in range(3):
        out = predictor.run_numpy(feeds)
        want = eager_step(lm, feeds["input_ids"], feeds["position_ids"], feeds["attn_mask"], cache)
        assert out["logits"].shape == (2, 1, c.vocab_size)
        np.testing.assert_allclose(out["logits"], want, rtol=1e-4, atol=1e-4)
        for kind, stored in (("key", cache.keys), ("value", cache.values)):
            for i in range(c.num_layers):  # per layer, head-major: the eager cache's [b, s, h, d] transposed
                got = out[f"present_{kind}_{i}"]
                assert got.shape == (2, c.num_kv_heads, stored[i].shape[1], c.head_dim)
                np.testing.assert_allclose(got, stored[i].numpy().transpose(0, 2, 1, 3), rtol=1e-4, atol=1e-5)
        # Next: two new positions after the prefill (a chunk against a non-empty past), then one (decode).
        n = 2 if step == 0 else 1
        next_ids = np.repeat(want.argmax(-1).astype(np.int64), n, axis=1)
        valid = np.concatenate([valid, np.ones((2, n), dtype=bool)], axis=1)
        feeds = {"input_ids": next_ids, "position_ids": feeds["position_ids"][:, -1:] + 1 + np.arange(n),
                 "attn_mask": Generator._attention_mask(valid, n).numpy(),
                 **{p: out[q] for p, q in zip(past_names, present_names)}}


class IdsAsText:
    """The BPE tokenizer for prompts; decode() spells out token ids, so equal texts mean equal tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.vocab_size = tokenizer.vocab_size

    def encode(self, text, add_bos=False):
        return self.tokenizer.encode(text, add_bos)

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"{int(i)} " for i in ids)


def test_greedy_generation_is_token_identical_to_eager(exported):
    module, _, tokenizer, out = exported
    model, exported_tokenizer, metadata = load_exported(out, threads=1)
    assert exported_tokenizer.fingerprint() == tokenizer.fingerprint()
    assert model.config.max_position_embeddings == 256 and not model.training
    prompts = ["def fibonacci(n):\n    if n < 2:\n        return", "import os"]  # different lengths: left padding
    sampling = SamplingConfig(max_new_tokens=16, stop_token_ids=[])
    eager = Generator(module.language_model(), IdsAsText(tokenizer)).generate(prompts, sampling)
    fast = Generator(model, IdsAsText(tokenizer), cache_factory=ExportedKVCache).generate(prompts, sampling)
    assert [len(t.split()) for t in eager] == [16, 16]
    assert fast == eager
    # And with the real tokenizer's text, as tools/infer.py streams it.
    text = Generator(model, exported_tokenizer, cache_factory=ExportedKVCache).generate(prompts[1], sampling)
    assert text == Generator(module.language_model(), tokenizer).generate(prompts[1], sampling)


def test_repeated_and_interleaved_decoding_stay_exact(exported, predictor):
    """A predictor writes its outputs into buffers it reuses in place when they are large enough, and the
    presents fed back are such outputs. Decoding the same rows again (buffers now large: this failed with
    a single predictor) and two caches decoding in turn must still match the eager model."""
    module, _, _, _ = exported
    lm = module.language_model()
    model = ExportedLanguageModel(predictor)
    ids = np.random.default_rng(3).integers(4, 300, size=(2, 21)).astype(np.int64)
    spans = [(0, 9)] + [(i, i + 1) for i in range(9, 21)]  # a prefill, then single positions

    def decode(call, cache):
        for start, stop in spans:
            logits = call(ids[:, start:stop], cache)
            cache.advance(stop - start)
            yield logits

    with paddle.no_grad():
        want = [l[:, -1:].numpy() for l in decode(lambda x, c: lm(paddle.to_tensor(x), cache=c), DenseKVCache())]
    for _ in range(3):
        got = [l.numpy() for l in decode(lambda x, c: model(x, cache=c), ExportedKVCache())]
        np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-4, atol=1e-4)
    first = decode(lambda x, c: model(x, cache=c), ExportedKVCache())
    second = decode(lambda x, c: model(x, cache=c), ExportedKVCache())
    for a, b, w in zip(first, second, want):
        np.testing.assert_allclose(a.numpy(), w, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(b.numpy(), w, rtol=1e-4, atol=1e-4)


def test_cache_reorder_and_defaults(exported, predictor):
    """ExportedKVCache.reorder keeps the chosen rows; without positions or mask the model counts positions
    from the cache and masks causally, like the eager model."""
    module, _, _, _ = exported
    lm = module.language_model()
    model = ExportedLanguageModel(predictor)
    ids = np.random.default_rng(2).integers(4, 300, size=(2, 6)).astype(np.int64)
    cache = ExportedKVCache()
    model(ids, cache=cache)
    cache.advance(6)
    cache.reorder([1])
    got = model(ids[1:, :1], cache=cache).numpy()
    eager_cache = DenseKVCache()
    with paddle.no_grad():
        lm(paddle.to_tensor(ids[1:]), cache=eager_cache)
        eager_cache.advance(6)
        want = lm(paddle.to_tensor(ids[1:, :1]), cache=eager_cache)[:, -1:].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert causal_mask(1, 2, 1).tolist() == [[[[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]]]]
    with pytest.raises(TypeError, match="cache_factory=ExportedKVCache"):
        model(ids, cache=DenseKVCache())
    with pytest.raises(ValueError, match="logits_to_keep=1"):
        model(ids, logits_to_keep=0)


@pytest.mark.parametrize("damage", ["missing_params", "truncated_params", "corrupt_metadata", "missing_tokenizer"])
def test_damaged_export_is_a_checkpoint_error_naming_the_file(exported, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(exported[3], copy)
    if damage == "missing_params":
        (copy / "model.pdiparams").unlink()
        name = "model.pdiparams"
    elif damage == "truncated_params":
        data = (copy / "model.pdiparams").read_bytes()
        (copy / "model.pdiparams").write_bytes(data[: len(data) // 2])
        name = "model.pdiparams"
    elif damage == "corrupt_metadata":
        (copy / METADATA_FILE).write_text("{not json")
        name = METADATA_FILE
    else:
        (copy / "tokenizer.json").unlink()
        name = "tokenizer.json"
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_exported(copy)


def test_export_does_not_replace_an_unrelated_directory(exported, tmp_path):
    module, cfg, tokenizer, _ = exported
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(PpzooError, match="not an exported ppzoo model"):
        export_language_model(module, cfg, tokenizer, tmp_path, check=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def assert_clean_user_error(result, *fragments):
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert str(fragment) in result.stderr, result.stderr


def test_command_line_train_export_infer(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    result = run_tool("train_tokenizer", ["--out", tokenizer, "--vocab-size", 512, "--max-chars", 200_000])
    assert result.returncode == 0, result.stderr
    overrides = [
        f"Data.tokenizer={tokenizer}", f"Engine.output_dir={tmp_path / 'run'}", "Model.hidden_size=64",
        "Model.num_layers=2", "Model.intermediate_size=176", "Model.vocab_size=512", "Data.seq_len=64",
        "Data.Train.max_chars=100000", "Data.Eval.max_chars=30000", "Engine.max_steps=2", "Engine.eval_iters=1",
        "Engine.progress_bar=false",
    ]
    result = run_tool("train", ["-c", TINY_CONFIG, *sum((["-o", o] for o in overrides), [])])
    assert result.returncode == 0, result.stderr
    checkpoint = tmp_path / "run" / "step_00000002"

    # -c whose Model section differs from the checkpoint's: refused, naming the key.
    result = run_tool("export", ["-c", TINY_CONFIG, "--ckpt", checkpoint, "--out", tmp_path / "x"])
    assert_clean_user_error(result, "does not match the checkpoint", "Model.hidden_size")
    assert not (tmp_path / "x").exists()

    out = tmp_path / "exported"
    model_overrides = [o for o in overrides if o.startswith("Model.")]
    result = run_tool("export", ["-c", TINY_CONFIG, *sum((["-o", o] for o in model_overrides), []),
                                 "--ckpt", checkpoint, "--out", out])
    assert result.returncode == 0, result.stderr
    summary = last_json_line(result.stdout)
    assert summary["files"]["model.pdiparams"] == (out / "model.pdiparams").stat().st_size > 0
    assert "Traceback" not in result.stderr

    result = run_tool("infer", ["--model", out, "--prompt", "def f(x):", "--max-new-tokens", 8])
    assert result.returncode == 0, result.stderr
    outputs = last_json_line(result.stdout)["outputs"]
    assert outputs[0]["prompt"] == "def f(x):" and isinstance(outputs[0]["completion"], str)

    (out / "model.json").write_text((out / "model.json").read_text()[:1000])  # truncated program
    result = run_tool("infer", ["--model", out, "--prompt", "x"])
    assert_clean_user_error(result, "model.json")
    shutil.rmtree(out)
    result = run_tool("infer", ["--model", out, "--prompt", "x"])
    assert_clean_user_error(result, str(out))
