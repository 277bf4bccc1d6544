"""Worker for tests/test_axial_parallel.py, run on 2 processes under paddle.distributed.launch with gloo.

Reads PROBLEM.npz (the Evoformer and extra MSA stacks' weights, the inputs, and the weights of a scalar
loss over the outputs), runs both stacks with dynamic axial parallelism over the two processes
(Distributed.dap_degree = 2), and writes OUT.rank{r}.npz: the outputs, the inputs' gradients and every
parameter's gradient after the DAP gradient sum.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402

import ppzoo  # noqa: E402,F401
from ppzoo.config.schema import DistributedConfig  # noqa: E402
from ppzoo.distributed.axial_parallel import new_axial_parallel  # noqa: E402
from ppzoo.distributed.env import init_parallel_env  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_axial_parallel import build_stacks, run_stacks  # noqa: E402


def main(problem_prefix, out_prefix):
    problem = dict(np.load(f"{problem_prefix}.npz"))
    config = json.loads(Path(f"{problem_prefix}.json").read_text())
    paddle.set_device("cpu")
    env = init_parallel_env(DistributedConfig(dp_degree=2), "cpu")
    dap = new_axial_parallel(2)
    assert dap.degree == 2 and dap.rank == env.rank and not dap.native_all_to_all
    evoformer, extra = build_stacks(config, problem)
    results = run_stacks(evoformer, extra, problem, dap)
    np.savez(f"{out_prefix}.rank{env.rank}.npz", **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
