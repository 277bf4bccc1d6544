"""KCache against the dense cache and against a plain numpy top-N attention; its tiers, configuration, the
decoded prompt tail and decode perplexity, and the tools' KCache options."""
import json
import math

import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401
from conftest import last_json_line, run_tool
from generation_helpers import CharTokenizer, small_chuxin
from ppzoo.errors import ConfigError
from ppzoo.eval.cache_policy import decode_perplexity
from ppzoo.inference import DenseKVCache, Generator, PreallocatedKVCache, SamplingConfig
from ppzoo.inference.kcache import KCache, KCacheConfig, cache_factory, parse_top_n, top_n_positions

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


@pytest.fixture(scope="module")
def model():
    return small_chuxin(max_position_embeddings=128)


def padded_masks(valid, num_queries):
    """Additive masks [b, heads, q, k] as Generator builds them: causal, padding keys masked."""
    k = valid.shape[1]
    causal = np.arange(k)[None, :] <= np.arange(k - num_queries, k)[:, None]
    allowed = causal[None] & valid[:, None, :]
    allowed |= np.eye(k, dtype=bool)[None, k - num_queries:]
    mask = np.where(allowed, 0.0, -np.inf).astype(np.float32)[:, None]
    return np.repeat(mask, HEADS, axis=1)


def run_steps(caches, layers=2, prefill=6, decode=7, seed=0):
    """Feed the same random q/k/v (grouped KV heads, row 1 left-padded by 2) through each cache: a prefill,
    then single-position decode steps. Returns, per cache, the outputs per step and layer, and the inputs."""
    rng = np.random.default_rng(seed)
    batch = 2
    valid = np.ones((batch, prefill), dtype=bool)
    valid[1, :2] = False
    outputs = [[] for _ in caches]
    inputs = []
    for step, s in enumerate([prefill] + [1] * decode):
        if step:
            valid = np.concatenate([valid, np.ones((batch, 1), dtype=bool)], axis=1)
        mask = paddle.to_tensor(padded_masks(valid, s))
        step_inputs = []
        for layer in range(layers):
            q = rng.standard_normal((batch, s, HEADS, HEAD_DIM)).astype(np.float32) * 2
            k = rng.standard_normal((batch, s, KV_HEADS, HEAD_DIM)).astype(np.float32) * 2
            v = rng.standard_normal((batch, s, KV_HEADS, HEAD_DIM)).astype(np.float32)
            step_inputs.append((q, k, v, mask.numpy()))
            for i, cache in enumerate(caches):
                out = cache.attend(layer, paddle.to_tensor(q), paddle.to_tensor(k), paddle.to_tensor(v), mask)
                outputs[i].append(out.numpy())
        for cache in caches:
            cache.advance(s)
        inputs.append(step_inputs)
    return outputs, inputs


@pytest.mark.parametrize("top_n", [1.0, 1000])
def test_top_n_of_all_positions_equals_the_dense_cache(top_n):
    dense = PreallocatedKVCache(block_size=4)
    kcache = KCache(KCacheConfig(top_n=top_n, dense_layers=0, block_size=4))
    (expected, got), _ = run_steps([dense, kcache])
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert not kcache.values  # no layer's values stayed in Paddle memory: all went to the offloaded tier


def numpy_top_n_attention(q, keys, values, mask, n, renormalize):
    """Reference decode step in plain numpy: q [b, 1, h, d], keys/values [b, t, kv, d] (every position so
    far), mask [b, h, 1, t]. Softmax over all keys, then each head's n largest weights times their values."""
    b, _, h, d = q.shape
    rep = h // keys.shape[2]
    k = np.repeat(keys, rep, axis=2).transpose(0, 2, 1, 3)  # [b, h, t, d]
    v = np.repeat(values, rep, axis=2).transpose(0, 2, 1, 3)
    scores = np.einsum("bhd,bhtd->bht", q[:, 0].astype(np.float64), k) / math.sqrt(d) + mask[:, :, 0]
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros((b, h, d))
    for i in range(b):
        for j in range(h):
            top = np.argsort(-probs[i, j], kind="stable")[:n]
            weights = probs[i, j, top] / (probs[i, j, top].sum() if renormalize else 1.0)
            out[i, j] = weights @ v[i, j, top]
    return out[:, None]


