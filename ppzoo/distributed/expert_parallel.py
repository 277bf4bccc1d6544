"""Expert parallelism: the experts of each MoE layer are spread over the ranks of an expert-parallel (ep)
group, and every rank's tokens travel to the ranks holding their experts and back (two all-to-alls).

Groups. `Distributed.ep_degree` splits each data-parallel group into consecutive ep groups of ep_degree
ranks (ep rank = dp rank % ep_degree). Rank q of an ep group holds the experts q * E_local .. (q+1) *
E_local - 1 of every MoE layer. Ranks with the same ep rank in different ep groups hold the same experts:
they form an expert-data-parallel group, over which those experts' gradients are summed.

Exchange. Tokens are laid out by a count matrix M [P, E] (tokens rank src sends to global expert g):
- send buffer of rank src: rows ordered by global expert (destination rank major, local expert minor);
- receive buffer of rank dst: rows ordered by local expert, then source rank, so each local expert's rows
  are contiguous. This is the layout of Paddle's global_scatter / global_gather.
Two implementations, chosen by capability (`exchange_mode`):
- "global_scatter": Paddle's global_scatter / global_gather ops (all-to-all over NCCL), where this build
  registers them for the GPU and the group's backend is NCCL; their gradients are each other;
- "all_gather": every rank all-gathers every rank's (padded) buffer and keeps the rows addressed to it. It
  moves P times the data of an all-to-all, but runs on gloo, which has no all-to-all: it is the CPU path
  tests use. Its backward is the same exchange in the opposite direction.
With one rank ("local") the buffers are the same.

Gradients. Parameters that are not the same on every data-parallel rank carry `no_sync = True` (Paddle's
DataParallel then leaves them alone) and `expert_parallel`:
- EXPERT: an expert's weights. Its gradient already sums the losses of every rank of the ep group (their
  tokens came to it), so it is summed over the expert-data-parallel group and divided by the dp size: the
  same mean over all ranks' losses that DataParallel gives dense weights.
- RANK_LOCAL: a parameter each ep rank trains on its own tokens only (the topology-aware gate: its routing
  depends on where the rank sits). Averaged over the expert-data-parallel group.
"""
import numpy as np
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

from ppzoo.nn.kernels import has_kernel

EXPERT = "expert"
RANK_LOCAL = "rank_local"

LOCAL, GLOBAL_SCATTER, ALL_GATHER = "local", "global_scatter", "all_gather"


def mark_expert_parallel(param, kind):
    """Mark a parameter as not replicated over data-parallel ranks (see the module docstring)."""
    if kind not in (EXPERT, RANK_LOCAL):
        raise ValueError(f"kind must be {EXPERT!r} or {RANK_LOCAL!r}, got {kind!r}")
    param.no_sync = True
    param.expert_parallel = kind
    return param


def expert_parallel_kind(param):
    return getattr(param, "expert_parallel", None)


# ---------------------------------------------------------------------------------------------------------
# Groups


def build_expert_parallel_groups(dp_rank_lists, ep_degree, rank):
    """Create the ep and expert-data-parallel groups; returns (ep_ranks, ep_group, edp_ranks, edp_group) of
    this rank. `dp_rank_lists`: the global ranks of every data-parallel group, in dp-rank order. Every
    process creates every group in the same order (new_group is collective).

    An ep group is a group of its own even when it has the dp group's ranks: DataParallel all-reduces
    gradient buckets during backward while the exchange all-gathers inside backward too, and two streams of
    collectives sharing one gloo group can interleave differently on different ranks (measured: gloo
    TIMEOUTs in backward with 4 ranks when the ep group was the dp group)."""
    mine = {}
    for ranks in dp_rank_lists:
        for start in range(0, len(ranks), ep_degree):
            group_ranks = list(ranks[start:start + ep_degree])
            group = dist.new_group(group_ranks)
            if rank in group_ranks:
                mine["ep"] = (group_ranks, group)
    for ranks in dp_rank_lists:
        for offset in range(ep_degree):
            group_ranks = list(ranks[offset::ep_degree])
            group = dist.new_group(group_ranks) if len(group_ranks) > 1 else None
            if rank in group_ranks:
                mine["edp"] = (group_ranks, group)
    return (*mine["ep"], *mine["edp"])


# ---------------------------------------------------------------------------------------------------------
# The token exchange


def exchange_mode(ep_size, group):
    if ep_size == 1:
        return LOCAL
    on_gpu = paddle.get_device().startswith("gpu")
    if on_gpu and group.backend.lower() == "nccl" and has_kernel("global_scatter", "GPU"):
        return GLOBAL_SCATTER
    return ALL_GATHER


def gather_count_matrix(counts, group, ep_size):
    """Every rank's per-expert send counts ([E] int64 tensor) -> M [P, E] numpy, the same on every rank."""
    if ep_size == 1:
        return counts.numpy()[None, :]
    parts = []
    dist.all_gather(parts, counts, group=group)
    return np.stack([p.numpy() for p in parts])


def _row_offsets(lengths):
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


