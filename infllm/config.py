"""Typed config schemas, registered in Hydra's ConfigStore.

`conf/config.yaml` lists `base_config` first in its defaults, so every group file and command-line override
is merged into these dataclasses: an unknown or mistyped key fails at compose time with the key named.
`__post_init__` checks run when the config is turned into objects (`to_object`) and name the field.
The data and eval schemas live beside their code (`data/config.py`, `infllm/eval/config.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from data.config import DataConfig
from infllm.errors import ConfigError
from infllm.eval.config import EvalConfig


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass
class RopeScalingConfig:
    """RoPE scaling for short-to-long, passed to transformers' own implementations. type null = unchanged."""
    # linear | dynamic | yarn | llama3 | longrope
    type: Optional[str] = None
    factor: Optional[float] = None
    # Defaults to the model's native max_position_embeddings.
    original_max_position_embeddings: Optional[int] = None
    # yarn
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    attention_factor: Optional[float] = None
    # llama3
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None

    def as_rope_parameters(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "type" and v is not None}
        out["rope_type"] = self.type
        return out


@dataclass
class ModelConfig:
    # A local Hugging Face causal-LM directory; null = the embedded default (SmolLM2-135M-Instruct GGUF).
    path: Optional[str] = None
    # Set by model=hf: a path must be given (a missing one would otherwise fall back to the embedded model).
    path_required: bool = False
    # Build a randomly initialised model from `arch` instead of loading weights (tests, debug).
    random_init: bool = False
    # For random_init: a transformers config as a dict, e.g. {model_type: llama, hidden_size: 64, ...}.
    arch: Dict[str, Any] = field(default_factory=dict)
    # Master-weight dtype (bf16 autocast on GPU comes from trainer.precision).
    dtype: str = "float32"
    # Short-to-long RoPE settings, written into the saved config.
    rope_theta: Optional[float] = None
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_position_embeddings: Optional[int] = None
    # Where the embedded GGUF is converted to safetensors once; null = $INFLLM_CACHE or ~/.cache/infllm.
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
               f"expected float32, bfloat16 or float16, got {self.dtype!r}")
        rs = self.rope_scaling
        if rs.type is not None:
            _check(rs.type in ROPE_SCALING_TYPES, "model.rope_scaling.type",
                   f"expected one of {ROPE_SCALING_TYPES} (or null), got {rs.type!r}")
            _check(rs.factor is not None and rs.factor >= 1.0, "model.rope_scaling.factor",
                   f"expected a number >= 1 with rope_scaling.type={rs.type}, got {rs.factor!r}")
        if self.rope_theta is not None:
            _check(self.rope_theta > 0, "model.rope_theta", f"expected > 0, got {self.rope_theta}")
        _check(self.path or not self.path_required, "model.path",
               "model=hf needs model.path=/path/to/a/local/hf/model (a Hugging Face causal-LM directory)")
        if self.random_init:
            _check("model_type" in self.arch, "model.arch.model_type",
                   "random_init needs model.arch with at least model_type (e.g. llama)")


@dataclass
class InfLLMv1Config:
    """InfLLM (v1) training-free context memory (infllm/attention_v1.py; the math: kernels/infllm_v1/README.md).
    Defaults as published for Mistral-7B (32k native); conf/attention/infllm_v1_small.yaml scales them down."""
    # Tokens per memory unit.
    block_size: int = 128
    # The first n_init tokens are always attended (attention sinks).
    n_init: int = 128
    # Local window: each query attends its n_local most recent tokens (itself included) at their true positions.
    n_local: int = 4096
    # Memory units retrieved per query chunk and KV head (0 = none: initial tokens + local window only).
    topk: int = 16
    # Keys that represent a unit in retrieval: those that received the most attention inside the local window.
    repr_topk: int = 4
    # Query tokens per chunk; retrieval runs once per chunk.
    exc_block_size: int = 512
    # Where the initial tokens sit: memory (as in InfLLM: at the memory distance n_local from every query, like
    # every token outside the local window) | true (their real distance, which grows past the trained length).
    sink_position: str = "memory"

    def __post_init__(self) -> None:
        for name in ("block_size", "n_local", "repr_topk", "exc_block_size"):
            _check(getattr(self, name) > 0, f"attention.v1.{name}", f"must be positive, got {getattr(self, name)}")
        for name in ("n_init", "topk"):
            _check(getattr(self, name) >= 0, f"attention.v1.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.repr_topk <= self.block_size, "attention.v1.repr_topk",
               f"must be <= block_size={self.block_size} (a unit has block_size keys), got {self.repr_topk}")
        _check(self.sink_position in ("memory", "true"), "attention.v1.sink_position",
               f"expected memory or true, got {self.sink_position!r}")


