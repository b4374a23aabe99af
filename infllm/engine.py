"""The engine owns what differs between one process and a distributed run: backward, the optimizer step,
gradient clipping, collectives, and saving/loading model + optimizer state. The trainer loop talks only to the
`Engine` protocol below; `SingleEngine` (one process) and `infllm.parallel.DeepSpeedEngine` (DeepSpeed ZeRO)
implement it, so the loop has no branch on the engine kind.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Dict, Iterator, Optional, Protocol, runtime_checkable

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from infllm.checkpoint import save_hf, torch_load
from infllm.config import Config
from infllm.errors import CheckpointError, ConfigError
from infllm.schedule import build_scheduler


@runtime_checkable
class Engine(Protocol):
    """What the trainer needs from an engine.

    Ranks: `rank` / `world_size` count every process; `dp_rank` / `dp_size` count the data-parallel replicas
    (each reads its own rows), which is `world_size / parallel.sp_size`: the `sp_size` ranks of one sequence-
    parallel group share one row, rank `sp_rank` of them holding its `sp_rank`-th slice. `is_distributed` is True when collectives run (a world of one included).
    """

    is_distributed: bool
    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    # What the gradient reduction divides the sum over ranks by (1 in one process): the trainer normalises each
    # rank's summed loss by the window's target count over this, so the update is the mean over every target.
    grad_divisor: int
    device: torch.device

    @property
    def module(self) -> torch.nn.Module:
        """The model (its forward may need every rank under ZeRO-3)."""

    def forward(self, **kwargs): ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> Optional[float]:
        """Apply the update of the accumulation window; the global gradient norm, or None if the step was
        skipped because it was not finite."""

    def lr(self) -> float: ...

    def all_reduce_sum(self, x):
        """Sum of a number or tensor over every rank (identity in one process)."""

    def barrier(self) -> None: ...

    def gathered(self) -> contextlib.AbstractContextManager:
        """Every rank enters; within, the module holds its full weights and its forward is local."""

    def checkpoint_files(self) -> Dict[str, Callable[[str], None]]:
        """File (or directory) name inside a checkpoint -> a writer called with its path."""

    def load_checkpoint(self, path: str) -> None: ...

    def export_hf(self, out_dir: str, tokenizer) -> str:
        """Hugging Face format of the full model (every rank calls it; rank 0 writes)."""


def resolve_device(name: str) -> torch.device:
    """trainer.device: auto | cpu | cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: cuda was asked for but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device | str) -> bool:
    """trainer.precision: the one place that decides bf16 (auto = bf16 on GPU, fp32 on CPU)."""
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases, norms and embeddings' 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 (zero.Init) leaves an empty 1-D placeholder in a partitioned parameter; ds_shape is its shape.
        (no_decay if len(getattr(p, "ds_shape", p.shape)) < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if next(model.parameters()).is_cuda:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


class SingleEngine:
    """One process, one device. Master weights in the model's dtype (fp32 by default), bf16 autocast on GPU."""

    is_distributed = False
    rank = 0
    world_size = 1
    dp_rank = 0
    dp_size = 1
    sp_rank = 0
    sp_size = 1
    grad_divisor = 1

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device):
        self.model = model.to(device)
        self.device = device
        self.cfg = cfg
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg.trainer.max_steps, cfg.schedule)
        self.grad_clip = cfg.trainer.grad_clip
        self.use_bf16 = use_bf16(cfg.trainer.precision, device)

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, **kwargs):
        with self.autocast():
            return self.model(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> Optional[float]:
        """Clip, step, schedule, zero grads. Returns the grad norm, or None if it was not finite (step skipped)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def all_reduce_sum(self, x):
        return x

    def barrier(self) -> None:
        pass

    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        yield self.model

    # Checkpoint files: the model through safetensors (shared/tied tensors handled), optimizer and scheduler
    # state through torch.save, read back with weights_only=True.
    def checkpoint_files(self) -> Dict[str, Callable[[str], None]]:
        return {
            "model.safetensors": lambda path: st_save_model(self.model, path),
            "optimizer.pt": lambda path: torch.save({"optimizer": self.optimizer.state_dict(),
                                                     "scheduler": self.scheduler.state_dict()}, path),
        }

    def load_checkpoint(self, path: str) -> None:
        missing, unexpected = st_load_model(self.model, os.path.join(path, "model.safetensors"), strict=False,
                                            device=str(self.device))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path}: model weights do not match this model (missing "
                                  f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}); it was written by "
                                  "another model or config")
        state = torch_load(os.path.join(path, "optimizer.pt"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def export_hf(self, out_dir: str, tokenizer) -> str:
        return save_hf(self.model, tokenizer, out_dir)

