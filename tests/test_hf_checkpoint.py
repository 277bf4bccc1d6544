"""Hugging Face checkpoint directories: loading without PyTorch, saving, conversion tools and bad input.

The reference is a tiny random transformers LlamaForCausalLM written with save_pretrained (single file,
sharded, bf16/fp16), next to a byte-level BPE tokenizer trained on a few kB of the built-in corpus.
"""
import json
import shutil

import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401  (first: CPU threading defaults before paddle loads)
from ppzoo.data.corpus import builtin_texts
from ppzoo.data.tokenizer import Tokenizer, train_byte_level_bpe
from ppzoo.errors import CheckpointError
from ppzoo.inference import Generator, SamplingConfig, load_checkpoint_for_inference
from ppzoo.models.chuxin.hf_checkpoint import INDEX_FILE, load_hf_checkpoint, save_hf_checkpoint
from ppzoo.models.chuxin.model import ChuXinConfig, ChuXinForCausalLM
from conftest import last_json_line, run_tool

torch = pytest.importorskip("torch", reason="the reference implementation needs PyTorch (requirements-dev.txt)")
transformers = pytest.importorskip("transformers", reason="needs transformers (requirements-dev.txt)")

VOCAB = 300
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_byte_level_bpe(builtin_texts("train", 4000), VOCAB)
    assert tok.vocab_size <= VOCAB
    return tok


def write_tokenizer(tok, directory):
    """tokenizer.json plus the tokenizer_config.json a Hugging Face export carries."""
    tok.save(directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}
    ))


def make_hf_model(seed=0, **config):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=160, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **config,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf


def save_hf(hf, directory, tok, **kwargs):
    hf.save_pretrained(directory, **kwargs)
    write_tokenizer(tok, directory)
    return directory


@pytest.fixture(scope="module")
def hf_model():
    return make_hf_model()


@pytest.fixture(scope="module")
def hf_dir(hf_model, tokenizer, tmp_path_factory):
    return save_hf(hf_model, tmp_path_factory.mktemp("hf_single"), tokenizer)


@pytest.fixture(scope="module")
def sharded_dir(hf_model, tokenizer, tmp_path_factory):
    directory = save_hf(hf_model, tmp_path_factory.mktemp("hf_sharded"), tokenizer, max_shard_size="200KB")
    assert len(json.loads((directory / INDEX_FILE).read_text())["weight_map"]) > 0
    assert len(list(directory.glob("model-*.safetensors"))) >= 2
    return directory


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.float().numpy()


def ours_logits(model, ids):
    with paddle.no_grad():
        return model(paddle.to_tensor(ids)).numpy()


def weights(model):
    return {name: p.numpy() for name, p in model.state_dict().items()}


IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 40))


# ---------------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_loaded_checkpoint_matches_transformers(layout, hf_model, hf_dir, sharded_dir):
    model, config, extras = load_hf_checkpoint(hf_dir if layout == "single" else sharded_dir)
    assert not model.training
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.vocab_size) == (2, 4, 2, VOCAB)
    assert (extras["bos_token_id"], extras["eos_token_id"], extras["pad_token_id"]) == (1, 2, 0)
    np.testing.assert_allclose(ours_logits(model, IDS), hf_logits(hf_model, IDS), atol=1e-4, rtol=0)


class RecordingTokenizer:
    """Forwards to a Tokenizer and remembers the ids of the last decode: the Generator decodes each row's
    whole continuation every step, so that is the generated token ids."""

    def __init__(self, inner):
        self.inner = inner
        self.last_decoded = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, ids, *args, **kwargs):
        self.last_decoded = [int(i) for i in ids]
        return self.inner.decode(ids, *args, **kwargs)


