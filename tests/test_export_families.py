"""Exported programs of RecycleGPT, MoE-GPT, ERNIE Titan's generator and ERNIE-ViLG
(ppzoo.inference.export_families) against the eager models they came from, loaded through
ppzoo.inference.load_exported (paddle.inference); and RecycleGPT through the tools, trained two steps:
tools/train.py -> tools/export.py -> tools/infer.py --model --strategy verified, against --ckpt."""
import json

import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401  (first: CPU threading defaults before paddle loads)
from ppzoo.data.corpus import builtin_texts
from ppzoo.data.tokenizer import train_byte_level_bpe
from ppzoo.errors import CheckpointError
from ppzoo.inference import DenseKVCache, Generator, SamplingConfig
from ppzoo.inference.export import METADATA_FILE
from ppzoo.inference.export_families import (
    ExportedMoEGPT, ExportedRecycleGPT, ExportedTitanLM, ExportedViLG, export_family,
)
from ppzoo.inference.predictor import ExportedKVCache, causal_mask, load_exported
from ppzoo.inference.recycle import RecycleGenerator, make_generator
from ppzoo.registry import MODULES

from conftest import REPO_ROOT, last_json_line, run_tool

CONFIGS = REPO_ROOT / "configs"
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0)
PROMPTS = ["def fibonacci(n):", "import os"]  # two lengths: the batch is left-padded


def build(config, overrides):
    cfg = ppzoo.load_config(config, overrides)
    paddle.seed(0)
    module = MODULES.get(cfg.model_module)(cfg.Model, None)
    module.eval()
    return module, cfg


def assert_close(got, want, atol=1e-4):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol * max(1.0, float(np.abs(want).max())))


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe(builtin_texts("train", 20_000), 300)


# ------------------------------------------------------------------------------------------------ RecycleGPT
@pytest.fixture(scope="module")
def recycle(tokenizer, tmp_path_factory):
    # Wide initial weights: logits far from flat, so greedy choices are not decided by float noise.
    module, cfg = build(CONFIGS / "recycle_gpt" / "tiny.yaml", [
        "Model.vocab_size=300", "Model.hidden_size=64", "Model.num_layers=2", "Model.num_heads=4",
        "Model.num_kv_heads=2", "Model.intermediate_size=128", "Model.max_position_embeddings=256",
        "Model.initializer_range=0.2"])
    out = tmp_path_factory.mktemp("recycle") / "model"
    export_family(module, cfg, tokenizer, out, check=False)  # the tests below compare
    model, loaded_tokenizer, metadata = load_exported(out, threads=1)
    return module, model, loaded_tokenizer, metadata, out


def test_recycle_programs_match_eager_over_prefill_and_decode(recycle):
    module, model, _, metadata, _ = recycle
    assert isinstance(model, ExportedRecycleGPT) and metadata["kind"] == "recycle_gpt"
    eager = module.recyclable_model()
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 7))
    eager_base, eager_module = DenseKVCache(), DenseKVCache()
    base, recycler = ExportedKVCache(), ExportedKVCache()
    t = paddle.to_tensor
    for start, stop in ((0, 5), (5, 7)):  # prefill, then a two-token step as the decoder runs it
        step, pos, mask = ids[:, start:stop], np.arange(start, stop)[None].repeat(2, 0), causal_mask(2, stop - start, start)
        want_hidden = eager.base_step(t(step), t(pos), t(mask), eager_base)
        got_hidden = model.base_step(step, pos, mask, base)
        eager_base.advance(stop - start)
        assert_close(got_hidden.numpy(), want_hidden.numpy())
        # The head on one position of a batch (a strided slice of the hidden states).
        assert_close(model.logits(want_hidden[:, -1]).numpy(), eager.logits(want_hidden[:, -1]).numpy())
        recycled = paddle.concat([paddle.zeros_like(want_hidden[:, :1]), want_hidden[:, :-1]], axis=1)
        want = eager.recycle_step(recycled, t(step), t(pos), t(mask), eager_module)
        got = model.recycle_step(recycled, step, pos, mask, recycler)
        eager_module.advance(stop - start)
        assert_close(got.numpy(), want.numpy())
    assert base.keys[0].shape[2] == 7 and recycler.keys[0].shape[2] == 7


