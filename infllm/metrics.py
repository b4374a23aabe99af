"""Metrics people compare: tokens/s, TFLOP/s and MFU counting the attention actually computed, memory,
and for sparse attention the realised density. Written to <run>/metrics.jsonl, the console and (optionally) wandb.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, by device-name substring.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def device_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding (a lookup).
    With tied embeddings the lm_head matmul still costs vocab x hidden, so count it once."""
    # ZeRO-3 leaves each rank a shard of every parameter; ds_numel is the full size.
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    return total if tied else total - getattr(emb, "ds_numel", emb.numel())


def attention_flops_per_layer(q_heads: int, head_dim: int, attended_pairs: float) -> float:
    """Forward FLOPs of attention for `attended_pairs` (query, key) pairs: QK^T and PV, 2 FLOPs per MAC."""
    return 4.0 * q_heads * head_dim * attended_pairs


def causal_pairs(cu_seqlens: torch.Tensor) -> float:
    """(query, key) pairs of dense causal attention over the documents (host tensor, no device sync)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    return float((lens * (lens + 1) / 2).sum())


def train_flops(model: torch.nn.Module, num_tokens: int, attended_pairs: float) -> float:
    """Forward + backward FLOPs of one batch: 6 * matmul params per token + 3x the attention forward."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dense = 6.0 * matmul_params(model) * num_tokens
    attn = 3.0 * layers * attention_flops_per_layer(heads, head_dim, attended_pairs)
    return dense + attn


class MetricsLogger:
    """Appends one JSON object per logged step to metrics.jsonl; mirrors to wandb when enabled."""

    def __init__(self, run_dir: str, logger_cfg, config_dict: Dict[str, Any], enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if enabled and logger_cfg.name == "wandb" and logger_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=logger_cfg.project, mode=logger_cfg.mode, dir=run_dir,
                                    config=config_dict, resume="allow")

    def log(self, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
