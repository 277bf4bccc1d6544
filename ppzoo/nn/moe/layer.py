"""The MoE feed-forward layer: a gate, E SwiGLU experts (E / ep_size of them on this rank), and the
dispatch that brings every token to its experts and their outputs back.

Dispatch (plain Paddle ops, any device): the (token, choice) pairs that survived the gate are sorted by
expert (stable, so tokens keep their order within an expert), gathered into a send buffer, exchanged with
the ranks holding the experts (ppzoo.distributed.expert_parallel.TokenExchange: nothing at ep 1, Paddle's
global_scatter / global_gather all-to-all on GPU with NCCL, an all_gather stand-in on CPU gloo), run through
each local expert as one contiguous segment, exchanged back, scattered to their (token, choice) slots and
summed with the gate's weights. Paddle's own MoELayer has no CPU kernel (number_count), hence this path.

Experts are kept one sub-layer per global expert index (`experts["5"]`), so a checkpoint names each expert
by its global index whatever the ep degree, and each expert's weights are separate tensors that a storage
layer can place (and move) independently. `expert(g)` is the one accessor the forward uses.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import paddle
import paddle.nn as nn

from ppzoo.distributed.expert_parallel import (
    EXPERT,
    RANK_LOCAL,
    ExchangePlan,
    TokenExchange,
    exchange_mode,
    gather_count_matrix,
    mark_expert_parallel,
)
from ppzoo.nn.mlp import swiglu
from ppzoo.nn.moe.gates import GATES


class ExpertFFN(nn.Layer):
    """One SwiGLU expert: w_down(silu(x w_gate) * (x w_up))."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        # Zeros here; the model draws every expert's weights in global order (see MoEGPTForCausalLM.
        # init_weights). A random default initializer would consume the global RNG once per *local* expert,
        # so models at different ep degrees would draw everything after the experts differently.
        zeros = nn.initializer.Constant(0.0)
        self.w_gate = self.create_parameter([hidden_size, intermediate_size], default_initializer=zeros)
        self.w_up = self.create_parameter([hidden_size, intermediate_size], default_initializer=zeros)
        self.w_down = self.create_parameter([intermediate_size, hidden_size], default_initializer=zeros)

    def forward(self, x):
        return paddle.matmul(swiglu(paddle.matmul(x, self.w_gate), paddle.matmul(x, self.w_up)), self.w_down)


@dataclass
class MoEStats:
    """What one MoE forward reports: the gate's auxiliary loss and the tokens rank i sent to rank j."""

    aux_loss: Optional[paddle.Tensor]
    aux_name: str
    tokens_between_ranks: np.ndarray  # [P, P] over the ep group, the same on every rank
    bytes_per_token: int  # one row of the exchange (hidden size x element size)
    dropped_fraction: float  # (token, choice) pairs the gate dropped (capacity, random routing)


@dataclass
class ExpertParallelContext:
    """The MoE layer's view of expert parallelism (from the engine's ParallelEnv)."""

    size: int = 1
    rank: int = 0
    group: object = None
    ranks: tuple = (0,)  # global ranks of the ep group, for the topology

    @classmethod
    def from_env(cls, env):
        if env is None or env.ep_size == 1:
            return cls()
        return cls(env.ep_size, env.ep_rank, env.ep_group, tuple(env.ep_ranks))


