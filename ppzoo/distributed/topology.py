"""The network between the ranks of a job, for topology-aware MoE routing (TA-MoE) and for modelling the
time of the experts' all-to-all exchange.

A topology is a P x P matrix of link bandwidths in GB/s (10^9 bytes per second) between the job's P ranks,
and the node each rank sits on. Two file forms are read (`Distributed.topology`):

- YAML describing nodes:
      nodes: [[0, 1], [2, 3]]          # or: ranks_per_node: 2 (consecutive ranks share a node)
      intra_node_bandwidth: 8.0        # GB/s between two ranks of one node
      inter_node_bandwidth: 1.0        # GB/s between ranks of different nodes
      local_bandwidth: 8.0             # optional (default: intra_node_bandwidth), see target_proportions
- a plain-text P x P bandwidth matrix (one row per line, GB/s; the diagonal is the local bandwidth). Its
  fastest off-diagonal links join ranks into nodes; every slower link is an inter-node link.

From TA-MoE (Chen et al., 2022): an all-to-all is as slow as its slowest link, so the dispatch pattern that
minimises max_j (share_ij * bytes / B_ij) under sum_j share_ij = 1 gives each destination a share
proportional to the link's bandwidth: all links then finish together. Those shares are the target
proportions; the topology-aware auxiliary loss pulls each rank's dispatch towards them.
"""
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import yaml

from ppzoo.errors import ConfigError

LOCAL, INTRA_NODE, INTER_NODE = "local", "intra_node", "inter_node"
LINK_CLASSES = (LOCAL, INTRA_NODE, INTER_NODE)
GIGA = 1e9


@dataclass
class Topology:
    bandwidth: np.ndarray  # [P, P] GB/s; the diagonal is what a rank's tokens to itself count as
    node_of: List[int]  # node index of every rank
    source: str = ""

    @property
    def size(self):
        return len(self.node_of)

    def link_class(self, src, dst):
        if src == dst:
            return LOCAL
        return INTRA_NODE if self.node_of[src] == self.node_of[dst] else INTER_NODE

    def link_classes(self):
        """[P, P] array of link class names."""
        return np.array([[self.link_class(i, j) for j in range(self.size)] for i in range(self.size)])

    def subset(self, ranks: Sequence[int]):
        """The topology among `ranks` (global ranks, e.g. one expert-parallel group), renumbered 0..len-1."""
        ranks = list(ranks)
        if max(ranks) >= self.size:
            raise ConfigError(
                f"The topology in {self.source} describes {self.size} ranks, but the job has rank {max(ranks)}. "
                "Describe every rank of the job (nodes / ranks_per_node, or a larger bandwidth matrix)."
            )
        return Topology(self.bandwidth[np.ix_(ranks, ranks)].copy(), [self.node_of[r] for r in ranks], self.source)

    def target_proportions(self):
        """[P, P]: the share of rank i's dispatched tokens that should go to rank j, proportional to B_ij.

        Tokens a rank keeps cost no link, but a share proportional to an unbounded local bandwidth would keep
        every token at home (no expert parallelism left), so the local share is weighted by the diagonal:
        by default the bandwidth of a link inside the node (a node-local peer and the rank itself are
        equally good destinations)."""
        return self.bandwidth / self.bandwidth.sum(axis=1, keepdims=True)

    def loss_weights(self):
        """[P, P]: weight of rank i's dispatched fraction to rank j in the topology-aware loss, 1 / (P c_ij).

        The loss sum_j w_ij f_ij m_ij is smallest (for f = m) at f_ij = c_ij; with equal bandwidths every
        weight is 1 and the loss is GShard's."""
        return 1.0 / (self.size * self.target_proportions())

    def alltoall_seconds(self, bytes_matrix):
        """Modelled time of one all-to-all: the slowest link, max over i != j of bytes_ij / B_ij. Links run
        concurrently; what a rank keeps moves no link."""
        seconds = np.asarray(bytes_matrix, dtype=np.float64) / (self.bandwidth * GIGA)
        np.fill_diagonal(seconds, 0.0)
        return float(seconds.max())


def uniform_topology(size, bandwidth=1.0):
    """Every rank on one node, all links alike (the topology GShard's loss assumes)."""
    return Topology(np.full((size, size), float(bandwidth)), [0] * size, "uniform")


