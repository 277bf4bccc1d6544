"""Generation with a trained ERNIE-ViLG module: text-to-image and image-to-text.

Text-to-image: `num_candidates` code sequences per caption are sampled (top-k, temperature) with a KV
cache; every candidate is scored by the image-to-text direction of the same model, log p(caption | image),
and the best one is kept (ERNIE-ViLG reranks its samples the same way, by the model's own other direction).
The image comes from the decoder: fed the generator's hidden states in end-to-end mode, codebook vectors in
two-stage mode. Arrays are returned; writing PNG files is the caller's business (tools/infer.py).

Image-to-text: greedy decoding, or beam search with summed log-probabilities (no length penalty, so a beam
of one is exactly greedy).
"""
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from ppzoo.errors import DataError


@dataclass
class ImageSampling:
    top_k: int = 32
    temperature: float = 1.0
    num_candidates: int = 4  # samples per caption, reranked by image-to-text likelihood
    seed: int = 0


def _top_k_sample(logits, top_k, temperature):
    """One sample per row of logits [b, K] from the top_k most likely entries, at `temperature`."""
    logits = logits / max(temperature, 1e-6)
    if 0 < top_k < logits.shape[-1]:
        kth = paddle.topk(logits, top_k, axis=-1)[0][:, -1:]
        logits = paddle.where(logits < kth, paddle.full([], float("-inf"), dtype=logits.dtype), logits)
    return paddle.multinomial(F.softmax(logits, axis=-1), 1).squeeze(-1)


@paddle.no_grad()
def sample_codes(module, text_ids, sampling):
    """Sample image codes [b, N] for captions text_ids [b, T] (top-k, with a KV cache)."""
    gen = module.generator
    pad = module.text_tokenizer.PAD
    b = text_ids.shape[0]
    valid = paddle.concat([paddle.ones([b, 1], "bool"), text_ids != pad, paddle.ones([b, 1], "bool")], axis=1)
    hidden, cache = gen.start_decoding(gen.text_segment(text_ids), gen.image_start(b), valid)
    codes = []
    for position in range(1, gen.num_image_tokens + 1):
        code = _top_k_sample(gen.image_head(hidden), sampling.top_k, sampling.temperature)
        codes.append(code)
        if position == gen.num_image_tokens:
            break
        valid = paddle.concat([valid, paddle.ones([b, 1], "bool")], axis=1)
        hidden, cache = gen.step(gen.image_tokens(code.unsqueeze(1), position), cache, valid)
    return paddle.stack(codes, axis=1)


@paddle.no_grad()
def caption_log_likelihood(module, codes, text_ids):
    """log p(caption | image) [b]: the summed log-probabilities of the caption's words and eos."""
    pad = module.text_tokenizer.PAD
    logits = module.generator.image_to_text(codes, text_ids, pad)[..., :module.text_tokenizer.vocab_size]
    logp = F.log_softmax(logits, axis=-1)
    picked = paddle.take_along_axis(logp, text_ids.unsqueeze(-1), axis=-1).squeeze(-1)
    return (picked * (text_ids != pad).astype(picked.dtype)).sum(-1)


@paddle.no_grad()
def render(module, text_ids, codes):
    """Images [b, 3, H, W] of codes [b, N] generated for text_ids, by the module's decoding mode."""
    hidden = module.generator.text_to_image(text_ids, codes, module.text_tokenizer.PAD)[1] \
        if module.config.end_to_end else None
    return module.images_from(codes, hidden).clip(-1.0, 1.0)


@paddle.no_grad()
def text_to_image(module, captions, sampling=None):
    """Generate one image per caption. Returns a dict of numpy arrays: images [b, 3, H, W] in [-1, 1],
    codes [b, N], scores [b] (the chosen candidate's log p(caption | image)), candidate_scores [b, C]."""
    sampling = sampling or ImageSampling()
    if sampling.num_candidates < 1:
        raise DataError(f"num_candidates must be at least 1, got {sampling.num_candidates}.")
    tokenizer, t = module.text_tokenizer, module.config.max_text_len
    text_ids = paddle.to_tensor([tokenizer.encode(c, t) for c in captions], dtype="int64")
    b, c = len(captions), sampling.num_candidates
    paddle.seed(sampling.seed)
    repeated = paddle.repeat_interleave(text_ids, c, axis=0)  # caption i's candidates are rows i*c .. i*c+c-1
    codes = sample_codes(module, repeated, sampling)
    scores = caption_log_likelihood(module, codes, repeated).reshape([b, c])
    best = scores.argmax(axis=1) + paddle.arange(b) * c
    chosen = paddle.gather(codes, best)
    images = render(module, text_ids, chosen)
    return {"images": images.numpy(), "codes": chosen.numpy(), "scores": scores.max(axis=1).numpy(),
            "candidate_scores": scores.numpy()}


