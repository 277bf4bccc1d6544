"""ChuXin as an engine Module: next-token loss over packed documents."""
import paddle

from ppzoo.core.module import Module
from ppzoo.distributed.tensor_parallel import mean_over_tokens, parallel_cross_entropy
from ppzoo.models.chuxin.model import ChuXinConfig, ChuXinForCausalLM
from ppzoo.registry import register_module


@register_module("ChuXin")
class ChuXinModule(Module):
    config_class = ChuXinConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        self.model = ChuXinForCausalLM(config, mp_group=self.mp_group)

    def forward(self, batch):
        # The Engine calls the (possibly data-parallel-wrapped) module itself for training: Paddle's
        # DataParallel prepares its gradient all-reduce inside forward.
        return self.training_step(batch)

    def _lm_loss(self, batch):
        logits = self.model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        per_token = parallel_cross_entropy(logits, batch["labels"], mp_group=self.mp_group)
        return mean_over_tokens(per_token, batch["labels"])

    def training_step(self, batch):
        return {"loss": self._lm_loss(batch)}

    def validation_step(self, batch):
        with paddle.no_grad():
            return {"loss": self._lm_loss(batch)}

    def language_model(self):
        """The causal LM that generation drives (forward(input_ids, position_ids, attn_mask, cache))."""
        return self.model

    def pipeline_description(self):
        from ppzoo.models.chuxin.pipeline import pipeline_description

        return pipeline_description(self.config, self.mp_group)

    def recompute_units(self):
        return list(self.model.model.layers)

    def input_spec(self):
        return [paddle.static.InputSpec([None, None], "int64", name="input_ids")]
