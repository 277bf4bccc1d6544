"""The schema of each config section, as dataclasses.

`Model` and the per-dataset arguments under `Data` are not fixed here: `Model.module` names a registered
Module whose `config_class` dataclass is the schema of the rest of the section, and `Data.Train.dataset`
names a registered dataset whose `config_class` is the schema of its arguments.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class GlobalConfig:
    seed: int = 1234
    device: str = "auto"  # auto | cpu | gpu
    global_batch_size: int = 8
    micro_batch_size: Optional[int] = None  # default: global_batch_size / (dp * accumulate_steps)


@dataclass
class MixPrecisionConfig:
    enable: bool = False
    dtype: str = "bfloat16"  # bfloat16 | float16
    level: str = "O1"  # O1 (auto_cast lists) | O2 (params in low precision, fp32 master weights)
    init_loss_scaling: float = 32768.0  # float16 only


@dataclass
class EngineConfig:
    max_steps: int = 100
    output_dir: str = "output/run"
    logging_freq: int = 10
    eval_freq: int = 0  # 0: evaluate only at the end
    eval_iters: int = 10
    save_steps: int = 0  # 0: save only at the end
    keep_last: int = 2
    accumulate_steps: Optional[int] = None  # default: global / (micro * dp)
    mix_precision: MixPrecisionConfig = field(default_factory=MixPrecisionConfig)
    recompute: bool = False
    recompute_granularity: str = "full"  # full: each decoder layer is recomputed in backward
    progress_bar: bool = True
    # A checkpoint (or a run's output directory: its newest checkpoint) whose model weights start a NEW run,
    # e.g. continual pretraining at a longer seq_len / higher rope_theta. Only weights: step, optimizer and
    # schedule start fresh (--resume continues a run instead, and takes precedence when it finds one).
    init_from: Optional[str] = None


@dataclass
class LRScheduleConfig:
    name: str = "CosineWarmup"
    max_lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # default: Engine.max_steps


@dataclass
class OptimizerConfig:
    name: str = "AdamW"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    epsilon: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables clipping
    lr: LRScheduleConfig = field(default_factory=LRScheduleConfig)


@dataclass
class DatasetSection:
    """One of Data.Train / Data.Eval: `dataset` names a registered dataset; `args` are its arguments."""

    dataset: str = "BuiltinCorpus"
    args: Any = None  # the registered dataset's config_class instance (YAML keys sit beside `dataset`)


@dataclass
class DataConfig:
    tokenizer: Optional[str] = None  # path to a tokenizer.json
    seq_len: int = 256
    Train: Optional[DatasetSection] = None
    Eval: Optional[DatasetSection] = None
    num_workers: int = 0


@dataclass
class DistributedConfig:
    dp_degree: int = 1
    mp_degree: int = 1
    pp_degree: int = 1
    sharding_degree: int = 1
    sharding_stage: int = 1
    ep_degree: int = 1


@dataclass
class Config:
    Global: GlobalConfig = field(default_factory=GlobalConfig)
    Engine: EngineConfig = field(default_factory=EngineConfig)
    Model: Any = None  # the registered module's config_class instance (YAML keys sit beside `module`)
    model_module: str = ""  # Model.module: the registered module's name
    Data: DataConfig = field(default_factory=DataConfig)
    Optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    Distributed: DistributedConfig = field(default_factory=DistributedConfig)
    source: str = ""  # the file it came from, for error messages
