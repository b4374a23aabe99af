"""Learning-rate schedules as multipliers of optim.lr: linear warmup, then constant / linear / cosine / WSD."""
from __future__ import annotations

import math

import torch

from infllm.config import ScheduleConfig


def lr_multiplier(step: int, max_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier for the update made at optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.name == "linear":
        return 1.0 - (1.0 - floor) * progress
    if cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: hold the peak, then decay linearly over the last decay_fraction of the run.
    stable_end = 1.0 - cfg.decay_fraction
    if progress <= stable_end:
        return 1.0
    return 1.0 - (1.0 - floor) * (progress - stable_end) / cfg.decay_fraction


def build_scheduler(optimizer: torch.optim.Optimizer, max_steps: int, cfg: ScheduleConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, max_steps, cfg))
