"""Where parallelism is applied, in one place. The model and the attention never see ranks or meshes.

`build_engine(model, cfg)` returns the engine the trainer drives (the interface of `infllm.engine.SingleEngine`):
- parallel.engine=single: `SingleEngine`, one process, one device;
- parallel.engine=deepspeed: `DeepSpeedEngine`, DeepSpeed ZeRO stage 1/2/3 (optionally offloading the optimizer
  state and, at stage 3, the parameters to CPU), one process per device, launched by torchrun (launch/run.sh).

A distributed run is set up in two calls, because ZeRO-3 partitions the model while it is being built:
`setup = setup_parallel(cfg)` before the model exists, `build_engine(model, cfg, setup)` after. `setup_parallel`:
1. reads rank / local rank / world size from the launcher's environment and checks them against the config;
2. binds the process to its device and opens the process group (NCCL on GPU, gloo on CPU), and DeepSpeed's
   communication on top of it;
3. agrees on one run directory (rank 0's) so that every rank writes its checkpoint files into the same place;
4. generates the DeepSpeed config (`deepspeed_config`, the one place it is built) and, at ZeRO-3 with
   `parallel.zero_init` (the default), a `ZeroInit` for `infllm.model.load_model`: transformers' HfDeepSpeedConfig
   around `from_pretrained` / `from_config`, so that the model is built already partitioned (deepspeed.zero.Init)
   and no rank ever holds all of its weights. A checkpoint is read on the host as transformers does under ZeRO-3;
   a random model (`model.random_init`) is drawn in full on the host, as one process draws it, and copied into
   the partitions, so a seed gives the same weights under every parallel config. The embedded GGUF conversion
   happens before, on full weights, with ZeRO-3 not yet visible to transformers.
`build_engine` then wraps the model with `deepspeed.initialize`: a client `torch.optim.AdamW` (a DeepSpeed-config
optimizer would JIT-compile fused_adam), the lr schedule stepped once per optimizer step, bf16 on GPU (DeepSpeed
keeps fp32 master weights), fp32 on CPU. Activation checkpointing stays the Hugging Face switch
(`trainer.gradient_checkpointing`), applied to the model before it gets here. `build_engine(model, cfg)` without a
setup does both steps (the model was then built in full; ZeRO-3 partitions it in `deepspeed.initialize`).

In-loop eval. `engine.gathered()` is a context every rank enters: ZeRO-1/2 hold full weights already (no-op);
ZeRO-3 gathers every parameter on every rank (`deepspeed.zero.GatheredParameters(..., modifier_rank=None)`, a
collective) and takes DeepSpeed's per-module hooks off, so that forward passes inside are local: rank 0 evaluates
while the other ranks wait in a barrier at the end of the context, after which the hooks are back and the weights
partitioned again, unchanged (training goes on exactly as without the eval).

Gradient accumulation. The trainer calls `forward`/`backward` once per micro-batch and `step` once per
accumulation window, with each micro-batch's loss already normalised by the token count of the whole window
(over all ranks). DeepSpeed's own accumulation is used unchanged: its `gradient_accumulation_steps` is
`trainer.grad_accum_steps`, `backward` calls `ds.backward(loss, scale_wrt_gas=False)` (no second division)
followed by `ds.step()`, which is bookkeeping until the last micro-batch of the window, where DeepSpeed reduces,
clips and applies the update. `step` then reports: the global gradient norm, or None when DeepSpeed skipped the
update because that norm was not finite (the same decision on every rank, since the norm is reduced over all
of them); the trainer counts it as a skipped step.

Checkpoints. `checkpoint_files` hands the trainer one entry, `zero/`, written by DeepSpeed's own collective
`save_checkpoint` into the checkpoint's temporary directory (model states from rank 0, one optimizer partition
per rank, `latest` and DeepSpeed's `zero_to_fp32.py`), beside the trainer's per-rank state and the manifest.
Loading reads those pickles with `torch.load(weights_only=True)`, allowing only the few DeepSpeed classes its
checkpoints hold (`_safe_deepspeed_globals`); the ranks first agree that each could read its files.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from infllm.config import Config, ConfigError
from infllm.engine import SingleEngine, build_optimizer
from infllm.schedule import build_scheduler

log = logging.getLogger(__name__)

# The DeepSpeed checkpoint tag, i.e. the sub-directory of a checkpoint that DeepSpeed writes.
DS_TAG = "zero"


# -- launcher environment --------------------------------------------------------------------------------

def launch_env() -> Tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's (or the deepspeed launcher's) environment; (0, 0, 1)
    for a plain `python train.py`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, local_rank, world_size


def launcher_argv(argv: List[str]) -> List[str]:
    """The command line Hydra should parse, given the one a launcher started us with.

    - The deepspeed launcher appends `--local_rank=N` (or `--local_rank N`): Hydra would reject it. It is dropped
      and kept in LOCAL_RANK, where torchrun puts it anyway.
    - Ranks > 0 neither write Hydra's `.hydra/` config copy nor its log file: rank 0 writes them into the run
      directory all ranks share; the other ranks log warnings and errors to their stdout.
    - A Hydra multirun (`-m`) inside one torchrun would re-initialise the process group for its second job and
      hang there; sweeps run each point as its own torchrun (launch/sweep.py).
    """
    out = [argv[0]]
    args = iter(argv[1:])
    for arg in args:
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            os.environ.setdefault("LOCAL_RANK", next(args, "0"))
        else:
            out.append(arg)
    rank, _, world_size = launch_env()
    if world_size > 1 and any(a in ("-m", "--multirun") for a in out[1:]):
        raise SystemExit("a Hydra multirun (-m) cannot run inside one torchrun (the second job would hang "
                         "re-initialising the process group); sweep with `python launch/sweep.py` instead, which "
                         "starts one torchrun per point")
    if rank > 0:
        out += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    return out


def check_world_size(cfg: Config, world_size: int) -> None:
    expected = cfg.parallel.world_size
    if expected and expected != world_size:
        raise ConfigError(f"parallel.world_size: the config expects {expected} processes but this run has "
                          f"{world_size} (WORLD_SIZE from the launcher); launch with NGPU={expected} "
                          "(launch/run.sh) or set parallel.world_size=0 to accept any number")
    if cfg.parallel.engine == "single" and world_size > 1:
        raise ConfigError(f"parallel.engine: single runs one process, but the launcher started {world_size}; "
                          "choose a distributed preset, e.g. parallel=zero2 or parallel=zero3")


# -- process group ---------------------------------------------------------------------------------------

def init_process_group(device: torch.device, timeout_minutes: int) -> None:
    """Open the default process group from the launcher's environment: NCCL on GPU, gloo on CPU.
    A plain `python train.py parallel=zero2` becomes a world of one on a free local port."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    kwargs: Dict[str, Any] = dict(timeout=datetime.timedelta(minutes=timeout_minutes))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs.update(backend="nccl", device_id=device)
    else:
        kwargs.update(backend="gloo")
    dist.init_process_group(**kwargs)
    import atexit

    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
            # Leave together: a gloo rank whose peer has already torn its connections down can abort at exit
            # ("terminate called without an active exception"). Bounded, so a crashed peer cannot hang us.
            with contextlib.suppress(Exception):
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=120))
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share_run_dir(cfg: Config) -> None:
    """Make every rank use rank 0's run directory. The launch scripts pass one explicit `run_name`; without it
    each process resolved its own `${now:}` timestamp, which can differ by a second between ranks."""
    import torch.distributed as dist

    chosen = [cfg.output_dir, cfg.run_name]
    dist.broadcast_object_list(chosen, src=0)
    if chosen[0] != cfg.output_dir:
        # Hydra created this rank's own (empty: ranks > 0 write no Hydra files) directory; remove it.
        with contextlib.suppress(OSError):
            os.rmdir(cfg.output_dir)
        cfg.output_dir, cfg.run_name = chosen


