"""HelixFold as an engine Module: AF2's losses in training, lDDT-Ca of the predicted structure in evaluation."""
import paddle

from ppzoo.core.module import Module
from ppzoo.models.helixfold.config import HelixFoldConfig
from ppzoo.models.helixfold.heads import plddt_from_logits
from ppzoo.models.helixfold.lddt import lddt_ca
from ppzoo.models.helixfold.losses import alphafold_loss
from ppzoo.models.helixfold.model import AlphaFold
from ppzoo.registry import register_module


@register_module("HelixFold")
class HelixFoldModule(Module):
    config_class = HelixFoldConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        self.model = AlphaFold(config)

    def forward(self, batch):
        # The Engine calls the (possibly data-parallel-wrapped) module for training.
        return self.training_step(batch)

    def training_step(self, batch):
        return alphafold_loss(self.model(batch), batch, self.config.loss)

    def validation_step(self, batch):
        with paddle.no_grad():
            outputs = self.model(batch, num_recycle=self.config.num_recycle)
            plddt = plddt_from_logits(outputs["plddt_logits"])
            seq_mask = batch["seq_mask"]
            return {
                "lddt_ca": lddt_ca(outputs["final_atom37_positions"], batch["all_atom_positions"],
                                   batch["all_atom_mask"]).mean(),
                "plddt": ((plddt * seq_mask).sum(axis=-1) / (seq_mask.sum(axis=-1) + 1e-10)).mean(),
            }

    def recompute_units(self):
        """With Engine.recompute: the Evoformer blocks from Model.recompute_start_block on."""
        return list(self.model.iteration.evoformer.blocks)[self.config.recompute_start_block:]

    def tokens_in_batch(self, batch):
        return int(batch["seq_mask"].sum())
