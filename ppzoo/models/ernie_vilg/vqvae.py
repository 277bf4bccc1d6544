"""The image tokenizer: a VQ-VAE (van den Oord et al. 2017) turning a 32x32 image into an 8x8 grid of codes.

encoder (two stride-2 convolutions and a residual block) -> nearest codebook vector per cell -> decoder
(mirror image). The quantizer passes gradients straight through (the decoder's gradient at the quantized
vector is used as the encoder output's gradient) and adds the commitment loss beta * |z - sg(q)|^2. The
codebook itself learns either by exponential moving averages of the vectors assigned to each code
(`codebook_update: ema`, VQ-VAE-2 / Razavi et al. 2019, with Laplace smoothing of the counts) or by the
codebook loss |sg(z) - q|^2 through the optimizer (`codebook_update: loss`). The codebook starts from
encoder outputs of the first training batch, so no code starts far from the data, and a code that falls
out of use is restarted on a random encoder output of the current batch (as in Jukebox, Dhariwal et al.
2020); without restarts the codebook of the tiny model collapses to a few codes within 50 steps.

ERNIE-ViLG's generator predicts these codes; its end-to-end mode feeds its own hidden states to this
decoder instead of the codebook vectors (see model.py).
"""
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.core.module import Module
from ppzoo.registry import register_module


@dataclass
class VQVAEConfig:
    image_size: int = 32
    downsamples: int = 2  # stride-2 stages: the code grid is image_size / 2^downsamples on a side
    channels: int = 32  # width of the first conv stage; the later ones have 2x
    code_dim: int = 32
    codebook_size: int = 128
    commitment_beta: float = 0.25
    codebook_update: str = "ema"  # ema | loss
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    # A code whose running usage (codes per batch, EMA) falls below this is moved onto a random encoder
    # output of the current batch: without it most codes die early and the codebook collapses to a handful.
    restart_below: float = 0.5
    usage_decay: float = 0.95

    def __post_init__(self):
        if self.codebook_update not in ("ema", "loss"):
            raise ValueError(f"codebook_update must be ema or loss, got {self.codebook_update!r}")
        if self.downsamples < 1 or self.image_size % (2 ** self.downsamples):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2^downsamples "
                             f"(downsamples={self.downsamples} >= 1)")

    @property
    def grid_size(self):
        return self.image_size // 2 ** self.downsamples