class MoELayer(nn.Layer):
    def __init__(self, hidden_size, intermediate_size, num_experts, gate="gshard", top_k=2, capacity_factor=1.25,
                 eval_capacity_factor=2.0, random_routing=True, ep=None, expert_loss_weights=None,
                 rank_local_gate=True):
        """`expert_loss_weights` [E] (numpy): this rank's topology-aware loss weight of every expert (None:
        GShard's plain loss). With them and `rank_local_gate`, the gate is rank-local under expert parallelism
        (its gradient is this rank's own, not the data-parallel mean)."""
        super().__init__()
        ep = ep or ExpertParallelContext()
        if num_experts % ep.size:
            raise ValueError(f"num_experts={num_experts} must be divisible by Distributed.ep_degree={ep.size}")
        self.ep = ep
        self.num_experts = num_experts
        self.local_experts = num_experts // ep.size
        self.first_expert = ep.rank * self.local_experts
        if gate == "naive":
            self.gate = GATES[gate](hidden_size, num_experts, top_k)
        elif gate == "switch":
            self.gate = GATES[gate](hidden_size, num_experts, capacity_factor, eval_capacity_factor)
        else:
            self.gate = GATES[gate](hidden_size, num_experts, capacity_factor, eval_capacity_factor, random_routing)
        self.experts = nn.LayerDict({str(g): ExpertFFN(hidden_size, intermediate_size)
                                     for g in range(self.first_expert, self.first_expert + self.local_experts)})
        for param in self.experts.parameters():
            mark_expert_parallel(param, EXPERT)
        self.expert_loss_weights = None
        if expert_loss_weights is not None:
            self.expert_loss_weights = paddle.to_tensor(np.asarray(expert_loss_weights, dtype="float32"))
            if ep.size > 1 and rank_local_gate:
                for param in self.gate.parameters():
                    mark_expert_parallel(param, RANK_LOCAL)
        self.mode = exchange_mode(ep.size, ep.group)
        # Hierarchical storage (ppzoo.distributed.hierarchical_storage) sets a provider that owns the experts'
        # weights: it is told the routing plan before any expert runs and hands out the experts. None: the
        # experts are this layer's own sub-layers.
        self.expert_provider = None

    def expert(self, global_index):
        if self.expert_provider is not None:
            return self.expert_provider.expert(self, global_index)
        return self.experts[str(global_index)]

    def local_expert_indices(self):
        return range(self.first_expert, self.first_expert + self.local_experts)

    def forward(self, x):
        """x [b, s, d] -> (y [b, s, d], MoEStats)."""
        shape = x.shape
        tokens = x.reshape([-1, shape[-1]])
        routing = self.gate(tokens, self.expert_loss_weights)
        k = routing.experts.shape[1]
        with paddle.no_grad():
            flat = routing.experts.reshape([-1])
            valid = flat >= 0
            # Dropped choices sort last (key E); a stable sort keeps token order within each expert.
            key = paddle.where(valid, flat, paddle.full_like(flat, self.num_experts))
            order = paddle.argsort(key, stable=True)
            counts = paddle.bincount(paddle.masked_select(flat, valid), minlength=self.num_experts)
            plan = ExchangePlan(gather_count_matrix(counts, self.ep.group, self.ep.size), self.ep.rank)
            kept = int(plan.counts[self.ep.rank].sum())
            order = order[:kept]
            token_of = order // k
        exchange = TokenExchange(plan, self.ep.group, self.mode)
        received = exchange.dispatch(paddle.gather(tokens, token_of))
        if self.expert_provider is not None:
            self.expert_provider.plan(self, plan.rows_per_local_expert())
        outputs, start = [], 0
        for g, rows in zip(self.local_expert_indices(), plan.rows_per_local_expert()):
            # Every expert runs, on zero rows too: the autograd graph then has the same shape on every rank
            # (so every rank joins the exchange's collectives in backward) and every expert gets a gradient.
            outputs.append(self.expert(g)(received[start:start + rows]))
            start += rows
        expert_out = paddle.concat(outputs) if len(outputs) > 1 else outputs[0]
        returned = exchange.combine(expert_out)
        # Back to (token, choice) slots, then the gate-weighted sum over the k choices.
        slots = paddle.scatter_nd(order.unsqueeze(-1), returned, [tokens.shape[0] * k, shape[-1]])
        y = (slots.reshape([-1, k, shape[-1]]) * routing.weights.unsqueeze(-1)).sum(axis=1)
        stats = MoEStats(routing.aux_loss, routing.aux_name, plan.tokens_between_ranks(),
                         shape[-1] * x.element_size(), 1.0 - kept / float(tokens.shape[0] * k))
        return y.reshape(shape), stats
