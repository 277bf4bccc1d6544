"""RecycleGPT as an engine Module: L = L_lm + lambda * L_recycle over packed documents.

The base keeps ChuXin's parameter names (`model.*`), so a trained ChuXin checkpoint initializes it through
Engine.init_from while the recyclable module (`recycler.*`) starts fresh; with Model.freeze_base only the
module trains.
"""
import paddle
import paddle.nn.functional as F

from ppzoo.core.module import Module
from ppzoo.distributed.tensor_parallel import (
    all_gather_along_axis, mean_over_tokens, mp_size_of, parallel_cross_entropy,
)
from ppzoo.errors import ConfigError
from ppzoo.models.chuxin.model import ChuXinForCausalLM
from ppzoo.models.recycle_gpt.model import BaseLM, RecycleGPT, RecycleGPTConfig, RecyclableModule, recycled_states
from ppzoo.registry import register_module

IGNORE_INDEX = -100


def soft_cross_entropy(logits, target_logits, labels):
    """Per-token cross entropy of `logits` against the distribution softmax(target_logits), [b, s]; 0 where
    the label is ignored. Through cross_entropy's soft labels, not log_softmax: Paddle's CPU log_softmax
    took 32 s forward for [8, 256, 4096] (measured, Paddle 3.3.1), the soft-label cross entropy 0.4 s."""
    per_token = F.cross_entropy(logits, F.softmax(target_logits, axis=-1), soft_label=True, reduction="none")
    return per_token.squeeze(-1) * (labels != IGNORE_INDEX).astype(per_token.dtype)


@register_module("RecycleGPT")
class RecycleGPTModule(Module):
    config_class = RecycleGPTConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        self.model = ChuXinForCausalLM(config, mp_group=self.mp_group)
        self.recycler = RecyclableModule(config, mp_group=self.mp_group)
        self.base = BaseLM(self.model)
        if config.recycle_target == "base" and mp_size_of(self.mp_group) > 1:
            raise ConfigError(
                "Model.recycle_target=base (soft targets over the vocabulary) is implemented for "
                "Distributed.mp_degree=1 only; use recycle_target=labels with tensor parallelism."
            )
        if config.freeze_base:
            # Frozen parameters get no gradient, so the optimizer and gradient clipping pass them by.
            for param in self.model.parameters():
                param.stop_gradient = True

    def forward(self, batch):
        # The Engine calls the (possibly data-parallel-wrapped) module itself for training.
        return self.training_step(batch)

    def _logits(self, batch):
        """(base logits, recyclable module's logits), both [b, s, vocab / mp], for every position."""
        input_ids, doc_ids = batch["input_ids"], batch.get("doc_ids")
        hidden = self.base.hidden_states(input_ids, doc_ids=doc_ids)
        # Position t's recycled state is the base's state at t-1, but not across a document boundary: the
        # module attends within documents only, as the base does.
        keep = paddle.ones(input_ids.shape, dtype="bool")
        keep[:, 0] = False
        if doc_ids is not None:
            keep[:, 1:] = doc_ids[:, 1:] == doc_ids[:, :-1]
        recycled = recycled_states(hidden, keep)
        recycled_hidden = self.recycler(recycled, self.base.embed(input_ids), doc_ids=doc_ids)
        return self.base.head(hidden), self.base.head(recycled_hidden)

    def _losses(self, batch):
        labels = batch["labels"]
        lm_logits, recycle_logits = self._logits(batch)
        lm_loss = mean_over_tokens(parallel_cross_entropy(lm_logits, labels, IGNORE_INDEX, self.mp_group), labels)
        if self.config.recycle_target == "base":
            recycle_per_token = soft_cross_entropy(recycle_logits, lm_logits.detach(), labels)
        else:
            recycle_per_token = parallel_cross_entropy(recycle_logits, labels, IGNORE_INDEX, self.mp_group)
        recycle_loss = mean_over_tokens(recycle_per_token, labels)
        loss = lm_loss + self.config.recycle_loss_weight * recycle_loss
        return {"loss": loss, "lm_loss": lm_loss, "recycle_loss": recycle_loss}, lm_logits, recycle_logits

    def training_step(self, batch):
        return self._losses(batch)[0]

    def validation_step(self, batch):
        """The losses (`loss` is the base's), how often the module's top token is the base's (about the
        acceptance rate verified decoding can expect), and each one's next-token accuracy."""
        with paddle.no_grad():
            losses, lm_logits, recycle_logits = self._losses(batch)
            if mp_size_of(self.mp_group) > 1:
                lm_logits = all_gather_along_axis(lm_logits, -1, self.mp_group)
                recycle_logits = all_gather_along_axis(recycle_logits, -1, self.mp_group)
            labels = batch["labels"]
            counted = (labels != IGNORE_INDEX).astype("float32")
            lm_top, recycle_top = lm_logits.argmax(-1), recycle_logits.argmax(-1)

            def rate(hits):
                return (hits.astype("float32") * counted).sum() / paddle.clip(counted.sum(), min=1.0)

            # `loss` is the base's LM loss, so the reported perplexity is the base model's.
            return {"loss": losses["lm_loss"], "joint_loss": losses["loss"], "recycle_loss": losses["recycle_loss"],
                    "recycle_agreement": rate(recycle_top == lm_top), "lm_accuracy": rate(lm_top == labels),
                    "recycle_accuracy": rate(recycle_top == labels)}

    def language_model(self):
        """The base causal LM: what the plain Generator drives (and what export writes)."""
        return self.model

    def recyclable_model(self):
        """The base and its recyclable module, for ppzoo.inference.recycle."""
        return RecycleGPT(self.model, self.recycler)

    def recompute_units(self):
        return list(self.model.model.layers) + list(self.recycler.layers)

    def init_from_skips(self):
        # A ChuXin checkpoint initializes the base; the recyclable module is new.
        return ("recycler.",)

    def input_spec(self):
        return [paddle.static.InputSpec([None, None], "int64", name="input_ids")]