class ExchangePlan:
    """Where every row goes, from the count matrix M [P, E] and this rank's ep rank."""

    def __init__(self, count_matrix, ep_rank):
        self.counts = np.asarray(count_matrix, dtype=np.int64)
        self.ep_size, total_experts = self.counts.shape
        self.local_experts = total_experts // self.ep_size
        self.ep_rank = ep_rank
        size, el = self.ep_size, self.local_experts
        # by_dst[src, dst, e]: tokens from src to local expert e of dst.
        self.by_dst = self.counts.reshape(size, size, el)
        # Offsets of piece (src -> dst, e) in src's send buffer (global expert order) ...
        self.send_offset = np.stack([_row_offsets(row) for row in self.counts]).reshape(size, size, el)
        # ... and in dst's receive buffer (local expert, then source).
        recv_order = self.by_dst.transpose(1, 2, 0)  # [dst, e, src]
        self.recv_offset = np.stack([_row_offsets(recv_order[d].reshape(-1)).reshape(el, size)
                                     for d in range(size)])  # [dst, e, src]
        self.send_rows = self.counts.sum(axis=1)  # per src
        self.recv_rows = self.by_dst.sum(axis=(0, 2))  # per dst

    def rows_per_local_expert(self):
        """Rows this rank's experts receive, per local expert (their receive-buffer segments)."""
        return self.by_dst[:, self.ep_rank, :].sum(axis=0).tolist()

    def dispatch_pieces(self, rank):
        """Rows of `rank`'s receive buffer, in order: (source rank, start in its send buffer, count)."""
        return [(src, int(self.send_offset[src, rank, e]), int(self.by_dst[src, rank, e]))
                for e in range(self.local_experts) for src in range(self.ep_size)]

    def combine_pieces(self, rank):
        """Rows of `rank`'s send buffer, in order: (expert rank, start in its receive buffer, count)."""
        return [(dst, int(self.recv_offset[dst, e, rank]), int(self.by_dst[rank, dst, e]))
                for dst in range(self.ep_size) for e in range(self.local_experts)]

    def tokens_between_ranks(self):
        """[P, P] tokens rank i sends to rank j in one dispatch."""
        return self.by_dst.sum(axis=2)


def _assemble_from_all_gather(x, pieces, max_rows, group):
    """All-gather every rank's buffer (padded to max_rows) and cut out `pieces` ((rank, start, count))."""
    width = x.shape[-1]
    padded = x if x.shape[0] == max_rows else paddle.concat(
        [x, paddle.zeros([max_rows - x.shape[0], width], dtype=x.dtype)])
    gathered = []
    dist.all_gather(gathered, padded, group=group)
    parts = [gathered[rank][start:start + count] for rank, start, count in pieces if count > 0]
    if not parts:
        return paddle.zeros([0, width], dtype=x.dtype)
    return paddle.concat(parts) if len(parts) > 1 else parts[0]


class _AllGatherExchange(PyLayer):
    """One direction of the exchange over all_gather; the gradient travels the other way."""

    @staticmethod
    def forward(ctx, x, plan, forward_pieces, backward_pieces, group):
        # Every rank pads to the same length (all_gather needs equal shapes): the longest buffer of any rank.
        ctx.max_rows = int(max(plan.send_rows.max(), plan.recv_rows.max(), 1))
        ctx.backward_pieces, ctx.group = backward_pieces, group
        return _assemble_from_all_gather(x, forward_pieces, ctx.max_rows, group)

    @staticmethod
    def backward(ctx, grad):
        return _assemble_from_all_gather(grad.contiguous(), ctx.backward_pieces, ctx.max_rows, ctx.group)


class TokenExchange:
    """Dispatch (send buffer -> experts' receive buffer) and combine (back) for one MoE forward."""

    def __init__(self, plan, group, mode):
        self.plan, self.group, self.mode = plan, group, mode
        if mode == GLOBAL_SCATTER:
            size, el, me = plan.ep_size, plan.local_experts, plan.ep_rank
            # global_scatter's counts: local_count[i] rows to expert i % el of rank i // el; global_count[i]
            # rows from rank i // el to this rank's expert i % el.
            self.local_count = paddle.to_tensor(plan.counts[me], dtype="int64")
            self.global_count = paddle.to_tensor(plan.by_dst[:, me, :].reshape(size * el), dtype="int64")

    def dispatch(self, x):
        if self.mode == LOCAL:
            return x
        if self.mode == GLOBAL_SCATTER:
            from paddle.distributed.utils.moe_utils import global_scatter

            return global_scatter(x, self.local_count, self.global_count, group=self.group)
        me = self.plan.ep_rank
        return _AllGatherExchange.apply(x, self.plan, self.plan.dispatch_pieces(me), self.plan.combine_pieces(me),
                                        self.group)

    def combine(self, y):
        if self.mode == LOCAL:
            return y
        if self.mode == GLOBAL_SCATTER:
            from paddle.distributed.utils.moe_utils import global_gather

            return global_gather(y, self.local_count, self.global_count, group=self.group)
        me = self.plan.ep_rank
        return _AllGatherExchange.apply(y, self.plan, self.plan.combine_pieces(me), self.plan.dispatch_pieces(me),
                                        self.group)


# ---------------------------------------------------------------------------------------------------------
# Gradients


@paddle.no_grad()
def sync_expert_gradients(parameters, env):
    """Combine the gradients of expert-parallel parameters over the data-parallel ranks (see the module
    docstring); DataParallel has already averaged the others. Called once per step, after backward."""
    if env.dp_size <= 1:
        return
    edp_size = env.expert_dp_size
    for param in parameters:
        kind = expert_parallel_kind(param)
        if kind is None or param.grad is None:
            continue
        if edp_size > 1:
            dist.all_reduce(param.grad, group=env.expert_dp_group)
        param.grad.scale_(1.0 / (env.dp_size if kind == EXPERT else edp_size))
