"""Worker for tests/test_moe.py::test_moe_ep2_equals_ep1, run on 2 processes (dp 2, ep 2) under
paddle.distributed.launch with gloo.

Reads PROBLEM.npz (weights of the whole model per variant, a batch whose halves are the two ranks' batches)
and PROBLEM.json (the variants), builds each variant's MoEGPT module with half the experts on each rank,
loads its share of the weights, and writes OUT.rank{r}.npz: the logits and losses of its half, and every
parameter's gradient after the step's gradient combination (dense: averaged over ranks as DataParallel
does; experts and rank-local gates: ppzoo.distributed.expert_parallel.sync_expert_gradients).
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

import ppzoo  # noqa: E402,F401
from ppzoo.config.schema import DistributedConfig  # noqa: E402
from ppzoo.distributed.env import init_parallel_env  # noqa: E402
from ppzoo.distributed.expert_parallel import sync_expert_gradients  # noqa: E402
from ppzoo.models.moe_gpt.model import MoEGPTConfig  # noqa: E402
from ppzoo.models.moe_gpt.module import MoEGPTModule  # noqa: E402


def main(problem_prefix, out_prefix):
    problem = dict(np.load(f"{problem_prefix}.npz"))
    spec = json.loads(Path(f"{problem_prefix}.json").read_text())
    paddle.set_device("cpu")
    env = init_parallel_env(DistributedConfig(dp_degree=2, ep_degree=2, topology=spec["topology"]), "cpu")
    assert (env.ep_size, env.dp_size, env.expert_dp_size) == (2, 2, 1)
    half = problem["input_ids"].shape[0] // 2
    rows = slice(env.rank * half, (env.rank + 1) * half)
    batch = {key: paddle.to_tensor(problem[key][rows]) for key in ("input_ids", "labels", "doc_ids")}
    results = {}
    for variant in spec["variants"]:
        name = variant["name"]
        paddle.seed(variant["seed"])
        module = MoEGPTModule(MoEGPTConfig(**variant["config"]), env)
        # The same draws as the single-process model: the shared names must get equal initial values.
        for key, value in module.state_dict().items():
            results[f"{name}/init/{key}"] = value.numpy()
        prefix = f"{name}/weight/"
        own = module.state_dict()
        module.set_state_dict({key: problem[prefix + key] for key in own})
        with paddle.no_grad():
            logits, _ = module.model(batch["input_ids"], doc_ids=batch["doc_ids"])
        results[f"{name}/logits"] = logits.numpy()
        losses = module.training_step(batch)
        losses["loss"].backward()
        for key in ("loss", "lm_loss"):
            results[f"{name}/{key}"] = losses[key].numpy()
        results[f"{name}/inter_node_tokens"] = np.array(losses["moe_tokens_inter_node"])
        # What the engine does after backward: DataParallel averages dense gradients, then the experts'.
        with paddle.no_grad():
            for param in module.parameters():
                if getattr(param, "expert_parallel", None) is None and param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad.scale_(1.0 / env.dp_size)
        sync_expert_gradients(module.parameters(), env)
        for key, param in module.named_parameters():
            results[f"{name}/grad/{key}"] = param.grad.numpy()
    np.savez(f"{out_prefix}.rank{env.rank}.npz", **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
