"""Standalone long-context eval: compose the config -> load the model (or a checkpoint) -> run_suite -> report.

    python eval.py                                              # the configured model (embedded SmolLM2)
    python eval.py eval=baseline run_name=eval_smollm2_baseline # the README's untrained baseline (CPU, ~1 h)
    python eval.py eval.checkpoint=runs/<run>/final eval.modes=[dense,sparse]
    python eval.py eval=ruler eval.checkpoint=runs/<run>        # a run dir: its final/ export is used
The report (eval_results.json, eval_report.md, PNGs) goes to eval.out_dir, else the Hydra run directory.
"""
import dataclasses
import json
import logging
import os
from typing import Optional, Tuple

import hydra
import torch
from omegaconf import DictConfig

from infllm.config import Config, ConfigError, to_object
from infllm.engine import resolve_device, use_bf16
from infllm.eval import run_suite

log = logging.getLogger("eval")


def _resolve_checkpoint(path: str) -> Tuple[str, str]:
    """("hf", dir) for a save_pretrained directory (a run dir means its final/ export), ("state", dir) for a
    trainer checkpoint holding model.safetensors (loaded into the configured model)."""
    path = os.path.expanduser(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf", path
    if os.path.isfile(os.path.join(path, "final", "config.json")):
        return "hf", os.path.join(path, "final")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return "state", path
    raise ConfigError(f"eval.checkpoint: {path!r} is neither a Hugging Face model directory (config.json), "
                      "a run directory with final/, nor a trainer checkpoint with model.safetensors")


def _find_metrics(path: Optional[str]) -> Optional[str]:
    """metrics.jsonl of the run a checkpoint came from (the checkpoint dir or up to two levels above)."""
    d = os.path.abspath(path) if path else None
    for _ in range(3):
        if d is None:
            break
        candidate = os.path.join(d, "metrics.jsonl")
        if os.path.isfile(candidate):
            return candidate
        d = os.path.dirname(d)
    return None


def build_model(cfg: Config):
    from infllm.model import load_model

    ckpt = cfg.eval.checkpoint
    if ckpt is None:
        return load_model(cfg.model, cfg.attention)
    kind, path = _resolve_checkpoint(ckpt)
    if kind == "hf":
        model_cfg = dataclasses.replace(cfg.model, path=path, random_init=False)
        with open(os.path.join(path, "config.json")) as f:
            saved_sparse = json.load(f).get("sparse_config")
        # A checkpoint trained with InfLLM-V2 brings its own sparse_config; a plain one gets cfg.attention,
        # so "sparse" mode can still be tried on it.
        return load_model(model_cfg, None if saved_sparse else cfg.attention)
    from safetensors.torch import load_model as st_load_model

    model, tokenizer = load_model(cfg.model, cfg.attention)
    # The trainer wrote it with safetensors' save_model, which stores tied weights (embeddings = lm_head) once under
    # one of their names; load_model is its counterpart and counts a tied name as present.
    missing, unexpected = st_load_model(model, os.path.join(path, "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ConfigError(f"eval.checkpoint: {path} does not match cfg.model (missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}); pass the model config the run was trained with")
    return model, tokenizer


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg = to_object(dcfg)
    out_dir = cfg.eval.out_dir or cfg.output_dir
    model, tokenizer = build_model(cfg)
    device = resolve_device(cfg.trainer.device).type
    model.to(device)
    metrics_path = cfg.eval.metrics_file or _find_metrics(cfg.eval.checkpoint)
    log.info("evaluating %s on %s -> %s", cfg.eval.checkpoint or "the configured model", device, out_dir)
    # bf16 autocast on GPU as in training (the sparse kernels want it); exact fp32 on CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=device == "cuda" and use_bf16(cfg.trainer.precision, device))
    with autocast:
        metrics = run_suite(model, tokenizer, cfg.eval, out_dir, data_cfg=cfg.data, metrics_path=metrics_path,
                            title=cfg.eval.checkpoint or getattr(model.config, "name_or_path", None))
    with open(os.path.join(out_dir, "eval_report.md")) as f:
        print(f.read())
    print(f"report written to {out_dir} ({metrics['seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
