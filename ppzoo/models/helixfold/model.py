"""AlphaFold2 (HelixFold's model): one iteration embeds the features, runs templates, the extra MSA stack,
the Evoformer, the structure module and the heads; recycling feeds an iteration's first MSA row, pair and
predicted positions into the next (AF2 supplement 1.10, Algorithms 2 and 31).

The batch follows ppzoo.data.protein's contract (leading batch dimension B, N residues, S MSA clusters,
E extra sequences, T templates).
"""
import contextlib

import paddle
import paddle.nn as nn

from ppzoo.models.helixfold.embedders import InputEmbedder, RecyclingEmbedder, extra_msa_features, pseudo_beta
from ppzoo.models.helixfold.evoformer import EvoformerStack, ExtraMSAStack
from ppzoo.models.helixfold.heads import DistogramHead, ExperimentallyResolvedHead, MaskedMSAHead, PLDDTHead
from ppzoo.models.helixfold.structure_module import StructureModule
from ppzoo.models.helixfold.template import TemplateEmbedder


def _float32(x):
    return x if x.dtype == paddle.float32 else x.astype("float32")


class AlphaFoldIteration(nn.Layer):
    """One pass from features (and the previous pass's outputs) to structure and head outputs."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.input_embedder = InputEmbedder(cfg)
        self.recycling_embedder = RecyclingEmbedder(cfg)
        self.template_embedder = TemplateEmbedder(cfg) if cfg.templates else None
        self.extra_msa_stack = ExtraMSAStack(cfg) if cfg.extra_msa_blocks > 0 else None
        self.evoformer = EvoformerStack(cfg)
        self.structure_module = StructureModule(cfg.structure_module)
        self.distogram_head = DistogramHead(cfg)
        self.masked_msa_head = MaskedMSAHead(cfg)
        self.plddt_head = PLDDTHead(cfg)
        self.experimentally_resolved_head = ExperimentallyResolvedHead(cfg)

    def forward(self, batch, prev):
        seq_mask = batch["seq_mask"]
        pair_mask = seq_mask.unsqueeze(2) * seq_mask.unsqueeze(1)
        msa_mask = batch["msa_mask"]
        num_msa = msa_mask.shape[1]

        msa, pair = self.input_embedder(batch["target_feat"], batch["msa_feat"], batch["residue_index"])
        msa, pair = self.recycling_embedder(msa, pair, prev["msa_first_row"], prev["pair"], prev["pseudo_beta"])

        if self.template_embedder is not None and batch["template_aatype"].shape[1] > 0:
            update, angle_rows, angle_mask = self.template_embedder(batch, pair, pair_mask)
            pair = pair + update
            if angle_rows is not None:
                msa = paddle.concat([msa, angle_rows.astype(msa.dtype)], axis=1)
                msa_mask = paddle.concat([msa_mask, angle_mask.astype(msa_mask.dtype)], axis=1)
        if self.extra_msa_stack is not None:
            pair = self.extra_msa_stack(extra_msa_features(batch, self.cfg.extra_msa_classes),
                                        batch["extra_msa_mask"], pair, pair_mask)

        msa, pair, single = self.evoformer(msa, pair, msa_mask, pair_mask)

        # The structure module and the heads run in float32 even when the trunk runs in bf16 (GPU AMP):
        # frames, coordinates and their losses need the precision.
        amp_off = paddle.amp.auto_cast(enable=False) if paddle.amp.is_autocast_enabled() else contextlib.nullcontext()
        with amp_off:
            single, pair, msa = _float32(single), _float32(pair), _float32(msa)
            outputs = dict(self.structure_module(single, pair, batch["aatype"], seq_mask))
            outputs["distogram_logits"] = self.distogram_head(pair)
            outputs["masked_msa_logits"] = self.masked_msa_head(msa[:, :num_msa])
            outputs["plddt_logits"] = self.plddt_head(outputs["single"])
            outputs["experimentally_resolved_logits"] = self.experimentally_resolved_head(single)
        prev = {
            "msa_first_row": msa[:, 0],
            "pair": pair,
            "pseudo_beta": pseudo_beta(batch["aatype"], outputs["final_atom37_positions"]),
        }
        return outputs, prev


class AlphaFold(nn.Layer):
    """Recycling around AlphaFoldIteration. Earlier iterations run without gradients; in training the number
    of recycles is drawn uniformly from [0, num_recycle] each step (AF2 1.10), in evaluation all run."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.iteration = AlphaFoldIteration(cfg)

    def initial_prev(self, batch):
        b, n = batch["aatype"].shape
        return {
            "msa_first_row": paddle.zeros([b, n, self.cfg.msa_channel]),
            "pair": paddle.zeros([b, n, n, self.cfg.pair_channel]),
            "pseudo_beta": paddle.zeros([b, n, 3]),
        }

    def sample_num_recycle(self):
        # From Paddle's seeded generator: reproducible, and the same on every data-parallel rank.
        return int(paddle.randint(0, self.cfg.num_recycle + 1, shape=[1]).item())

    def forward(self, batch, num_recycle=None):
        if num_recycle is None:
            num_recycle = self.sample_num_recycle() if self.training else self.cfg.num_recycle
        prev = self.initial_prev(batch)
        if num_recycle > 0:
            with paddle.no_grad():
                for _ in range(num_recycle):
                    _, prev = self.iteration(batch, prev)
            prev = {key: value.detach() for key, value in prev.items()}
        outputs, _ = self.iteration(batch, prev)
        return outputs
