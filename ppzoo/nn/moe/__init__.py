"""Mixture of experts: gates (naive top-k, GShard top-2, Switch top-1, topology-aware loss) and the MoE layer
with its expert dispatch."""
from ppzoo.nn.moe.gates import GATES, GShardGate, NaiveGate, Routing, SwitchGate, load_balance_loss  # noqa: F401
from ppzoo.nn.moe.layer import ExpertFFN, ExpertParallelContext, MoELayer, MoEStats  # noqa: F401