def test_greedy_generation_matches_transformers(hf_model, hf_dir):
    module, tok, cfg = load_checkpoint_for_inference(str(hf_dir))
    assert cfg.model_module == "ChuXin" and cfg.Model.num_kv_heads == 2 and tok.eos_id == 2
    recording = RecordingTokenizer(tok)
    # No stop tokens on either side, so both produce exactly 12 tokens whatever the random model prefers.
    text = Generator(module.language_model(), recording).generate(
        PROMPT, SamplingConfig(max_new_tokens=12, stop_token_ids=[]))
    prompt_ids = tok.encode(PROMPT, add_bos=True)  # the Generator adds bos when the tokenizer has one
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=12, min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt_ids):].tolist()
    assert len(expected) == 12
    assert recording.last_decoded == expected
    assert text == tok.decode(expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads(dtype, tmp_path, tokenizer):
    hf = make_hf_model(seed=1).to(getattr(torch, dtype))
    save_hf(hf, tmp_path, tokenizer)
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert header["model.norm.weight"]["dtype"] == {"bfloat16": "BF16", "float16": "F16"}[dtype]
    model, _, _ = load_hf_checkpoint(tmp_path)
    ours = weights(model)
    for name, p in hf.state_dict().items():
        expected = p.float().numpy()
        got = ours[name].T if ours[name].ndim == 2 and "embed" not in name else ours[name]
        np.testing.assert_array_equal(got, expected, err_msg=name)
    hf.float()
    np.testing.assert_allclose(ours_logits(model, IDS), hf_logits(hf, IDS), atol=1e-4, rtol=0)


def test_linear_rope_scaling_carries_over_and_round_trips(tmp_path, tokenizer):
    hf = make_hf_model(seed=2, rope_theta=5000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    save_hf(hf, tmp_path / "src", tokenizer)
    model, config, _ = load_hf_checkpoint(tmp_path / "src")
    assert (config.rope_theta, config.rope_position_scale) == (5000.0, 0.5)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(1, 96))
    expected = hf_logits(hf, ids)
    np.testing.assert_allclose(ours_logits(model, ids), expected, atol=1e-4, rtol=0)
    save_hf_checkpoint(model, config, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids), expected, atol=1e-5, rtol=0)


def test_unsupported_rope_scaling_is_refused(tmp_path, hf_dir):
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json uses RoPE scaling of type 'yarn'.*linear"):
        load_hf_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Saving


