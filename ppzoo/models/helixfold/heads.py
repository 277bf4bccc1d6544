"""Output heads (AF2 supplement 1.9): distogram, masked MSA, pLDDT and experimentally resolved."""
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.models.helixfold.primitives import Linear


class DistogramHead(nn.Layer):
    """Pair -> logits over distogram_bins distance bins [B, N, N, bins], symmetric in i and j."""

    def __init__(self, cfg):
        super().__init__()
        self.logits = Linear(cfg.pair_channel, cfg.distogram_bins, init="final")

    def forward(self, pair):
        logits = self.logits(pair)
        return logits + logits.transpose([0, 2, 1, 3])


class MaskedMSAHead(nn.Layer):
    """MSA -> logits over the 23 MSA classes at every position [B, S, N, 23] (BERT-style reconstruction)."""

    def __init__(self, cfg):
        super().__init__()
        self.logits = Linear(cfg.msa_channel, cfg.extra_msa_classes, init="final")

    def forward(self, msa):
        return self.logits(msa)


class PLDDTHead(nn.Layer):
    """The structure module's single -> logits over plddt_bins bins of the per-residue lDDT-Ca [B, N, bins]."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.single_channel)
        self.hidden1 = Linear(cfg.single_channel, cfg.plddt_hidden, init="relu")
        self.hidden2 = Linear(cfg.plddt_hidden, cfg.plddt_hidden, init="relu")
        self.logits = Linear(cfg.plddt_hidden, cfg.plddt_bins, init="final")

    def forward(self, single):
        return self.logits(F.relu(self.hidden2(F.relu(self.hidden1(self.norm(single))))))


def plddt_from_logits(logits):
    """Expected lDDT-Ca (0..100) from pLDDT logits [..., bins] with equal-width bins over [0, 1]."""
    bins = logits.shape[-1]
    centers = paddle.arange(bins, dtype=logits.dtype) / bins + 0.5 / bins
    return (F.softmax(logits, axis=-1) * centers).sum(axis=-1) * 100.0


class ExperimentallyResolvedHead(nn.Layer):
    """The Evoformer's single -> logits that each of the 37 atom types was resolved [B, N, 37]."""

    def __init__(self, cfg):
        super().__init__()
        self.logits = Linear(cfg.single_channel, 37, init="final")

    def forward(self, single):
        return self.logits(single)
