"""The Module contract: what every model family gives the Engine.

A Module builds its network from its `config_class` dataclass (the config's Model section) and turns a
batch into named losses. It never initializes Fleet, writes files or touches an optimizer: the Engine does.
"""
import paddle.nn as nn


class Module(nn.Layer):
    #: dataclass of the Model section's fields; the config loader validates YAML against it.
    config_class = None

    def __init__(self, config, parallel_env=None):
        super().__init__()
        self.config = config
        self.parallel_env = parallel_env

    @property
    def mp_group(self):
        return self.parallel_env.mp_group if self.parallel_env is not None else None

    def training_step(self, batch):
        """A dict of named scalar losses; `loss` is optimized, the others are logged."""
        raise NotImplementedError

    def validation_step(self, batch):
        """A dict of scalar metrics; `loss` (if present) is averaged and reported with its perplexity."""
        raise NotImplementedError

    def language_model(self):
        """For text generators: the causal LM that ppzoo.inference.Generator drives."""
        raise NotImplementedError(f"{type(self).__name__} does not generate text")

    def pipeline_description(self):
        """For pipeline parallelism (GPU): ([(layer class, args, kwargs), ...], loss layer) in stage order;
        see ppzoo.distributed.gpu_parallel."""
        raise NotImplementedError(f"{type(self).__name__} does not support pipeline parallelism")

    def recompute_units(self):
        """The sub-layers the Engine may wrap in activation recompute (e.g. the decoder layers)."""
        return []

    def init_from_skips(self):
        """Prefixes of parameter names an Engine.init_from checkpoint need not hold: parts this module adds
        to a pretrained model (e.g. RecycleGPT's recyclable module over a ChuXin checkpoint). They keep their
        fresh initialization; every other tensor must be in the checkpoint."""
        return ()

    def input_spec(self):
        """paddle.static.InputSpec list describing the exported forward."""
        raise NotImplementedError

    def tokens_in_batch(self, batch):
        """Number of tokens a batch trains on, for throughput logging."""
        ids = batch.get("input_ids")
        return int(ids.shape[0] * ids.shape[1]) if ids is not None else 0
