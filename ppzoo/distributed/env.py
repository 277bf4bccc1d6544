"""The process's place in a distributed run: world size, ranks, communication groups.

`init_parallel_env` is called once per process, before any model is built. Under
`python -m paddle.distributed.launch` it initializes fleet's hybrid topology; a plain single-process run needs
no launcher and does not touch fleet at all (fleet's hybrid wrappers assert a world larger than one).

What runs where (Paddle 3.3 CPU build, gloo backend):
- data parallel and tensor (model) parallel run on CPU; fleet's hybrid init builds the model-parallel group
  on CPU as well, but fleet's own tensor-parallel layers need GPU kernels, so ppzoo.distributed.tensor_parallel
  brings its own gloo implementation and uses fleet's layers only on GPU with NCCL;
- pipeline parallel and group sharding do not run on CPU and are refused up front with the reason.
"""
from dataclasses import dataclass
from typing import Any

from ppzoo.errors import ConfigError, PpzooError

_DEVICES = ("cpu", "gpu")


@dataclass
class ParallelEnv:
    world_size: int = 1
    rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    mp_rank: int = 0
    mp_size: int = 1
    pp_size: int = 1
    pp_rank: int = 0
    sharding_rank: int = 0
    sharding_size: int = 1
    device: str = "cpu"  # cpu | gpu
    backend: str = "gloo"  # gloo | nccl
    hcg: Any = None  # fleet's HybridCommunicateGroup; None at world size 1
    dp_group: Any = None  # paddle.distributed Group; None at world size 1
    mp_group: Any = None
    # Expert parallelism (see ppzoo.distributed.expert_parallel): the ep group splits the dp group; ranks with
    # the same ep rank form the expert-data-parallel (edp) group. `ep_ranks`: global ranks of the ep group.
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Any = None
    ep_ranks: tuple = (0,)
    expert_dp_size: int = 1
    expert_dp_group: Any = None
    topology: Any = None  # ppzoo.distributed.topology.Topology of the whole job, from Distributed.topology


def backend_for_device(device: str) -> str:
    """The collective backend paddle.distributed.launch picks for a device."""
    return "nccl" if device == "gpu" else "gloo"


def check_degrees(dist_cfg, world_size: int, device: str) -> None:
    """Raise a PpzooError if the Distributed section cannot run on `world_size` processes on `device`.

    Pure (no communication), so it can be checked for any world size without launching processes.
    """
    if device not in _DEVICES:
        # Resolving Global.device "auto" to cpu/gpu is the caller's job; reaching here with anything else is a bug.
        raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")

    degrees = {
        "dp_degree": dist_cfg.dp_degree,
        "mp_degree": dist_cfg.mp_degree,
        "pp_degree": dist_cfg.pp_degree,
        "sharding_degree": dist_cfg.sharding_degree,
    }
    for name, value in degrees.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"Distributed.{name} must be a positive integer, got {value!r}.")

    # Checked before the product: fixing the product would not make these run.
    if device == "cpu" and dist_cfg.pp_degree > 1:
        raise PpzooError(
            f"Distributed.pp_degree={dist_cfg.pp_degree} cannot run on CPU: Paddle's pipeline parallelism sends "
            "activations between stages with NCCL send/recv on the calculation stream, which the CPU (gloo) "
            "backend does not provide. Set pp_degree: 1 for CPU runs; on GPU, pipeline parallelism is "
            "configured through fleet's PipelineLayer."
        )
    if device == "cpu" and dist_cfg.sharding_degree > 1:
        raise PpzooError(
            f"Distributed.sharding_degree={dist_cfg.sharding_degree} cannot run on CPU: Paddle's group sharding "
            "(group_sharded_parallel) supports only gpu, xpu and custom devices. Set sharding_degree: 1 for CPU "
            "runs (use dp_degree for data parallelism); on GPU, sharding is configured through fleet's "
            "group_sharded_parallel."
        )

    dap = getattr(dist_cfg, "dap_degree", 1)
    if dap != 1:
        raise ConfigError(
            f"Distributed.dap_degree={dap!r}: the Engine does not split training over an axial-parallel group; "
            "set dap_degree: 1. Axial parallelism runs by giving HelixFold's EvoformerStack / ExtraMSAStack an "
            "AxialParallel group (ppzoo.distributed.axial_parallel.new_axial_parallel)."
        )

    ep = getattr(dist_cfg, "ep_degree", 1)
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ConfigError(f"Distributed.ep_degree must be a positive integer, got {ep!r}.")
    if ep > 1 and (dist_cfg.dp_degree % ep or dist_cfg.mp_degree > 1 or dist_cfg.pp_degree > 1
                   or dist_cfg.sharding_degree > 1):
        raise ConfigError(
            f"Distributed.ep_degree={ep} spreads the experts over data-parallel ranks: it must divide "
            f"dp_degree={dist_cfg.dp_degree}, with mp_degree, pp_degree and sharding_degree 1. Set e.g. "
            f"dp_degree: {ep * max(1, dist_cfg.dp_degree // ep)} and ep_degree: {ep}."
        )

    product = 1
    for value in degrees.values():
        product *= value
    if product != world_size:
        described = " * ".join(f"{name}={value}" for name, value in degrees.items())
        raise ConfigError(
            f"The Distributed degrees multiply to {product} ({described}) but the run has {world_size} "
            f"process(es). Make dp_degree * mp_degree * pp_degree * sharding_degree equal the number of "
            f"processes: change the degrees, or launch {product} process(es) with "
            f"`python -m paddle.distributed.launch --nproc_per_node {product} ...`."
        )