class ResBlock(nn.Layer):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2D(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2D(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Layer):
    def __init__(self, config):
        super().__init__()
        c = config.channels
        widths = [3, c] + [2 * c] * (config.downsamples - 1)
        self.down = nn.LayerList([nn.Conv2D(widths[i], widths[i + 1], 4, stride=2, padding=1)
                                  for i in range(config.downsamples)])
        self.res = ResBlock(widths[-1])
        self.to_code = nn.Conv2D(widths[-1], config.code_dim, 1)

    def forward(self, images):
        x = images
        for i, conv in enumerate(self.down):
            x = conv(F.relu(x) if i else x)
        return self.to_code(F.relu(self.res(F.relu(x))))


class Decoder(nn.Layer):
    """[b, code_dim, g, g] -> [b, 3, g 2^downsamples, ...] images in about [-1, 1] (the encoder mirrored)."""

    def __init__(self, config):
        super().__init__()
        c = config.channels
        widths = [2 * c] * (config.downsamples - 1) + [c, 3]
        self.from_code = nn.Conv2D(config.code_dim, widths[0], 3, padding=1)
        self.res = ResBlock(widths[0])
        self.up = nn.LayerList([nn.Conv2DTranspose(widths[i], widths[i + 1], 4, stride=2, padding=1)
                                for i in range(config.downsamples)])

    def forward(self, codes):
        x = self.res(self.from_code(codes))
        for conv in self.up:
            x = conv(F.relu(x))
        return x


def straight_through(z, q):
    """Forward value q, gradient to z unchanged (d out / d z = identity): q is treated as z plus a constant."""
    return z + (q - z).detach()


def code_statistics(flat, codes, num_codes):
    """(n_k [K]: how many of the vectors flat [n, d] chose code k, sum of those vectors [K, d])."""
    one_hot = F.one_hot(codes, num_codes).astype(flat.dtype)  # [n, K]
    return one_hot.sum(0), paddle.matmul(one_hot, flat, transpose_x=True)


def ema_codebook_update(counts, sums, cluster_size, embed_sum, decay, epsilon):
    """One EMA step of the codebook from this batch's code_statistics (paddle tensors, no gradient).

    counts [K] and sums [K, d] of the batch; cluster_size [K] and embed_sum [K, d] the running averages.
    Returns (cluster_size, embed_sum, codebook):
        N_k <- decay N_k + (1 - decay) n_k,   m_k <- decay m_k + (1 - decay) sum_{i: code i = k} z_i,
        e_k = m_k / N~_k with Laplace-smoothed N~_k = (N_k + eps) / (N + K eps) * N,  N = sum_k N_k.
    """
    num_codes = cluster_size.shape[0]
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    embed_sum = decay * embed_sum + (1.0 - decay) * sums
    total = cluster_size.sum()
    smoothed = (cluster_size + epsilon) / (total + num_codes * epsilon) * total
    return cluster_size, embed_sum, embed_sum / smoothed.unsqueeze(1)


def _spans_ranks(group):
    return group is not None and group.nranks > 1


class VectorQuantizer(nn.Layer):
    """Nearest-code quantizer. Under data parallelism (`dp_group`) its codebook statistics are summed over
    the ranks and restarts draw from the whole global batch, so every rank keeps the same codebook and the
    updates equal those of one process training on the global batch."""

    def __init__(self, config, dp_group=None):
        super().__init__()
        self.config = config
        self.dp_group = dp_group
        k, d = config.codebook_size, config.code_dim
        init = paddle.uniform([k, d], min=-1.0 / k, max=1.0 / k)
        if config.codebook_update == "ema":
            self.register_buffer("codebook", init)
            self.register_buffer("ema_cluster_size", paddle.zeros([k]))
            self.register_buffer("ema_embed_sum", init.clone())
        else:
            self.codebook = self.create_parameter([k, d], default_initializer=nn.initializer.Assign(init))
        self.register_buffer("usage", paddle.full([k], float(config.restart_below) * 2))
        # 0 until the codebook is seeded from the first training batch; saved so a resume does not reseed.
        self.register_buffer("initialized", paddle.zeros([1]))

    def nearest(self, flat):
        """Index of the nearest codebook vector (squared L2) for each row of flat [n, d]."""
        e = self.codebook
        distance = (flat * flat).sum(1, keepdim=True) - 2 * paddle.matmul(flat, e, transpose_y=True) + (e * e).sum(1)
        return distance.argmin(axis=1)

    def lookup(self, codes):
        """codes [b, g, g] -> vectors [b, d, g, g]."""
        return F.embedding(codes, self.codebook).transpose([0, 3, 1, 2])

    def _global_batch(self, flat):
        """The rows of every data-parallel rank, in rank order (the sampler's order of the global batch)."""
        if not _spans_ranks(self.dp_group):
            return flat
        gathered = []
        dist.all_gather(gathered, flat, group=self.dp_group)
        return paddle.concat(gathered)

    def _summed_over_ranks(self, tensor):
        if _spans_ranks(self.dp_group):
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

    def _seed_codebook(self, flat):
        """Codebook <- encoder outputs of this batch (distinct rows, repeated when the batch has fewer)."""
        k = self.config.codebook_size
        picks = np.random.default_rng(0).permutation(flat.shape[0])
        picks = np.resize(picks, k)
        seeded = paddle.gather(flat.detach(), paddle.to_tensor(picks))
        self.codebook.set_value(seeded)
        if self.config.codebook_update == "ema":
            self.ema_cluster_size.set_value(paddle.ones([k]))
            self.ema_embed_sum.set_value(seeded)
        self.initialized.set_value(paddle.ones([1]))

    def _restart_dead_codes(self, flat, counts):
        """Track each code's usage (EMA of its count per global batch) and move unused codes onto vectors
        of the global batch `flat`."""
        k = self.config.codebook_size
        usage = self.config.usage_decay * self.usage + (1.0 - self.config.usage_decay) * counts
        dead = (usage < self.config.restart_below).astype(flat.dtype).unsqueeze(1)  # [K, 1]
        if float(dead.sum().item()) > 0:
            picks = paddle.randint(0, flat.shape[0], [k])
            fresh = paddle.gather(flat, picks)
            self.codebook.set_value(dead * fresh + (1.0 - dead) * self.codebook)
            if self.config.codebook_update == "ema":
                self.ema_embed_sum.set_value(dead * fresh + (1.0 - dead) * self.ema_embed_sum)
                self.ema_cluster_size.set_value(dead[:, 0] + (1.0 - dead[:, 0]) * self.ema_cluster_size)
            usage = dead[:, 0] * self.config.restart_below * 2 + (1.0 - dead[:, 0]) * usage
        self.usage.set_value(usage)

    def forward(self, z):
        """z [b, d, g, g] -> (straight-through quantized [b, d, g, g], codes [b, g, g], losses dict)."""
        b, d, g, _ = z.shape
        flat = z.transpose([0, 2, 3, 1]).reshape([-1, d])
        if self.training and float(self.initialized.item()) == 0.0:
            with paddle.no_grad():
                self._seed_codebook(self._global_batch(flat.detach()))
        codes = self.nearest(flat.detach())
        if self.training:
            with paddle.no_grad():
                counts, sums = code_statistics(flat.detach(), codes, self.config.codebook_size)
                counts, sums = self._summed_over_ranks(counts), self._summed_over_ranks(sums)
                if self.config.codebook_update == "ema":
                    size, embed_sum, codebook = ema_codebook_update(
                        counts, sums, self.ema_cluster_size, self.ema_embed_sum, self.config.ema_decay,
                        self.config.ema_epsilon)
                    self.ema_cluster_size.set_value(size)
                    self.ema_embed_sum.set_value(embed_sum)
                    self.codebook.set_value(codebook)
                self._restart_dead_codes(self._global_batch(flat.detach()), counts)
        q = F.embedding(codes, self.codebook)  # [n, d]
        losses = {"commitment": F.mse_loss(flat, q.detach())}
        if self.config.codebook_update == "loss":
            losses["codebook"] = F.mse_loss(flat.detach(), q)
        q = straight_through(flat, q)
        return q.reshape([b, g, g, d]).transpose([0, 3, 1, 2]), codes.reshape([b, g, g]), losses


def psnr(reconstruction, target):
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (computed on the [0, 1] scale), batch mean."""
    rec = (reconstruction.clip(-1.0, 1.0) + 1.0) / 2.0
    tgt = (target + 1.0) / 2.0
    mse = ((rec - tgt) ** 2).reshape([rec.shape[0], -1]).mean(1)
    return (10.0 * paddle.log10(1.0 / paddle.clip(mse, min=1e-10))).mean()


class VQVAE(nn.Layer):
    def __init__(self, config, dp_group=None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config, dp_group)
        self.decoder = Decoder(config)

    @paddle.no_grad()
    def encode(self, images):
        """images [b, 3, H, W] in [-1, 1] -> codes [b, g, g] (int64)."""
        z = self.encoder(images)
        b, d, g, _ = z.shape
        return self.quantizer.nearest(z.transpose([0, 2, 3, 1]).reshape([-1, d])).reshape([b, g, g])

    def decode_codes(self, codes):
        """codes [b, g, g] -> images [b, 3, H, W]."""
        return self.decoder(self.quantizer.lookup(codes))

    def forward(self, images):
        quantized, codes, losses = self.quantizer(self.encoder(images))
        return self.decoder(quantized), codes, losses


@register_module("VQVAE")
class VQVAEModule(Module):
    """Trains the image tokenizer: reconstruction MSE + beta * commitment (+ codebook loss without EMA)."""

    config_class = VQVAEConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        self.vqvae = VQVAE(config, parallel_env.dp_group if parallel_env is not None else None)

    def forward(self, batch):
        return self.training_step(batch)  # the Engine calls the (possibly data-parallel) module itself

    def _losses(self, batch):
        images = batch["image"]
        reconstruction, codes, vq = self.vqvae(images)
        reconstruction_loss = F.mse_loss(reconstruction, images)
        loss = reconstruction_loss + self.config.commitment_beta * vq["commitment"] + vq.get("codebook", 0.0)
        used = paddle.unique(codes.flatten()).shape[0]
        return {"loss": loss, "reconstruction": reconstruction_loss, "commitment": vq["commitment"],
                "psnr": psnr(reconstruction.detach(), images), "codes_used": float(used)}

    def training_step(self, batch):
        return self._losses(batch)

    def validation_step(self, batch):
        return self._losses(batch)

    def tokens_in_batch(self, batch):
        return int(batch["image"].shape[0]) * self.config.grid_size ** 2

    def input_spec(self):
        s = self.config.image_size
        return [paddle.static.InputSpec([None, 3, s, s], "float32", name="images")]
