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
    tensor_fusion: bool = False  # pack parameters into contiguous buffers for the update (core/tensor_fusion.py)
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
class SEMoEConfig:
    """SE-MoE (ppzoo.distributed.hierarchical_storage, fused_comm): expert parameters and their optimizer
    states in tiers (fast = device, a CPU-memory cache, a disk tier of memory-mapped files)."""
    enable: bool = False
    fast_budget_mb: float = 64.0  # expert weights resident on the device
    cpu_budget_mb: float = 256.0  # the CPU cache of expert weights + optimizer states
    disk_dir: Optional[str] = None  # the disk tier; None: <Engine.output_dir>/expert_store
    decay: float = 0.9  # the CPU cache's hit counts are multiplied by this every step
    prefetch: bool = True  # bring the next MoE layer's experts up a tier in a background thread
    fused_comm: bool = False  # bucketed gradient all-reduce and fused scalar collectives
    bucket_mb: float = 25.0


@dataclass
class CrossClusterConfig:
    """Nebula-I: this cluster's leader syncs a subset of the model with another cluster's over a WAN
    (ppzoo.distributed.cross_cluster). Each cluster is its own Fleet job with its own config."""

    enable: bool = False
    role: str = "server"  # server: this leader listens on `address`; client: it dials `address`
    address: str = "127.0.0.1:7700"  # HOST:PORT
    cert: Optional[str] = None  # this cluster's certificate, key and the federation CA (tools/make_certs.py)
    key: Optional[str] = None
    ca_cert: Optional[str] = None
    mode: str = "diloco"  # diloco: outer optimizer on pseudo-gradients | data_parallel: average gradients every step
    sync_every: int = 10  # local steps between syncs (diloco)
    sync_params: List[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns of the parameters that cross
    outer_lr: float = 0.7
    outer_momentum: float = 0.9  # Nesterov momentum of the outer optimizer
    compression: str = "auto"  # auto (from the measured bandwidth) | none | int8 | topk | topk_int8
    topk_ratio: float = 0.05  # for topk / topk_int8 when chosen explicitly
    comm_budget_s: float = 0.5  # auto: the longest a sync message may take on the link
    overlap_steps: int = 2  # local steps computed while a sync is in flight (0: wait for it)
    reconnect_timeout: float = 120.0


@dataclass
class DistributedConfig:
    dp_degree: int = 1
    mp_degree: int = 1
    pp_degree: int = 1
    sharding_degree: int = 1
    sharding_stage: int = 1
    ep_degree: int = 1
    # Dynamic axial parallelism (HelixFold): processes that split one protein's Evoformer activations
    # (ppzoo.distributed.axial_parallel). Used through EvoformerStack.axial; the Engine trains with 1 only.
    dap_degree: int = 1
    # A topology YAML or P x P bandwidth matrix file (ppzoo.distributed.topology): MoE routing accounts its
    # all-to-all traffic per link class against it, and topology-aware gates (TA-MoE) route by it.
    topology: Optional[str] = None
    # Nebula-I cross-cluster sync between two clusters' leaders (off unless enable: true).
    cross_cluster: CrossClusterConfig = field(default_factory=CrossClusterConfig)
    se_moe: SEMoEConfig = field(default_factory=SEMoEConfig)


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