def init_parallel_env(dist_cfg, device: str, pipeline_configs=None) -> ParallelEnv:
    """Check the Distributed section against the launched world and set up the communication groups.

    `pipeline_configs` ({"micro_batch_size", "accumulate_steps"}) is passed to fleet when pp_degree > 1 (GPU):
    the pipeline schedule splits each step's batch into that many micro-batches."""
    import paddle.distributed as dist

    # Before any init this reads PADDLE_TRAINERS_NUM, which the launcher sets; 1 without the launcher.
    world_size = dist.get_world_size()
    check_degrees(dist_cfg, world_size, device)
    backend = backend_for_device(device)
    topology = None
    if getattr(dist_cfg, "topology", None):
        from ppzoo.distributed.topology import load_topology

        topology = load_topology(dist_cfg.topology, world_size)

    if world_size == 1:
        return ParallelEnv(device=device, backend=backend, topology=topology)

    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {
        "dp_degree": dist_cfg.dp_degree,
        "mp_degree": dist_cfg.mp_degree,
        "pp_degree": dist_cfg.pp_degree,
        "sharding_degree": dist_cfg.sharding_degree,
    }
    if dist_cfg.pp_degree > 1 and pipeline_configs:
        strategy.pipeline_configs = dict(pipeline_configs)
    # Measured on CPU with gloo: the hybrid init succeeds and hcg.get_model_parallel_group() is a working
    # gloo group (all_reduce SUM/MAX, all_gather), so no hand-made new_group() is needed.
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    env = ParallelEnv(
        world_size=world_size,
        rank=dist.get_rank(),
        dp_rank=hcg.get_data_parallel_rank(),
        dp_size=hcg.get_data_parallel_world_size(),
        mp_rank=hcg.get_model_parallel_rank(),
        mp_size=hcg.get_model_parallel_world_size(),
        pp_size=hcg.get_pipe_parallel_world_size(),
        sharding_size=hcg.get_sharding_parallel_world_size(),
        device=device,
        backend=backend,
        hcg=hcg,
        dp_group=hcg.get_data_parallel_group(),
        mp_group=hcg.get_model_parallel_group(),
        pp_rank=hcg.get_stage_id(),
        sharding_rank=hcg.get_sharding_parallel_rank(),
        topology=topology,
    )
    _set_expert_parallel_groups(env, hcg, getattr(dist_cfg, "ep_degree", 1))
    return env


def _set_expert_parallel_groups(env, hcg, ep_degree):
    """Fill in the ep and expert-data-parallel groups (ep_degree 1: every expert on every rank, the
    expert-data-parallel group is the dp group)."""
    env.ep_size = ep_degree
    env.ep_rank = env.dp_rank % ep_degree
    if ep_degree == 1:
        env.ep_ranks = (env.rank,)
        env.expert_dp_size, env.expert_dp_group = env.dp_size, env.dp_group
        return
    from ppzoo.distributed.expert_parallel import build_expert_parallel_groups

    ep_ranks, env.ep_group, edp_ranks, env.expert_dp_group = build_expert_parallel_groups(
        hcg.topology().get_comm_list("data"), ep_degree, env.rank)
    env.ep_ranks, env.expert_dp_size = tuple(ep_ranks), len(edp_ranks)


def fleet_tensor_parallel_applies(mp_size: int, device: str, backend: str) -> bool:
    """Whether fleet's own tensor-parallel layers can run: they need GPU kernels (c_identity,
    c_softmax_with_cross_entropy) and NCCL, so only mp_size > 1 on gpu with nccl qualifies."""
    return mp_size > 1 and device == "gpu" and backend == "nccl"


def use_fleet_tensor_parallel(env: ParallelEnv) -> bool:
    return fleet_tensor_parallel_applies(env.mp_size, env.device, env.backend)
