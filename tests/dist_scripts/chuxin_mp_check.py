"""Run the ChuXin module at mp=2 and write its init, logits, loss and gradients in the full (mp=1) layout.

Launched by tests/test_distributed_train.py as
    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_scripts/chuxin_mp_check.py PROBLEM OUT
PROBLEM.json lists the variants (name, seed, ChuXinConfig fields); PROBLEM.npz holds the batch
(input_ids, labels, doc_ids) and, per variant, full-layout weights "<variant>/weight/<name>". Every rank
writes OUT.rank<r>.npz with, per variant:
  <variant>/init/<name>    the freshly built model's weights (seeded with the variant's seed), gathered;
  <variant>/logits         logits over the whole vocabulary with the given weights loaded (sharded);
  <variant>/loss           the module's training loss;
  <variant>/grad/<name>    d loss / d weight, gathered to the full layout.
The test computes the same at mp=1 in one process.
"""
import json
import sys

import numpy as np


def main(problem_prefix, out_prefix):
    import paddle

    from ppzoo.config.schema import DistributedConfig
    from ppzoo.distributed.env import init_parallel_env
    from ppzoo.distributed.tensor_parallel import all_gather_along_axis, gather_state_dict, shard_state_dict
    from ppzoo.models.chuxin.model import ChuXinConfig
    from ppzoo.models.chuxin.module import ChuXinModule

    paddle.set_device("cpu")
    env = init_parallel_env(DistributedConfig(mp_degree=2), "cpu")
    group = env.mp_group
    with open(problem_prefix + ".json") as f:
        variants = json.load(f)["variants"]
    problem = dict(np.load(problem_prefix + ".npz"))
    batch = {key: paddle.to_tensor(problem[key]) for key in ("input_ids", "labels", "doc_ids")}

    results = {}
    for variant in variants:
        name = variant["name"]
        paddle.seed(variant["seed"])
        module = ChuXinModule(ChuXinConfig(**variant["config"]), env)
        for key, value in gather_state_dict(module, group).items():
            results[f"{name}/init/{key}"] = value.numpy()

        full = {key[len(f"{name}/weight/"):]: value for key, value in problem.items()
                if key.startswith(f"{name}/weight/")}
        module.set_state_dict(shard_state_dict(full, module, env.mp_rank, env.mp_size))
        with paddle.no_grad():
            local_logits = module.model(batch["input_ids"], doc_ids=batch["doc_ids"])
        results[f"{name}/logits"] = all_gather_along_axis(local_logits, -1, group).numpy()
        loss = module.training_step(batch)["loss"]
        loss.backward()
        results[f"{name}/loss"] = loss.numpy()
        for key, param in module.named_parameters():
            axis = getattr(param, "mp_split_axis", None)
            grad = param.grad if axis is None else all_gather_along_axis(param.grad, axis, group)
            results[f"{name}/grad/{key}"] = grad.numpy()
        print(f"rank {env.rank}: {name} loss {float(loss):.6f}", flush=True)

    np.savez(f"{out_prefix}.rank{env.rank}.npz", **results)
    print(f"rank {env.rank}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
