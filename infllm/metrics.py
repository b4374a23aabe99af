"""Metrics people compare: tokens/s, TFLOP/s and MFU counting the attention actually computed, memory,
and for sparse attention the realised density. Written to <run>/metrics.jsonl, the console and (optionally) wandb.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional

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


def host_peak_rss_gb() -> Optional[float]:
    """This process's peak resident memory (GiB), the CPU run's memory figure; None where unknown."""
    try:
        import resource
    except ImportError:
        return None
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def format_step_line(m: Dict[str, Any], max_steps: Optional[int] = None) -> str:
    """One console line per logged step (trainer.progress_bar=false: batch jobs, slurm):
    step, loss, lr, tokens/s, realised density (sparse runs) and memory (device peak, else host peak RSS)."""
    step = f"{m['step']}/{max_steps}" if max_steps else f"{m['step']}"
    parts = [f"step {step}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:,.0f} tok/s"]
    if m.get("sparse/density") is not None:
        parts.append(f"density {m['sparse/density']:.2f}")
    if m.get("peak_mem_gb") is not None:
        parts.append(f"mem {m['peak_mem_gb']:.1f} GiB")
    else:
        rss = host_peak_rss_gb()
        if rss is not None:
            parts.append(f"rss {rss:.1f} GiB")
    return " | ".join(parts)


def _cell(x: Any) -> str:
    if not isinstance(x, (int, float)) or x != x:
        return "-"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def format_eval_table(results: Dict[str, Any], step: int) -> str:
    """The in-loop eval as a short table for the console: one row per attention mode, one column per task's
    accuracy, then the mean accuracy and the perplexity. Keys as `infllm.eval.report.flat_metrics` writes
    them (<mode>/<task>/acc, <mode>/acc, <mode>/ppl); the per-length and probe keys go to metrics.jsonl only."""
    rows: Dict[str, Dict[str, Any]] = {}
    tasks: List[str] = []
    for key, value in results.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == "acc":
            rows.setdefault(parts[0], {})[parts[1]] = value
            if parts[1] not in tasks:
                tasks.append(parts[1])
        elif len(parts) == 2 and parts[1] in ("acc", "ppl"):
            rows.setdefault(parts[0], {})[f"<{parts[1]}>"] = value
    if not rows:
        return f"eval at step {step}: no accuracy or perplexity results"
    columns = tasks + ["<acc>", "<ppl>"]
    names = {"<acc>": "mean acc", "<ppl>": "ppl"}
    header = ["mode"] + [names.get(c, c) for c in columns]
    body = [[mode] + [_cell(vals.get(c)) for c in columns] for mode, vals in rows.items()]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header] + body]
    # On its own lines, so that a log line's prefix does not shift the header off its columns.
    return f"eval at step {step}:\n" + "\n".join(lines)


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

    def truncate_after(self, step: int) -> int:
        """Drop the rows of steps after `step` (a resumed run re-runs them), atomically; returns how many were
        dropped. A row without a step, or a torn last line from a kill mid-write, is dropped as well."""
        if not self.enabled or not os.path.isfile(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    dropped += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
                else:
                    dropped += 1
        if dropped:
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
            log.info("metrics.jsonl: dropped %d rows after the resumed step %d", dropped, step)
        return dropped

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
