"""ERNIE-ViLG: the built-in image-text data, the VQ-VAE tokenizer, the bidirectional generator, end-to-end
versus two-stage training, generation, the metrics, and the train -> infer path through the tools.

Each behaviour is checked against something independent of the code under test: pixel facts of the drawn
scenes (scipy's connected components), a NumPy EMA codebook update, the mask written out by hand, the
gradient of a straight-through identity, teacher-forced logits against cached sampling, greedy against
beam search, scipy's sqrtm for FID, and hand-counted BLEU.
"""
import json
from pathlib import Path

import numpy as np
import paddle
import pytest
import yaml

from ppzoo import Engine, load_config
from ppzoo.core.engine import to_tensors
from ppzoo.data.images import (
    ATTRIBUTE_NAMES, COLOR_NAMES, COLORS, POSITIONS, CaptionTokenizer, HandwrittenDigits,
    HandwrittenDigitsConfig, SyntheticScenes, SyntheticScenesConfig, parse_scene_caption, scene_caption,
)
from ppzoo.data.sampler import collate
from ppzoo.errors import CheckpointError, DataError
from ppzoo.eval.image_metrics import attribute_accuracy, corpus_bleu, frechet_distance
from ppzoo.models.ernie_vilg import ErnieViLGConfig, ErnieViLGModule, ImageSampling, text_to_image
from ppzoo.models.ernie_vilg.generation import (
    caption_beam, caption_greedy, caption_log_likelihood, sample_codes,
)
from ppzoo.models.ernie_vilg.model import seq2seq_allowed
from ppzoo.models.ernie_vilg.vqvae import (
    VectorQuantizer, VQVAEConfig, code_statistics, ema_codebook_update, straight_through,
)

from conftest import REPO_ROOT, last_json_line, read_metrics, run_launch, run_tool

CONFIGS = REPO_ROOT / "configs" / "ernie_vilg"
SMALL_VQ = {"channels": 8, "code_dim": 8, "codebook_size": 32}
SMALL_VILG = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def small_module(mode="end_to_end", seed=0):
    paddle.seed(seed)
    return ErnieViLGModule(ErnieViLGConfig(training_mode=mode, vqvae=VQVAEConfig(**SMALL_VQ), **SMALL_VILG))


@pytest.fixture(scope="module")
def scenes():
    return SyntheticScenes.build(SyntheticScenesConfig(num_samples=48, seed=3))


def batch_of(dataset, n=8):
    return to_tensors(collate([dataset[i] for i in range(n)]))


# ---------------------------------------------------------------------------------------------------------
# Data


def test_scenes_are_deterministic_and_seeded(scenes):
    again = SyntheticScenes.build(SyntheticScenesConfig(num_samples=48, seed=3))
    other = SyntheticScenes.build(SyntheticScenesConfig(num_samples=48, seed=4))
    assert np.array_equal(scenes.images_uint8, again.images_uint8) and scenes.captions == again.captions
    assert not np.array_equal(scenes.images_uint8, other.images_uint8)
    sample = scenes[5]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == np.float32
    assert -1.0 <= sample["image"].min() and sample["image"].max() <= 1.0


def test_scene_pixels_match_caption_and_labels(scenes):
    """Count (connected components), color (mean object color) and position (object centroid) read from the
    pixels agree with the labels, and the caption parses back into the same labels."""
    from scipy import ndimage

    for image, caption, labels in zip(scenes.images_uint8, scenes.captions, scenes.labels):
        stated = parse_scene_caption(caption)
        assert [stated[name] for name in ATTRIBUTE_NAMES] == list(labels), caption
        objects = image.astype(int).max(-1) > 100  # the background is at most 40 in every channel
        _, count = ndimage.label(objects)
        assert count == labels[3] + 1, caption
        mean_color = image[objects].mean(0)
        nearest = min(COLOR_NAMES, key=lambda c: np.abs(np.array(COLORS[c]) - mean_color).sum())
        assert nearest == COLOR_NAMES[labels[1]], caption
        rows, cols = np.nonzero(objects)
        side = {"left": cols.mean() < 16, "right": cols.mean() > 16, "top": rows.mean() < 16,
                "bottom": rows.mean() > 16}
        assert side[POSITIONS[labels[4]]], caption