@pytest.mark.parametrize("strategy", ["base", "alternating", "verified"])
def test_recycle_exported_decoding_matches_eager_greedy_text(recycle, tokenizer, strategy):
    module, model, loaded_tokenizer, _, _ = recycle
    want = make_generator(module, tokenizer, strategy).generate(PROMPTS, GREEDY)
    if strategy == "base":
        generator = Generator(model.lm, loaded_tokenizer, cache_factory=ExportedKVCache)
    else:
        generator = RecycleGenerator(model, loaded_tokenizer, strategy, cache_factory=ExportedKVCache)
    assert generator.generate(PROMPTS, GREEDY) == want
    assert all(want)


# ------------------------------------------------------------------------------------------------ MoE-GPT
MOE = ["Model.vocab_size=300", "Model.hidden_size=64", "Model.num_layers=2", "Model.intermediate_size=96",
       "Model.expert_intermediate_size=48", "Model.initializer_range=0.2"]


@pytest.mark.parametrize("gate", ["gshard", "switch"])
def test_moe_exported_logits_match_eager_with_capacity_dropping_tokens(gate, tmp_path):
    # eval_capacity_factor 0.5: experts overflow and drop choices, so the traced capacity formula is exercised.
    module, cfg = build(CONFIGS / "moe_gpt" / "tiny.yaml", MOE + [f"Model.gate={gate}", "Model.eval_capacity_factor=0.5"])
    export_family(module, cfg, None, tmp_path / "moe", check=False)
    model, _, metadata = load_exported(tmp_path / "moe", threads=1)
    assert isinstance(model, ExportedMoEGPT) and metadata["kind"] == "moe_gpt"
    for shape in ((1, 5), (3, 11)):  # dynamic batch and sequence: the capacity follows the token count
        ids = np.random.default_rng(sum(shape)).integers(0, 300, size=shape)
        want = module.model(paddle.to_tensor(ids))[0].numpy()
        assert_close(model(ids).numpy(), want)
    # The capacity binds: without it (a huge factor) the eager logits differ, so the match above tested it.
    for moe in module.model.moe_layers():
        moe.gate.eval_capacity_factor = 100.0
    assert not np.allclose(module.model(paddle.to_tensor(ids))[0].numpy(), want, atol=1e-3)


# ------------------------------------------------------------------------------------------------ ERNIE Titan
def test_titan_generator_exported_matches_eager(tokenizer, tmp_path):
    module, cfg = build(CONFIGS / "ernie_titan" / "tiny.yaml", [
        "Model.vocab_size=304", "Model.hidden_size=64", "Model.intermediate_size=128", "Model.task_hidden_size=64",
        "Model.task_intermediate_size=128", "Model.num_layers=1", "Model.task_num_layers=1"])
    export_family(module, cfg, tokenizer, tmp_path / "titan", check=False)
    model, loaded_tokenizer, metadata = load_exported(tmp_path / "titan", threads=1)
    assert isinstance(model, ExportedTitanLM) and metadata["cache"]["num_layers"] == 2
    lm = module.language_model()
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 7))
    eager_cache, cache = DenseKVCache(), ExportedKVCache()
    for start, stop in ((0, 5), (5, 6), (6, 7)):
        with paddle.no_grad():
            want = lm(paddle.to_tensor(ids[:, start:stop]), cache=eager_cache)[:, -1:].numpy()
        eager_cache.advance(stop - start)
        assert_close(model(ids[:, start:stop], cache=cache).numpy(), want)
        cache.advance(stop - start)
    lm.vocab_limit = model.vocab_limit = tokenizer.vocab_size
    want = Generator(lm, tokenizer).generate(PROMPTS, GREEDY)
    assert Generator(model, loaded_tokenizer, cache_factory=ExportedKVCache).generate(PROMPTS, GREEDY) == want


