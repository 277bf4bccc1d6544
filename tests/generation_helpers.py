"""What the generation tests share: a tokenizer needing no training and a small random ChuXin."""
import paddle

from ppzoo.models.chuxin.model import ChuXinConfig, ChuXinForCausalLM


class CharTokenizer:
    """A character tokenizer over Latin-1 (id = code point + 3), enough to drive the Generator."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text, add_bos=False):
        return ([self.bos_id] if add_bos else []) + [ord(c) + 3 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


def small_chuxin(max_position_embeddings):
    """A seeded 2-layer ChuXin with grouped KV heads over CharTokenizer's vocabulary, in eval mode; weights
    large enough (std 0.2) that its greedy choices are not ties."""
    paddle.seed(0)
    model = ChuXinForCausalLM(ChuXinConfig(
        vocab_size=CharTokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, max_position_embeddings=max_position_embeddings, initializer_range=0.2,
    ))
    model.eval()
    return model
