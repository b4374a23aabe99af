"""Where parallelism is applied, in one place. The model and the attention never see ranks or meshes.

`build_engine(model, cfg)` returns the engine the trainer drives:
- parallel.engine=single: `SingleEngine` (one process, one device);
- parallel.engine=deepspeed: DeepSpeed ZeRO under torchrun (see the distributed issue).
"""
from __future__ import annotations

import torch

from infllm.config import Config, ConfigError
from infllm.engine import SingleEngine


def build_engine(model: torch.nn.Module, cfg: Config):
    from infllm.trainer import resolve_device

    if cfg.parallel.engine == "single":
        return SingleEngine(model, cfg, resolve_device(cfg.trainer.device))
    raise ConfigError(f"parallel.engine: {cfg.parallel.engine!r} is not available yet; use single")
