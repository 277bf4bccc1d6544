"""Generation against plain recomputation: the KV cache, left padding and the decoding filters."""
import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401
from generation_helpers import CharTokenizer, small_chuxin
from ppzoo.errors import PpzooError
from ppzoo.inference import DenseKVCache, Generator, PreallocatedKVCache, SamplingConfig
from ppzoo.inference.generate import apply_repetition_penalty, filter_top_k_top_p


@pytest.fixture(scope="module")
def model():
    return small_chuxin(max_position_embeddings=128)


def greedy_without_cache(model, ids, steps):
    ids = list(ids)
    out = []
    for _ in range(steps):
        logits = model(paddle.to_tensor([ids])).numpy()[0, -1]
        token = int(np.argmax(logits))
        out.append(token)
        ids.append(token)
    return out


def test_cached_greedy_equals_full_recomputation(model):
    tok = CharTokenizer()
    prompt = "def f(x):"
    expected = greedy_without_cache(model, tok.encode(prompt, add_bos=True), 12)
    expected = [t for t in expected]
    # Stop tokens off, so exactly 12 tokens come out whatever the random model prefers.
    text = Generator(model, tok).generate(prompt, SamplingConfig(max_new_tokens=12, stop_token_ids=[]))
    stop = next((i for i, t in enumerate(expected) if t < 3), len(expected))  # non-byte ids decode to ''
    assert text == tok.decode(expected[:stop] + [t for t in expected[stop:] if t >= 3])


def test_left_padding_does_not_change_a_row(model):
    tok = CharTokenizer()
    gen = Generator(model, tok)
    sampling = SamplingConfig(max_new_tokens=8, stop_token_ids=[])
    prompts = ["a much longer prompt here", "short"]
    together = gen.generate(prompts, sampling)
    alone = [gen.generate(p, sampling) for p in prompts]
    assert together == alone


def test_streaming_pieces_join_to_the_full_text(model):
    tok = CharTokenizer()
    gen = Generator(model, tok)
    sampling = SamplingConfig(max_new_tokens=10, stop_token_ids=[])
    pieces = [p[0] for p in gen.stream(["hello"], sampling)]
    assert "".join(pieces) == gen.generate("hello", sampling)
    assert len(pieces) >= 10


def test_sampling_is_reproducible_with_a_seed(model):
    gen = Generator(model, CharTokenizer())
    s = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, stop_token_ids=[])
    assert gen.generate("x", SamplingConfig(seed=3, **s)) == gen.generate("x", SamplingConfig(seed=3, **s))


def test_stop_string_cuts_the_output(model):
    tok = CharTokenizer()
    gen = Generator(model, tok)
    full = gen.generate("abc", SamplingConfig(max_new_tokens=12, stop_token_ids=[]))
    assert len(full) >= 4
    stop = full[2:4]
    cut = gen.generate("abc", SamplingConfig(max_new_tokens=12, stop_token_ids=[], stop_strings=[stop]))
    assert cut == full[: full.index(stop)]


def test_top_k_top_p_filters():
    logits = paddle.to_tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = np.isfinite(filter_top_k_top_p(logits, 2, 1.0).numpy())[0]
    assert kept.tolist() == [True, True, False, False, False]
    probs = np.exp(logits.numpy()[0]) / np.exp(logits.numpy()[0]).sum()  # 0.636, 0.234, 0.086, ...
    kept = np.isfinite(filter_top_k_top_p(logits, 0, 0.8).numpy())[0]
    # The smallest prefix whose mass reaches 0.8 is the first two tokens (0.636 + 0.234 = 0.87).
    assert probs[0] < 0.8 <= probs[0] + probs[1]
    assert kept.tolist() == [True, True, False, False, False]


def test_repetition_penalty_formula():
    logits = paddle.to_tensor([[2.0, -2.0, 1.0]])
    seen = paddle.to_tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0).numpy()[0]
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0])


def test_prompt_longer_than_context_is_an_error_or_truncated(model):
    gen = Generator(model, CharTokenizer())
    long_prompt = "x" * 200
    with pytest.raises(PpzooError, match="exceeds the model's context of 128"):
        gen.generate(long_prompt, SamplingConfig(max_new_tokens=4))
    out = gen.generate(long_prompt, SamplingConfig(max_new_tokens=4, stop_token_ids=[]), truncate=True)
    assert isinstance(out, str)


def test_preallocated_cache_generates_what_the_dense_cache_does(model):
    """Left-padded batch, grouped KV heads (the fixture has 2 for 4 query heads), a block size small enough
    that the buffers grow several times while decoding."""
    tok = CharTokenizer()
    sampling = SamplingConfig(max_new_tokens=12, stop_token_ids=[])
    prompts = ["a much longer prompt here", "short"]
    dense = Generator(model, tok, cache_factory=DenseKVCache).generate(prompts, sampling)
    grows = Generator(model, tok, cache_factory=lambda: PreallocatedKVCache(block_size=4)).generate(prompts, sampling)
    assert grows == dense
    assert Generator(model, tok, cache_factory=PreallocatedKVCache).generate(prompts, sampling) == dense


def test_preallocated_cache_logits_reorder_and_limit(model):
    """Logits against the dense cache for a prefill without a mask (causal default), a 3-position chunk
    and single steps; then reorder keeps the chosen rows; max_length is enforced."""
    ids = paddle.to_tensor(np.random.default_rng(0).integers(3, 259, size=(2, 12)))
    dense, pre = DenseKVCache(), PreallocatedKVCache(block_size=5)
    with paddle.no_grad():
        for start, stop in ((0, 6), (6, 9), (9, 10), (10, 11)):
            want = model(ids[:, start:stop], cache=dense).numpy()
            got = model(ids[:, start:stop], cache=pre).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            dense.advance(stop - start)
            pre.advance(stop - start)
        assert pre.capacity == 15  # 11 positions, in blocks of 5
        dense.reorder([1])
        pre.reorder([1])
        np.testing.assert_allclose(model(ids[1:, 11:], cache=pre).numpy(), model(ids[1:, 11:], cache=dense).numpy(),
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="at most 4 positions"):
            model(ids[:, :5], cache=PreallocatedKVCache(max_length=4))


def test_logits_to_keep_computes_only_the_last_positions(model):
    ids = paddle.to_tensor(np.random.default_rng(1).integers(3, 259, size=(2, 7)))
    with paddle.no_grad():
        full = model(ids).numpy()
        last = model(ids, logits_to_keep=1).numpy()
        last3 = model(ids, logits_to_keep=3).numpy()
    assert last.shape == (2, 1, 259) and last3.shape == (2, 3, 259)
    np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last3, full[:, -3:], rtol=1e-5, atol=1e-5)


def test_preallocated_cache_layers_may_differ_in_head_count():
    """Decode steps through layers with 2 and 4 kv heads (as ERNIE Titan's universal and task modules) give
    what the dense cache gives."""
    rng = np.random.default_rng(0)
    dense, preallocated = DenseKVCache(), PreallocatedKVCache(block_size=4)

    def step(length):
        for layer, heads in enumerate((2, 4)):
            q, k, v = (paddle.to_tensor(rng.standard_normal([2, length, heads, 8]).astype("float32"))
                       for _ in range(3))
            expected = dense.attend(layer, q, k, v)
            actual = preallocated.attend(layer, q, k, v)
            np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        dense.advance(length)
        preallocated.advance(length)

    step(3)  # prefill
    for _ in range(3):
        step(1)  # decode steps: one position per layer, written by row index
