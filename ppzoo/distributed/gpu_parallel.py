"""GPU-only parallel training: pipeline parallel (fleet's PipelineLayer) and group sharding.

Untested in this project's CI, which has no GPU: written against Paddle's documented fleet APIs. On CPU the
Distributed checks refuse pp_degree > 1 and sharding_degree > 1 before anything is built (see env.py), so
these functions are only reached on GPU with NCCL.

- Pipeline: a Module that supports it returns its network as a list of layer descriptions plus a loss
  function (`Module.pipeline_description()`); fleet's PipelineLayer places them on stages and
  PipelineParallel.train_batch runs the 1F1B schedule over the step's micro-batches.
- Sharding: stage 1 shards optimizer state through fleet's hybrid optimizer (DygraphShardingOptimizer);
  stages 2 and 3 also shard gradients (and parameters) through group_sharded_parallel.
"""


def build_pipeline_layer(module, env, recompute):
    from paddle.distributed.fleet.meta_parallel import LayerDesc, PipelineLayer

    descriptions, loss_fn = module.pipeline_description()
    layers = [LayerDesc(cls, *args, **kwargs) for cls, args, kwargs in descriptions]
    return PipelineLayer(
        layers=layers,
        num_stages=env.pp_size,
        topology=env.hcg.topology(),
        loss_fn=loss_fn,
        seg_method="layer:DecoderLayer",
        recompute_interval=1 if recompute else 0,
    )


def wrap_for_hybrid_parallel(network, optimizer, scaler, env, sharding_stage):
    """(model, optimizer, scaler) wrapped for fleet's hybrid parallelism on GPU."""
    from paddle.distributed import fleet

    if env.sharding_size > 1 and sharding_stage in (2, 3):
        from paddle.distributed.sharding import group_sharded_parallel

        level = "os_g" if sharding_stage == 2 else "p_g_os"
        network, optimizer, scaler = group_sharded_parallel(
            network, optimizer, level=level, scaler=scaler, group=env.hcg.get_sharding_parallel_group()
        )
        return network, optimizer, scaler
    # HybridParallelOptimizer: shards optimizer state at sharding stage 1, and computes the global gradient
    # norm across the mp / pp / sharding groups for clipping.
    model = fleet.distributed_model(network)
    optimizer = fleet.distributed_optimizer(optimizer)
    if scaler is not None:
        scaler = fleet.distributed_scaler(scaler)
    return model, optimizer, scaler


def pipeline_train_step(model, batch, optimizer, scaler):
    """One optimizer step of the pipeline schedule over the step's whole batch (fleet splits it into
    micro-batches); returns the loss as a float."""
    inputs = (batch["input_ids"], batch["doc_ids"])
    loss = model.train_batch([inputs, batch["labels"]], optimizer=optimizer, lr_scheduler=None, scaler=scaler)
    return float(loss)
