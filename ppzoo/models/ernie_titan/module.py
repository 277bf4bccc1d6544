"""Engine Modules: "ErnieTitan" (pretraining: every task of ppzoo.data.ernie_tasks at once) and
"ErnieTitanNLU" (classification fine-tuning on the understanding module's [CLS]).

The adversarial loss: the discriminator ([CLS] of the understanding path, credibility_head) tells original
text from text the model generated itself. Every `adversarial_refresh_every` steps (and whenever the buffer
is empty, e.g. after a resume) the generation module continues the 1-3 sentence prefixes of the current
batch (`adversarial_new_tokens` sampled tokens); those sequences are the negatives until the next refresh.
The positives are the batch's own texts cut to the same length (prefix + as many real tokens), so the
discriminator cannot tell them apart by length. The refresh counts training_step calls (micro-batches), and
the buffer is not part of a checkpoint: a resumed run regenerates it at once, so its adversarial loss
differs from the uninterrupted run's until the next scheduled refresh.
"""
import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ppzoo.core.module import Module
from ppzoo.data.ernie_tasks import IGNORE
from ppzoo.errors import ConfigError
from ppzoo.models.ernie_titan.generation import TitanCausalLM, sample_continuations
from ppzoo.models.ernie_titan.model import ErnieTitanConfig, ErnieTitanModel, Memory
from ppzoo.registry import register_module


def token_cross_entropy(logits, labels):
    """Mean cross entropy over the positions whose label is not IGNORE (Paddle's mean would divide by all)."""
    labels = labels.reshape([-1, 1])
    losses = F.cross_entropy(logits.reshape([-1, logits.shape[-1]]).astype("float32"), labels,
                             ignore_index=IGNORE, reduction="none")
    count = (labels != IGNORE).astype("float32").sum()
    return losses.sum() / paddle.clip(count, min=1.0)


def shifted_labels(ids, valid):
    """Next-token labels of `ids` [b, s + 1] for inputs ids[:, :s]; IGNORE where the target is padding."""
    return paddle.where(valid[:, 1:], ids[:, 1:], paddle.full([], IGNORE, dtype=ids.dtype))


def accuracy(logits, labels):
    return (logits.argmax(axis=-1) == labels).astype("float32").mean()


def check_token_ids(batch, key, vocab_size):
    if int(batch[key].max()) >= vocab_size:
        raise ConfigError(
            f"Token id {int(batch[key].max())} is outside Model.vocab_size={vocab_size}: the tokenizer plus the "
            "task tokens ([CLS], [SEP], [MASK]) need a larger Model.vocab_size.")


