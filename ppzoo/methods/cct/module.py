"""CCT as an engine Module: ChuXin trained with code comparison tuning.

loss = instruction_loss_weight * L_instruction   (next-token loss on the instruction samples' responses)
     + sequence_loss_weight    * L_sequence      (the same on the sequence-level bug-fix samples)
     + token_loss_weight       * L_token         (the hinge loss of ppzoo.methods.cct.losses)

The scoring head r is a linear layer on ChuXin's final hidden states; it only trains (generation and export
use the language model alone). With token_loss_weight 0 and no comparison data it is plain instruction
tuning of ChuXin.
"""
from dataclasses import dataclass

import paddle
import paddle.nn as nn

from ppzoo.errors import ConfigError
from ppzoo.methods.cct.losses import ranking_accuracy, token_hinge_loss
from ppzoo.models.chuxin.model import ChuXinConfig
from ppzoo.models.chuxin.module import ChuXinModule
from ppzoo.registry import register_module


@dataclass
class CCTConfig(ChuXinConfig):
    instruction_loss_weight: float = 1.0
    sequence_loss_weight: float = 1.0
    token_loss_weight: float = 1.0
    hinge_margin: float = 1.0


@register_module("CCT")
class CCTModule(ChuXinModule):
    config_class = CCTConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        if min(config.instruction_loss_weight, config.sequence_loss_weight, config.token_loss_weight) < 0:
            raise ConfigError("Model.instruction_loss_weight, sequence_loss_weight and token_loss_weight must be >= 0.")
        self.score_head = nn.Linear(config.hidden_size, 1)

    def scores(self, input_ids):
        """r(h) at every position: [b, s]."""
        return self.score_head(self.model.model(input_ids)).squeeze(-1)

    def _pair_scores(self, batch):
        chosen, rejected = batch["chosen_ids"], batch["rejected_ids"]
        length = chosen.shape[-1]
        both = paddle.concat([chosen.reshape([-1, length]), rejected.reshape([-1, length])], axis=0)
        scores = self.scores(both)  # one forward for originals and copies
        chosen_scores, rejected_scores = paddle.split(scores, 2, axis=0)
        return chosen_scores, rejected_scores, batch["pair_span"].reshape([-1, 2])

    def _require(self, batch, key, weight_name):
        if key not in batch:
            raise ConfigError(
                f"Model.{weight_name} is above 0 but the training rows have no {key!r}: use the CodeInstructions "
                f"dataset with comparison: true (or set Model.{weight_name}=0)."
            )

    def training_step(self, batch):
        cfg = self.config
        losses = {"instruction_loss": self._lm_loss(batch)}
        total = cfg.instruction_loss_weight * losses["instruction_loss"]
        if cfg.sequence_loss_weight > 0:
            self._require(batch, "fix_input_ids", "sequence_loss_weight")
            fix = {"input_ids": batch["fix_input_ids"], "labels": batch["fix_labels"], "doc_ids": batch["fix_doc_ids"]}
            losses["sequence_loss"] = self._lm_loss(fix)
            total = total + cfg.sequence_loss_weight * losses["sequence_loss"]
        if cfg.token_loss_weight > 0:
            self._require(batch, "chosen_ids", "token_loss_weight")
            chosen, rejected, span = self._pair_scores(batch)
            losses["token_loss"] = token_hinge_loss(chosen, rejected, span, cfg.hinge_margin)
            losses["pair_accuracy"] = ranking_accuracy(chosen.detach(), rejected.detach(), span)
            total = total + cfg.token_loss_weight * losses["token_loss"]
        losses["loss"] = total
        return losses

    def validation_step(self, batch):
        with paddle.no_grad():
            metrics = {"loss": self._lm_loss(batch)}
            if "chosen_ids" in batch:
                metrics["pair_accuracy"] = ranking_accuracy(*self._pair_scores(batch))
            return metrics

    def pipeline_description(self):
        raise NotImplementedError("CCT's scoring head is not split into pipeline stages; train it with pp_degree=1")
