"""MoE-GPT as an engine Module: next-token loss plus the gates' auxiliary loss, and per-step metrics of the
experts' communication.

Logged besides `loss` (= lm_loss + aux_loss_coef * the auxiliary loss):
- `lm_loss`; the auxiliary loss by its name (`balance_loss` for GShard / Switch, `topology_loss` for TA-MoE),
  the mean over MoE layers;
- `moe_dropped_fraction`: (token, choice) pairs the gate dropped (capacity, random routing);
- per link class (`local`, `intra_node`, `inter_node`): `moe_tokens_<class>` and `moe_bytes_<class>`, the
  rows every rank of the ep group sent in one forward (dispatch and combine, all MoE layers; the backward
  moves as much again), and with a Distributed.topology `moe_alltoall_ms`, the modelled time of those
  all-to-alls (each as slow as its slowest link). They are the same on every rank, so the engine's mean over
  ranks and micro-batches is the job's traffic per micro-batch.
"""
import paddle
import paddle.distributed as dist

from ppzoo.core.module import Module
from ppzoo.distributed.tensor_parallel import mean_over_tokens, parallel_cross_entropy
from ppzoo.distributed.topology import traffic_by_link_class
from ppzoo.errors import ConfigError
from ppzoo.models.moe_gpt.model import MoEGPTConfig, MoEGPTForCausalLM
from ppzoo.registry import register_module


@register_module("MoEGPT")
class MoEGPTModule(Module):
    config_class = MoEGPTConfig

    def __init__(self, config, parallel_env=None):
        super().__init__(config, parallel_env)
        if parallel_env is not None and parallel_env.mp_size > 1:
            raise ConfigError("MoEGPT has no tensor-parallel layers: set Distributed.mp_degree: 1 (spread the "
                              "experts with ep_degree instead).")
        self.model = MoEGPTForCausalLM(config, parallel_env)
        env = parallel_env
        self.topology = None
        if env is not None and env.topology is not None:
            self.topology = env.topology.subset(env.ep_ranks if env.ep_size > 1 else (env.rank,))

    def forward(self, batch):
        # The Engine calls the (possibly data-parallel-wrapped) module itself: see ChuXinModule.forward.
        return self.training_step(batch)

    def _lm_loss(self, batch):
        logits, stats = self.model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
        per_token = parallel_cross_entropy(logits, batch["labels"])
        return mean_over_tokens(per_token, batch["labels"]), stats

    def training_step(self, batch):
        lm_loss, stats = self._lm_loss(batch)
        out = {"lm_loss": lm_loss}
        aux = [s.aux_loss for s in stats if s.aux_loss is not None]
        loss = lm_loss
        if aux:
            aux_loss = paddle.add_n(aux) / len(aux)
            out[stats[0].aux_name] = aux_loss
            loss = lm_loss + self.config.aux_loss_coef * aux_loss
        out["loss"] = loss
        out.update(self.communication_metrics(stats))
        return out

    def communication_metrics(self, stats):
        if not stats:
            return {}
        totals = {}
        for layer in stats:
            for name, value in traffic_by_link_class(layer.tokens_between_ranks, layer.bytes_per_token,
                                                     self.topology).items():
                totals[f"moe_{name}"] = totals.get(f"moe_{name}", 0.0) + float(value)
        totals["moe_dropped_fraction"] = sum(s.dropped_fraction for s in stats) / len(stats)
        return totals

    def validation_step(self, batch):
        with paddle.no_grad():
            loss, _ = self._lm_loss(batch)
            env = self.parallel_env
            if env is not None and env.ep_size > 1:
                # Topology-aware gates differ between ranks: report the ep group's mean.
                dist.all_reduce(loss, group=env.ep_group)
                loss = loss / env.ep_size
            return {"loss": loss}

    def input_spec(self):
        return [paddle.static.InputSpec([None, None], "int64", name="input_ids")]