@pytest.mark.parametrize("renormalize", [False, True])
def test_top_n_decode_steps_match_a_numpy_reference(renormalize):
    n = 3
    kcache = KCache(KCacheConfig(top_n=n, dense_layers=0, renormalize=renormalize, block_size=4))
    (outputs,), inputs = run_steps([kcache], layers=1)
    keys = np.concatenate([step[0][1] for step in inputs], axis=1)
    values = np.concatenate([step[0][2] for step in inputs], axis=1)
    prefill = inputs[0][0][0].shape[1]
    for step in range(1, len(inputs)):
        q, _, _, mask = inputs[step][0]
        end = prefill + step
        expected = numpy_top_n_attention(q, keys[:, :end], values[:, :end], mask, n, renormalize)
        np.testing.assert_allclose(outputs[step], expected, rtol=0, atol=2e-5)
    # The prefill attends densely.
    dense = PreallocatedKVCache(block_size=4)
    (dense_out,), _ = run_steps([dense], layers=1)
    np.testing.assert_allclose(outputs[0], dense_out[0], rtol=0, atol=1e-6)
    assert np.abs(outputs[-1] - dense_out[-1]).max() > 1e-3  # n = 3 of 12 positions is not the dense result


def test_top_n_positions_are_the_largest_weights():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(50), size=(2, 3, 1)).astype(np.float32)
    probs[1, :, :, 30:] = 0.0  # masked or unwritten positions: ties at zero once n exceeds the rest
    for n in (1, 7, 30, 45, 50):
        got = np.sort(top_n_positions(probs, n), axis=-1)
        assert got.shape == (2, 3, 1, n)
        expected_mass = -np.sort(-probs, axis=-1)[..., :n].sum(-1)  # independent: a full sort
        np.testing.assert_allclose(np.take_along_axis(probs, got, -1).sum(-1), expected_mass, rtol=1e-6)
        assert all(len(set(row)) == n for row in got.reshape(-1, n))  # n distinct positions


def test_dense_layers_keep_the_dense_cache():
    dense = PreallocatedKVCache(block_size=4)
    kcache = KCache(KCacheConfig(top_n=2, dense_layers=1, block_size=4))
    (expected, got), _ = run_steps([dense, kcache], layers=2)
    layer0 = slice(0, None, 2)  # outputs alternate layer 0, layer 1
    for a, b in zip(expected[layer0], got[layer0]):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert np.abs(expected[-1] - got[-1]).max() > 1e-3
    assert sorted(kcache.values) == [0] and sorted(kcache.offloaded) == [1]


def test_tiers_hold_what_the_report_says():
    kcache = KCache(KCacheConfig(top_n=2, dense_layers=1, block_size=4))
    dense = PreallocatedKVCache(block_size=4)
    _, inputs = run_steps([kcache, dense], layers=3, prefill=6, decode=3)
    report, dense_report = kcache.memory_report(), dense.memory_report()
    capacity = 12  # 9 positions in blocks of 4
    buffer = 2 * KV_HEADS * capacity * HEAD_DIM * 4  # one layer's keys (or values), float32
    fetched = 2 * HEADS * 2 * (HEAD_DIM + 1) * 4  # rows and weights of one layer's step: batch x heads x n
    assert report["offloaded_bytes"] == 2 * buffer  # layers 1 and 2's values, in the files
    assert report["fetched_peak_bytes"] == fetched
    assert report["fast_tier_bytes"] == 3 * buffer + buffer + fetched  # keys of 3 layers, values of layer 0
    assert report["dense_cache_bytes"] == dense_report["fast_tier_bytes"] == 6 * buffer
    # The offloaded tier holds exactly the values written, in order.
    written = np.concatenate([step[2][2] for step in inputs], axis=1)  # layer 2's v, [b, 9, kv, d]
    np.testing.assert_array_equal(kcache.offloaded[2].read(9), written.transpose(0, 2, 1, 3))


