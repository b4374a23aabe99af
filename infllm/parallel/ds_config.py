"""The DeepSpeed config, generated from the Hydra config: the one place it is built. `parallel.extra` is merged
in last, for knobs not exposed as fields."""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch

from infllm.config import Config
from infllm.engine import use_bf16
from infllm.errors import ConfigError


def deepspeed_config(cfg: Config, device: torch.device) -> Dict[str, Any]:
    """The DeepSpeed config, generated from the Hydra config; `parallel.extra` is merged in last."""
    p, t = cfg.parallel, cfg.trainer
    pin = device.type == "cuda"
    zero: Dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if p.zero_stage == 3 and p.sp_size > 1:
        # One gradient-averaging rule under sequence parallelism: ZeRO-3's reduce-scatter path (its contiguous
        # bucket path divides differently, see DeepSpeedEngine.grad_divisor).
        zero["reduce_scatter"] = True
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # A non-finite gradient norm skips the update (and the lr step) on every rank.
        "bf16": {"enabled": use_bf16(cfg.trainer.precision, device), "check_grad_overflow": True},
        # The client torch AdamW also serves offloaded optimizer states (DeepSpeedCPUAdam would need a
        # C++ JIT build; set parallel.extra.zero_force_ds_cpu_optimizer=true to ask for it).
        "zero_force_ds_cpu_optimizer": False,
        # The trainer logs; DeepSpeed's own progress lines stay off.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    ds = _deep_merge(ds, p.extra)
    if p.zero_stage == 3 and p.sp_size > 1 and not ds["zero_optimization"].get("reduce_scatter", True):
        raise ConfigError("parallel.extra.zero_optimization.reduce_scatter=false cannot be combined with "
                          "parallel.sp_size > 1 at ZeRO-3 (the gradients would be averaged by another rule)")
    return ds


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
