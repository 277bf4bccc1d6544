"""Worker for tests/test_se_moe.py::test_fused_communication_equals_unfused, run on 2 processes with gloo.

Each rank draws different tensors (gradients of many shapes and two dtypes, and a dict of scalars), reduces
them once per tensor with plain all_reduce and once with ppzoo.distributed.fused_comm (small buckets, so
several tensors share one), and writes both to OUT.rank{r}.npz with the number of collectives each issued.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

from ppzoo.distributed.fused_comm import allreduce_gradients, fused_mean  # noqa: E402


class _Param:
    """A stand-in parameter: a gradient and the attributes allreduce_gradients reads."""

    def __init__(self, grad, expert=False):
        self.grad = grad
        if expert:
            self.expert_parallel, self.no_sync = "expert", True


def main(out_prefix):
    paddle.set_device("cpu")
    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = np.random.default_rng(100 + rank)
    shapes = [[7], [3, 5], [64, 33], [2], [16, 16, 4], [1], [300], [5, 9]]
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    arrays.append(rng.standard_normal([11]).astype(np.float64))  # another dtype: a bucket of its own
    unfused = []
    for a in arrays:
        t = paddle.to_tensor(a)
        dist.all_reduce(t)
        unfused.append((t / world).numpy())
    params = [_Param(paddle.to_tensor(a)) for a in arrays]
    expert = _Param(paddle.to_tensor(rng.standard_normal([4]).astype(np.float32)), expert=True)
    before_expert = expert.grad.numpy().copy()
    collectives = allreduce_gradients(params + [expert], None, world, bucket_bytes=1024)
    scalars = {"loss": float(rng.random()), "aux": float(rng.random()), "tokens": float(rank + 1)}
    unfused_scalars = {}
    for name, value in scalars.items():
        t = paddle.to_tensor([value], dtype="float64")
        dist.all_reduce(t)
        unfused_scalars[name] = float(t.item()) / world
    fused_scalars = fused_mean(scalars, None, world)
    result = {f"unfused/{i}": a for i, a in enumerate(unfused)}
    result.update({f"fused/{i}": p.grad.numpy() for i, p in enumerate(params)})
    result.update({"collectives": np.array(collectives), "expert_untouched": np.array(
        np.array_equal(expert.grad.numpy(), before_expert))})
    result.update({f"scalar_unfused/{k}": np.array(v) for k, v in unfused_scalars.items()})
    result.update({f"scalar_fused/{k}": np.array(v) for k, v in fused_scalars.items()})
    np.savez(f"{out_prefix}.rank{rank}.npz", **result)


if __name__ == "__main__":
    main(sys.argv[1])