def teacher_forced_logits(model, ids, cache, prefill):
    model(paddle.to_tensor(ids[:, :prefill]), cache=cache)
    cache.advance(prefill)
    steps = []
    for t in range(prefill, ids.shape[1]):
        steps.append(model(paddle.to_tensor(ids[:, t:t + 1]), cache=cache).numpy()[:, -1])
        cache.advance(1)
    return np.stack(steps)


def test_kcache_of_all_positions_decodes_tiny_chuxin_as_the_dense_cache(model):
    tok = CharTokenizer()
    ids = np.array([tok.encode("def kcache(x): return x * 2 + 1", add_bos=True)] * 2)
    ids[1] = ids[1][::-1]
    dense = teacher_forced_logits(model, ids, PreallocatedKVCache(), 6)
    kcache = teacher_forced_logits(model, ids, KCache(KCacheConfig(top_n=1.0, dense_layers=0)), 6)
    # Within 1e-6 of the logits' scale: the same sums in another order.
    assert np.abs(kcache - dense).max() <= 1e-6 * np.abs(dense).max()
    sampling = SamplingConfig(max_new_tokens=10, stop_token_ids=[])
    prompts = ["a longer prompt to pad against", "short"]
    factory = cache_factory(KCacheConfig(top_n=1.0, dense_layers=0, block_size=8))
    assert Generator(model, tok, cache_factory=factory).generate(prompts, sampling) == \
        Generator(model, tok, cache_factory=PreallocatedKVCache).generate(prompts, sampling)


def test_reorder_keeps_the_chosen_rows():
    kcache = KCache(KCacheConfig(top_n=1.0, dense_layers=1, block_size=4))
    dense = PreallocatedKVCache(block_size=4)
    run_steps([kcache, dense], layers=2, decode=2)
    for cache in (kcache, dense):
        cache.reorder([1])
    rng = np.random.default_rng(5)
    for layer in range(2):
        q = paddle.to_tensor(rng.standard_normal((1, 1, HEADS, HEAD_DIM)).astype(np.float32))
        k, v = (paddle.to_tensor(rng.standard_normal((1, 1, KV_HEADS, HEAD_DIM)).astype(np.float32)) for _ in "kv")
        np.testing.assert_allclose(kcache.attend(layer, q, k, v).numpy(), dense.attend(layer, q, k, v).numpy(),
                                   rtol=0, atol=1e-6)


def test_config_is_checked():
    for bad in (0, -3, 0.0, 1.5, True, "64"):
        with pytest.raises(ConfigError, match="top_n"):
            KCacheConfig(top_n=bad)
    with pytest.raises(ConfigError, match="dense_layers"):
        KCacheConfig(dense_layers=-1)
    with pytest.raises(ConfigError, match="neither a count"):
        parse_top_n("many")
    assert parse_top_n("64") == 64 and parse_top_n("0.125") == 0.125
    assert KCacheConfig(top_n=0.125).num_selected(100) == 13
    assert KCacheConfig(top_n=64).num_selected(10) == 10
    assert cache_factory(None) is PreallocatedKVCache
    assert cache_factory(KCacheConfig(enabled=False)) is PreallocatedKVCache
    assert isinstance(cache_factory(KCacheConfig())(), KCache)


def test_decoded_prompt_tail_changes_nothing_for_a_dense_cache(model):
    tok = CharTokenizer()
    prompts = ["the prompt whose tail is decoded", "a shorter one"]
    plain = Generator(model, tok).prompt_logits(prompts)
    tail = Generator(model, tok, decode_tail=8, prefill_chunk=5).prompt_logits(prompts)
    np.testing.assert_allclose(tail, plain, rtol=0, atol=1e-4)


