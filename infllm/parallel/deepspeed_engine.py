"""DeepSpeed ZeRO stage 1/2/3 behind the `infllm.engine.Engine` protocol.

Gradient accumulation. The trainer calls `forward`/`backward` once per micro-batch and `step` once per
accumulation window, with each micro-batch's loss already normalised by the token count of the whole window
(over all ranks). DeepSpeed's own accumulation is used unchanged: its `gradient_accumulation_steps` is
`trainer.grad_accum_steps`, `backward` calls `ds.backward(loss, scale_wrt_gas=False)` (no second division)
followed by `ds.step()`, which is bookkeeping until the last micro-batch of the window, where DeepSpeed reduces,
clips and applies the update. `step` then reports: the global gradient norm, or None when DeepSpeed skipped the
update because that norm was not finite (the same decision on every rank, since the norm is reduced over all
of them); the trainer counts it as a skipped step.

In-loop eval. `engine.gathered()` is a context every rank enters: ZeRO-1/2 hold full weights already (no-op);
ZeRO-3 gathers every parameter on every rank (`deepspeed.zero.GatheredParameters(..., modifier_rank=None)`, a
collective) and takes DeepSpeed's per-module hooks off, so that forward passes inside are local: rank 0 evaluates
while the other ranks wait in a barrier at the end of the context, after which the hooks are back and the weights
partitioned again, unchanged (training goes on exactly as without the eval).

Checkpoints. `checkpoint_files` hands the trainer one entry, `zero/`, written by DeepSpeed's own collective
`save_checkpoint` into the checkpoint's temporary directory (model states from rank 0, one optimizer partition
per rank, `latest` and DeepSpeed's `zero_to_fp32.py`), beside the trainer's per-rank state and the manifest.
Loading reads those pickles with `torch.load(weights_only=True)` (`ds_checkpoint`); the ranks first agree that
each could read its files.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Callable, Dict, Iterator, Optional

import torch

from infllm.checkpoint import save_hf
from infllm.config import Config
from infllm.engine import build_optimizer
from infllm.errors import CheckpointError
from infllm.parallel.ds_checkpoint import safe_checkpoint_engine
from infllm.parallel.sequence import sequence_parallel_mpu
from infllm.schedule import build_scheduler

# The DeepSpeed checkpoint tag, i.e. the sub-directory of a checkpoint that DeepSpeed writes.
DS_TAG = "zero"


class DeepSpeedEngine:
    """DeepSpeed ZeRO behind the `Engine` protocol. Build it with `infllm.parallel.build_engine` (process group
    first); `setup` is the `ParallelSetup` of `setup_parallel`."""

    is_distributed = True

    def __init__(self, model: torch.nn.Module, cfg: Config, setup):
        import deepspeed
        import torch.distributed as dist

        self.cfg = cfg
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Ranks of one sequence-parallel group (consecutive) read the same row.
        self.sp_size = cfg.parallel.sp_size
        self.dp_size = self.world_size // self.sp_size
        self.dp_rank = self.rank // self.sp_size
        optimizer = build_optimizer(model, cfg)  # groups partitioned (zero.Init) parameters by their ds_shape
        max_steps = cfg.trainer.max_steps
        self.ds_config = setup.ds_config
        self.zero_init = setup.zero_init  # holds the HfDeepSpeedConfig the model was built with, for its lifetime
        self.sp_rank = self.rank % self.sp_size
        # DeepSpeed 0.19 divides the all-ranks gradient sum by the data-parallel replicas (world / sp) at ZeRO-1/2,
        # but by the world size in ZeRO-3's reduce-scatter (which ds_config pins on under sequence parallelism);
        # tests/test_sequence_parallel.py checks both against one process.
        self.grad_divisor = self.world_size if cfg.parallel.zero_stage == 3 else self.dp_size
        mpu = sequence_parallel_mpu() if self.sp_size > 1 else None
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config, mpu=mpu,
            lr_scheduler=lambda opt: build_scheduler(opt, max_steps, cfg.schedule))
        self.ds.checkpoint_engine = safe_checkpoint_engine(self.ds.checkpoint_engine)
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
        state = self.full_state_dict()
        if self.rank == 0:
            save_hf(self.module, tokenizer, out_dir, state_dict=state)
        self.barrier()
        return out_dir
