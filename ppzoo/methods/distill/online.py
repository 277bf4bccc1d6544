"""Online distillation (ERNIE 3.0 Titan): students trained while the teacher trains, in one engine run.

    teacher (trains on its own task) ──detached outputs──▶ teacher assistant ──detached outputs──▶ students

* On-the-Fly Distillation (OFD): every step the teacher runs its forward once, for its own loss; the same
  outputs (MLM distributions and attention probabilities), detached, are the assistant's targets. No extra
  teacher forward, and no gradient from any distillation loss reaches the teacher.
* Teacher assistant: a model between teacher and students in size; the students learn from it.
* Attention distillation: KL divergence between the head-averaged attention distributions of the
  teacher's (assistant's) last `attention_layers` layers and the learner's last ones (head counts differ
  between sizes, hence the head average).
* Auxiliary Layer Distillation (ALD): each learner carries one extra layer on top while it is distilled;
  the distillation losses are taken after it. The layer is dropped for use: export_student writes the
  learner without it, and the learner's own top layer then feeds its head.

The task distilled is the knowledge-masked LM of the understanding path (ppzoo.data.ernie_tasks); every
model (teacher included) also trains on its hard labels.
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.core.module import Module
from ppzoo.errors import CheckpointError, ConfigError
from ppzoo.models.ernie_titan.model import ErnieTitanConfig, ErnieTitanModel, XLLayer, XLStack, additive_mask, \
    relative_index, segment_mask
from ppzoo.models.ernie_titan.module import check_token_ids, token_cross_entropy
from ppzoo.registry import register_module

STUDENT_FILE = "student.json"


@dataclass
class StudentSize:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256


@dataclass
class OnlineDistillConfig:
    teacher: ErnieTitanConfig = field(default_factory=ErnieTitanConfig)
    assistant: StudentSize = field(default_factory=lambda: StudentSize(96, 2, 4, 384))
    students: List[StudentSize] = field(default_factory=lambda: [StudentSize(64, 2, 2, 256), StudentSize(32, 1, 2, 128)])
    temperature: float = 1.0
    attention_layers: int = 1  # distil the attention of the last this many layers
    kd_weight: float = 1.0  # soft-target KL
    attention_weight: float = 1.0
    hard_weight: float = 1.0  # the learners' own MLM loss
    auxiliary_layer: bool = True  # ALD


class TitanStudent(nn.Layer):
    """A single bidirectional Transformer-XL encoder with an MLM head, and (while distilled) the ALD layer."""

    def __init__(self, size, vocab_size, max_relative_distance, auxiliary_layer=True, eps=1e-5):
        super().__init__()
        self.size, self.vocab_size, self.max_relative_distance = size, vocab_size, max_relative_distance
        h = size.hidden_size
        self.embed = nn.Embedding(vocab_size, h)
        self.encoder = XLStack(size.num_layers, h, size.num_heads, size.intermediate_size, max_relative_distance,
                               eps=eps)
        self.auxiliary = XLLayer(h, size.num_heads, size.intermediate_size, max_relative_distance, eps=eps) \
            if auxiliary_layer else None
        self.norm = nn.LayerNorm(h, epsilon=eps)
        self.mlm_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, epsilon=eps), nn.Linear(h, vocab_size))

    def forward(self, input_ids, valid, use_auxiliary=None, return_probs=False):
        """-> (MLM logits [b, s, vocab], attention probs of every layer, the auxiliary one last if used)."""
        use_auxiliary = self.auxiliary is not None if use_auxiliary is None else use_auxiliary
        if use_auxiliary and self.auxiliary is None:
            raise ValueError("this student has no auxiliary layer (it was exported without it)")
        b, s = input_ids.shape
        pos = paddle.arange(s, dtype="int64").unsqueeze(0).expand([b, s])
        mask = additive_mask(segment_mask(valid, s, causal=False))
        x, _, probs = self.encoder(self.embed(input_ids), pos, pos, mask, return_probs=return_probs)
        if use_auxiliary:
            x, p = self.auxiliary(x, None, relative_index(pos, pos, self.max_relative_distance), mask,
                                  return_probs=return_probs)
            probs = probs + [p]
        return self.mlm_head(self.norm(x)), probs


def attention_kl(target_probs, probs, valid):
    """KL(target || learner) of head-averaged attention distributions [b, h, s, s], averaged over the valid
    query rows."""
    t = target_probs.mean(axis=1)
    p = probs.mean(axis=1)
    kl = (t * (paddle.log(t + 1e-9) - paddle.log(p + 1e-9))).sum(axis=-1)  # [b, s]
    rows = valid.astype("float32")
    return (kl * rows).sum() / rows.sum()


def soft_target_kl(target_logits, logits, valid, temperature):
    """KL(softmax(target / T) || softmax(logits / T)) * T^2 over the valid positions.

    The cross term goes through the fused soft-label softmax cross entropy: Paddle's CPU log_softmax
    backward (an unvectorized Eigen kernel) took most of a distillation step at a 4k vocabulary."""
    t = F.softmax(target_logits / temperature, axis=-1)
    vocab = logits.shape[-1]
    cross = F.cross_entropy((logits / temperature).reshape([-1, vocab]), t.reshape([-1, vocab]), soft_label=True,
                            reduction="none").reshape(valid.shape)
    kl = cross + (t * paddle.log(t + 1e-9)).sum(axis=-1)  # minus the target's entropy (a constant)
    rows = valid.astype("float32")
    return (kl * rows).sum() / rows.sum() * temperature ** 2


@register_module("ErnieTitanDistill")
class OnlineDistillModule(Module):
    config_class = OnlineDistillConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        if not config.students:
            raise ConfigError("Model.students is empty: online distillation needs at least one student size.")
        if config.attention_layers < 1:
            raise ConfigError(f"Model.attention_layers must be >= 1, got {config.attention_layers}.")
        t = config.teacher
        depths = [config.assistant.num_layers] + [s.num_layers for s in config.students]
        if config.attention_layers > min(depths + [t.task_num_layers]) + int(config.auxiliary_layer):
            raise ConfigError(f"Model.attention_layers={config.attention_layers} exceeds the layers of the smallest "
                              "model (plus its auxiliary layer).")
        self.teacher = ErnieTitanModel(t)
        self.assistant = TitanStudent(config.assistant, t.vocab_size, t.max_relative_distance, config.auxiliary_layer)
        self.students = nn.LayerList([TitanStudent(s, t.vocab_size, t.max_relative_distance, config.auxiliary_layer)
                                      for s in config.students])

    def tokens_in_batch(self, batch):
        return int(batch["mlm_ids"].shape[0] * batch["mlm_ids"].shape[1])

    def _distill(self, name, learner, target_logits, target_probs, batch):
        c = self.config
        logits, probs = learner(batch["mlm_ids"], batch["mlm_valid"], return_probs=True)
        k = c.attention_layers
        attn = sum(attention_kl(t.detach(), p, batch["mlm_valid"]) for t, p in zip(target_probs[-k:], probs[-k:])) / k
        out = {f"{name}_hard": token_cross_entropy(logits, batch["mlm_labels"]),
               f"{name}_kd": soft_target_kl(target_logits.detach(), logits, batch["mlm_valid"], c.temperature),
               f"{name}_attention": attn}
        out[name] = c.hard_weight * out[f"{name}_hard"] + c.kd_weight * out[f"{name}_kd"] + c.attention_weight * attn
        return out, logits, probs

    def compute_losses(self, batch):
        """Every loss of a step; `teacher` trains the teacher only, the others only their learner."""
        check_token_ids(batch, "mlm_ids", self.config.teacher.vocab_size)
        # OFD: the teacher's training forward is the distillation target; nothing more is run for it.
        hidden, teacher_probs = self.teacher.understand(batch["mlm_ids"], batch["mlm_valid"], return_probs=True)
        teacher_logits = self.teacher.mlm_head(hidden)
        out = {"teacher": token_cross_entropy(teacher_logits, batch["mlm_labels"])}
        assistant, assistant_logits, assistant_probs = self._distill(
            "assistant", self.assistant, teacher_logits, teacher_probs, batch)
        out.update(assistant)
        for i, student in enumerate(self.students):
            losses, _, _ = self._distill(f"student{i}", student, assistant_logits, assistant_probs, batch)
            out.update(losses)
        return out

    def training_step(self, batch):
        out = self.compute_losses(batch)
        out["loss"] = out["teacher"] + out["assistant"] + sum(out[f"student{i}"] for i in range(len(self.students)))
        return out

    def validation_step(self, batch):
        """Each model's MLM loss as used: the learners without their auxiliary layer."""
        hidden, _ = self.teacher.understand(batch["mlm_ids"], batch["mlm_valid"])
        out = {"teacher_loss": token_cross_entropy(self.teacher.mlm_head(hidden), batch["mlm_labels"])}
        for name, learner in [("assistant", self.assistant)] + [(f"student{i}", s) for i, s in enumerate(self.students)]:
            logits, _ = learner(batch["mlm_ids"], batch["mlm_valid"], use_auxiliary=False)
            out[f"{name}_loss"] = token_cross_entropy(logits, batch["mlm_labels"])
        out["loss"] = out["teacher_loss"]
        return out

    def forward(self, batch):
        return self.training_step(batch)


def export_student(module, index, out_dir):
    """Write student `index` (or "assistant") without its ALD layer: model.pdparams + student.json."""
    learner = module.assistant if index == "assistant" else module.students[index]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: value for name, value in learner.state_dict().items() if not name.startswith("auxiliary.")}
    paddle.save(state, str(out / "model.pdparams"))
    meta = {"size": asdict(learner.size), "vocab_size": learner.vocab_size,
            "max_relative_distance": learner.max_relative_distance}
    (out / STUDENT_FILE).write_text(json.dumps(meta, indent=2))
    return out


def load_student(path):
    """A student written by export_student (no auxiliary layer), in eval mode."""
    path = Path(path)
    meta_file = path / STUDENT_FILE
    if not meta_file.is_file() or not (path / "model.pdparams").is_file():
        raise CheckpointError(f"{path} is not an exported student (expected {STUDENT_FILE} and model.pdparams); "
                              "write one with ppzoo.methods.distill.export_student.")
    meta = json.loads(meta_file.read_text())
    student = TitanStudent(StudentSize(**meta["size"]), meta["vocab_size"], meta["max_relative_distance"],
                           auxiliary_layer=False)
    student.set_state_dict(paddle.load(str(path / "model.pdparams")))
    student.eval()
    return student
