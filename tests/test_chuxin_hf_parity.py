"""ChuXin against the reference implementation: Hugging Face LlamaForCausalLM on PyTorch, same weights."""
import numpy as np
import paddle
import pytest

import ppzoo  # noqa: F401
from ppzoo.models.chuxin.convert import chuxin_config_from_hf, hf_to_ppzoo_state
from ppzoo.models.chuxin.model import ChuXinForCausalLM

torch = pytest.importorskip("torch", reason="the reference implementation needs PyTorch (requirements-dev.txt)")
transformers = pytest.importorskip("transformers", reason="needs transformers (requirements-dev.txt)")


def make_pair(num_kv_heads):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=num_kv_heads,
        intermediate_size=160, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = ChuXinForCausalLM(chuxin_config_from_hf(hf_cfg.to_dict()))
    state = hf_to_ppzoo_state({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    missing, unexpected = ours.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
    assert not missing and not unexpected
    ours.eval()
    return hf, ours


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_logits_match_hugging_face(num_kv_heads):
    hf, ours = make_pair(num_kv_heads)
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 48))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    got = ours(paddle.to_tensor(ids)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_packed_documents_match_separate_runs():
    """A row packing two documents gives each the logits it gets alone (the block-diagonal mask and the
    per-document positions are the model's job: positions here restart at each document)."""
    _, ours = make_pair(4)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 320, size=20), rng.integers(0, 320, size=12)
    packed = np.concatenate([a, b])[None]
    doc_ids = np.array([[0] * 20 + [1] * 12], dtype=np.int32)
    positions = np.array([list(range(20)) + list(range(12))])
    got = ours(paddle.to_tensor(packed), position_ids=paddle.to_tensor(positions),
               doc_ids=paddle.to_tensor(doc_ids)).numpy()[0]
    alone_a = ours(paddle.to_tensor(a[None])).numpy()[0]
    alone_b = ours(paddle.to_tensor(b[None])).numpy()[0]
    np.testing.assert_allclose(got[:20], alone_a, atol=1e-5)
    np.testing.assert_allclose(got[20:], alone_b, atol=1e-5)


def test_gradients_match_hugging_face():
    hf, ours = make_pair(2)
    ids = np.random.default_rng(2).integers(0, 320, size=(2, 32))
    out = hf(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    logits = ours(paddle.to_tensor(ids))
    # Hugging Face shifts labels inside; do the same here.
    loss = paddle.nn.functional.cross_entropy(logits[:, :-1].reshape([-1, 320]), paddle.to_tensor(ids[:, 1:]).reshape([-1]))
    loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-5
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g = hf_grads[name].grad.numpy()
        g = g.T if p.ndim == 2 and "embed" not in name else g
        np.testing.assert_allclose(p.grad.numpy(), g, atol=2e-5, err_msg=name)
