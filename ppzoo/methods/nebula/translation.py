"""Translation fine-tuning with knowledge distillation from the pretrained model (Nebula-I, phase two).

The student is a ChuXin causal LM initialized from the cross-cluster pretrained checkpoint (Engine.init_from)
and fine-tuned on translation pairs (ppzoo.data.nebula_tasks.DocToSignature: English docstring -> Python
signature; loss on the target side only). The teacher is the pretrained model itself, frozen: on the
target tokens the student also matches the teacher's temperature-softened next-token distribution,

    loss = CE(labels) + kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)),

which keeps the pretrained model's knowledge of both languages while the task is learned (with a fixed
teacher, the distillation term is a data-dependent pull towards the pretrained model; the student starts
equal to it, so the term is exactly 0 at the first step). The teacher is held outside the Layer tree: it is
not trained, not checkpointed and not exported.
"""
import os
from dataclasses import dataclass
from typing import Optional

import paddle
import paddle.nn.functional as F

from ppzoo.core import checkpoint as ckpt
from ppzoo.distributed.tensor_parallel import mean_over_tokens, parallel_cross_entropy
from ppzoo.errors import CheckpointError, ConfigError
from ppzoo.models.chuxin.model import ChuXinConfig, ChuXinForCausalLM
from ppzoo.models.chuxin.module import ChuXinModule
from ppzoo.registry import register_module

IGNORE = -100


@dataclass
class NebulaTranslationConfig(ChuXinConfig):
    teacher: Optional[str] = None  # the pretrained checkpoint (or run directory: its newest checkpoint)
    kd_weight: float = 0.5
    temperature: float = 2.0


def load_teacher(config):
    path = config.teacher
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, ckpt.MANIFEST)) and ckpt.list_checkpoints(path):
        path = ckpt.list_checkpoints(path)[-1]
    weights_file = os.path.join(path, "model.mp0.pdparams")
    if not os.path.isfile(weights_file):
        raise CheckpointError(f"Model.teacher={config.teacher}: no checkpoint there (expected a run directory or "
                              "step_XXXXXXXX with model.mp0.pdparams); pretrain first (configs/nebula/pretrain_*.yaml).")
    ckpt.verify(path)
    state = {name[len("model."):]: value for name, value in paddle.load(weights_file).items() if name.startswith("model.")}
    teacher = ChuXinForCausalLM(config)
    own = teacher.state_dict()
    wrong = [name for name in own if name not in state or list(state[name].shape) != list(own[name].shape)]
    if wrong:
        raise CheckpointError(f"Model.teacher={config.teacher}: tensors {wrong[:4]} are missing or shaped differently; "
                              "the teacher must have the student's architecture (Model sizes of the pretraining run).")
    teacher.set_state_dict(state)
    teacher.eval()
    for param in teacher.parameters():
        param.stop_gradient = True
    return teacher


def distillation_kl(teacher_logits, student_logits, labels, temperature):
    """Mean over target tokens of T^2 * KL(teacher_T || student_T)."""
    log_student = F.log_softmax(student_logits / temperature, axis=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, axis=-1)
    per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(axis=-1) * temperature ** 2
    per_token = paddle.where(labels == IGNORE, paddle.zeros_like(per_token), per_token)
    return mean_over_tokens(per_token, labels)


@register_module("NebulaTranslation")
class NebulaTranslationModule(ChuXinModule):
    config_class = NebulaTranslationConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        if self.mp_group is not None and getattr(self.mp_group, "nranks", 1) > 1:
            raise ConfigError("NebulaTranslation distils from a whole teacher: use mp_degree 1.")
        if config.kd_weight > 0 and not config.teacher:
            raise ConfigError("Model.kd_weight > 0 needs Model.teacher (the pretrained checkpoint); or set kd_weight: 0.")
        if config.temperature <= 0:
            raise ConfigError(f"Model.temperature={config.temperature} must be positive.")
        teacher = load_teacher(config) if config.kd_weight > 0 else None
        # Not a sublayer: the frozen teacher must stay out of parameters(), checkpoints and exports.
        object.__setattr__(self, "_teacher", teacher)

    def training_step(self, batch):
        logits = self.model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        labels = batch["labels"]
        ce = mean_over_tokens(parallel_cross_entropy(logits, labels, mp_group=self.mp_group), labels)
        if self._teacher is None:
            return {"loss": ce, "ce": ce}
        with paddle.no_grad():
            teacher_logits = self._teacher(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        kd = distillation_kl(teacher_logits, logits, labels, self.config.temperature)
        return {"loss": ce + self.config.kd_weight * kd, "ce": ce, "kd": kd}
