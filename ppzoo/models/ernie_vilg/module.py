"""ERNIE-ViLG as an engine Module: the shared generator, the image tokenizer, and the two training modes.

Images become codes through a trained VQ-VAE (its checkpoint is `Model.tokenizer_checkpoint`, trained
through the engine as Module "VQVAE"); its encoder and codebook stay frozen. The loss of a batch is
L_t2i + L_i2t, both directions with the same parameters (model.py).

`training_mode: end_to_end` (the paper's method): the generator's last-layer hidden states at the image
positions are projected to the code dimension and fed to the image decoder in place of the codebook
vectors; the decoder's reconstruction error (MSE, weight `reconstruction_weight`) is added to the loss, so
its gradient trains the decoder and flows into the generator.
`training_mode: two_stage` (the ablation): the generator learns the codes only, and the VQ-VAE's decoder,
frozen, turns codebook vectors of the codes into images. The reconstruction loss is still reported, from
codebook vectors, and reaches no generator parameter.
"""
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.core import checkpoint as ckpt
from ppzoo.core.module import Module
from ppzoo.data.images import CaptionTokenizer
from ppzoo.errors import CheckpointError, ConfigError, DataError
from ppzoo.models.ernie_vilg.model import ViLGTransformer
from ppzoo.models.ernie_vilg.vqvae import VQVAE, VQVAEConfig, psnr
from ppzoo.registry import register_module

TRAINING_MODES = ("end_to_end", "two_stage")


@dataclass
class ErnieViLGConfig:
    text_vocab_size: int = 64  # at least the caption vocabulary (ppzoo.data.images.CaptionTokenizer)
    max_text_len: int = 10  # caption tokens incl. eos; Data's max_text_len must match
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 344
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    training_mode: str = "end_to_end"  # end_to_end | two_stage
    reconstruction_weight: float = 1.0  # end_to_end: weight of the decoder's MSE in the loss
    # The trained VQVAE checkpoint whose weights start the tokenizer (training only: a ViLG checkpoint holds
    # the tokenizer's weights itself). null: a randomly initialized tokenizer (tests).
    tokenizer_checkpoint: Optional[str] = None
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)  # must equal the tokenizer checkpoint's Model

    def __post_init__(self):
        if self.training_mode not in TRAINING_MODES:
            raise ValueError(f"training_mode must be one of {', '.join(TRAINING_MODES)}, got {self.training_mode!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        words = CaptionTokenizer().vocab_size
        if self.text_vocab_size < words:
            raise ValueError(f"text_vocab_size={self.text_vocab_size} is smaller than the caption vocabulary "
                             f"({words} tokens); set it to at least {words}")

    @property
    def end_to_end(self):
        return self.training_mode == "end_to_end"


def _strip_prefix(state, prefix):
    return {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}


def load_tokenizer_weights(vqvae, path, expected_config, where):
    """Load a VQVAE checkpoint's weights into `vqvae`, checking its architecture is the one configured."""
    path = ckpt.checkpoint_or_newest(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{where}={path}: no such checkpoint. Train the image tokenizer first "
                              "(tools/train.py -c configs/ernie_vilg/tiny_vqvae.yaml) and point it at its output.")
    ckpt.verify(path)
    saved = ckpt.read_trainer_state(path)["config"]["Model"]
    if saved.get("module") != "VQVAE":
        raise CheckpointError(f"{where}={path} is a {saved.get('module')} checkpoint, not a VQVAE image tokenizer.")
    expected = asdict(expected_config)
    differing = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    architecture = {"image_size", "downsamples", "channels", "code_dim", "codebook_size"}
    if differing.keys() & architecture:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}"
                            for k, (a, b) in differing.items() if k in architecture)
        raise CheckpointError(f"{where}={path} does not match Model.vqvae ({details}); copy the tokenizer "
                              "config's Model section into Model.vqvae.")
    state = _strip_prefix(paddle.load(os.path.join(path, "model.mp0.pdparams")), "vqvae.")
    vqvae.set_state_dict(state)
    return path