@pytest.mark.parametrize("max_shard_bytes", [None, 150_000])
def test_save_round_trip(max_shard_bytes, tmp_path, hf_model, hf_dir):
    model, config, extras = load_hf_checkpoint(hf_dir)
    tok = Tokenizer.from_file(hf_dir)
    out = save_hf_checkpoint(model, config, tmp_path / "out", tokenizer=tok, max_shard_bytes=max_shard_bytes,
                             generation_config=extras["generation_config"])
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    if max_shard_bytes is None:
        assert shards == ["model.safetensors"] and not (out / INDEX_FILE).exists()
    else:
        assert len(shards) >= 3 and (out / INDEX_FILE).is_file()
        assert all(p.stat().st_size <= max_shard_bytes + 4096 for p in out.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(reloaded, IDS), hf_logits(hf_model, IDS), atol=1e-6, rtol=0)
    again, again_config, again_extras = load_hf_checkpoint(out)
    assert again_config == config
    assert (again_extras["bos_token_id"], again_extras["eos_token_id"], again_extras["pad_token_id"]) == (1, 2, 0)
    before = weights(model)
    for name, value in weights(again).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    tok_again = Tokenizer.from_file(out)
    assert (tok_again.bos_id, tok_again.eos_id, tok_again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert tok_again.fingerprint() == tok.fingerprint()

    # Saving over an existing checkpoint replaces it whole.
    save_hf_checkpoint(model, config, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_tied_embeddings_save_and_load(tmp_path):
    """A tied model stores no lm_head; transformers ties it back from config.json."""
    paddle.seed(3)
    config = ChuXinConfig(vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                          intermediate_size=96, max_position_embeddings=128, tie_word_embeddings=True)
    model = ChuXinForCausalLM(config)
    model.eval()
    save_hf_checkpoint(model, config, tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(hf_logits(reloaded, IDS), ours_logits(model, IDS), atol=1e-4, rtol=0)
    again, again_config, _ = load_hf_checkpoint(tmp_path)
    assert again_config == config and again.lm_head is None
    np.testing.assert_array_equal(ours_logits(again, IDS), ours_logits(model, IDS))


def test_save_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, hf_dir):
    model, config, _ = load_hf_checkpoint(hf_dir)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint"):
        save_hf_checkpoint(model, config, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------
# Broken checkpoints: each builder returns the directory and strings the error must contain.


def missing_shard(source_dirs, directory):
    shutil.copytree(source_dirs["sharded"], directory)
    weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    (directory / shard).unlink()
    a_tensor = sorted(name for name, file in weight_map.items() if file == shard)[0]
    return directory, [shard, a_tensor, INDEX_FILE]


def wrong_shape(source_dirs, directory):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source_dirs["single"], directory)
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((160, 32), dtype=np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return directory, ["model.layers.1.mlp.up_proj.weight", "model.safetensors", "[160, 32]", "[160, 64]"]


def unknown_architecture(source_dirs, directory):
    shutil.copytree(source_dirs["single"], directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (directory / "config.json").write_text(json.dumps(config))
    return directory, ["config.json", "GPT2LMHeadModel", "LlamaForCausalLM"]


def missing_tensor(source_dirs, directory):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source_dirs["single"], directory)
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.k_norm.weight"] = np.ones(16, dtype=np.float32)  # e.g. a Qwen3 checkpoint
    save_file(tensors, str(path), metadata={"format": "pt"})
    return directory, ["model.layers.0.self_attn.k_proj.weight"]


BROKEN = {"missing_shard": missing_shard, "wrong_shape": wrong_shape,
          "unknown_architecture": unknown_architecture, "missing_tensor": missing_tensor}


@pytest.fixture
def source_dirs(hf_dir, sharded_dir):
    return {"single": hf_dir, "sharded": sharded_dir}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_checkpoint_errors_name_the_problem(kind, source_dirs, tmp_path):
    directory, needles = BROKEN[kind](source_dirs, tmp_path / "broken")
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(directory)
    for needle in needles:
        assert needle in str(info.value)


def test_unexpected_tensor_is_an_error(source_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source_dirs["single"], tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, dtype=np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, dtype=np.float32)  # allowed: recomputed
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"does not have: model\.layers\.0\.self_attn\.q_proj\.bias\."):
        load_hf_checkpoint(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------------------
# Command lines


def test_convert_tool_both_directions_then_infer(tmp_path, hf_dir):
    ppzoo_dir, hf_again = tmp_path / "ppzoo_ckpt", tmp_path / "hf_again"
    result = run_tool("convert_checkpoint", ["--from-hf", hf_dir, "--out", ppzoo_dir])
    assert result.returncode == 0, result.stderr
    assert last_json_line(result.stdout)["format"] == "ppzoo"
    assert (ppzoo_dir / "manifest.json").is_file() and (ppzoo_dir / "model.mp0.pdparams").is_file()

    infer_args = ["--prompt", PROMPT, "--max-new-tokens", "8"]
    first = run_tool("infer", ["--ckpt", ppzoo_dir, *infer_args])
    assert first.returncode == 0, first.stderr
    completion = last_json_line(first.stdout)["outputs"][0]["completion"]
    assert completion

    result = run_tool("convert_checkpoint", ["--to-hf", ppzoo_dir, "--out", hf_again, "--max-shard-mb", "0.2"])
    assert result.returncode == 0, result.stderr
    assert (hf_again / INDEX_FILE).is_file()
    original, _, _ = load_hf_checkpoint(hf_dir)
    converted, _, _ = load_hf_checkpoint(hf_again)
    expected = weights(original)
    for name, value in weights(converted).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)

    second = run_tool("infer", ["--ckpt", hf_again, *infer_args])  # a Hugging Face directory, read directly
    assert second.returncode == 0, second.stderr
    assert last_json_line(second.stdout)["outputs"][0]["completion"] == completion


@pytest.mark.parametrize("kind", ["missing_shard", "wrong_shape", "unknown_architecture"])
def test_infer_tool_reports_broken_checkpoints(kind, source_dirs, tmp_path):
    directory, needles = BROKEN[kind](source_dirs, tmp_path / "broken")
    result = run_tool("infer", ["--ckpt", directory, "--prompt", "x", "--max-new-tokens", "2"])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    for needle in needles:
        assert needle in result.stderr