# -- DeepSpeed config ------------------------------------------------------------------------------------

def use_bf16(cfg: Config, device: torch.device) -> bool:
    precision = cfg.trainer.precision
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def deepspeed_config(cfg: Config, device: torch.device) -> Dict[str, Any]:
    """The DeepSpeed config, generated from the Hydra config; `parallel.extra` is merged in last."""
    p, t = cfg.parallel, cfg.trainer
    pin = device.type == "cuda"
    zero: Dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # A non-finite gradient norm skips the update (and the lr step) on every rank.
        "bf16": {"enabled": use_bf16(cfg, device), "check_grad_overflow": True},
        # The client torch AdamW also serves offloaded optimizer states (DeepSpeedCPUAdam would need a
        # C++ JIT build; set parallel.extra.zero_force_ds_cpu_optimizer=true to ask for it).
        "zero_force_ds_cpu_optimizer": False,
        # The trainer logs; DeepSpeed's own progress lines stay off.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, p.extra)


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_zero3(ds_config: Dict[str, Any]) -> bool:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


# -- ZeRO-3: the model built partitioned (zero.Init) ------------------------------------------------------

class ZeroInit:
    """The zero.Init hook of `infllm.model.load_model` (ZeRO-3 with parallel.zero_init): models that transformers
    builds within `building()` are partitioned over the ranks as they are constructed (transformers enters
    `deepspeed.zero.Init` itself when an HfDeepSpeedConfig of stage 3 is alive). Collective: every rank builds
    the same model.

    transformers holds the HfDeepSpeedConfig by a weak reference only; this object keeps it alive. ZeRO-3 is
    visible to transformers only within `building()`: before it (the embedded GGUF conversion, the tokenizer, a
    random model's full draw) and after it (the rank-0 eval, `generate` included, which would otherwise wait for
    the other ranks at every token) models are plain."""

    def __init__(self, ds_config: Dict[str, Any], device: torch.device):
        if not is_zero3(ds_config):
            raise ValueError("ZeroInit needs a ZeRO stage 3 DeepSpeed config")
        self.ds_config = ds_config
        self.device = device
        self.hf_config = None

    @property
    def used(self) -> bool:
        """Whether a model was built within `building()`."""
        return self.hf_config is not None

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """transformers' `from_pretrained` / `from_config` build partitioned models within. RNG-neutral: the
        torch RNG leaves as it came, whatever the construction drew (rank 0 alone initialises weights there)."""
        from transformers.integrations import HfDeepSpeedConfig, set_hf_deepspeed_config, \
            unset_hf_deepspeed_config

        if self.hf_config is None:
            self.hf_config = HfDeepSpeedConfig(self.ds_config)  # registers itself
        set_hf_deepspeed_config(self.hf_config)
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                yield
        finally:
            unset_hf_deepspeed_config()

    @staticmethod
    def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
        """Copy the full model `src` (the same on every rank) into its partitioned twin `dst`, one module's
        parameters gathered at a time; rank 0's copy is broadcast. Collective."""
        import deepspeed
        import torch.distributed as dist

        full = dict(src.named_parameters(remove_duplicate=False))
        rank0 = dist.get_rank() == 0
        with torch.no_grad():
            for mod_name, module in dst.named_modules():
                named = list(module.named_parameters(recurse=False))
                if not named:
                    continue
                with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
                    if rank0:
                        for name, param in named:
                            param.data.copy_(full[f"{mod_name}.{name}" if mod_name else name].data)
            buffers = dict(src.named_buffers())
            for name, buf in dst.named_buffers():  # never partitioned: copied whole
                if name in buffers and buffers[name].shape == buf.shape:
                    buf.copy_(buffers[name])


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full data is not on this rank now (only its `ds_tensor` partition is)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return hasattr(param, "ds_id") and param.ds_status == ZeroParamStatus.NOT_AVAILABLE


