"""Typed configuration: the dataclasses behind every YAML file in `configs/`.

Hydra merges the YAML files into these schemas, so a mistyped key or a value of the
wrong type stops the run at start-up with Hydra's own message. Each field has a one-line
docstring-style comment; the YAML files mirror them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from storage.order import DEFAULT_BLOCK_SHARDS


class ConfigError(ValueError):
    """A config value outside its field's range; the message names the key, the value and the range."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: bounds, and sentinel values outside them (e.g. -1 = auto)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[float, ...] = ()

    def __contains__(self, value: float) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        bounds = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                  if v is not None]
        text = " and ".join(bounds) or "any finite number"
        return " or ".join([*(f"{v:g}" for v in self.also), text])


def num(default: float, **bounds: Any) -> Any:
    """A numeric field with its range next to it: `num(150, ge=1)`, `num(-1, ge=1, also=(-1,))`."""
    return field(default=default, metadata={"range": Range(**bounds)})


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first numeric field (walking nested configs) outside its range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        elif "range" in f.metadata and not isinstance(value, bool) and value not in f.metadata["range"]:
            raise ConfigError(f"{key}={value!r} is out of range: it must be {f.metadata['range']}; "
                              f"set {key}=<value> on the command line or in its configs/ file")


class Engine(StrEnum):
    native = "native"  # torch.distributed: DDP, FSDP2, tensor parallel
    deepspeed = "deepspeed"  # DeepSpeed ZeRO (pip install -e '.[deepspeed]')


class DataParallel(StrEnum):
    ddp = "ddp"
    fsdp = "fsdp"


class Checkpointing(StrEnum):
    none = "none"
    full = "full"  # keep each block's input, recompute the whole block in backward
    selective = "selective"  # keep matmul (every second) and attention outputs, recompute the rest, per op


class Float8(StrEnum):
    off = "off"
    rowwise = "rowwise"  # torchao: a float8 scale per row (more accurate; H100 and later)
    tensorwise = "tensorwise"  # torchao: one scale per tensor (fastest; float8 all-gathers under FSDP2)


# torch.distributed.pipelining's schedule names (its get_schedule_class): 1F1B and GPipe run one
# stage per rank; Interleaved1F1B runs parallel.pp_stages_per_rank >= 2, ZBVZeroBubble exactly 2
# (a "V": rank r holds stages r and 2 x pp - 1 - r). The functional form, as "1F1B" is no identifier.
PipelineSchedule = StrEnum("PipelineSchedule", [(name, name) for name in
                                                ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "GPipe")])