@register_module("ErnieTitan")
class ErnieTitanModule(Module):
    config_class = ErnieTitanConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        self.model = ErnieTitanModel(config)
        self._lm = []  # the TitanCausalLM view of self.model, built once; a list so Paddle does not register it
        self._calls = 0
        self._negatives = None  # (ids [n, width] int64, valid [n, width] bool) of generated texts

    def language_model(self):
        """The generation module as a causal LM for ppzoo.inference.Generator (shares self.model's weights)."""
        if not self._lm:
            self._lm.append(TitanCausalLM(self.model))
        return self._lm[0]

    def tokens_in_batch(self, batch):
        return int(batch["lm_ids"].shape[0] * (batch["lm_ids"].shape[1] - 1))

    # ------------------------------------------------------------------------------------------ tasks
    # At these sizes a forward costs mostly its operator launches, so the tasks of one path share a forward:
    # every understanding input (MLM, reordering, distance, the discriminator's texts) goes through the
    # bidirectional path as one batch, and the first document-LM segment shares the causal forward with the
    # controllable LM (its rows see an empty memory where the controllable rows see the genre prompt).

    def _understanding_losses(self, batch, negatives=None):
        """MLM, sentence reordering and distance, and (with `negatives`) the discriminator, in one forward."""
        c, m = self.config, self.model
        width = batch["mlm_ids"].shape[1]
        groups = [(batch["mlm_ids"], batch["mlm_valid"]), (batch["reorder_ids"], batch["reorder_valid"]),
                  (batch["distance_ids"], batch["distance_valid"])]
        if negatives is not None:
            # Positives: [CLS] + prefix + as many real tokens as were generated after it.
            cut = paddle.minimum(batch["adv_length"], batch["adv_prefix_len"] + 1 + c.adversarial_new_tokens)
            pos_valid = paddle.arange(width).unsqueeze(0) < cut.unsqueeze(1)
            neg_ids, neg_valid = negatives
            groups += [(batch["adv_ids"], pos_valid), (paddle.to_tensor(neg_ids[:, :width]),
                                                       paddle.to_tensor(neg_valid[:, :width]))]
        sizes = [g[0].shape[0] for g in groups]
        hidden, _ = m.understand(paddle.concat([g[0] for g in groups]), paddle.concat([g[1] for g in groups]))
        parts = paddle.split(hidden, sizes, axis=0)
        out = {"mlm": token_cross_entropy(m.mlm_head(parts[0]), batch["mlm_labels"])}
        for name, head, part in (("reorder", m.reorder_head, parts[1]), ("distance", m.distance_head, parts[2])):
            logits = head(part[:, 0])
            out[name], out[name + "_acc"] = F.cross_entropy(logits, batch[name + "_label"]), accuracy(
                logits, batch[name + "_label"])
        if negatives is not None:
            logits = m.credibility_head(paddle.concat([parts[3][:, 0], parts[4][:, 0]]))[:, 0]
            targets = paddle.concat([paddle.ones([sizes[3]]), paddle.zeros([sizes[4]])])
            out["adversarial"] = F.binary_cross_entropy_with_logits(logits, targets)
            out["adversarial_acc"] = ((logits > 0).astype("float32") == targets).astype("float32").mean()
        return out

    def _generation_losses(self, batch):
        """Document LM over two segments (the second reads the first's recurrence memory) and the
        controllable LM (conditioned rows also see their genre's soft prompt, through memory: see
        ErnieTitanModel.genre_memory); the loss of the latter covers the text after the prompt only."""
        m = self.model
        ids, valid = batch["lm_ids"], batch["lm_valid"]
        b, s = ids.shape[0], (ids.shape[1] - 1) // 2
        genre = m.genre_memory(batch["ctrl_genre"])
        conditioned = batch["ctrl_conditioned"].unsqueeze(1).expand(genre.valid.shape)
        # One forward: rows 0..b-1 the first LM segment (no memory), rows b.. the controllable LM.
        memory = Memory([paddle.concat([h, h]) for h in genre.hidden], paddle.concat([genre.positions] * 2),
                        paddle.concat([paddle.zeros_like(conditioned), conditioned]))
        inputs = paddle.concat([ids[:, :s], batch["ctrl_ids"][:, :s]])
        input_valid = paddle.concat([valid[:, :s], batch["ctrl_valid"][:, :s]])
        positions = paddle.arange(s, dtype="int64").unsqueeze(0).expand([2 * b, s])
        hidden, layer_inputs = m.generate_hidden(m.embed(inputs), positions, input_valid, memory)
        logits = m.lm_head(hidden)
        first = m.next_memory([h[:b] for h in layer_inputs], positions[:b], valid[:, :s])
        logits_b, _ = m.lm_segment(ids[:, s:2 * s], valid[:, s:2 * s], memory=first)
        lm_logits = paddle.concat([logits[:b], logits_b], axis=1)
        return {"doc_lm": token_cross_entropy(lm_logits, shifted_labels(ids, valid)),
                "controllable": token_cross_entropy(logits[b:], batch["ctrl_labels"][:, :s])}

    # ------------------------------------------------------------------------------------ adversarial
    def _refresh_negatives(self, batch):
        """Regenerate the negatives: the generation module continues each prefix of this batch."""
        c = self.config
        ids = batch["adv_ids"].numpy()
        prefix_len = batch["adv_prefix_len"].numpy()
        prefixes = [list(row[1:1 + n]) for row, n in zip(ids, prefix_len)]
        generated = sample_continuations(self.language_model(), prefixes, c.adversarial_new_tokens,
                                         c.adversarial_temperature, c.adversarial_top_k, seed=self._calls)
        rows = [[int(ids[0, 0])] + p + g for p, g in zip(prefixes, generated)]  # [CLS] prefix generated
        width = max(ids.shape[1], max(len(r) for r in rows))
        out = np.zeros((len(rows), width), dtype=np.int64)
        valid = np.zeros((len(rows), width), dtype=bool)
        for i, r in enumerate(rows):
            out[i, :len(r)], valid[i, :len(r)] = r, True
        self._negatives = (out, valid)

    # --------------------------------------------------------------------------------------- steps
    def training_step(self, batch):
        c = self.config
        check_token_ids(batch, "mlm_ids", c.vocab_size)
        if self._negatives is None or self._calls % c.adversarial_refresh_every == 0:
            self._refresh_negatives(batch)
        self._calls += 1
        out = self._understanding_losses(batch, self._negatives)
        out.update(self._generation_losses(batch))
        out["loss"] = (c.mlm_weight * out["mlm"] + c.doc_lm_weight * out["doc_lm"] + c.reorder_weight * out["reorder"]
                       + c.distance_weight * out["distance"] + c.controllable_weight * out["controllable"]
                       + c.adversarial_weight * out["adversarial"])
        return out

    def validation_step(self, batch):
        check_token_ids(batch, "mlm_ids", self.config.vocab_size)
        out = self._understanding_losses(batch)
        out.update(self._generation_losses(batch))
        out["loss"] = out.pop("doc_lm")  # eval_loss / eval_ppl: the document LM's
        return out

    def forward(self, batch):
        return self.training_step(batch)


@register_module("ErnieTitanNLU")
class ErnieTitanNLUModule(Module):
    """Classification on the understanding module's [CLS]; initialize from an ErnieTitan checkpoint
    (Engine.init_from): every pretrained tensor loads, the classifier starts fresh."""

    config_class = ErnieTitanConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        if config.num_labels < 2:
            raise ConfigError(f"ErnieTitanNLU needs Model.num_labels >= 2 (the task's classes), got {config.num_labels}.")
        self.model = ErnieTitanModel(config)
        self.classifier = nn.Linear(config.task_hidden_size, config.num_labels)

    def init_from_skips(self):
        return ("classifier",)

    def tokens_in_batch(self, batch):
        return int(batch["input_ids"].shape[0] * batch["input_ids"].shape[1])

    def logits(self, input_ids, valid=None):
        return self.model.cls_logits(self.classifier, input_ids, valid)

    def training_step(self, batch):
        check_token_ids(batch, "input_ids", self.config.vocab_size)
        logits = self.logits(batch["input_ids"], batch["valid"])
        return {"loss": F.cross_entropy(logits, batch["label"]), "accuracy": accuracy(logits, batch["label"])}

    def validation_step(self, batch):
        return self.training_step(batch)

    def forward(self, batch):
        return self.training_step(batch)
