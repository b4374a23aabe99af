"""The training loop: engine-agnostic (one process or DeepSpeed), resumable, with metrics and in-loop eval.

    trainer = Trainer.build(cfg)   # model, tokenizer, data, engine
    trainer.fit()                  # resume if asked, train, checkpoint, export Hugging Face format
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Optional

import torch
from omegaconf import OmegaConf

from data.batch import IGNORE_INDEX, PackedBatch
from infllm import checkpoint as ckpt
from infllm.config import Config
from infllm.engine import Engine, save_hf
from infllm.errors import ConfigError
from infllm.attention import configure_sparse_stats, expected_density, get_sparse_stats, reset_sparse_stats
from infllm.metrics import MetricsLogger, causal_pairs, device_peak_tflops, train_flops

log = logging.getLogger(__name__)


def model_fingerprint(model: torch.nn.Module) -> Dict[str, Any]:
    """What must match for a checkpoint to belong to this model."""
    c = model.config
    return {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads", "vocab_size")}


def warn_if_beyond_native_length(model: torch.nn.Module, seq_len: int, cfg: Config) -> None:
    native = getattr(model.config, "max_position_embeddings", None)
    rope_changed = cfg.model.rope_scaling.type is not None or cfg.model.rope_theta is not None
    if native and seq_len > native and not rope_changed:
        log.warning("trainer.seq_len=%d is beyond the model's native length %d and RoPE is unchanged "
                    "(set model.rope_theta or model.rope_scaling for short-to-long); training anyway",
                    seq_len, native)


class Trainer:
    def __init__(self, cfg: Config, engine: Engine, tokenizer, loader, run_dir: str):
        self.cfg = cfg
        self.engine = engine
        self.tokenizer = tokenizer
        self.loader = loader
        self.run_dir = run_dir
        self.is_main = engine.rank == 0
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_steps = 0
        self._stop_signal: Optional[int] = None
        self.metrics = MetricsLogger(run_dir, cfg.logger, _plain(cfg), enabled=self.is_main)
        self.peak_tflops = device_peak_tflops(engine.device)
        self.last_metrics: Dict[str, Any] = {}

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: Config) -> "Trainer":
        from data import build_train_loader
        from infllm.model import load_model
        from infllm.parallel import build_engine, setup_parallel

        attn = cfg.attention
        if attn.name == "infllm_v1":
            raise ConfigError("attention.name: infllm_v1 is training-free (forward only); use it with eval.py, "
                              "and train with dense or infllm_v2")
        # Process group, run directory and, at ZeRO-3, zero.Init: before the model, which it may partition.
        setup = setup_parallel(cfg)
        torch.manual_seed(cfg.trainer.seed)
        model, tokenizer = load_model(cfg.model, attn, zero_init=setup.zero_init if setup is not None else None)
        if cfg.trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        warn_if_beyond_native_length(model, cfg.trainer.seq_len, cfg)
        if cfg.trainer.time_selection and attn.name == "infllm_v2":
            configure_sparse_stats(model, time_selection=True)
        _log_attention(attn, cfg.trainer.seq_len)
        engine = build_engine(model, cfg, setup)
        loader = build_train_loader(cfg.data, tokenizer, seq_len=cfg.trainer.seq_len,
                                    micro_batch_size=cfg.trainer.micro_batch_size, rank=engine.dp_rank,
                                    world_size=engine.dp_size, seed=cfg.trainer.seed)
        os.makedirs(cfg.output_dir, exist_ok=True)
        return cls(cfg, engine, tokenizer, loader, cfg.output_dir)

    # -- checkpoints ----------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_steps": self.nonfinite_steps,
                "loader": self.loader.state_dict(), "model": model_fingerprint(self.engine.module),
                "world_size": self.engine.world_size}

    def save_checkpoint(self) -> str:
        files = dict(self.engine.checkpoint_files())
        rank = self.engine.rank
        files[f"rng_rank{rank}.pt"] = ckpt.torch_save(ckpt.rng_state())
        files[f"trainer_state_rank{rank}.json"] = lambda path: ckpt.write_json(path, self.state())
        return ckpt.save_checkpoint(self.run_dir, self.step, files, self.cfg.checkpoint.keep_last,
                                    is_main=self.is_main, barrier=self.engine.barrier)

    def load_checkpoint(self, path: str) -> None:
        ckpt.verify_checkpoint(path)
        rank = self.engine.rank
        state_path = os.path.join(path, f"trainer_state_rank{rank}.json")
        if not os.path.isfile(state_path):
            raise ckpt.CheckpointError(f"checkpoint {path}: no state for rank {rank}; it was written with another "
                                       "number of ranks (resume on the same world size)")
        state = json.load(open(state_path))
        if state.get("world_size", 1) != self.engine.world_size:
            raise ckpt.CheckpointError(f"checkpoint {path}: written by {state.get('world_size')} ranks, this run "
                                       f"has {self.engine.world_size}; resume on the same world size")
        if state["model"] != model_fingerprint(self.engine.module):
            raise ckpt.CheckpointError(f"checkpoint {path}: written for model {state['model']}, this run builds "
                                       f"{model_fingerprint(self.engine.module)}")
        try:
            self.engine.load_checkpoint(path)
        except RuntimeError as e:
            raise ckpt.CheckpointError(f"checkpoint {path}: cannot load model/optimizer state: {e}") from None
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(ckpt.torch_load(os.path.join(path, f"rng_rank{rank}.pt")))
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.nonfinite_steps = state["nonfinite_steps"]
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop -------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        log.warning("received signal %d: finishing this step, then saving a checkpoint", signum)
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """A signal can reach the ranks during different steps: they agree (any rank asked) so that all of
        them stop after the same step and save the checkpoint together."""
        asked = self._stop_signal is not None
        if self.engine.is_distributed:
            asked = self.engine.all_reduce_sum(int(asked)) > 0
        return asked

    def _micro_batches(self, it: Iterator[PackedBatch]) -> List[PackedBatch]:
        return [next(it) for _ in range(self.cfg.trainer.grad_accum_steps)]

    def train_step(self, batches: List[PackedBatch]) -> Dict[str, Any]:
        """One optimizer step over the accumulation window. The loss is the mean over every target token of
        the window (each micro-batch's summed loss divided by the window's token count)."""
        engine = self.engine
        # Targets are labels[:, 1:] (the model shifts by one); counted on the host copy, so no device sync.
        n_targets = sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_targets = engine.all_reduce_sum(n_targets) if engine.is_distributed else n_targets
        loss_sum = torch.zeros((), device=engine.device)
        for b in batches:
            kwargs = b.to(engine.device).model_kwargs()
            out = engine.forward(**kwargs, labels=b.labels.to(engine.device),
                                 num_items_in_batch=max(n_targets, 1) / engine.world_size
                                 if engine.is_distributed else max(n_targets, 1))
            engine.backward(out.loss)
            loss_sum += out.loss.detach()
        grad_norm = engine.step()
        loss = float(engine.all_reduce_sum(loss_sum) if engine.is_distributed else loss_sum)
        if engine.is_distributed:
            loss /= engine.world_size
        return {"loss": loss, "grad_norm": grad_norm}

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        resume_path = ckpt.resolve_resume(cfg.checkpoint.resume, self.run_dir)
        if resume_path is not None:
            self.load_checkpoint(resume_path)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        model = self.engine.module
        model.train()
        it = iter(self.loader)
        pbar = None
        if self.is_main and cfg.trainer.progress_bar:
            from tqdm import tqdm

            pbar = tqdm(total=cfg.trainer.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        device = self.engine.device
        try:
            while self.step < cfg.trainer.max_steps:
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                batches = self._micro_batches(it)
                reset_sparse_stats(model)
                out = self.train_step(batches)
                if out["grad_norm"] is None or out["loss"] != out["loss"] or abs(out["loss"]) == float("inf"):
                    self.nonfinite_steps += 1
                    log.warning("step %d: non-finite loss/gradients, step skipped (%d so far)", self.step,
                                self.nonfinite_steps)
                    if self.nonfinite_steps >= cfg.trainer.max_nonfinite_steps:
                        raise RuntimeError(f"{self.nonfinite_steps} non-finite steps (trainer.max_nonfinite_steps="
                                           f"{cfg.trainer.max_nonfinite_steps}); stopping. The last checkpoint is "
                                           "intact; lower optim.lr or check the data")
                    continue
                dt = time.perf_counter() - t0
                n_tokens = sum(b.num_tokens for b in batches) * self.engine.world_size
                self.tokens_seen += n_tokens
                self.step += 1
                metrics = self._step_metrics(out, batches, n_tokens, dt)
                self.last_metrics = metrics
                if self.step % cfg.trainer.log_every == 0 or self.step == cfg.trainer.max_steps:
                    self.metrics.log(metrics)
                if pbar is not None:
                    pbar.update(1)
                    postfix = dict(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                   tok_s=f"{metrics['tokens_per_s']:.0f}")
                    if "sparse/density" in metrics:
                        postfix["density"] = f"{metrics['sparse/density']:.2f}"
                    pbar.set_postfix(**postfix)
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                    self.run_eval()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                if self._stop_requested():
                    self.save_checkpoint()
                    log.warning("stopped by signal %s at step %d; resume with checkpoint.resume=auto",
                                self._stop_signal, self.step)
                    return self.last_metrics
            if self.step >= cfg.trainer.max_steps:
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps:
                    self.save_checkpoint()
                if cfg.checkpoint.save_hf:
                    self.export_hf()
        finally:
            if pbar is not None:
                pbar.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.metrics.close()
        return self.last_metrics

    def export_hf(self) -> Optional[str]:
        out = os.path.join(self.run_dir, "final")
        path = self.engine.export_hf(out, self.tokenizer)
        if self.is_main:
            log.info("final model (Hugging Face format) written to %s", path)
            print(f"final model written to {path}", flush=True)
        return path

    def run_eval(self) -> Dict[str, Any]:
        """The eval suite on rank 0. Every rank calls it: under ZeRO-3 they all gather the weights first
        (`engine.gathered()`, a collective) and wait there until rank 0 is done; under ZeRO-1/2 rank 0 alone
        evaluates (the weights are whole on every rank) and the others wait at the next step's first collective.
        The torch RNG is restored afterwards, so the eval cannot change how training goes on."""
        from infllm.eval import run_suite

        engine = self.engine
        results: Dict[str, Any] = {}
        with engine.gathered() as model:
            if self.is_main:
                devices = [engine.device] if engine.device.type == "cuda" else []
                model.eval()
                try:
                    with torch.random.fork_rng(devices=devices):
                        out_dir = os.path.join(self.run_dir, "eval", f"step_{self.step:08d}")
                        results = run_suite(model, self.tokenizer, self.cfg.eval, out_dir, data_cfg=self.cfg.data,
                                            step=self.step, metrics_path=self.metrics.path)
                finally:
                    model.train()
        if self.is_main and results:
            flat = {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}
            self.metrics.log({"step": self.step, **flat})
            log.info("eval at step %d: %s", self.step, flat)
        return results

    def _step_metrics(self, out: Dict[str, Any], batches: List[PackedBatch], n_tokens: int, dt: float):
        model = self.engine.module
        stats = _get_sparse_stats(model)
        pairs = sum(causal_pairs(b.cu_seqlens) for b in batches) * self.engine.world_size
        density = stats.get("density")
        attended = pairs * density if density is not None else pairs
        flops = train_flops(model, n_tokens, attended)
        m = {"step": self.step, "loss": out["loss"], "lr": self.engine.lr(), "grad_norm": out["grad_norm"],
             "tokens_per_s": n_tokens / dt, "step_time_s": dt, "tokens_seen": self.tokens_seen,
             "tflops": flops / dt / 1e12 / self.engine.world_size}
        if self.peak_tflops:
            m["mfu"] = m["tflops"] / self.peak_tflops
        if self.engine.device.type == "cuda":
            m["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.engine.device) / 2**30
        if stats:
            m.update({f"sparse/{k}": v for k, v in stats.items()})
            if stats.get("select_ms") is not None:
                # Timed at the first layer over the whole window; every layer selects the same way, and again
                # in the backward's recompute under gradient checkpointing.
                layers = getattr(model.config, "num_hidden_layers", 1)
                runs = 2 if getattr(model, "is_gradient_checkpointing", False) else 1
                m["sparse/select_step_share"] = stats["select_ms"] * layers * runs / (dt * 1e3)
        mix = getattr(self.loader, "mix_stats", None)
        if callable(mix):
            m.update({f"data/{k}": v for k, v in mix().items() if isinstance(v, (int, float))})
        return m


def _log_attention(attn, seq_len: int) -> None:
    if attn.name != "infllm_v2":
        log.info("attention: %s", attn.name)
        return
    msg = (f"attention: InfLLM-V2 sparse, k_eff={attn.k_eff} blocks of {attn.block_size} tokens "
           f"({attn.k_eff * attn.block_size} keys per query), dense below {attn.dense_len} tokens; a "
           f"{seq_len}-token document attends {expected_density(seq_len, attn):.0%} of its causal key blocks")
    log.info(msg)
    print(msg, flush=True)


def _plain(cfg: Config) -> Dict[str, Any]:
    try:
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    except Exception:
        return asdict(cfg)


def _get_sparse_stats(model) -> Dict[str, Any]:
    stats = get_sparse_stats(model)
    return stats.as_dict() if stats is not None else {}