@dataclass
class AttentionConfig:
    # dense | infllm_v2 (trainable sparse) | infllm_v1 (training-free context memory, eval only)
    name: str = "dense"
    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    use_nope: bool = False
    lse_approx: bool = True
    # auto (triton on CUDA, reference elsewhere) | naive | triton
    impl: str = "auto"
    # Dense documents: auto (flash-attn, torch varlen, Triton; SDPA on CPU) | flash_attn | torch_varlen | triton | sdpa
    dense_backend: str = "auto"
    # InfLLM (v1) context memory, used when name == infllm_v1.
    v1: InfLLMv1Config = field(default_factory=InfLLMv1Config)

    def __post_init__(self) -> None:
        _check(self.name in ("dense", "infllm_v2", "infllm_v1"), "attention.name",
               f"expected dense, infllm_v2 or infllm_v1, got {self.name!r}")
        _check(self.impl in ("auto", "naive", "triton"), "attention.impl",
               f"expected auto, naive or triton, got {self.impl!r}")
        _check(self.dense_backend in ("auto", "flash_attn", "torch_varlen", "triton", "sdpa"),
               "attention.dense_backend",
               f"expected auto, flash_attn, torch_varlen, triton or sdpa, got {self.dense_backend!r}")
        for name in ("block_size", "kernel_size", "kernel_stride", "topk"):
            _check(getattr(self, name) > 0, f"attention.{name}", f"must be positive, got {getattr(self, name)}")
        for name in ("init_blocks", "window_size"):
            _check(getattr(self, name) >= 0, f"attention.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(self.window_size % self.block_size == 0, "attention.window_size",
               f"must be a multiple of block_size={self.block_size}, got {self.window_size}")
        _check(self.kernel_stride <= self.kernel_size, "attention.kernel_stride",
               f"must be <= kernel_size={self.kernel_size}, got {self.kernel_stride}")
        _check(self.topk >= self.init_blocks + 1, "attention.topk",
               f"must be >= init_blocks + 1 = {self.init_blocks + 1}, got {self.topk}")
        _check(self.dense_len == -1 or self.dense_len >= 0, "attention.dense_len",
               f"must be -1 (always sparse) or >= 0, got {self.dense_len}")

    @property
    def k_eff(self) -> int:
        return self.topk + self.window_size // self.block_size


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.name == "adamw", "optim.name", f"only adamw is supported, got {self.name!r}")
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"expected two numbers in [0, 1), got {list(self.betas)}")


@dataclass
class ScheduleConfig:
    # constant | linear | cosine | wsd (warmup-stable-decay)
    name: str = "cosine"
    warmup_steps: int = 0
    # lr at the end of the decay, as a fraction of optim.lr (the InfLLM-V2 recipe: 2.75e-4 / 3e-4).
    min_lr_ratio: float = 0.1
    # wsd: fraction of the steps spent in the final decay.
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        _check(self.name in ("constant", "linear", "cosine", "wsd"), "schedule.name",
               f"expected constant, linear, cosine or wsd, got {self.name!r}")
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(0 < self.decay_fraction <= 1, "schedule.decay_fraction",
               f"must be in (0, 1], got {self.decay_fraction}")


