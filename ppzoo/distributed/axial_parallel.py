"""Dynamic axial parallelism (DAP; HelixFold, Wang et al. 2022, after FastFold): the Evoformer's MSA and pair
activations split along one axis over `Distributed.dap_degree` processes that work on the same protein.

The MSA [B, S, N, C] is split along its sequences S for the row-wise operations (row attention attends
along N within each sequence) and along its residues N for the column-wise ones (column attention attends
along S within each residue); the pair [B, N, N, C] is split along its rows i, and along its columns j for
the operations around the ending node (triangle attention around the ending node, and the incoming triangle
multiplication's left projection). Switching the split axis is an all-to-all transpose: each process sends
the part of its shard that another process will own. Operations that need a whole tensor (the pair bias of
row attention and triangle attention, the right projections of the outer product mean and the triangle
multiplications) all-gather it.

Collectives and their gradients (PyLayers):
- `split(x, axis)`: this rank's shard of a replicated tensor; backward all-gathers the shards' gradients.
- `gather(x, axis)`: the whole tensor for rank-local use; backward sums the ranks' gradients of this rank's
  shard (reduce-scatter; all-reduce then slice on gloo, which has no reduce_scatter).
- `collect(x, axis)`: the whole tensor for replicated use afterwards (every rank computes the same from it);
  backward keeps this rank's shard of the (identical) gradient.
- `transpose(x, from_axis, to_axis)`: the all-to-all from a shard along `from_axis` to a shard along
  `to_axis`; its backward is the transpose back.
The all-to-all is paddle.distributed.alltoall on NCCL (chosen by the group's backend); on gloo, which has no
alltoall, it is an all_gather of the shards followed by taking this rank's slice: the same result with D times
the traffic, for CPU tests.

Parameters inside the split region see only their shard's contribution: `sync_gradients` sums those
gradients over the DAP group before the optimizer step (parameters outside it compute replicated, whole
gradients and must not be summed).
"""
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

from ppzoo.errors import ConfigError


class AxialParallel:
    """A DAP group: `degree` processes, this one `rank` among them. degree 1 (no group) makes every operation
    the identity, so the Evoformer runs the same code with and without DAP."""

    def __init__(self, group=None):
        self.group = group
        self.degree = 1 if group is None else group.nranks
        self.rank = 0 if group is None else group.rank
        backend = "" if group is None else str(dist.get_backend(group)).lower()
        self.native_all_to_all = backend == "nccl"  # gloo has no alltoall / reduce_scatter

    @property
    def enabled(self):
        return self.degree > 1

    def check_divisible(self, what, length):
        if length % self.degree:
            raise ConfigError(f"{what} ({length}) must be divisible by Distributed.dap_degree ({self.degree}) to "
                              f"split it over the DAP group; pad the features (crop_size / MSA sizes) to a multiple.")

    # -- collectives on tensors without autograd ---------------------------------------------------------
    def _all_gather(self, x, axis):
        parts = []
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return paddle.concat(parts, axis=axis)

    def _shard(self, x, axis):
        return paddle.split(x, self.degree, axis=axis)[self.rank].contiguous()

    def _reduce_shard(self, x, axis):
        """Sum over the ranks of x, keeping this rank's shard along axis."""
        if self.native_all_to_all:
            out = paddle.empty_like(self._shard(x, axis))
            dist.reduce_scatter(out, [p.contiguous() for p in paddle.split(x, self.degree, axis=axis)],
                                group=self.group)
            return out
        total = x.clone()
        dist.all_reduce(total, group=self.group)
        return self._shard(total, axis)

    def _all_to_all(self, x, from_axis, to_axis):
        """x sharded along from_axis (whole along to_axis) -> sharded along to_axis (whole along from_axis)."""
        if self.native_all_to_all:
            received = []
            dist.alltoall(received, [p.contiguous() for p in paddle.split(x, self.degree, axis=to_axis)],
                          group=self.group)
            return paddle.concat(received, axis=from_axis)
        return self._shard(self._all_gather(x, from_axis), to_axis)

    # -- differentiable operations ------------------------------------------------------------------------
    def split(self, x, axis):
        if not self.enabled:
            return x
        self.check_divisible(f"axis {axis} of a {list(x.shape)} activation", x.shape[axis])
        return _Split.apply(x, self, axis)

    def gather(self, x, axis):
        return _Gather.apply(x, self, axis) if self.enabled else x

    def collect(self, x, axis):
        return _Collect.apply(x, self, axis) if self.enabled else x

    def transpose(self, x, from_axis, to_axis):
        if not self.enabled:
            return x
        self.check_divisible(f"axis {to_axis} of a {list(x.shape)} activation", x.shape[to_axis])
        return _Transpose.apply(x, self, from_axis, to_axis)

    def shard_of(self, x, axis):
        """This rank's shard of a tensor every rank holds whole and that needs no gradient (masks)."""
        return self._shard(x, axis) if self.enabled else x

    def sync_gradients(self, parameters):
        """Sum the gradients of parameters used inside the split region over the DAP group."""
        if not self.enabled:
            return
        for param in parameters:
            if param.grad is not None:
                dist.all_reduce(param.grad, group=self.group)


class _Split(PyLayer):
    @staticmethod
    def forward(ctx, x, dap, axis):
        ctx.dap, ctx.axis = dap, axis
        return dap._shard(x, axis)

    @staticmethod
    def backward(ctx, grad):
        return ctx.dap._all_gather(grad, ctx.axis)


class _Gather(PyLayer):
    @staticmethod
    def forward(ctx, x, dap, axis):
        ctx.dap, ctx.axis = dap, axis
        return dap._all_gather(x, axis)

    @staticmethod
    def backward(ctx, grad):
        return ctx.dap._reduce_shard(grad, ctx.axis)


class _Collect(PyLayer):
    @staticmethod
    def forward(ctx, x, dap, axis):
        ctx.dap, ctx.axis = dap, axis
        return dap._all_gather(x, axis)

    @staticmethod
    def backward(ctx, grad):
        return ctx.dap._shard(grad, ctx.axis)


class _Transpose(PyLayer):
    @staticmethod
    def forward(ctx, x, dap, from_axis, to_axis):
        ctx.dap, ctx.from_axis, ctx.to_axis = dap, from_axis, to_axis
        return dap._all_to_all(x, from_axis, to_axis)

    @staticmethod
    def backward(ctx, grad):
        return ctx.dap._all_to_all(grad, ctx.to_axis, ctx.from_axis)


def new_axial_parallel(dap_degree):
    """The DAP group of this process: consecutive ranks [k * dap_degree, (k + 1) * dap_degree) work on one
    protein. dap_degree 1: AxialParallel without a group. Every process must call it (new_group is
    collective)."""
    if dap_degree < 1:
        raise ConfigError(f"Distributed.dap_degree must be at least 1, got {dap_degree}.")
    if dap_degree == 1:
        return AxialParallel()
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % dap_degree:
        raise ConfigError(f"Distributed.dap_degree={dap_degree} does not divide the {world} launched processes; "
                          f"launch a multiple of {dap_degree} (--nproc_per_node).")
    mine = None
    for start in range(0, world, dap_degree):
        group = dist.new_group(list(range(start, start + dap_degree)))
        if start <= rank < start + dap_degree:
            mine = group
    return AxialParallel(mine)