def test_validation_captions_are_held_out():
    train = SyntheticScenes.build(SyntheticScenesConfig(split="train", num_samples=600))
    val = SyntheticScenes.build(SyntheticScenesConfig(split="validation", num_samples=100))
    assert set(val.captions).isdisjoint(train.captions)
    assert len(set(val.captions)) > 10
    from ppzoo.data.images import scene_combinations

    every = scene_combinations("all")
    assert len(every) == 3 * 4 * 2 * 3 * 4
    assert sorted(scene_combinations("train") + scene_combinations("validation")) == sorted(every)


def test_digits_are_the_real_scikit_learn_digits():
    from sklearn.datasets import load_digits

    digits = HandwrittenDigits.build(HandwrittenDigitsConfig(split="validation"))
    reference = load_digits()
    assert len(digits) == len(range(0, len(reference.target), 5))
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for i in (0, 7, 100):
        assert digits.labels[i][0] == reference.target[5 * i]
        assert digits.captions[i].split()[-1] == words[reference.target[5 * i]]
        assert digits.captions[i].split()[1] == COLOR_NAMES[digits.labels[i][1]]


def test_generator_trains_on_the_captioned_digits():
    digits = HandwrittenDigits.build(HandwrittenDigitsConfig(split="validation"))
    module = small_module()
    first = module.training_step(batch_of(digits, 8))
    optimizer = paddle.optimizer.Adam(1e-2, parameters=module.parameters())
    for _ in range(3):
        losses = module.training_step(batch_of(digits, 8))
        losses["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    assert float(module.training_step(batch_of(digits, 8))["i2t"]) < float(first["i2t"])
    assert module.text_tokenizer.decode(digits[0]["text_ids"]) == digits.captions[0]


def test_image_files_load_resized_and_bad_ones_are_clear_errors(tmp_path):
    from PIL import Image

    from ppzoo.data.images import load_image_file, to_uint8

    big = np.zeros((64, 64, 3), dtype=np.uint8)
    big[:, 32:] = (220, 40, 40)  # right half red
    Image.fromarray(big).save(tmp_path / "big.png")
    image = load_image_file(tmp_path / "big.png")
    assert image.shape == (3, 32, 32)
    assert (to_uint8(image)[:, 16:] == (220, 40, 40)).all() and (to_uint8(image)[:, :16] == 0).all()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        load_image_file(tmp_path / "broken.png")


def test_caption_tokenizer_round_trip_and_errors():
    tokenizer = CaptionTokenizer()
    caption = scene_caption("triangle", "blue", "large", "three", "bottom")
    ids = tokenizer.encode(caption, 10)
    assert len(ids) == 10 and ids[len(caption.split())] == tokenizer.EOS
    assert tokenizer.decode(ids) == caption
    with pytest.raises(DataError, match="purple"):
        tokenizer.encode("two purple circles")


# ---------------------------------------------------------------------------------------------------------
# VQ-VAE


def test_straight_through_gradient_is_identity():
    z = paddle.randn([4, 8])
    z.stop_gradient = False
    q = paddle.randn([4, 8])
    weights = paddle.randn([4, 8])
    out = straight_through(z, q)
    np.testing.assert_allclose(out.numpy(), q.numpy(), rtol=1e-6, atol=1e-6)
    (out * weights).sum().backward()
    np.testing.assert_allclose(z.grad.numpy(), weights.numpy(), rtol=1e-6)


def test_quantizer_picks_nearest_code_and_passes_gradient_through():
    paddle.seed(0)
    quantizer = VectorQuantizer(VQVAEConfig(code_dim=4, codebook_size=16, codebook_update="loss"))
    quantizer.eval()  # no seeding or restarts: the codebook stays as initialized
    z = paddle.randn([2, 4, 3, 3]) * 0.05
    z.stop_gradient = False
    quantized, codes, _ = quantizer(z)
    flat = z.numpy().transpose(0, 2, 3, 1).reshape(-1, 4)
    book = quantizer.codebook.numpy()
    expected = ((flat[:, None, :] - book[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(codes.numpy().reshape(-1), expected)
    np.testing.assert_allclose(quantized.numpy().transpose(0, 2, 3, 1).reshape(-1, 4), book[expected], atol=1e-6)
    quantized.sum().backward()
    np.testing.assert_allclose(z.grad.numpy(), np.ones(z.shape), rtol=1e-6)


def test_ema_codebook_update_matches_numpy():
    rng = np.random.default_rng(0)
    k, d, n, decay, eps = 6, 3, 40, 0.9, 1e-5
    flat = rng.normal(size=(n, d)).astype("float32")
    codes = rng.integers(0, k - 1, size=n)  # the last code gets nothing this step
    size = rng.uniform(0.5, 3, size=k).astype("float32")
    embed_sum = rng.normal(size=(k, d)).astype("float32")

    ref_size, ref_sum = size.copy(), embed_sum.copy()
    counts = np.bincount(codes, minlength=k)
    sums = np.zeros((k, d))
    for i, c in enumerate(codes):
        sums[c] += flat[i]
    ref_size = decay * ref_size + (1 - decay) * counts
    ref_sum = decay * ref_sum + (1 - decay) * sums
    total = ref_size.sum()
    ref_book = ref_sum / ((ref_size + eps) / (total + k * eps) * total)[:, None]

    counts_t, sums_t = code_statistics(paddle.to_tensor(flat), paddle.to_tensor(codes), k)
    np.testing.assert_allclose(counts_t.numpy(), counts)
    np.testing.assert_allclose(sums_t.numpy(), sums, rtol=1e-5, atol=1e-6)
    new_size, new_sum, book = ema_codebook_update(
        counts_t, sums_t, paddle.to_tensor(size), paddle.to_tensor(embed_sum), decay, eps)
    np.testing.assert_allclose(new_size.numpy(), ref_size, rtol=1e-5)
    np.testing.assert_allclose(new_sum.numpy(), ref_sum, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(book.numpy(), ref_book, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The bidirectional generator


def test_seq2seq_mask_pattern():
    """Prefix of 3 (bidirectional), then 3 causal positions; key 1 is a pad."""
    valid = paddle.to_tensor([[True, False, True, True, True, True]])
    expected = np.array([
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 0, 1, 1, 1, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(seq2seq_allowed(3, valid).numpy()[0], expected)


def test_direction_masks_in_the_model(scenes):
    """Text-to-image: the caption is read bidirectionally and image codes causally; image-to-text: the other
    way round. Checked by what a change of one token can and cannot affect."""
    module = small_module()
    module.eval()
    gen, pad = module.generator, CaptionTokenizer.PAD
    batch = batch_of(scenes, 2)
    text, codes = batch["text_ids"], module.image_codes(batch["image"])
    codes_changed = codes.clone()
    codes_changed[:, 40] = (codes[:, 40] + 1) % 32
    with paddle.no_grad():
        logits, hidden = gen.text_to_image(text, codes, pad)
        logits2, hidden2 = gen.text_to_image(text, codes_changed, pad)
        # logits[:, j] predicts code j+1 having read codes < j+1: a change at code 40 (index 40) shows from
        # logits index 41 on, never before.
        np.testing.assert_allclose(logits[:, :41].numpy(), logits2[:, :41].numpy(), atol=1e-5)
        assert np.abs(logits[:, 41:].numpy() - logits2[:, 41:].numpy()).max() > 1e-4
        # image-to-text: the image is the bidirectional condition, so the same change reaches every word.
        words = gen.image_to_text(codes, text, pad)
        words2 = gen.image_to_text(codes_changed, text, pad)
        assert np.abs(words[:, 0].numpy() - words2[:, 0].numpy()).max() > 1e-4
        # ... while words are causal: changing word 3 leaves the predictions of words 1..3 alone.
        text_changed = text.clone()
        text_changed[:, 2] = (text[:, 2] + 1) % CaptionTokenizer().vocab_size + 2
        words3 = gen.image_to_text(codes, text_changed, pad)
        np.testing.assert_allclose(words[:, :3].numpy(), words3[:, :3].numpy(), atol=1e-5)
        assert np.abs(words[:, 3:].numpy() - words3[:, 3:].numpy()).max() > 1e-4
        # text-to-image: the caption is bidirectional, so its last word changes the first image prediction.
        logits3, _ = gen.text_to_image(text_changed, codes, pad)
        assert np.abs(logits[:, 0].numpy() - logits3[:, 0].numpy()).max() > 1e-4


@pytest.mark.parametrize("mode", ["end_to_end", "two_stage"])
def test_reconstruction_gradient_reaches_generator_only_end_to_end(scenes, mode):
    module = small_module(mode)
    losses = module.training_step(batch_of(scenes, 4))
    for name in ("t2i", "i2t", "reconstruction"):
        assert np.isfinite(float(losses[name]))
    losses["reconstruction"].backward()  # the reconstruction loss alone
    generator_grads = [p.grad for p in module.generator_parameters() if p.grad is not None]
    total = sum(float((g * g).sum()) for g in generator_grads)
    decoder_grads = [p.grad for p in module.vqvae.decoder.parameters() if p.grad is not None]
    if mode == "end_to_end":
        assert total > 0 and decoder_grads  # it trains the decoder and reaches the generator
        assert float(losses["loss"]) == pytest.approx(
            float(losses["t2i"]) + float(losses["i2t"]) + float(losses["reconstruction"]), rel=1e-5)
    else:
        assert total == 0.0 and not decoder_grads  # frozen decoder, no path to the generator
        assert float(losses["loss"]) == pytest.approx(float(losses["t2i"]) + float(losses["i2t"]), rel=1e-5)
    assert all(p.grad is None for p in module.vqvae.encoder.parameters())


def test_recompute_of_the_generator_blocks_gives_the_same_gradients(scenes):
    from ppzoo.core.recompute import apply_recompute

    batch = batch_of(scenes, 4)

    def gradients(recompute):
        module = small_module(seed=1)
        if recompute:
            apply_recompute(module.recompute_units())
        module.training_step(batch)["loss"].backward()
        return {name: p.grad.numpy() for name, p in module.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and len(plain) > 20
    for name in plain:
        np.testing.assert_allclose(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Generation


def test_cached_sampling_matches_teacher_forced_logits(scenes):
    """With top_k = 1 sampling is argmax: each cached step's code must be the argmax of the full
    (uncached) text-to-image pass over the generated sequence."""
    module = small_module()
    module.eval()
    text = batch_of(scenes, 3)["text_ids"]
    codes = sample_codes(module, text, ImageSampling(top_k=1))
    with paddle.no_grad():
        logits, _ = module.generator.text_to_image(text, codes, CaptionTokenizer.PAD)
    np.testing.assert_array_equal(logits.argmax(-1).numpy(), codes.numpy())


def test_reranking_keeps_the_candidate_the_caption_fits_best(scenes):
    module = small_module()
    module.eval()
    captions = scenes.captions[:2]
    result = text_to_image(module, captions, ImageSampling(num_candidates=3, seed=5))
    assert result["images"].shape == (2, 3, 32, 32)
    assert np.abs(result["images"]).max() <= 1.0
    text = paddle.to_tensor(np.stack([scenes.tokenizer.encode(c, 10) for c in captions]))
    again = caption_log_likelihood(module, paddle.to_tensor(result["codes"]), text).numpy()
    np.testing.assert_allclose(again, result["scores"], rtol=1e-4)
    np.testing.assert_allclose(result["scores"], result["candidate_scores"].max(1), rtol=1e-6)
    # the same seed gives the same images
    np.testing.assert_array_equal(text_to_image(module, captions, ImageSampling(num_candidates=3, seed=5))["codes"],
                                  result["codes"])


def test_beam_one_is_greedy_and_wider_beams_score_at_least_as_high(scenes):
    module = small_module(seed=2)
    module.eval()
    codes = module.image_codes(batch_of(scenes, 6)["image"])
    greedy = caption_greedy(module, codes)
    beam1, _ = caption_beam(module, codes, beam_size=1)
    np.testing.assert_array_equal(greedy.numpy(), beam1.numpy())
    beam4, scores4 = caption_beam(module, codes, beam_size=4)
    greedy_scores = caption_log_likelihood(module, codes, greedy).numpy()
    np.testing.assert_allclose(caption_log_likelihood(module, codes, beam4).numpy(), scores4.numpy(), rtol=1e-4)
    assert (scores4.numpy() >= greedy_scores - 1e-4).all()


# ---------------------------------------------------------------------------------------------------------
# Metrics


def test_bleu_by_hand():
    caption = "two small red circles on the left"
    assert corpus_bleu([caption], [caption]) == pytest.approx(1.0)
    assert corpus_bleu(["two red circles"], ["two red circles"]) == 0.0  # no 4-gram at all
    assert corpus_bleu(["a b c d"], ["e f g h"]) == 0.0
    # 6 of 6 unigrams, 4 of 5 bigrams ("at top" is not in the reference), 3 of 4 trigrams; the hypothesis has
    # 6 words against 7, so the brevity penalty is exp(1 - 7/6).
    hyp, ref = "one small red circle at top", "one small red circle at the top"
    expected = (1.0 * 4 / 5 * 3 / 4) ** (1 / 3) * np.exp(1 - 7 / 6)
    assert corpus_bleu([hyp], [ref], max_n=3) == pytest.approx(expected)
    # corpus level: counts are summed over sentences before the precisions are taken
    assert corpus_bleu([hyp, caption], [ref, caption], max_n=3) == pytest.approx(
        (13 / 13 * 10 / 11 * 8 / 9) ** (1 / 3) * np.exp(1 - 14 / 13))


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 5))
    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_attribute_accuracy():
    labels = [[0, 1, 0, 2, 3], [1, 1, 1, 1, 1]]
    result = attribute_accuracy([[0, 1, 0, 2, 3], [1, None, 1, 1, 0]], labels)
    assert result == {"shape": 1.0, "color": 0.5, "size": 1.0, "count": 1.0, "position": 0.5, "all": 0.5}


# ---------------------------------------------------------------------------------------------------------
# Through the engine and the tools


def write_yaml(path, base, sections):
    path.write_text(yaml.safe_dump({"_base_": str(base), **sections}, sort_keys=False))
    return path


def shrink(output_dir, steps):
    return {
        "Global": {"device": "cpu", "global_batch_size": 8, "micro_batch_size": 8},
        "Engine": {"max_steps": steps, "output_dir": str(output_dir), "logging_freq": 1, "eval_freq": 0,
                   "eval_iters": 1, "save_steps": 0, "progress_bar": False},
        "Data": {"Train": {"dataset": "SyntheticScenes", "num_samples": 32},
                 "Eval": {"dataset": "SyntheticScenes", "split": "validation", "num_samples": 8}},
        "Optimizer": {"lr": {"warmup_steps": 1}},
    }


@pytest.fixture(scope="module")
def trained_vilg(tmp_path_factory):
    """A VQVAE trained through the engine, then an end-to-end ErnieViLG on top of it."""
    root = tmp_path_factory.mktemp("vilg")
    vq_sections = shrink(root / "vqvae", 6)
    vq_sections["Model"] = SMALL_VQ
    vq_config = write_yaml(root / "vqvae.yaml", CONFIGS / "tiny_vqvae.yaml", vq_sections)
    vq_summary = Engine(load_config(vq_config)).fit()
    sections = shrink(root / "vilg", 6)
    sections["Model"] = {**SMALL_VILG, "tokenizer_checkpoint": str(root / "vqvae"), "vqvae": SMALL_VQ}
    config = write_yaml(root / "vilg.yaml", CONFIGS / "tiny.yaml", sections)
    engine = Engine(load_config(config))
    summary = engine.fit()
    return {"root": root, "vq_summary": vq_summary, "summary": summary, "engine": engine, "config": config}


def test_tokenizer_and_generator_train_through_the_engine(trained_vilg):
    assert np.isfinite(trained_vilg["vq_summary"]["eval_psnr"])
    records = [json.loads(line) for line in open(Path(trained_vilg["summary"]["output_dir"]) / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"t2i", "i2t", "reconstruction", "psnr"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]
    # the generator started from the trained tokenizer: its encoder weights are the VQVAE checkpoint's
    vq_state = paddle.load(str(Path(trained_vilg["vq_summary"]["checkpoint"]) / "model.mp0.pdparams"))
    module = trained_vilg["engine"].module
    np.testing.assert_array_equal(module.vqvae.encoder.down[0].weight.numpy(),
                                  vq_state["vqvae.encoder.down.0.weight"].numpy())


def test_caption_length_must_match_the_model(scenes):
    longer = SyntheticScenes.build(SyntheticScenesConfig(num_samples=4, max_text_len=12))
    with pytest.raises(DataError, match="max_text_len"):
        small_module().training_step(batch_of(longer, 2))


def test_tensor_parallel_is_refused_with_the_reason():
    from ppzoo.distributed.env import ParallelEnv
    from ppzoo.errors import ConfigError

    config = ErnieViLGConfig(vqvae=VQVAEConfig(**SMALL_VQ), **SMALL_VILG)
    with pytest.raises(ConfigError, match="sharding_degree"):
        ErnieViLGModule(config, ParallelEnv(world_size=2, mp_size=2))


def test_mismatched_tokenizer_checkpoint_is_a_clear_error(trained_vilg):
    cfg = load_config(trained_vilg["config"], ["Model.vqvae.codebook_size=64"])
    with pytest.raises(CheckpointError, match="codebook_size"):
        ErnieViLGModule(cfg.Model)


def test_infer_tool_writes_pngs_and_captions_them(trained_vilg):
    ckpt = trained_vilg["summary"]["output_dir"]
    out = trained_vilg["root"] / "samples"
    captions = ["two small red circles on the left", "one large blue square at the top"]
    prompts = trained_vilg["root"] / "prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    done = run_tool("infer", ["--ckpt", ckpt, "--prompts", prompts, "--out", out, "--candidates", "2"])
    assert done.returncode == 0, done.stderr
    result = last_json_line(done.stdout)
    files = [o["image"] for o in result["outputs"]]
    assert [o["prompt"] for o in result["outputs"]] == captions and all(Path(f).is_file() for f in files)
    from PIL import Image

    assert Image.open(files[0]).size == (32, 32)
    done = run_tool("infer", ["--ckpt", ckpt, "--image", files[0], "--image", files[1], "--beam", "2"])
    assert done.returncode == 0, done.stderr
    outputs = last_json_line(done.stdout)["outputs"]
    assert [o["image"] for o in outputs] == files and all(isinstance(o["caption"], str) for o in outputs)
    bad = run_tool("infer", ["--ckpt", ckpt, "--prompt", "a purple elephant"])
    assert bad.returncode == 2 and "purple" in bad.stderr


def test_vqvae_data_parallel_matches_single_process(tmp_path):
    """dp=2 over gloo (micro 4 per rank) trains the tokenizer like one process on the global batch of 8: the
    codebook statistics are summed over the ranks and restarts draw from the whole global batch."""
    sections = shrink(tmp_path / "single", 4)
    # rarely used codes restart from the second step on, so restarts are part of what must match
    sections["Model"] = {**SMALL_VQ, "usage_decay": 0.5, "restart_below": 8.0}
    sections["Data"].pop("Eval")
    config = write_yaml(tmp_path / "vqvae.yaml", CONFIGS / "tiny_vqvae.yaml", sections)
    Engine(load_config(config)).fit()
    run_launch([REPO_ROOT / "tools" / "train.py", "-c", config, "-o", f"Engine.output_dir={tmp_path / 'dp2'}",
                "-o", "Distributed.dp_degree=2", "-o", "Global.micro_batch_size=4"], nproc=2, log_dir=tmp_path / "log")
    single, parallel = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "dp2")
    assert [r["step"] for r in parallel] == [1, 2, 3, 4]
    for a, b in zip(single, parallel):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a, b)
    ours = paddle.load(str(tmp_path / "dp2" / "step_00000004" / "model.mp0.pdparams"))
    reference = paddle.load(str(tmp_path / "single" / "step_00000004" / "model.mp0.pdparams"))
    assert "vqvae.quantizer.codebook" in reference and "vqvae.quantizer.usage" in reference
    for name, value in reference.items():
        np.testing.assert_allclose(ours[name].numpy(), value.numpy(), rtol=0, atol=1e-5, err_msg=name)