@register_module("ErnieViLG")
class ErnieViLGModule(Module):
    config_class = ErnieViLGConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        if parallel_env is not None and (parallel_env.mp_size > 1 or parallel_env.pp_size > 1):
            raise ConfigError(
                "ErnieViLG has no tensor- or pipeline-parallel layers: set Distributed.mp_degree and pp_degree to 1 "
                "and scale with dp_degree and sharding_degree (group sharding on GPU) instead.")
        self.text_tokenizer = CaptionTokenizer()
        self.vqvae = VQVAE(config.vqvae)
        if config.tokenizer_checkpoint:
            load_tokenizer_weights(self.vqvae, config.tokenizer_checkpoint, config.vqvae, "Model.tokenizer_checkpoint")
        self.generator = ViLGTransformer(config)
        frozen = [self.vqvae.encoder, self.vqvae.quantizer]
        if config.end_to_end:
            # Hidden states -> the decoder's input space (the codebook vectors' dimension).
            self.to_decoder = nn.Linear(config.hidden_size, config.vqvae.code_dim)
        else:
            frozen.append(self.vqvae.decoder)
        for layer in frozen:
            for param in layer.parameters():
                param.stop_gradient = True

    def forward(self, batch):
        return self.training_step(batch)  # the Engine calls the (possibly data-parallel) module itself

    # ------------------------------------------------------------------------------------- pieces
    def image_codes(self, images):
        """images [b, 3, H, W] -> flattened codes [b, N] (frozen tokenizer)."""
        return self.vqvae.encode(images).reshape([images.shape[0], -1])

    def decode_hidden(self, hidden):
        """End-to-end decoding: generator hidden states at the image positions [b, N, d] -> images."""
        b, n, _ = hidden.shape
        g = self.config.vqvae.grid_size
        return self.vqvae.decoder(self.to_decoder(hidden).transpose([0, 2, 1]).reshape([b, -1, g, g]))

    def decode_codes(self, codes):
        """Two-stage decoding: codes [b, N] -> codebook vectors -> images."""
        g = self.config.vqvae.grid_size
        return self.vqvae.decode_codes(codes.reshape([codes.shape[0], g, g]))

    def images_from(self, codes, hidden):
        """The images of generated or encoded codes, by the configured mode (hidden: their t2i states)."""
        return self.decode_hidden(hidden) if self.config.end_to_end else self.decode_codes(codes)

    def losses(self, batch):
        images, text_ids = batch["image"], batch["text_ids"]
        if text_ids.shape[1] != self.config.max_text_len or images.shape[-1] != self.config.vqvae.image_size:
            raise DataError(
                f"The batch has captions of {text_ids.shape[1]} tokens and {images.shape[-1]}-pixel images, but "
                f"Model.max_text_len is {self.config.max_text_len} and Model.vqvae.image_size "
                f"{self.config.vqvae.image_size}; set the datasets' max_text_len (Data.Train / Data.Eval) to "
                "Model.max_text_len.")
        pad = self.text_tokenizer.PAD
        codes = self.image_codes(images)
        image_logits, image_hidden = self.generator.text_to_image(text_ids, codes, pad)
        loss_t2i = F.cross_entropy(image_logits, codes.unsqueeze(-1)).mean()
        text_logits = self.generator.image_to_text(codes, text_ids, pad)
        loss_i2t = F.cross_entropy(text_logits, text_ids.unsqueeze(-1), ignore_index=pad).mean()
        reconstruction = self.images_from(codes, image_hidden)
        loss_rec = F.mse_loss(reconstruction, images)
        loss = loss_t2i + loss_i2t
        if self.config.end_to_end:
            loss = loss + self.config.reconstruction_weight * loss_rec
        return {"loss": loss, "t2i": loss_t2i, "i2t": loss_i2t, "reconstruction": loss_rec,
                "psnr": psnr(reconstruction.detach(), images)}

    def training_step(self, batch):
        return self.losses(batch)

    def validation_step(self, batch):
        with paddle.no_grad():
            return self.losses(batch)

    def recompute_units(self):
        return list(self.generator.blocks)

    def generator_parameters(self):
        return list(self.generator.parameters())

    def tokens_in_batch(self, batch):
        per_pair = self.config.max_text_len + self.config.vqvae.grid_size ** 2 + 2
        return 2 * int(batch["text_ids"].shape[0]) * per_pair  # both directions

    def input_spec(self):
        s = self.config.vqvae.image_size
        return [paddle.static.InputSpec([None, 3, s, s], "float32", name="image"),
                paddle.static.InputSpec([None, self.config.max_text_len], "int64", name="text_ids")]


def load_vilg_for_inference(path):
    """(ErnieViLG module in eval mode, its config) from a checkpoint or a run directory (its newest).

    The tokenizer's weights come from the ViLG checkpoint itself, so Model.tokenizer_checkpoint is not read
    (it may be gone by now)."""
    from ppzoo.config import config_from_dict

    path = ckpt.checkpoint_or_newest(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory (expected output_dir/step_XXXXXXXX).")
    ckpt.verify(path)
    state = ckpt.read_trainer_state(path)
    data = state["config"]
    if data.get("Model", {}).get("module") != "ErnieViLG":
        raise CheckpointError(f"{path} is a {data.get('Model', {}).get('module')} checkpoint, not ErnieViLG.")
    data["Model"]["tokenizer_checkpoint"] = None
    cfg = config_from_dict(data, source=os.path.join(path, ckpt.TRAINER_STATE))
    module = ErnieViLGModule(cfg.Model)
    module.set_state_dict(paddle.load(os.path.join(path, "model.mp0.pdparams")))
    module.eval()
    return module, cfg