# -- the set-up before the model exists -------------------------------------------------------------------

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
    from infllm.trainer import resolve_device

    _, local_rank, world_size = launch_env()
    check_world_size(cfg, world_size)
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
    ds_config = deepspeed_config(cfg, device)
    zero_init = ZeroInit(ds_config, device) if is_zero3(ds_config) and cfg.parallel.zero_init else None
    return ParallelSetup(device=device, ds_config=ds_config, zero_init=zero_init)


# -- checkpoints read without unpickling arbitrary objects ----------------------------------------------

def _safe_deepspeed_globals() -> List[Any]:
    """The non-tensor classes DeepSpeed 0.19 puts into its checkpoints (found with
    `torch.serialization.get_unsafe_globals_in_checkpoint` for ZeRO-1/2/3, fp32 and bf16, with and without
    offload): the loss scaler, the ZeRO stage enum, and the fragment addresses of the ZeRO-1/2 optimizer state.
    Everything else is tensors, numbers, strings and containers, which `weights_only=True` reads by itself."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_checkpoint_engine(base_engine):
    """A DeepSpeed checkpoint engine whose `load` is `torch.load(weights_only=True)` with only DeepSpeed's own
    checkpoint classes allowed; saving is DeepSpeed's. `preload` reads a file ahead of DeepSpeed (which then
    gets the same object), so that a rank that cannot read its part is known before any collective."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, base):
            self.__dict__.update(base.__dict__)
            self.preloaded: Dict[str, Any] = {}

        def preload(self, path: str) -> None:
            self.preloaded[os.path.realpath(path)] = self._read(path, "cpu")

        def load(self, path: str, map_location=None):
            if os.path.realpath(path) in self.preloaded:
                return self.preloaded.pop(os.path.realpath(path))
            return self._read(path, map_location)

        @staticmethod
        def _read(path: str, map_location):
            with torch.serialization.safe_globals(_safe_deepspeed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine(base_engine)


# -- the engine ------------------------------------------------------------------------------------------

class DeepSpeedEngine:
    """DeepSpeed ZeRO behind the SingleEngine interface. Build it with `build_engine` (process group first)."""

    is_distributed = True

    def __init__(self, model: torch.nn.Module, cfg: Config, setup: ParallelSetup):
        import deepspeed
        import torch.distributed as dist

        self.cfg = cfg
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        optimizer = build_optimizer(model, cfg)  # groups partitioned (zero.Init) parameters by their ds_shape
        max_steps = cfg.trainer.max_steps
        self.ds_config = setup.ds_config
        self.zero_init = setup.zero_init  # holds the HfDeepSpeedConfig the model was built with, for its lifetime
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: build_scheduler(opt, max_steps, cfg.schedule))
        self.ds.checkpoint_engine = _safe_checkpoint_engine(self.ds.checkpoint_engine)
        self.device = self.ds.device if isinstance(self.ds.device, torch.device) else torch.device(self.ds.device)
        self._skipped_before = 0

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def forward(self, **kwargs):
        return self.ds(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised over the whole window: no division by the accumulation steps here.
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()

    def step(self) -> Optional[float]:
        """The update already happened in the window's last `backward` (DeepSpeed's boundary): report it."""
        ds = self.ds
        if ds.micro_steps % ds.gradient_accumulation_steps() != 0:
            raise RuntimeError(f"DeepSpeed is mid-window ({ds.micro_steps} micro-steps, accumulation "
                               f"{ds.gradient_accumulation_steps()}): the trainer must call backward exactly "
                               "trainer.grad_accum_steps times per step")
        skipped = ds.skipped_steps != self._skipped_before
        self._skipped_before = ds.skipped_steps
        norm = ds.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        if skipped or (norm is not None and not math.isfinite(norm)):
            return None
        return norm

    def zero_grad(self) -> None:
        self.ds.optimizer.zero_grad()

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    # -- collectives the trainer uses
    def all_reduce_sum(self, x):
        import torch.distributed as dist

        if isinstance(x, torch.Tensor):
            t = x.detach().clone().to(self._comm_device())
            dist.all_reduce(t)
            return t.to(x.device)
        dtype = torch.float64 if isinstance(x, float) else torch.int64
        t = torch.tensor(x, dtype=dtype, device=self._comm_device())
        dist.all_reduce(t)
        return type(x)(t.item())

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # -- full weights for the in-loop eval
    @property
    def zero_stage(self) -> int:
        return int(self.ds.zero_optimization_stage())

    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        """Every rank enters; within, `module` holds its full weights on every rank and its forward passes are
        local (no collectives), for rank 0 to evaluate; the others wait at the exit. ZeRO-1/2: the weights are
        full already, nothing to do (and nobody waits). ZeRO-3: all parameters are gathered (collective) and
        DeepSpeed's module hooks are taken off: fetch / release, and the trace check at the start of a forward,
        which compares the ranks (`reset_step`) and would start collectives on rank 0 alone (DeepSpeed's own
        `unwrap_model_for_generation` leaves that one on: its generation runs on every rank). At the exit,
        after a barrier, they are registered again (the prefetch trace is re-recorded at the next step) and the
        parameters partitioned again, unmodified (`modifier_rank=None`)."""
        if self.zero_stage != 3:
            yield self.module
            return
        import deepspeed

        offload = getattr(self.ds.optimizer, "parameter_offload", None) or self.ds.optimizer
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            offload._remove_module_hooks()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield self.module
            finally:
                self.barrier()  # bounded by parallel.timeout_minutes, like any collective
                offload.setup_zero_stage3_hooks()

    # -- checkpoints
    def checkpoint_files(self) -> Dict[str, Callable[[str], None]]:
        # Collective: every rank calls DeepSpeed's save into the same directory; `latest` names the tag, so
        # `python <ckpt>/zero_to_fp32.py <ckpt> <out>` consolidates the fp32 master weights offline.
        def save(path: str) -> None:
            self.ds.save_checkpoint(os.path.dirname(path), tag=os.path.basename(path), save_latest=True)

        return {DS_TAG: save}

    def load_checkpoint(self, path: str) -> None:
        from infllm.checkpoint import CheckpointError

        zero_dir = os.path.join(path, DS_TAG)
        if not os.path.isdir(zero_dir):
            raise CheckpointError(f"checkpoint {path}: no {DS_TAG}/ directory; it was not written by the "
                                  "DeepSpeed engine (resume it with the parallel preset that wrote it)")
        # Each rank first reads the files DeepSpeed will give it (model states, its optimizer partition), and
        # the ranks agree on the outcome: one unreadable file fails every rank here, with its name, instead of
        # leaving the others waiting in DeepSpeed's collectives.
        own = re.compile(rf"^(mp_rank_\d+_model_states|(bf16_)?zero_pp_rank_{self.rank}_mp_rank_\d+_"
                         r"(model|optim)_states)\.pt$")
        engine = self.ds.checkpoint_engine
        problem = None
        for name in sorted(os.listdir(zero_dir)):
            if own.match(name):
                try:
                    engine.preload(os.path.join(zero_dir, name))
                except Exception as e:  # a truncated zip, a flipped byte, an unexpected class
                    problem = f"{DS_TAG}/{name} cannot be read ({type(e).__name__}: {e})"
                    break
        failed = self.all_reduce_sum(int(problem is not None))
        if failed:
            engine.preloaded.clear()
            raise CheckpointError(f"checkpoint {path}: " + (problem or f"{failed} other rank(s) could not read "
                                                            "their part of it (see their messages)") +
                                  "; the checkpoint is corrupt, resume from an earlier one")
        try:
            loaded, _ = self.ds.load_checkpoint(path, tag=DS_TAG, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as e:  # DeepSpeed raises asserts, shape and key errors alike
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load it: {type(e).__name__}: {e}") \
                from None
        finally:
            engine.preloaded.clear()
        if loaded is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed found no checkpoint under {DS_TAG}/")
        self._skipped_before = self.ds.skipped_steps

    # -- export
    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The model's complete weights on rank 0 (CPU, in the module's dtype); None on the other ranks.
        Collective: ZeRO-3 parameters are gathered one at a time, so no rank ever holds the whole model on
        its device."""
        import deepspeed

        module = self.module
        state: Dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():
            gather = deepspeed.zero.GatheredParameters([param], modifier_rank=None) \
                if hasattr(param, "ds_id") else contextlib.nullcontext()
            with gather:
                if self.rank == 0:
                    state[name] = param.detach().to("cpu", copy=True)
        for mod_name, mod in module.named_modules():
            for buf_name, buf in mod.named_buffers(recurse=False):
                if buf is not None and buf_name not in mod._non_persistent_buffers_set and self.rank == 0:
                    state[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach().to("cpu", copy=True)
        return state if self.rank == 0 else None

    def export_hf(self, out_dir: str, tokenizer) -> str:
        """Hugging Face format consolidated from the ZeRO partitions (with the model config's sparse_config).
        Every rank must call it; rank 0 writes."""
        from infllm.trainer import save_hf

        state = self.full_state_dict()
        if self.rank == 0:
            save_hf(self.module, tokenizer, out_dir, state_dict=state)
        self.barrier()
        return out_dir


def build_engine(model: torch.nn.Module, cfg: Config, setup: Optional[ParallelSetup] = None):
    """The engine for `model`. `setup`: what `setup_parallel(cfg)` returned before the model was built (None
    for a single-process run); without it, it is done here."""
    from infllm.trainer import resolve_device

    if setup is None:
        setup = setup_parallel(cfg)
    if setup is None:
        return SingleEngine(model, cfg, resolve_device(cfg.trainer.device))
    device = setup.device
    engine = DeepSpeedEngine(model, cfg, setup)
    if engine.rank == 0:
        p, t = cfg.parallel, cfg.trainer
        world_size = engine.world_size
        offload = [name for name, on in (("optimizer", p.offload_optimizer), ("params", p.offload_params)) if on]
        log.info("DeepSpeed ZeRO-%d on %d %s ranks%s%s, %s: global batch %d rows x %d tokens (micro-batch %d x "
                 "accumulation %d x ranks)", p.zero_stage, world_size, device.type,
                 f" (offload: {', '.join(offload)})" if offload else "",
                 ", model built partitioned (zero.Init)" if setup.zero_init and setup.zero_init.used else "",
                 "bf16" if use_bf16(cfg, device) else "fp32",
                 t.micro_batch_size * t.grad_accum_steps * world_size, t.seq_len, t.micro_batch_size,
                 t.grad_accum_steps)
    return engine
