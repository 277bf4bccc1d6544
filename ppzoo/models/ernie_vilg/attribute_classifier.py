"""A small CNN that reads the five attributes of a synthetic scene (shape, color, size, count, position).

It is the judge of the ERNIE-ViLG measurements (ppzoo/eval/image_metrics.py): its predictions on generated
images give their attribute accuracy, and its penultimate features stand in for Inception's in FID. Trained
through the engine on SyntheticScenes like any model (configs/ernie_vilg/tiny_classifier.yaml).
"""
from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.core.module import Module
from ppzoo.data.images import ATTRIBUTES
from ppzoo.registry import register_module


@dataclass
class SceneAttributeClassifierConfig:
    image_size: int = 32
    channels: int = 32
    feature_dim: int = 128


@register_module("SceneAttributeClassifier")
class SceneAttributeClassifier(Module):
    config_class = SceneAttributeClassifierConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        c = config.channels
        self.conv1 = nn.Conv2D(3, c, 3, padding=1)
        self.conv2 = nn.Conv2D(c, 2 * c, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2D(2 * c, 2 * c, 4, stride=2, padding=1)
        # Flattened, not pooled: count and position are where things are, which global pooling would lose.
        self.features = nn.Linear(2 * c * (config.image_size // 4) ** 2, config.feature_dim)
        self.heads = nn.LayerList([nn.Linear(config.feature_dim, len(values)) for values in ATTRIBUTES.values()])

    def embed(self, images):
        """Penultimate features [b, feature_dim] of images [b, 3, H, W] in [-1, 1] (FID's feature space)."""
        x = F.relu(self.conv1(images))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.relu(self.features(x.flatten(1)))

    def forward(self, batch):
        return self.training_step(batch)  # the Engine calls the (possibly data-parallel) module itself

    def logits(self, images):
        """A list of per-attribute logits, in ATTRIBUTES order."""
        features = self.embed(images)
        return [head(features) for head in self.heads]

    def predict(self, images):
        """Attribute indices [b, 5] (numpy-free tensor) of images."""
        return paddle.stack([logits.argmax(-1) for logits in self.logits(images)], axis=1)

    def _losses(self, batch):
        logits = self.logits(batch["image"])
        labels = batch["labels"]
        result, total = {}, 0.0
        for i, (name, head_logits) in enumerate(zip(ATTRIBUTES, logits)):
            total = total + F.cross_entropy(head_logits, labels[:, i:i + 1])
            result[f"acc_{name}"] = (head_logits.argmax(-1) == labels[:, i]).astype("float32").mean()
        result["loss"] = total
        return result

    def training_step(self, batch):
        return self._losses(batch)

    def validation_step(self, batch):
        with paddle.no_grad():
            return self._losses(batch)

    def tokens_in_batch(self, batch):
        return int(batch["image"].shape[0])  # images per step

    def input_spec(self):
        s = self.config.image_size
        return [paddle.static.InputSpec([None, 3, s, s], "float32", name="images")]