def test_decoded_prompt_tail_goes_through_the_kcache_decode_path(model):
    made = []

    def factory():
        made.append(KCache(KCacheConfig(top_n=2, dense_layers=0)))
        return made[-1]

    sampling = SamplingConfig(max_new_tokens=1, stop_token_ids=[])
    Generator(model, CharTokenizer(), cache_factory=factory).generate("a prompt", sampling)
    assert made[-1].fetched_peak_bytes == 0  # the answer came out of the prefill: no value was selected
    Generator(model, CharTokenizer(), cache_factory=factory, decode_tail=3).generate("a prompt", sampling)
    assert made[-1].fetched_peak_bytes > 0


def test_decode_perplexity_with_a_dense_cache_is_the_full_forward_perplexity(model):
    rng = np.random.default_rng(0)
    windows = rng.integers(3, 200, size=(3, 24))
    got = decode_perplexity(model, windows, DenseKVCache, prefill=5, batch_size=2)
    logits = model(paddle.to_tensor(windows)).numpy().astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    # Decode steps are positions 5 .. 22 (the logits of position t score token t + 1).
    nll = -np.take_along_axis(logp[:, 5:-1], windows[:, 6:, None], axis=-1).mean()
    assert got["tokens"] == 3 * 18
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.fixture(scope="module")
def checkpoint(write_config, tmp_path_factory):
    directory = tmp_path_factory.mktemp("kcache_run")
    config = write_config(directory, Engine={"max_steps": 2, "save_steps": 2})
    result = run_tool("train", ["-c", config])
    assert result.returncode == 0, result.stderr[-3000:]
    return config, directory / "out"


def test_infer_with_kcache_of_all_positions_gives_the_dense_text(checkpoint):
    _, out = checkpoint
    common = ["--ckpt", out / "step_00000002", "--prompt", "def f(x):", "--max-new-tokens", "12"]
    dense = run_tool("infer", common)
    assert dense.returncode == 0, dense.stderr[-3000:]
    kcache = run_tool("infer", common + ["--kcache-top-n", "1.0", "--kcache-dense-layers", "0"])
    assert kcache.returncode == 0, kcache.stderr[-3000:]
    result = last_json_line(kcache.stdout)
    assert result["kcache"] == "KCache top-1 of the positions"
    assert result["outputs"] == last_json_line(dense.stdout)["outputs"]
    refused = run_tool("infer", ["--model", out / "exported", "--prompt", "x", "--kcache-top-n", "8"])
    assert refused.returncode == 2 and "--kcache-top-n runs from a checkpoint" in refused.stderr


def test_eval_compares_kcache_with_the_dense_cache(checkpoint):
    config, out = checkpoint
    result = run_tool("eval", ["-c", config, "--ckpt", out / "step_00000002", "--task", "kcache", "--top-n", "1.0", "4",
                               "--dense-layers", "0", "--ppl-windows", "2", "--ppl-len", "32", "--lengths", "96",
                               "--depths", "0.5", "--trials", "2", "--haystack-chars", "100000"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| cache policy | decode ppl | ppl vs ref | NIAH accuracy | NIAH vs ref |" in result.stdout
    rows = {row["policy"]: row for row in last_json_line(result.stdout)["rows"]}
    assert list(rows) == ["dense", "KCache top-1 of the positions", "KCache top-4"]
    assert rows["KCache top-1 of the positions"]["ppl"] == pytest.approx(rows["dense"]["ppl"], rel=1e-5)
    assert rows["KCache top-4"]["ppl"] != pytest.approx(rows["dense"]["ppl"], rel=1e-5)
    assert rows["dense"]["tokens"] == 2 * (32 - 16 - 1)
    json.dumps(rows)  # the result line is plain JSON
