"""The training loop: engine-agnostic (one process or DeepSpeed), resumable, with metrics and in-loop eval.

    trainer = Trainer.build(cfg)   # model, tokenizer, data, engine
    trainer.fit()                  # resume if asked, train, checkpoint, export Hugging Face format
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, Iterator, List, Optional

import torch
from omegaconf import OmegaConf

from data.batch import PackedBatch
from infllm import checkpoint as ckpt
from infllm.attention import configure_sparse_stats, expected_density, get_sparse_stats, reset_sparse_stats
from infllm.config import Config
from infllm.engine import Engine, resolve_device
from infllm.errors import ConfigError
from infllm.memory import apply_memory_options, enable_gradient_checkpointing, recomputed_selections
from infllm.metrics import (MetricsLogger, causal_pairs, device_peak_tflops, format_eval_table, format_step_line,
                            train_flops)
from infllm.parallel.sequence import shard_batch, target_count

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


# The exit status of a run stopped by a signal once its checkpoint is saved: "stopped, resumable" (EX_TEMPFAIL of
# sysexits.h), apart from success (0, final/ written) and failure (1). launch/run.sh exits with it under torchrun.
EXIT_STOPPED = 75
# Written into an in-training eval's directory once its report is complete.
EVAL_DONE = ".done"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def stop_exit_code() -> int:
    """What train.py exits with after a stop: EXIT_STOPPED, unless the launcher asks otherwise (launch/run.sh
    sets INFLLM_STOP_EXIT_CODE=0 for its workers, as torchrun would report any other status as a crash, and
    exits EXIT_STOPPED itself)."""
    return int(os.environ.get("INFLLM_STOP_EXIT_CODE", EXIT_STOPPED))


def resume_command(cfg: Config, argv: Optional[List[str]] = None) -> str:
    """The command that resumes this run: its own command line (`argv`, train.py's sys.argv; None: unknown)
    with run_name=<this run> checkpoint.resume=auto in place of any run_name / checkpoint.resume it had."""
    skip = ("run_name=", "checkpoint.resume=")
    kept = [a for a in (argv or [])[1:] if not a.lstrip("+~").startswith(skip)]
    args = " ".join(shlex.quote(a) for a in kept + [f"run_name={cfg.run_name}", "checkpoint.resume=auto"])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(local, 1)
        return f"launch/run.sh NGPU={local}" + (f" NNODES={nodes} MASTER_ADDR=..." if nodes > 1 else "") + f" {args}"
    if "MAKELEVEL" in os.environ:
        return f"make train ARGS={shlex.quote(args)}"
    python = "python" if os.environ.get("VIRTUAL_ENV") else os.path.relpath(sys.executable)
    return f"{python} train.py {args}"


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
        # True once fit() stopped on a signal (checkpoint saved); train.py then exits stop_exit_code().
        self.stopped = False
        # The command line that started the run (train.py sets it), for the resume command.
        self.argv: Optional[List[str]] = None
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
            enable_gradient_checkpointing(model, cfg.trainer, attn, resolve_device(cfg.trainer.device).type)
        apply_memory_options(model, cfg.trainer)
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
                                    is_main=self.is_main, barrier=self.engine.barrier, rank=rank,
                                    world_size=self.engine.world_size)

    def load_checkpoint(self, path: str, verify: bool = True) -> None:
        """Load a checkpoint (verified against its manifest first unless the caller just did)."""
        rank = self.engine.rank
        if verify:
            ckpt.verify_checkpoint(path)
        state_path = os.path.join(path, f"trainer_state_rank{rank}.json")
        if not os.path.isfile(state_path):
            raise ckpt.CheckpointError(f"checkpoint {path}: no state for rank {rank}; it was written with another "
                                       "number of ranks (resume on the same world size)")
        state = ckpt.read_json(state_path, f"checkpoint {path}")
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
        bad = _nonfinite_parameter(self.engine.module)
        if self.engine.all_reduce_sum(int(bad is not None)) > 0:
            where = bad or "on another rank"
            raise ckpt.CheckpointError(f"checkpoint {path}: the model weights hold NaN/inf ({where}); "
                                       "the checkpoint is damaged: resume from an older one "
                                       "(checkpoint.resume=<path of …/checkpoints/step_N>)")
        self.loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(ckpt.torch_load(os.path.join(path, f"rng_rank{rank}.pt")))
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.nonfinite_steps = state["nonfinite_steps"]
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop -------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        """SIGINT (Ctrl-C), SIGTERM, SIGUSR1: finish the step, save a checkpoint, exit EXIT_STOPPED. A second
        Ctrl-C aborts at once, without saving."""
        if self._stop_signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self._stop_signal = signum
        log.warning("received %s: finishing step %d, then saving a checkpoint%s", signal.Signals(signum).name,
                    self.step + 1, " (Ctrl-C again aborts at once, without saving)" if signum == signal.SIGINT else "")

    def _report_stop(self, path: str) -> None:
        """Say how the run stopped and the exact command that resumes it; tell launch/run.sh (a marker file,
        written by every rank: each node's run.sh reads its own)."""
        self.stopped = True
        command = resume_command(self.cfg, self.argv)
        marker = os.environ.get("INFLLM_STOP_MARKER")
        if marker:
            with open(marker, "w") as f:
                f.write(f"{self.step}\n{command}\n")
        if not self.is_main:
            return
        how = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "a signal on another rank"
        log.warning("stopped by %s after step %d of %d; checkpoint saved: %s\nresume with:  %s", how, self.step,
                    self.cfg.trainer.max_steps, path, command)

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
        the window (each micro-batch's summed loss divided by the window's token count). Under sequence
        parallelism each rank feeds its slice of every row (`shard_batch`); with sp_size 1 the whole row."""
        engine = self.engine
        inputs = [shard_batch(b, engine.sp_rank, engine.sp_size) for b in batches]
        # Counted on the host copies, so no device sync; summed over every rank, each counting its own slices.
        n_targets = engine.all_reduce_sum(target_count(inputs))
        # The gradient reduction divides the sum over ranks by engine.grad_divisor: normalise so that the result
        # is the mean over every target of the window.
        num_items = max(n_targets, 1) / engine.grad_divisor
        loss_sum = torch.zeros((), device=engine.device)
        for x in inputs:
            x = {name: t.to(engine.device, non_blocking=True) if isinstance(t, torch.Tensor) else t
                 for name, t in x.items()}
            out = engine.forward(**x, labels=x["shift_labels"], num_items_in_batch=num_items)
            engine.backward(out.loss)
            loss_sum += out.loss.detach()
        grad_norm = engine.step()
        loss = float(engine.all_reduce_sum(loss_sum)) / engine.grad_divisor
        return {"loss": loss, "grad_norm": grad_norm}

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        engine = self.engine
        # Each rank checksums its share of the files; they agree on the verdict, so all resume from the same one.
        agree = (lambda ok: engine.all_reduce_sum(int(not ok)) == 0) if engine.is_distributed else None
        # Finding nothing is a warning when the command line asked for a resume (a preset's auto is quieter).
        asked = self.argv is None or any(a.lstrip("+").startswith("checkpoint.resume=") for a in self.argv[1:])
        resume_path = ckpt.resolve_resume(cfg.checkpoint.resume, self.run_dir, rank=engine.rank,
                                          world_size=engine.world_size, agree=agree, asked=asked)
        if resume_path is not None:
            self.load_checkpoint(resume_path, verify=False)
        # A kill between checkpoints left rows of the steps about to be re-run.
        self.metrics.truncate_after(self.step)
        first_step = self.step
        old_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        model = self.engine.module
        model.train()
        it = iter(self.loader)
        pbar = None
        console = contextlib.ExitStack()
        if self.is_main and cfg.trainer.progress_bar:
            from tqdm import tqdm

            from tqdm.contrib.logging import logging_redirect_tqdm

            pbar = tqdm(total=cfg.trainer.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
            # Log lines during the loop go through tqdm, so that they leave no copies of the bar behind.
            console.enter_context(logging_redirect_tqdm())
        device = self.engine.device
        try:
            if self._eval_pending():
                log.info("the eval of step %d did not finish before the stop: running it first", self.step)
                self.run_eval()
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
                                           f"{cfg.trainer.max_nonfinite_steps}); stopping. The checkpoints are from "
                                           "before these steps (resume=auto verifies them); lower optim.lr or check "
                                           "the data")
                    continue
                dt = time.perf_counter() - t0
                n_tokens = sum(b.num_tokens for b in batches) * self.engine.dp_size
                self.tokens_seen += n_tokens
                self.step += 1
                metrics = self._step_metrics(out, batches, n_tokens, dt)
                self.last_metrics = metrics
                if self.step == first_step + 1:
                    _warn_if_never_sparse(cfg.attention, cfg.trainer.seq_len, metrics)
                if self.step % cfg.trainer.log_every == 0 or self.step == cfg.trainer.max_steps:
                    self.metrics.log(metrics)
                    if pbar is None and self.is_main:
                        log.info("%s", format_step_line(metrics, cfg.trainer.max_steps))
                if pbar is not None:
                    pbar.update(1)
                    postfix = dict(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                   tok_s=f"{metrics['tokens_per_s']:.0f}")
                    if "sparse/density" in metrics:
                        postfix["density"] = f"{metrics['sparse/density']:.2f}"
                    pbar.set_postfix(**postfix)
                # Checkpoint first: an eval cut by a stop or a kill then costs no training (it reruns at resume).
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                    self.run_eval()
                if self._stop_requested():
                    if pbar is not None:
                        pbar.close()
                        pbar = None
                    console.close()
                    self._report_stop(self.save_checkpoint())
                    return self.last_metrics
            # The bar is done before the final checkpoint and export print their lines.
            if pbar is not None:
                pbar.close()
                pbar = None
            console.close()
            if self.step >= cfg.trainer.max_steps:
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps:
                    self.save_checkpoint()
                if cfg.checkpoint.save_hf:
                    self.export_hf()
        finally:
            if pbar is not None:
                pbar.close()
            console.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.metrics.close()
        return self.last_metrics

    def export_hf(self) -> Optional[str]:
        out = os.path.join(self.run_dir, "final")
        if not self.engine.is_distributed and self.engine.device.type == "cpu":
            # save_pretrained imports DeepSpeed (through accelerate) when it is installed, which warns that it
            # fell back to the CPU; a one-process CPU run does not use it, so name the CPU up front.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar for writing one shard is noise after the training bar
        path = self.engine.export_hf(out, self.tokenizer)
        if self.is_main:
            log.info("final model written to %s (Hugging Face format)", path)
        return path

    def _eval_dir(self) -> str:
        return os.path.join(self.run_dir, "eval", f"step_{self.step:08d}")

    def _eval_pending(self) -> bool:
        """Resumed at an eval step whose eval never finished (cut by a stop, or by a kill after the checkpoint)."""
        every = self.cfg.eval.every_steps
        pending = bool(every and 0 < self.step and self.step % every == 0
                       and not os.path.isfile(os.path.join(self._eval_dir(), EVAL_DONE)))
        if self.engine.is_distributed:  # rank 0's verdict, so that every rank joins the eval or none
            pending = self.engine.all_reduce_sum(int(pending and self.is_main)) > 0
        return pending

    def run_eval(self) -> Dict[str, Any]:
        """The eval suite on rank 0. Every rank calls it: under ZeRO-3 they all gather the weights first
        (`engine.gathered()`, a collective) and wait there until rank 0 is done; under ZeRO-1/2 rank 0 alone
        evaluates (the weights are whole on every rank) and the others wait at the next step's first collective.
        The torch RNG is restored afterwards, so the eval cannot change how training goes on."""
        from infllm.eval import run_suite
        from infllm.eval.suite import EvalInterrupted

        engine = self.engine
        results: Dict[str, Any] = {}
        with engine.gathered() as model:
            if self.is_main:
                devices = [engine.device] if engine.device.type == "cuda" else []
                model.eval()
                try:
                    with torch.random.fork_rng(devices=devices):
                        out_dir = self._eval_dir()
                        results = run_suite(model, self.tokenizer, self.cfg.eval, out_dir, data_cfg=self.cfg.data,
                                            step=self.step, metrics_path=self.metrics.path,
                                            should_stop=lambda: self._stop_signal is not None)
                    open(os.path.join(out_dir, EVAL_DONE), "w").close()
                except EvalInterrupted:
                    log.warning("eval at step %d cut by the stop; it runs again when this run resumes", self.step)
                    results = {}
                finally:
                    model.train()
        if self.is_main and results:
            flat = {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}
            self.metrics.log({"step": self.step, **flat})
            log.info("%s", format_eval_table({k: v for k, v in results.items() if isinstance(v, (int, float))},
                                             self.step))
        return results

    def _step_metrics(self, out: Dict[str, Any], batches: List[PackedBatch], n_tokens: int, dt: float):
        model = self.engine.module
        stats = _get_sparse_stats(model)
        pairs = sum(causal_pairs(b.cu_seqlens) for b in batches) * self.engine.dp_size
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
                # in the backward's recompute under gradient checkpointing unless trainer.checkpoint_keep keeps it.
                layers = getattr(model.config, "num_hidden_layers", 1)
                runs = recomputed_selections(self.cfg.trainer, self.cfg.attention, self.engine.device.type)
                m["sparse/select_step_share"] = stats["select_ms"] * layers * runs / (dt * 1e3)
        mix = getattr(self.loader, "mix_stats", None)
        if callable(mix):
            m.update({f"data/{k}": v for k, v in mix().items() if isinstance(v, (int, float))})
        return m


def _log_attention(attn, seq_len: int) -> None:
    """The attention header (once: Hydra's console handler shows it), and a warning when the settings leave
    nothing sparse although the header says InfLLM-V2 sparse."""
    if attn.name != "infllm_v2":
        log.info("attention: %s", attn.name)
        return
    log.info("attention: InfLLM-V2 sparse, k_eff=%d blocks of %d tokens (%d keys per query), dense below %d "
             "tokens; a %d-token document attends %.0f%% of its causal key blocks", attn.k_eff, attn.block_size,
             attn.k_eff * attn.block_size, attn.dense_len, seq_len, 100 * expected_density(seq_len, attn))
    keys = attn.k_eff * attn.block_size
    if attn.dense_len != -1 and seq_len < attn.dense_len:
        log.warning("attention: trainer.seq_len=%d is below attention.dense_len=%d: every document is shorter, so "
                    "the whole run attends densely (no InfLLM-V2 selection is trained); raise trainer.seq_len or "
                    "lower attention.dense_len", seq_len, attn.dense_len)
    elif seq_len <= keys:
        log.warning("attention: trainer.seq_len=%d fits in the k_eff=%d blocks of attention.block_size=%d (%d "
                    "keys) a query may attend: every query attends all its causal blocks, the run is dense in "
                    "effect; raise trainer.seq_len above %d or lower attention.topk / window_size",
                    seq_len, attn.k_eff, attn.block_size, keys, keys)


def _warn_if_never_sparse(attn, seq_len: int, metrics: Dict[str, Any]) -> None:
    """After the first step: the data decides what the settings could not (every document below dense_len)."""
    if attn.name != "infllm_v2" or "sparse/sparse_tokens" not in metrics:
        return
    if attn.dense_len != -1 and seq_len < attn.dense_len:
        return  # _log_attention said so already
    if metrics["sparse/sparse_tokens"] == 0:
        log.warning("attention: no document of the first step reached attention.dense_len=%d tokens, so the step "
                    "ran entirely dense although the header says InfLLM-V2 sparse; the corpus's documents are "
                    "shorter (see the data: lines above): lower attention.dense_len or use longer documents",
                    attn.dense_len)


def _nonfinite_parameter(model: torch.nn.Module) -> Optional[str]:
    """The name of the first parameter holding NaN/inf on this rank (ZeRO-3: its local partition), or None."""
    for name, p in model.named_parameters():
        local = getattr(p, "ds_tensor", p)
        if local.numel() and not bool(torch.isfinite(local).all()):
            return name
    return None


def _plain(cfg: Config) -> Dict[str, Any]:
    try:
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    except Exception:
        return asdict(cfg)


def _get_sparse_stats(model) -> Dict[str, Any]:
    stats = get_sparse_stats(model)
    return stats.as_dict() if stats is not None else {}
