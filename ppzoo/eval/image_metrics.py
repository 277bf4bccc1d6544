"""Image and caption metrics for ERNIE-ViLG on the synthetic scenes, where every attribute is known.

- attribute accuracy of generated images: a SceneAttributeClassifier (trained on other synthetic scenes)
  reads each generated image's shape, color, size, count and position; the score is the share that match the
  caption the image was generated from (per attribute, and all five at once);
- FID (Heusel et al. 2017) between generated and real held-out images, on that classifier's penultimate
  features instead of Inception's (which would need downloaded weights and 299x299 inputs);
- caption attribute accuracy (the caption parsed back into attributes) and corpus BLEU-4 (Papineni et al.
  2002) against the reference caption;
- PSNR of reconstructions.
"""
import math
from collections import Counter

import numpy as np
import paddle

from ppzoo.data.images import ATTRIBUTE_NAMES, parse_scene_caption

# ------------------------------------------------------------------------------------------ pure metrics


def psnr(images, references):
    """Mean PSNR (dB) of images against references, both in [-1, 1] (computed on the [0, 1] scale)."""
    a = (np.clip(np.asarray(images, dtype=np.float64), -1, 1) + 1) / 2
    b = (np.asarray(references, dtype=np.float64) + 1) / 2
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def frechet_distance(features_a, features_b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets [n, d].

    tr((S_a S_b)^(1/2)) is computed as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD matrix with the
    same eigenvalues as S_a S_b, so only symmetric eigendecompositions are needed."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def corpus_bleu(hypotheses, references, max_n=4):
    """Corpus BLEU of whitespace-tokenized hypotheses, one reference each: the geometric mean of the
    clipped n-gram precisions (n = 1..max_n, counts summed over the corpus) times the brevity penalty
    exp(1 - r / c) when the hypotheses are shorter (c) than the references (r). 0 when a precision is 0."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            h_grams = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            r_grams = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(count, r_grams[g]) for g, count in h_grams.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def attribute_accuracy(predicted, labels):
    """{attribute: share correct, "all": share with every attribute correct} of [n, 5] index arrays
    (None or -1 entries in `predicted` count as wrong)."""
    predicted = np.asarray([[(-1 if v is None else v) for v in row] for row in predicted], dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    correct = predicted == labels
    result = {name: float(correct[:, i].mean()) for i, name in enumerate(ATTRIBUTE_NAMES)}
    result["all"] = float(correct.all(1).mean())
    return result


def caption_attributes(captions):
    """[n, 5] attribute indices parsed from scene captions (None where a caption does not state one)."""
    return [[parse_scene_caption(c)[name] for name in ATTRIBUTE_NAMES] for c in captions]


# ------------------------------------------------------------------------------------------ with models


@paddle.no_grad()
def classify(classifier, images, batch_size=128):
    """(predicted attributes [n, 5], features [n, feature_dim]) of images [n, 3, H, W] in [-1, 1]."""
    classifier.eval()
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        x = paddle.to_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))
        predictions.append(classifier.predict(x).numpy())
        features.append(classifier.embed(x).numpy())
    return np.concatenate(predictions), np.concatenate(features)


@paddle.no_grad()
def reconstruction_psnr(module, images, text_ids, batch_size=64):
    """PSNR of the module's images of the true codes (decoded by its mode: hidden states end to end,
    codebook vectors in two stages) and of the tokenizer alone (codebook vectors through its decoder)."""
    from ppzoo.models.ernie_vilg.generation import render

    ours, tokenizer = [], []
    for start in range(0, len(images), batch_size):
        x = paddle.to_tensor(images[start:start + batch_size])
        ids = paddle.to_tensor(text_ids[start:start + batch_size])
        codes = module.image_codes(x)
        ours.append(render(module, ids, codes).numpy())
        tokenizer.append(module.decode_codes(codes).numpy())
    return psnr(np.concatenate(ours), images), psnr(np.concatenate(tokenizer), images)


def evaluate_vilg(module, classifier, dataset, num_samples=64, sampling=None, beam_size=3, batch_size=16):
    """All measurements of a ViLG module on the first num_samples pairs of `dataset` (held-out scenes).

    Returns a dict of scalars and `samples` (captions, generated images) for grids."""
    from ppzoo.models.ernie_vilg.generation import caption_images, text_to_image

    module.eval()
    n = min(num_samples, len(dataset))
    images = np.stack([dataset[i]["image"] for i in range(n)])
    text_ids = np.stack([dataset[i]["text_ids"] for i in range(n)])
    captions, labels = dataset.captions[:n], dataset.labels[:n]

    generated = []
    for start in range(0, n, batch_size):
        generated.append(text_to_image(module, captions[start:start + batch_size], sampling)["images"])
    generated = np.concatenate(generated)
    predicted, fake_features = classify(classifier, generated)
    real_predicted, real_features = classify(classifier, images)

    greedy, beam = [], []
    for start in range(0, n, batch_size):
        greedy += caption_images(module, images[start:start + batch_size], beam_size=1)
        beam += caption_images(module, images[start:start + batch_size], beam_size=beam_size)
    model_psnr, tokenizer_psnr = reconstruction_psnr(module, images, text_ids)
    return {
        "t2i_attribute_accuracy": attribute_accuracy(predicted, labels),
        "classifier_accuracy_on_real": attribute_accuracy(real_predicted, labels),
        "fid": frechet_distance(fake_features, real_features),
        "caption_greedy_attribute_accuracy": attribute_accuracy(caption_attributes(greedy), labels),
        "caption_beam_attribute_accuracy": attribute_accuracy(caption_attributes(beam), labels),
        "bleu_greedy": corpus_bleu(greedy, captions),
        "bleu_beam": corpus_bleu(beam, captions),
        "reconstruction_psnr": model_psnr,
        "tokenizer_psnr": tokenizer_psnr,
        "num_samples": n,
        "samples": {"captions": list(captions), "generated": generated, "real": images,
                    "greedy_captions": greedy, "beam_captions": beam},
    }
