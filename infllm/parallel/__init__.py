"""Where parallelism is applied, in one place. The model and the attention never see ranks or meshes.

`build_engine(model, cfg)` returns the engine the trainer drives (the `infllm.engine.Engine` protocol):
- parallel.engine=single: `SingleEngine`, one process, one device;
- parallel.engine=deepspeed: `DeepSpeedEngine`, DeepSpeed ZeRO stage 1/2/3 (optionally offloading the optimizer
  state and, at stage 3, the parameters to CPU), one process per device, launched by torchrun (launch/run.sh).

A distributed run is set up in two calls, because ZeRO-3 partitions the model while it is being built:
`setup = setup_parallel(cfg)` before the model exists, `build_engine(model, cfg, setup)` after. `setup_parallel`:
1. reads rank / local rank / world size from the launcher's environment and checks them against the config
   (`launch`);
2. binds the process to its device and opens the process group (NCCL on GPU, gloo on CPU), and DeepSpeed's
   communication on top of it;
3. agrees on one run directory (rank 0's) so that every rank writes its checkpoint files into the same place;
4. generates the DeepSpeed config (`ds_config`) and, at ZeRO-3 with `parallel.zero_init` (the default), a
   `ZeroInit` for `infllm.model.load_model` (`zero_init`): the model is built already partitioned, and no rank
   ever holds all of its weights. A random model (`model.random_init`) is drawn in full on the host, as one
   process draws it, and copied into the partitions, so a seed gives the same weights under every parallel
   config.
`build_engine` then wraps the model with `deepspeed.initialize` (`deepspeed_engine`): a client `torch.optim.AdamW`
(a DeepSpeed-config optimizer would JIT-compile fused_adam), the lr schedule stepped once per optimizer step,
bf16 on GPU (DeepSpeed keeps fp32 master weights), fp32 on CPU. Activation checkpointing stays the Hugging Face
switch (`trainer.gradient_checkpointing`), applied to the model before it gets here. `build_engine(model, cfg)`
without a setup does both steps (the model was then built in full; ZeRO-3 partitions it in
`deepspeed.initialize`).

Sequence parallelism (`parallel.sp_size > 1`, `sequence`): the groups are made in `setup_parallel`, the
attention is wrapped with the Ulysses exchange in `build_engine` (before DeepSpeed sees the model), and DeepSpeed
gets the groups as its `mpu`, so gradients are reduced over every rank.

Files: `launch` (ranks, argv, process group, run directory), `ds_config` (the DeepSpeed config), `zero_init`
(ZeRO-3 partitioned construction), `ds_checkpoint` (safe loading of DeepSpeed's pickles), `sequence` (Ulysses
sequence parallelism), `deepspeed_engine` (the engine).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from infllm.config import Config
from infllm.engine import SingleEngine, resolve_device, use_bf16
from infllm.errors import ConfigError
from infllm.parallel.deepspeed_engine import DeepSpeedEngine
from infllm.parallel.ds_config import deepspeed_config, is_zero3
from infllm.parallel.launch import check_world_size, init_process_group, launch_env, launcher_argv, share_run_dir
from infllm.parallel.sequence import apply_sequence_parallel, check_sequence_parallel, init_sequence_parallel
from infllm.parallel.zero_init import ZeroInit, is_partitioned

__all__ = ["ParallelSetup", "setup_parallel", "build_engine", "launcher_argv", "deepspeed_config", "ZeroInit",
           "is_partitioned", "DeepSpeedEngine"]

log = logging.getLogger(__name__)


@dataclass
class ParallelSetup:
    """What `setup_parallel` prepared for a distributed run: the device, the DeepSpeed config, and (ZeRO-3 with
    parallel.zero_init) the zero.Init hook for `load_model`."""
    device: torch.device
    ds_config: Dict[str, Any]
    zero_init: Optional[ZeroInit] = None


def setup_parallel(cfg: Config) -> Optional[ParallelSetup]:
    """Everything a distributed run needs before its model is built (see the module docstring); None for
    parallel.engine=single, after checking that the launcher started one process."""
    _, local_rank, world_size = launch_env()
    check_world_size(cfg, world_size)
    check_sequence_parallel(cfg, world_size)
    if cfg.parallel.engine == "single":
        return None
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError:
        raise ConfigError("parallel.engine=deepspeed needs the deepspeed package: pip install -r requirements.txt") \
            from None
    device = resolve_device(cfg.trainer.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
    init_process_group(device, cfg.parallel.timeout_minutes)
    share_run_dir(cfg)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (~30 s to minutes, once) that
        # only its inference path uses; gloo serves training. DeepSpeed keeps this table for such edits.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.parallel.sp_size > 1:
        init_sequence_parallel(cfg.parallel.sp_size)
    ds_config = deepspeed_config(cfg, device)
    zero_init = ZeroInit(ds_config, device) if is_zero3(ds_config) and cfg.parallel.zero_init else None
    return ParallelSetup(device=device, ds_config=ds_config, zero_init=zero_init)


def build_engine(model: torch.nn.Module, cfg: Config, setup: Optional[ParallelSetup] = None):
    """The engine for `model`. `setup`: what `setup_parallel(cfg)` returned before the model was built (None
    for a single-process run); without it, it is done here."""
    if setup is None:
        setup = setup_parallel(cfg)
    if setup is None:
        return SingleEngine(model, cfg, resolve_device(cfg.trainer.device))
    device = setup.device
    if cfg.parallel.sp_size > 1:
        apply_sequence_parallel(model, cfg.parallel.sp_size, cfg.trainer.micro_batch_size)
    engine = DeepSpeedEngine(model, cfg, setup)
    if engine.rank == 0:
        p, t = cfg.parallel, cfg.trainer
        world_size = engine.world_size
        offload = [name for name, on in (("optimizer", p.offload_optimizer), ("params", p.offload_params)) if on]
        log.info("DeepSpeed ZeRO-%d on %d %s ranks%s%s%s, %s: global batch %d rows x %d tokens (micro-batch %d x "
                 "accumulation %d x data-parallel replicas)", p.zero_stage, world_size, device.type,
                 f", sequence parallel over {p.sp_size} ranks ({engine.dp_size} replicas)" if p.sp_size > 1 else "",
                 f" (offload: {', '.join(offload)})" if offload else "",
                 ", model built partitioned (zero.Init)" if setup.zero_init and setup.zero_init.used else "",
                 "bf16" if use_bf16(cfg.trainer.precision, device) else "fp32",
                 t.micro_batch_size * t.grad_accum_steps * engine.dp_size, t.seq_len, t.micro_batch_size,
                 t.grad_accum_steps)
    return engine