# ------------------------------------------------------------------------------------------------ ERNIE-ViLG
def test_vilg_exported_both_directions_and_vq_match_eager(tmp_path):
    from ppzoo.models.ernie_vilg.generation import ImageSampling, caption_greedy, sample_codes

    module, cfg = build(CONFIGS / "ernie_vilg" / "tiny_two_stage.yaml", [
        "Model.tokenizer_checkpoint=null", "Model.hidden_size=64", "Model.num_layers=2", "Model.intermediate_size=96",
        "Model.initializer_range=0.2"])
    export_family(module, cfg, None, tmp_path / "vilg", check=False)
    model, _, metadata = load_exported(tmp_path / "vilg", threads=1)
    assert isinstance(model, ExportedViLG) and metadata["kind"] == "ernie_vilg"
    words = module.text_tokenizer
    text = paddle.to_tensor([words.encode(c, cfg.Model.max_text_len) for c in ("a red circle", "two blue squares")])
    greedy = ImageSampling(top_k=1)  # top-1 sampling is deterministic: the code sequences must be equal
    codes = sample_codes(module, text, greedy)
    np.testing.assert_array_equal(model.sample_codes(text, greedy).numpy(), codes.numpy())
    with paddle.no_grad():
        assert_close(model.decode_codes(codes).numpy(), module.decode_codes(codes).numpy(), atol=1e-4)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype("float32")
    image_codes = module.image_codes(paddle.to_tensor(images))
    np.testing.assert_array_equal(model.image_codes(images).numpy(), image_codes.numpy())
    np.testing.assert_array_equal(model.caption_greedy(image_codes).numpy(), caption_greedy(module, image_codes).numpy())


# ------------------------------------------------------------------------------------------------ loading
def test_unknown_family_kind_is_a_checkpoint_error(recycle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(recycle[4], copy)
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["kind"] = "no_such_family"
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="no_such_family"):
        load_exported(copy)


# ------------------------------------------------------------------------------------------------ the tools
def test_tools_train_export_infer_recycle_gpt(write_config, tmp_path):
    config = write_config(tmp_path, Model={"module": "RecycleGPT", "recycle_layers": 1},
                          Engine={"max_steps": 2, "save_steps": 2})
    trained = run_tool("train", ["-c", config])
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = run_tool("export", ["--ckpt", tmp_path / "out", "--out", tmp_path / "exported"])
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((tmp_path / "exported" / METADATA_FILE).read_text())["kind"] == "recycle_gpt"
    common = ["--prompt", "def add(a, b):", "--max-new-tokens", "8", "--temperature", "0", "--strategy", "verified"]
    eager = run_tool("infer", ["--ckpt", tmp_path / "out", *common])
    from_program = run_tool("infer", ["--model", tmp_path / "exported", *common])
    assert eager.returncode == 0 and from_program.returncode == 0, (eager.stderr + from_program.stderr)[-2000:]
    assert last_json_line(from_program.stdout)["outputs"] == last_json_line(eager.stdout)["outputs"]


TOOL_RUNS = {  # config, overrides: two tiny training steps of each family through tools/train.py
    "moe_gpt": ("moe_gpt/tiny.yaml", ["Model.hidden_size=64", "Model.num_layers=2", "Model.vocab_size=512",
                                      "Data.seq_len=32"]),
    "ernie_titan": ("ernie_titan/tiny.yaml", ["Model.hidden_size=64", "Model.task_hidden_size=64",
                                              "Model.num_layers=1", "Model.task_num_layers=1",
                                              "Model.vocab_size=520", "Data.seq_len=32",
                                              "Data.Train.max_chars=20000", "Data.Eval.max_chars=5000"]),
    "ernie_vilg": ("ernie_vilg/tiny_two_stage.yaml", ["Model.tokenizer_checkpoint=null", "Model.hidden_size=64",
                                                      "Model.num_layers=1"]),
}


@pytest.mark.parametrize("kind", sorted(TOOL_RUNS))
def test_tools_export_each_family_from_a_trained_checkpoint(kind, tokenizer_file, tmp_path):
    """tools/train.py (2 steps) -> tools/export.py, whose self-check runs the programs against the eager model."""
    config, overrides = TOOL_RUNS[kind]
    common = ["Engine.max_steps=2", "Engine.save_steps=2", "Engine.eval_freq=0", "Global.global_batch_size=4",
              "Global.micro_batch_size=4", f"Engine.output_dir={tmp_path / 'out'}", f"Data.tokenizer={tokenizer_file}"]
    args = ["-c", CONFIGS / config]
    for override in common + overrides:
        args += ["-o", override]
    trained = run_tool("train", args)
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = run_tool("export", ["--ckpt", tmp_path / "out", "--out", tmp_path / "exported"])
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((tmp_path / "exported" / METADATA_FILE).read_text())["kind"] == kind
    model, _, _ = load_exported(tmp_path / "exported", threads=1)
    assert model.config == ppzoo.load_config(CONFIGS / config, overrides).Model