@dataclass
class TrainerConfig:
    max_steps: int = 100
    seq_len: int = 4096
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    # auto = bf16 autocast on GPU, fp32 on CPU | bf16 | fp32
    precision: str = "auto"
    gradient_checkpointing: bool = False
    # auto | cpu | cuda
    device: str = "auto"
    seed: int = 0
    log_every: int = 1
    progress_bar: bool = True
    # Stop after this many skipped (non-finite) steps.
    max_nonfinite_steps: int = 10
    # InfLLM-V2: time block selection at the first layer (CUDA events, one extra selection pass per forward)
    # and log sparse/select_step_share, the estimated share of the step spent selecting blocks.
    time_selection: bool = False
    # The language-model loss: plain (full logits, as transformers computes them) | fused (logits made and
    # consumed chunk by chunk, never the whole [tokens, vocab] at once) | auto (fused where it works).
    loss: str = "auto"
    # Fused loss, chunked implementation (CPU; Liger on CUDA sizes its own chunks): tokens whose logits are made
    # at once (0 = auto, about 1 GiB of fp32 logits per chunk).
    loss_chunk_tokens: int = 0
    # DeepSpeed TiledMLP: each decoder MLP runs over sequence tiles, recomputed in the backward.
    tiled_mlp: bool = False
    # Activations saved for the backward (the layer inputs kept by gradient checkpointing) live in host memory.
    activation_offload: bool = False
    # Gradient checkpointing: what a layer keeps from its forward instead of recomputing it in the backward
    # (infllm/memory.py): none | selection (InfLLM-V2's block ids, no gradient) | attention (the attention
    # outputs too: the backward's recompute runs no attention forward) | auto (selection where the Triton
    # selection runs; none with activation_offload, which says device memory is what is short).
    checkpoint_keep: str = "auto"

    def __post_init__(self) -> None:
        _check(self.loss in ("auto", "plain", "fused"), "trainer.loss",
               f"expected auto, plain or fused, got {self.loss!r}")
        _check(self.checkpoint_keep in ("auto", "none", "selection", "attention"), "trainer.checkpoint_keep",
               f"expected auto, none, selection or attention, got {self.checkpoint_keep!r}")
        _check(self.loss_chunk_tokens >= 0, "trainer.loss_chunk_tokens",
               f"must be >= 0 (0 = auto), got {self.loss_chunk_tokens}")
        for name in ("max_steps", "seq_len", "micro_batch_size", "grad_accum_steps", "log_every"):
            _check(getattr(self, name) > 0, f"trainer.{name}", f"must be a positive integer, got {getattr(self, name)}")
        _check(self.precision in ("auto", "bf16", "fp32"), "trainer.precision",
               f"expected auto, bf16 or fp32, got {self.precision!r}")
        _check(self.device in ("auto", "cpu", "cuda"), "trainer.device",
               f"expected auto, cpu or cuda, got {self.device!r}")
        _check(self.grad_clip >= 0, "trainer.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class CheckpointConfig:
    # Save a resumable checkpoint every N optimizer steps (0 = only at the end / on SIGTERM).
    every_steps: int = 0
    keep_last: int = 2
    # none | auto (newest complete checkpoint in the run directory) | a checkpoint path
    resume: str = "none"
    # Export the final model in Hugging Face format (save_pretrained + tokenizer).
    save_hf: bool = True

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", f"must be >= 0, got {self.every_steps}")
        _check(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LoggerConfig:
    # console | wandb
    name: str = "console"
    project: str = "infllm"
    # wandb mode: offline (default, no network) | online | disabled
    mode: str = "offline"

    def __post_init__(self) -> None:
        _check(self.name in ("console", "wandb"), "logger.name", f"expected console or wandb, got {self.name!r}")
        _check(self.mode in ("offline", "online", "disabled"), "logger.mode",
               f"expected offline, online or disabled, got {self.mode!r}")


@dataclass
class ParallelConfig:
    # single (one process) | deepspeed (torchrun + DeepSpeed ZeRO; see infllm/parallel/, launch/README.md)
    engine: str = "single"
    # 1: optimizer state sharded | 2: + gradients | 3: + parameters (gathered layer by layer)
    zero_stage: int = 2
    # Optimizer state (and its update) on CPU; parameters on CPU (stage 3 only).
    offload_optimizer: bool = False
    offload_params: bool = False
    # Stage 3 only: the model is built already partitioned over the ranks (DeepSpeed zero.Init, entered through
    # transformers' HfDeepSpeedConfig), so no rank ever holds the whole model on its device; false: every rank
    # builds the full model and DeepSpeed partitions it when the engine starts. Same weights either way.
    zero_init: bool = True
    # Expected world size (0 = whatever torchrun gives); a different launch fails before training.
    world_size: int = 0
    # Collective timeout: a rank waits this long for the others (e.g. while rank 0 exports or evaluates).
    timeout_minutes: int = 60
    # Ulysses sequence parallelism: each row is split over sp_size ranks along the sequence, attention runs on
    # whole sequences for a share of the heads (all-to-all in and out). 1 = off. Divides the world size.
    sp_size: int = 1
    # Merged last into the generated DeepSpeed config, for knobs not exposed here; new keys take a `+` on the
    # command line: +parallel.extra.zero_optimization.reduce_bucket_size=5e8
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.engine in ("single", "deepspeed"), "parallel.engine",
               f"expected single or deepspeed, got {self.engine!r}")
        _check(self.zero_stage in (1, 2, 3), "parallel.zero_stage",
               f"expected 1, 2 or 3 (ZeRO-1 costs no more than plain data parallel), got {self.zero_stage}")
        _check(not self.offload_params or self.zero_stage == 3, "parallel.offload_params",
               f"parameter offload needs zero_stage=3, got zero_stage={self.zero_stage}")
        _check(self.world_size >= 0, "parallel.world_size", f"must be >= 0 (0 = any), got {self.world_size}")
        _check(self.sp_size >= 1, "parallel.sp_size", f"must be >= 1 (1 = off), got {self.sp_size}")
        _check(self.timeout_minutes > 0, "parallel.timeout_minutes", f"must be > 0, got {self.timeout_minutes}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_name: str = "run"
    # The run directory (checkpoints, logs, final model). Hydra sets it per run.
    output_dir: str = MISSING


def _cuda_or(gpu_value, cpu_value):
    """`${cuda_or:GPU,CPU}` in a config: one preset that scales itself to the machine it runs on."""
    import torch

    return gpu_value if torch.cuda.is_available() else cpu_value


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("cuda_or"):
        OmegaConf.register_new_resolver("cuda_or", _cuda_or)


def check_known_keys(node: Any, where: str = "") -> None:
    """Every key of a typed node must be a field of its schema. Hydra's `+key=value` form (which Hydra itself
    suggests after a typo) adds a key even to a typed node, and it would be silently ignored; refuse it,
    naming the key and the nearest fields."""
    import dataclasses
    import difflib

    from omegaconf import ListConfig

    if isinstance(node, ListConfig):
        for i in range(len(node)):
            check_known_keys(node._get_node(i), f"{where[:-1]}[{i}].")
        return
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in fields:
                near = difflib.get_close_matches(str(key), fields, n=3)
                hint = f"; did you mean {', '.join(where + n for n in near)}?" if near else ""
                raise ConfigError(f"{where}{key}: not a key of the config schema ({schema.__name__}), it would be "
                                  f"ignored (a `+{where}{key}=...` override adds keys the schema does not "
                                  f"have){hint}")
    for key in node.keys():
        check_known_keys(node._get_node(key), f"{where}{key}.")


def to_object(cfg: DictConfig | Config) -> Config:
    """Check every key against the schema, resolve interpolations and build the dataclasses (running every
    `__post_init__` check)."""
    if isinstance(cfg, Config):
        return cfg
    check_known_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except Exception as e:  # OmegaConf wraps our ConfigError; surface the field-naming message
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, ConfigError):
                break
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ConfigError):
            raise ConfigError(str(cause)) from None
        raise


register_configs()
