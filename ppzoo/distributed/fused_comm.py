"""Fused communication (SE-MoE): fewer, larger collectives.

- `allreduce_gradients`: the dense (replicated) parameters' gradients packed into flat buckets of at most
  `bucket_bytes`, one all-reduce per bucket instead of one per tensor, then unpacked in place. A sum is a
  sum whatever the packing, so the result is the per-tensor all-reduce's.
- `fused_mean`: many scalars (the losses and metrics every step logs) averaged over a group in one
  all-reduce of a float64 vector instead of one collective per scalar.

With `Distributed.se_moe.fused_comm: true` the engine uses both for data parallelism: the model is not wrapped
in Paddle's DataParallel, and after the step's last backward the dense gradients are all-reduced here in
buckets (expert gradients stay with ppzoo.distributed.expert_parallel.sync_expert_gradients).
"""
import numpy as np
import paddle
import paddle.distributed as dist

from ppzoo.distributed.expert_parallel import expert_parallel_kind


def bucket_tensors(tensors, bucket_bytes):
    """Consecutive tensors of one dtype grouped into buckets of at most `bucket_bytes` (a larger tensor is
    a bucket of its own)."""
    buckets, current, size = [], [], 0
    for tensor in tensors:
        nbytes = int(tensor.size) * tensor.element_size()
        if current and (size + nbytes > bucket_bytes or tensor.dtype != current[0].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(tensor)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


@paddle.no_grad()
def fused_all_reduce(tensors, group=None, bucket_bytes=25 << 20, scale=None):
    """All-reduce (sum) `tensors` in place, bucket by bucket; each result times `scale` if given. Returns the
    number of collectives issued."""
    buckets = bucket_tensors(list(tensors), bucket_bytes)
    for bucket in buckets:
        flat = paddle.concat([t.reshape([-1]) for t in bucket]) if len(bucket) > 1 else bucket[0].reshape([-1])
        dist.all_reduce(flat, group=group)
        if scale is not None:
            flat = flat * scale
        offset = 0
        for tensor in bucket:
            size = int(tensor.size)
            paddle.assign(flat[offset:offset + size].reshape(tensor.shape), output=tensor)
            offset += size
    return len(buckets)


def allreduce_gradients(parameters, group, world, bucket_bytes=25 << 20):
    """Average the gradients of the replicated (not expert-parallel) parameters over `group` of `world`
    ranks, in buckets: what DataParallel does to them. Returns the number of collectives."""
    grads = [p.grad for p in parameters
             if p.grad is not None and expert_parallel_kind(p) is None and not getattr(p, "no_sync", False)]
    if world <= 1 or not grads:
        return 0
    return fused_all_reduce(grads, group, bucket_bytes, scale=1.0 / world)


def fused_mean(values, group, world):
    """{name: float} averaged over `group` of `world` ranks with one all-reduce (names in the same order on
    every rank: sorted here)."""
    if world <= 1 or not values:
        return dict(values)
    names = sorted(values)
    vector = paddle.to_tensor(np.array([values[n] for n in names], dtype=np.float64))
    dist.all_reduce(vector, group=group)
    return {name: float(v) / world for name, v in zip(names, vector.numpy())}
