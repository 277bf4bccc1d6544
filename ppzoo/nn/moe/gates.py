"""MoE gates: which experts each token goes to, with what weight, and the auxiliary load-balance loss.

A gate maps tokens x [T, d] to a Routing: `experts` [T, k] (global expert indices, -1 where a token's
choice was dropped) and `weights` [T, k] (the combine weights, 0 where dropped, differentiable).

- NaiveGate (top-k): the k highest logits, weights the softmax over those k; no capacity, no loss.
- GShardGate (Lepikhin et al., 2020): top-2 of the softmax, weights g1, g2 normalised to sum 1; the second
  expert is kept with probability min(1, 2 g2) (random routing); each expert takes at most
  capacity = ceil(capacity_factor * T * 2 / E) tokens of the group (first choices before second choices,
  in token order); load-balance loss E * sum_e f_e m_e, f_e the fraction of tokens whose first choice is e,
  m_e the mean gate probability of e.
- SwitchGate (Fedus et al., 2021): top-1, weight the chosen probability, capacity ceil(cf * T / E), the same
  loss.

Topology-aware loss (TA-MoE, Chen et al., 2022): the load-balance loss with a weight per expert,
E * sum_e w_e f_e m_e. With w_e = 1 / (E c_e) for a target share c_e of this rank's tokens, the loss is
smallest at f_e = m_e = c_e, so routing is pulled towards the target pattern; equal weights (c_e = 1 / E)
give GShard's loss. The weights come from ppzoo.distributed.topology via the MoE layer.

A group is the tokens of one forward on one rank (GShard's "group"): capacity counts them.
"""
import math
from dataclasses import dataclass
from typing import Optional

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


@dataclass
class Routing:
    experts: paddle.Tensor  # [T, k] int64, -1: dropped
    weights: paddle.Tensor  # [T, k] combine weights, 0 where dropped
    aux_loss: Optional[paddle.Tensor] = None  # the gate's auxiliary loss (None: the gate has none)
    aux_name: str = ""  # its name in the logged metrics


def load_balance_loss(first_choice, probs, expert_weights=None):
    """E * sum_e w_e f_e m_e: f_e the fraction of tokens whose first choice is e (counted, no gradient), m_e
    the mean probability of e (the gradient's path); w_e = 1 without `expert_weights` ([E])."""
    tokens, num_experts = probs.shape
    fraction = paddle.bincount(first_choice, minlength=num_experts).astype(probs.dtype) / tokens
    mean_prob = probs.mean(axis=0)
    per_expert = fraction * mean_prob
    if expert_weights is not None:
        per_expert = per_expert * expert_weights
    return num_experts * per_expert.sum()


def keep_within_capacity(choice, capacity, num_experts, already=None):
    """Bool [T]: whether token t's choice `choice[t]` (-1: none) fits in its expert, taking tokens in order;
    `already` [E]: slots each expert has filled before (e.g. by first choices). Also returns the new fill."""
    valid = choice >= 0
    one_hot = F.one_hot(paddle.where(valid, choice, paddle.zeros_like(choice)), num_experts).astype("int64")
    one_hot = one_hot * valid.astype("int64").unsqueeze(-1)
    position = (paddle.cumsum(one_hot, axis=0) * one_hot).sum(axis=-1) - 1  # slot among this expert's tokens
    if already is not None:
        position = position + paddle.gather(already, paddle.where(valid, choice, paddle.zeros_like(choice)))
    keep = valid & (position < capacity)
    filled = one_hot.sum(axis=0) if already is None else already + one_hot.sum(axis=0)
    return keep, paddle.minimum(filled, paddle.full_like(filled, capacity))


class Gate(nn.Layer):
    """A linear router (no bias): logits = x W, W [d, E]."""

    top_k = 1

    def __init__(self, hidden_size, num_experts):
        super().__init__()
        self.num_experts = num_experts
        self.weight = self.create_parameter([hidden_size, num_experts])

    def logits(self, x):
        return paddle.matmul(x, self.weight)

    def forward(self, x, expert_loss_weights=None):
        raise NotImplementedError


class NaiveGate(Gate):
    def __init__(self, hidden_size, num_experts, top_k=2):
        super().__init__(hidden_size, num_experts)
        self.top_k = top_k

    def forward(self, x, expert_loss_weights=None):
        values, experts = paddle.topk(self.logits(x), self.top_k, axis=-1)
        return Routing(experts, F.softmax(values, axis=-1))


class SwitchGate(Gate):
    top_k = 1

    def __init__(self, hidden_size, num_experts, capacity_factor=1.25, eval_capacity_factor=2.0):
        super().__init__(hidden_size, num_experts)
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor

    def capacity(self, tokens):
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return max(1, math.ceil(factor * tokens / self.num_experts))

    def forward(self, x, expert_loss_weights=None):
        probs = F.softmax(self.logits(x), axis=-1)
        prob, expert = paddle.topk(probs, 1, axis=-1)
        expert = expert.squeeze(-1)
        with paddle.no_grad():
            keep, _ = keep_within_capacity(expert, self.capacity(x.shape[0]), self.num_experts)
        aux = load_balance_loss(expert, probs, expert_loss_weights)
        experts = paddle.where(keep, expert, paddle.full_like(expert, -1)).unsqueeze(-1)
        weights = prob * keep.astype(prob.dtype).unsqueeze(-1)
        return Routing(experts, weights, aux, "topology_loss" if expert_loss_weights is not None else "balance_loss")


class GShardGate(Gate):
    top_k = 2

    def __init__(self, hidden_size, num_experts, capacity_factor=1.25, eval_capacity_factor=2.0, random_routing=True):
        super().__init__(hidden_size, num_experts)
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.random_routing = random_routing

    def capacity(self, tokens):
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return max(1, math.ceil(factor * tokens * 2 / self.num_experts))

    def forward(self, x, expert_loss_weights=None):
        probs = F.softmax(self.logits(x), axis=-1)
        top_probs, top_experts = paddle.topk(probs, 2, axis=-1)
        weights = top_probs / (top_probs.sum(axis=-1, keepdim=True) + 1e-9)
        first, second = top_experts[:, 0], top_experts[:, 1]
        with paddle.no_grad():
            if self.random_routing and self.training:
                # GShard: the second expert serves the token with probability 2 * g2 (g2 <= 1/2).
                keep_second = paddle.rand([x.shape[0]], dtype=weights.dtype) < 2.0 * weights[:, 1]
                second = paddle.where(keep_second, second, paddle.full_like(second, -1))
            capacity = self.capacity(x.shape[0])
            keep_first, filled = keep_within_capacity(first, capacity, self.num_experts)
            keep_second, _ = keep_within_capacity(second, capacity, self.num_experts, already=filled)
            keep = paddle.stack([keep_first, keep_second], axis=-1)
        aux = load_balance_loss(first, probs, expert_loss_weights)
        experts = paddle.where(keep, top_experts, paddle.full_like(top_experts, -1))
        weights = weights * keep.astype(weights.dtype)
        return Routing(experts, weights, aux, "topology_loss" if expert_loss_weights is not None else "balance_loss")


GATES = {"naive": NaiveGate, "gshard": GShardGate, "switch": SwitchGate}
