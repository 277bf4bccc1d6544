"""ERNIE-ViLG: a VQ-VAE image tokenizer and one transformer for text-to-image and image-to-text.

Modules (registered): "VQVAE" (the image tokenizer) and "ErnieViLG" (the bidirectional generator, trained
end to end with the image decoder or in two stages). Generation: text_to_image, caption_images.
"""
from ppzoo.data import images as _images  # noqa: F401  (registers SyntheticScenes, HandwrittenDigits)
from ppzoo.models.ernie_vilg.attribute_classifier import SceneAttributeClassifier
from ppzoo.models.ernie_vilg.generation import ImageSampling, caption_images, text_to_image
from ppzoo.models.ernie_vilg.module import (
    ErnieViLGConfig, ErnieViLGModule, load_vilg_for_inference,
)
from ppzoo.models.ernie_vilg.vqvae import VQVAEConfig, VQVAEModule

__all__ = [
    "ErnieViLGConfig", "ErnieViLGModule", "ImageSampling", "SceneAttributeClassifier", "VQVAEConfig", "VQVAEModule",
    "caption_images", "load_vilg_for_inference", "text_to_image",
]