class Precision(StrEnum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class OnNonfinite(StrEnum):
    stop = "stop"
    skip = "skip"


class OnCorruptShard(StrEnum):
    error = "error"
    skip = "skip"


class Builtin(StrEnum):
    stdlib = "stdlib"  # the .py files of this Python's standard library


class Logger(StrEnum):
    tensorboard = "tensorboard"  # <run dir>/tensorboard/ events (a dependency: always there)
    mlflow = "mlflow"  # an MLflow tracking server (MLFLOW_TRACKING_URI) or a local store
    wandb = "wandb"  # Weights & Biases (online, or offline with WANDB_MODE=offline)


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class Backend(StrEnum):
    gloo = "gloo"
    nccl = "nccl"



class RopeScaling(StrEnum):
    none = "none"  # RoPE frequencies as trained: theta ** (-2i / head_dim)
    llama3 = "llama3"  # Llama 3.1+: low frequencies divided by rope_scaling_factor, a smooth band between


@dataclass
class ModelConfig:
    name: str = "tiny"  # preset name, for logs
    path: str = ""  # Hugging Face model directory or URL (model=hf): architecture and step-0 weights; "" = from trainer.seed
    vocab_size: int = num(256, ge=1)  # must cover every token id of the dataset's tokenizer
    dim: int = num(128, ge=1)  # hidden size
    n_layers: int = num(4, ge=1)  # transformer blocks
    n_heads: int = num(4, ge=1)  # query heads
    n_kv_heads: int = num(2, ge=1)  # key/value heads (grouped-query attention); divides n_heads
    ffn_hidden_dim: int = num(0, ge=0)  # SwiGLU hidden size; 0 = 8/3 * dim rounded up to multiple_of
    multiple_of: int = num(32, ge=1)  # rounding for the derived ffn_hidden_dim
    max_seq_len: int = num(2048, ge=1)  # tokens: longest sequence RoPE is precomputed for
    rope_theta: float = num(10000.0, gt=0)  # RoPE base frequency
    rope_scaling: RopeScaling = RopeScaling.none  # none | llama3 (Llama 3.1 and later: long-context RoPE frequencies)
    rope_scaling_factor: float = num(8.0, ge=1)  # llama3: low frequencies are divided by this
    rope_low_freq_factor: float = num(1.0, gt=0)  # llama3: wavelengths above rope_original_max_seq_len / this are scaled fully
    rope_high_freq_factor: float = num(4.0, gt=0)  # llama3: wavelengths below rope_original_max_seq_len / this are kept; > rope_low_freq_factor
    rope_original_max_seq_len: int = num(8192, ge=1)  # llama3: tokens: the context length before the extension
    norm_eps: float = num(1e-5, gt=0)  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the input embedding with the output projection
    init_std: float = num(0.02, gt=0)  # std of the normal initialisation of linear layers


@dataclass
class ParallelConfig:
    name: str = "ddp"  # preset name, for logs
    engine: Engine = Engine.native  # native (torch.distributed: DDP, FSDP2, TP) | deepspeed (ZeRO; pip install -e '.[deepspeed]')
    data_parallel: DataParallel = DataParallel.ddp  # ddp | fsdp: how the data-parallel dimension is applied
    dp: int = num(-1, ge=1, also=(-1,))  # data-parallel degree; -1 = world size / (pp x tp)
    tp: int = num(1, ge=1, also=(-1,))  # tensor-parallel degree; -1 = processes per node; stays inside a node
    pp: int = num(1, ge=1)  # pipeline-parallel degree: ranks the layers are cut over (across nodes first); 1 = no pipeline
    pp_schedule: PipelineSchedule = PipelineSchedule["1F1B"]  # 1F1B | Interleaved1F1B | ZBVZeroBubble | GPipe (torch's schedule names)
    pp_stages_per_rank: int = num(1, ge=1)  # stages each pipeline rank holds: 1 (1F1B, GPipe), >= 2 (Interleaved1F1B), 2 (ZBVZeroBubble)
    pp_split: list[int] = field(default_factory=list)  # first layer of each stage after the first; [] = balanced by parameter count
    sequence_parallel: bool = False  # shard norms and residuals over the sequence under TP
    activation_checkpointing: Checkpointing = Checkpointing.none  # none | full (recompute each block in backward) | selective (per op: keep matmul and attention outputs)
    compile: bool = False  # torch.compile each transformer block
    float8: Float8 = Float8.off  # off | rowwise | tensorwise: the blocks' matmuls in float8 through torchao (CUDA, Hopper or later)
    mixed_precision: Precision = Precision.auto  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    fsdp_reshard_after_forward: bool = True  # free gathered params after forward (ZeRO-3 style)
    fsdp_reduce_per_micro_batch: bool = True  # gradient accumulation under FSDP: reduce-scatter every micro-batch; false = accumulate unsharded fp32 gradients (+4 bytes x params / tp per GPU), reduce once per step
    zero_stage: int = num(0, ge=0, le=3)  # engine=deepspeed: 1 shards optimizer state, 2 also gradients, 3 also parameters; 0 = native
    offload_optimizer: bool = False  # engine=deepspeed: optimizer state and its step on the host CPU (ZeRO-Offload)
    offload_params: bool = False  # engine=deepspeed, zero_stage=3: parameters on the host CPU between uses
    deepspeed_extra: dict[str, Any] = field(default_factory=dict)  # more DeepSpeed config keys, merged last (they win)
    deepspeed_staging_dir: str = ""  # node-local disk for DeepSpeed checkpoints on their way to/from checkpoint.url; "" = $TMPDIR


@dataclass
class DataSourceConfig:
    name: str = MISSING  # the source's name in metrics (source_tokens), logs and checkpoints
    url: str = MISSING  # fsspec URL of a prepared dataset (local, s3://, ...)
    weight: float = num(1.0, gt=0)  # its share of every step's samples, relative to the other sources' weights
    max_epochs: int = num(0, ge=0)  # epochs of it the run may use; 0 = no cap (a small source repeats)


@dataclass
class DataConfig:
    name: str = "stdlib"  # preset name, for logs; with url, the source's name in metrics (source_tokens)
    url: str = ""  # fsspec URL of a prepared dataset (a directory with index.json); "" = builtin (or data.sources)
    sources: list[DataSourceConfig] = field(default_factory=list)  # weighted mixture of datasets, one tokenizer; [] = data.url alone
    builtin: Builtin = Builtin.stdlib  # builtin corpus used when url is "": stdlib (.py files of this Python)
    cache_dir: str = "${oc.env:TRAIN_HARNESS_CACHE,'~/.cache/train-harness'}"  # where builtin shards live
    seq_len: int = num(256, ge=1)  # tokens per sample (the model sees seq_len inputs and seq_len targets)
    shuffle: bool = True  # permute samples across blocks of shards; false = one shard at a time (data shuffled when prepared)
    shuffle_block_shards: int = num(DEFAULT_BLOCK_SHARDS, ge=1)  # shards whose samples are permuted together; the node cache holds two blocks per remote source
    num_workers: int = num(0, ge=0)  # DataLoader worker processes per rank
    document_mask: bool = False  # attention stays inside each document of a packed sample (eos/bos bounds)
    builtin_max_bytes: int = num(24_000_000, ge=1)  # cap on the builtin corpus size


@dataclass
class StorageConfig:
    name: str = "local"  # local | nvme | ceph
    root: str = ""  # base URL relative paths are resolved against; "" = current directory
    endpoint_url: str = "${oc.env:S3_ENDPOINT_URL,''}"  # S3 endpoint (Ceph RGW) for s3:// URLs; "" = AWS
    verify_tls: bool = True  # verify the endpoint's TLS certificate
    ca_bundle: str = ""  # PEM file of the CA that signed the endpoint's certificate; "" = system CAs
    connect_timeout_s: float = num(5.0, gt=0)  # per connection attempt to the endpoint
    read_timeout_s: float = num(60.0, gt=0)  # per read from the endpoint
    max_retries: int = num(5, ge=0)  # transient errors (reset, 5xx, endpoint restarting) retried with backoff
    cache_dir: str = ""  # node-local prefetch cache for remote shards; "" = no cache
    cache_limit_bytes: int = num(0, ge=0)  # evict least-recently-used shards above this; 0 = no limit
    prefetch_shards: int = num(2, ge=0)  # shards fetched ahead of the reader, in the data order
    fetch_workers: int = num(2, ge=1)  # background download threads per process
    on_corrupt_shard: OnCorruptShard = OnCorruptShard.error  # error | skip (skipped shards are counted in the metrics)


@dataclass
class OptimConfig:
    name: str = "adamw"  # only AdamW for now
    lr: float = num(3e-3, gt=0)  # peak learning rate
    min_lr_ratio: float = num(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = num(15, ge=0)  # linear warm-up from 0 to lr
    decay_steps: int = num(-1, ge=1, also=(-1,))  # cosine length after warm-up; -1 = until trainer.max_steps
    weight_decay: float = num(0.1, ge=0)  # decoupled weight decay, not applied to norms and biases
    beta1: float = num(0.9, ge=0, lt=1)  # AdamW first-moment decay
    beta2: float = num(0.95, ge=0, lt=1)  # AdamW second-moment decay
    eps: float = num(1e-8, gt=0)  # AdamW denominator epsilon
    grad_clip_norm: float = num(1.0, ge=0)  # clip the global gradient norm; 0 = off


@dataclass
class TrainerConfig:
    max_steps: int = num(300, ge=1)  # optimizer steps in the run
    seed: int = num(1234, ge=0)  # seeds the weights and the data order
    global_batch_tokens: int = num(0, ge=1, also=(0,))  # tokens per optimizer step, over all ranks; 0 = micro_batch_size x seq_len x data-parallel size (no accumulation; with pp > 1, x the fewest micro-batches the schedule takes)
    micro_batch_size: int = num(16, ge=1)  # sequences per rank per forward/backward
    log_interval_steps: int = num(10, ge=1)  # a log line and a metrics.jsonl row every N steps
    eval_interval_steps: int = num(50, ge=0)  # held-out evaluation every N steps; 0 = only at the end
    eval_batches: int = num(4, ge=1)  # micro-batches per rank in one evaluation
    stop_after_steps: int = num(-1, ge=1, also=(-1,))  # stop (with a checkpoint) after this step, as if killed; -1 = off
    collective_timeout_s: float = num(600, gt=0)  # a collective waiting longer than this fails the run
    heartbeat_interval_s: float = num(5, ge=0)  # how often each rank says it is alive; 0 = no heartbeats
    straggler_factor: float = num(1.5, gt=1, also=(0,))  # name a rank whose own time per step (data wait, forward, update) is over this times the other ranks' median; 0 = off
    straggler_steps: int = num(20, ge=1)  # ... for at least this many steps (needs heartbeats)
    on_nonfinite_loss: OnNonfinite = OnNonfinite.stop  # stop | skip: a NaN/inf loss or gradient norm stops the run, or skips the step
    max_skipped_steps: int = num(5, ge=1)  # with skip: this many non-finite steps in a row stop the run
    profile_steps: list[int] = field(default_factory=list)  # [first, last]: torch.profiler trace of these steps per rank under <run dir>/profile/; [] = off
    memory_snapshot: bool = False  # CUDA: record the allocator's history, dump it under <run dir>/memory/ at the end and on out-of-memory (pytorch.org/memory_viz); CPU: nothing


@dataclass
class CheckpointConfig:
    url: str = "${run.dir}/checkpoints"  # fsspec URL of the checkpoint directory
    interval: int = num(50, ge=0)  # save every N steps (and at the end); 0 = only at the end
    keep_last: int = num(3, ge=0)  # committed checkpoints kept; older ones are deleted; 0 = keep all
    resume: str = "auto"  # auto (latest committed under url) | never | URL of one checkpoint
    async_save: bool = False  # the loop blocks only while the state is copied to host memory


@dataclass
class MonitorConfig:
    prometheus_port: int = num(0, ge=0, le=65535)  # each node serves /metrics for Prometheus on the first free port of [port, port + prometheus_port_count) (train/prometheus.py); 0 = off
    prometheus_port_count: int = num(1, ge=1, le=65535)  # ports a node tries from prometheus_port on: raise it when several nodes or jobs share a host
    prometheus_address: str = "0.0.0.0"  # address the exporter binds: 0.0.0.0 = every interface (Prometheus scrapes from another host); 127.0.0.1 = this host only
    loggers: list[Logger] = field(default_factory=lambda: [Logger.tensorboard])  # experiment trackers fed every metrics row from rank 0: tensorboard | mlflow | wandb; [] = metrics.jsonl only
    experiment: str = ""  # MLflow experiment / W&B project the run is filed under; "" = run.name
    mlflow_tracking_uri: str = ""  # MLflow server (http://host:5000) or store URI; "" = MLFLOW_TRACKING_URI, else sqlite <run dir>/mlflow.db; credentials only from the environment (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME/PASSWORD)
    wandb_entity: str = ""  # W&B team or user; "" = WANDB_ENTITY or the API key's default (key: WANDB_API_KEY; WANDB_MODE=offline writes <run dir>/wandb/ only)


@dataclass
class RunConfig:
    dir: str = "runs/${run_id:}"  # run directory shared by every rank (logs, config, metrics)
    name: str = "train"  # free-form label, for logs


@dataclass
class SlurmConfig:
    partition: str = ""  # sbatch --partition; "" = the cluster's default partition
    account: str = ""  # sbatch --account; "" = none
    qos: str = ""  # sbatch --qos; "" = none
    time_limit: str = "01:00:00"  # sbatch --time ([D-]HH:MM:SS); USR1 comes signal_lead_s before it
    job_name: str = ""  # sbatch --job-name; "" = run.name
    output: str = ""  # sbatch --output (%j = job id); "" = <run dir>.out beside the run directory
    error: str = ""  # sbatch --error; "" = into the output file
    exclusive: bool = True  # sbatch --exclusive: whole nodes, no other job beside this one
    cpus_per_task: int = num(0, ge=0)  # CPUs of each node's torchrun task; 0 = all of the node's (exclusive) or one per process
    signal_lead_s: int = num(120, ge=0)  # seconds before the time limit that USR1 asks the run to checkpoint and stop
    max_requeues: int = num(3, ge=0)  # times a stopped job requeues itself before it gives up with exit 75
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--mem=0", "--constraint=ib"]
    setup: list[str] = field(default_factory=list)  # shell lines run before srun, e.g. ["module load cuda/12.4"]


@dataclass
class PlanConfig:
    enforce_memory: bool = True  # refuse to start when the predicted memory exceeds the accelerator's
    reserved_bytes: int = num(2 * 1024**3, ge=0)  # per GPU outside the allocator: CUDA context, NCCL and cuBLAS workspaces
    fragmentation_fraction: float = num(0.10, ge=0, lt=1)  # allocator fragmentation and temporaries, on top of the estimate
    matmul_efficiency: float = num(0.6, gt=0, le=1)  # fraction of the datasheet peak FLOP/s the step's kernels sustain
    offload_bandwidth_bytes_per_s: float = num(25.0e9, gt=0)  # GPU <-> host (PCIe Gen4 x16) for ZeRO offload


@dataclass
class ClusterConfig:
    name: str = MISSING  # layout name, [nodes x] procs-per-node x device
    nodes: int = num(1, ge=1)  # nodes in the job
    min_nodes: int = num(0, ge=0)  # fewest nodes the job runs on when nodes are lost (torchrun --nnodes=MIN:MAX); 0 = nodes (no elasticity)
    max_restarts: int = num(3, ge=0)  # with min_nodes < nodes: torchrun --max-restarts, the failures (a node lost, a rank crashed) the job survives
    procs_per_node: int = num(1, ge=1)  # processes (one per GPU) on every node
    device: Device = Device.cpu  # cpu | cuda
    accelerator: str = "cpu"  # accelerator model, for logs and the plan
    peak_flops_bf16: float = num(0.0, ge=0)  # dense bf16 peak FLOP/s of one accelerator; 0 = unknown (no MFU)
    memory_bytes: int = num(0, ge=0)  # memory of one accelerator; 0 = unknown
    backend: Backend = Backend.gloo  # nccl on GPUs, gloo on CPUs
    intra_node_link: str = "loopback"  # e.g. NVLink4 (for logs and the plan)
    intra_node_bandwidth_bytes_per_s: float = num(0.0, ge=0)  # per GPU, one direction
    inter_node_link: str = "none"  # e.g. InfiniBand NDR 400
    inter_node_bandwidth_bytes_per_s: float = num(0.0, ge=0)  # per node, one direction
    network_interface: str = "auto"  # interface the nodes train over (e.g. ib0, eth1); auto = the one that routes to the rendezvous host
    ib_hcas: str = ""  # NCCL_IB_HCA: the InfiniBand/RoCE adapters NCCL uses (e.g. mlx5_0,mlx5_1); "" = NCCL's choice
    env: dict[str, str] = field(default_factory=dict)  # environment set before the process group


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    cluster: Optional[ClusterConfig] = None  # appended with +cluster=NAME; None = derived locally


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of a process, from /proc (Linux only)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_id() -> str:
    """One id that every rank of a job computes alike, before any process group exists.

    Slurm's job id, else torchrun's rendezvous id, else the start time and pid of the
    process that launched the ranks (torchrun's agent: the same parent for all local ranks),
    else this process's own start time and pid.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    pid = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    started = _process_start_time(pid) or time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(started)) + f"-{pid}"


def register() -> None:
    """Register the schema and the `run_id` resolver with Hydra and OmegaConf."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", run_id, use_cache=True)
    ConfigStore.instance().store(name="schema", node=Config)


def to_object(cfg: Any) -> Config:
    """Resolve a DictConfig into the typed dataclasses and check every numeric field's range."""
    obj = OmegaConf.to_object(cfg)
    check_ranges(obj)
    return obj  # type: ignore[return-value]