def _word_logits(module, hidden):
    """Text-head logits restricted to the caption vocabulary (text_vocab_size may leave spare rows)."""
    return module.generator.text_head(hidden)[..., :module.text_tokenizer.vocab_size]


def _image_condition(module, codes):
    gen = module.generator
    b = codes.shape[0]
    valid = paddle.ones([b, gen.num_image_tokens + 2], "bool")
    hidden, cache = gen.start_decoding(gen.image_segment(codes), gen.text_start(b), valid)
    return hidden, cache, valid


@paddle.no_grad()
def caption_greedy(module, codes):
    """The most likely next word at every step, until eos or max_text_len tokens. Returns ids [b, T]."""
    gen, eos, pad = module.generator, module.text_tokenizer.EOS, module.text_tokenizer.PAD
    hidden, cache, valid = _image_condition(module, codes)
    b, out = codes.shape[0], []
    finished = paddle.zeros([b], "bool")
    for position in range(1, module.config.max_text_len + 1):
        word = _word_logits(module, hidden).argmax(-1)
        word = paddle.where(finished, paddle.full_like(word, pad), word)
        out.append(word)
        finished = finished | (word == eos) | (word == pad)
        if position == module.config.max_text_len or bool(finished.all()):
            break
        valid = paddle.concat([valid, paddle.ones([b, 1], "bool")], axis=1)
        hidden, cache = gen.step(gen.text_tokens(word.unsqueeze(1), position), cache, valid)
    return _pad_to(paddle.stack(out, axis=1), module.config.max_text_len, pad)


def _pad_to(ids, length, pad):
    if ids.shape[1] == length:
        return ids
    return paddle.concat([ids, paddle.full([ids.shape[0], length - ids.shape[1]], pad, "int64")], axis=1)


@paddle.no_grad()
def caption_beam(module, codes, beam_size=4):
    """Beam search over captions by summed log-probability. Returns (ids [b, T], scores [b])."""
    if beam_size < 1:
        raise DataError(f"beam size must be at least 1, got {beam_size}.")
    gen, eos, pad = module.generator, module.text_tokenizer.EOS, module.text_tokenizer.PAD
    t, b = module.config.max_text_len, codes.shape[0]
    hidden, cache, valid = _image_condition(module, paddle.repeat_interleave(codes, beam_size, axis=0))
    # Only the first beam of each image is live at the start (the others are copies of it).
    scores = paddle.to_tensor(np.tile([0.0] + [-np.inf] * (beam_size - 1), b).astype("float32"))
    finished = paddle.zeros([b * beam_size], "bool")
    history = paddle.zeros([b * beam_size, 0], "int64")
    vocab = module.text_tokenizer.vocab_size
    # A finished beam continues only with pad, at no cost.
    after_end = paddle.full([vocab], float("-inf")).numpy()
    after_end[pad] = 0.0
    after_end = paddle.to_tensor(after_end)
    for position in range(1, t + 1):
        logp = F.log_softmax(_word_logits(module, hidden), axis=-1)  # [b*beam, V]
        logp = paddle.where(finished.unsqueeze(1), after_end.unsqueeze(0), logp)
        total = (scores.unsqueeze(1) + logp).reshape([b, beam_size * vocab])
        top_scores, top_index = paddle.topk(total, beam_size, axis=1)
        origin = (top_index // vocab + paddle.arange(b).unsqueeze(1) * beam_size).reshape([-1])
        word = (top_index % vocab).reshape([-1])
        scores = top_scores.reshape([-1])
        history = paddle.concat([paddle.gather(history, origin), word.unsqueeze(1)], axis=1)
        finished = paddle.gather(finished, origin) | (word == eos) | (word == pad)
        if position == t or bool(finished.all()):
            break
        cache = [(paddle.gather(k, origin), paddle.gather(v, origin)) for k, v in cache]
        valid = paddle.concat([valid, paddle.ones([b * beam_size, 1], "bool")], axis=1)
        hidden, cache = gen.step(gen.text_tokens(word.unsqueeze(1), position), cache, valid)
    best = scores.reshape([b, beam_size]).argmax(axis=1) + paddle.arange(b) * beam_size
    return _pad_to(paddle.gather(history, best), t, pad), paddle.gather(scores, best)


@paddle.no_grad()
def caption_images(module, images, beam_size=1):
    """Captions (strings) of images [b, 3, H, W] in [-1, 1] (numpy or tensor): greedy when beam_size == 1."""
    images = paddle.to_tensor(images, dtype="float32")
    codes = module.image_codes(images)
    ids = caption_greedy(module, codes) if beam_size == 1 else caption_beam(module, codes, beam_size)[0]
    return [module.text_tokenizer.decode(row) for row in ids.numpy()]