def load_topology(path, world_size=None):
    """Read a topology file (YAML or a bandwidth matrix, see the module docstring); errors name the file."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"Distributed.topology: cannot read {path} ({e.strerror}). Point it at a topology YAML "
                          "or a P x P bandwidth matrix file (see configs/moe_gpt/topology_2x2.yaml).") from e
    if path.endswith((".yaml", ".yml")):
        topology = _from_yaml(yaml.safe_load(text), path)
    else:
        topology = _from_matrix(text, path)
    if world_size is not None and topology.size < world_size:
        raise ConfigError(
            f"The topology in {path} describes {topology.size} ranks but the job has {world_size} processes. "
            "Describe every rank (nodes / ranks_per_node, or a larger bandwidth matrix)."
        )
    return topology


def _positive(value, key, path):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{path}: {key} must be a positive number of GB/s, got {value!r}.")
    return float(value)


def _from_yaml(data, path):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a topology YAML is a mapping with nodes (or ranks_per_node and num_nodes), "
                          "intra_node_bandwidth and inter_node_bandwidth.")
    known = {"nodes", "ranks_per_node", "num_nodes", "intra_node_bandwidth", "inter_node_bandwidth", "local_bandwidth"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown topology keys {unknown}; valid keys: {sorted(known)}.")
    if "nodes" in data:
        nodes = data["nodes"]
        if not (isinstance(nodes, list) and all(isinstance(n, list) and n for n in nodes)):
            raise ConfigError(f"{path}: nodes must be a list of rank lists, e.g. [[0, 1], [2, 3]].")
    elif "ranks_per_node" in data and "num_nodes" in data:
        per, count = data["ranks_per_node"], data["num_nodes"]
        nodes = [list(range(n * per, (n + 1) * per)) for n in range(count)]
    else:
        raise ConfigError(f"{path}: give nodes: [[0, 1], [2, 3]] or ranks_per_node and num_nodes.")
    ranks = sorted(r for node in nodes for r in node)
    if ranks != list(range(len(ranks))):
        raise ConfigError(f"{path}: the nodes must hold each rank 0..{len(ranks) - 1} exactly once, got {nodes}.")
    intra = _positive(data.get("intra_node_bandwidth"), "intra_node_bandwidth", path)
    inter = _positive(data.get("inter_node_bandwidth"), "inter_node_bandwidth", path)
    local = _positive(data.get("local_bandwidth", intra), "local_bandwidth", path)
    node_of = [0] * len(ranks)
    for index, node in enumerate(nodes):
        for rank in node:
            node_of[rank] = index
    bandwidth = np.array([[local if i == j else intra if node_of[i] == node_of[j] else inter
                           for j in range(len(ranks))] for i in range(len(ranks))])
    return Topology(bandwidth, node_of, path)


def _from_matrix(text, path):
    try:
        rows = [[float(v) for v in line.replace(",", " ").split()] for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    except ValueError as e:
        raise ConfigError(f"{path}: a bandwidth matrix file holds numbers only ({e}).") from e
    if not rows or any(len(row) != len(rows) for row in rows):
        raise ConfigError(f"{path}: expected a square P x P bandwidth matrix, got rows of lengths "
                          f"{[len(row) for row in rows]}.")
    bandwidth = np.array(rows)
    if (bandwidth <= 0).any():
        raise ConfigError(f"{path}: every bandwidth must be positive (GB/s).")
    size = len(rows)
    off_diagonal = bandwidth[~np.eye(size, dtype=bool)]
    fastest = off_diagonal.max() if size > 1 else 0.0
    # Nodes: ranks joined by the fastest links (connected components).
    node_of = [-1] * size
    for start in range(size):
        if node_of[start] >= 0:
            continue
        node_of[start], stack = max(node_of) + 1, [start]
        while stack:
            i = stack.pop()
            for j in range(size):
                if node_of[j] < 0 and i != j and bandwidth[i, j] >= fastest:
                    node_of[j] = node_of[start]
                    stack.append(j)
    return Topology(bandwidth, node_of, path)


def traffic_by_link_class(tokens_between_ranks, bytes_per_token, topology=None):
    """Tokens and bytes of one MoE layer's forward exchange (dispatch and combine: the same rows travel out
    and back) per link class, and its modelled all-to-all time in milliseconds (two all-to-alls, each as slow
    as its slowest link; only with a topology). Without a topology every peer counts as intra-node.

    `tokens_between_ranks` [P, P]: tokens rank i dispatches to rank j (ranks of one ep group)."""
    tokens = np.asarray(tokens_between_ranks, dtype=np.float64)
    size = tokens.shape[0]
    topology = topology or uniform_topology(size)
    classes = topology.link_classes()
    stats = {}
    for name in LINK_CLASSES:
        moved = 2.0 * tokens[classes == name].sum()
        stats[f"tokens_{name}"] = moved
        stats[f"bytes_{name}"] = moved * bytes_per_token
    if topology.source != "uniform":
        stats["alltoall_ms"] = 2.0 * 1e3 * topology.alltoall_seconds(tokens * bytes_per_token)
    return stats
