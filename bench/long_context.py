"""Long-context training on one GPU: the longest row that trains, peak memory and tokens/s, dense against
InfLLM-V2, with the memory options (infllm/memory.py) on and off; and the fused-loss implementations alone.

    python bench/long_context.py --loss --out loss.json                 # loss implementations, 32k / 128k
    python bench/long_context.py --case 8b8l:infllm_v2:128k:all:12 --case 8b8l:dense:128k:all:12 --out t.json
    python bench/long_context.py --probe 8b8l:infllm_v2:all:128k-1m --out probe.json    # up until OOM
    python bench/long_context.py --case 1b:infllm_v2:128k:fused:16:none --out t.json   # 6th field: checkpoint_keep
    python bench/long_context.py --smoke                                # tiny model on CPU: the bench runs
    python bench/long_context.py --tuning pick.json --case ...          # kernel launch overrides (--pick-out)

Models (random weights, `model=smollm2_random` with `model.arch` overrides, fp32 master weights, bf16 autocast,
gradient checkpointing, AdamW): `8b8l` Llama-3-8B cut to 8 layers (hidden 4096, 32 q / 8 kv heads, d 128, MLP
14336) with the SmolLM2 tokenizer's 49,152 vocab; `1b` Llama-3.2-1B's shape (16 layers, hidden 2048, 32 q / 8 kv,
d 64, MLP 8192, vocab 128,256). Both tie lm_head to the embedding, as the issue's measurement and Llama-3.2-1B.
A case's optional 6th field is trainer.checkpoint_keep (auto | none | selection | attention; left out: the trainer's
default), what the checkpointed layers keep from the forward instead of recomputing it.

Rows: one document per row (`--doc-len` for shorter ones). The stdlib corpus has few documents over 64k tokens,
so the documents are joined: a row is a window of the corpus' token stream (its documents one after another,
the separators kept as tokens), and cu_seqlens marks the whole window as one document. Attention cost depends
on the document lengths only, so this measures what real long documents cost.

Tokens/s: the median of the steady steps, i.e. after `warmup` steps (Triton compiles and autotunes there);
a steady step slower than 1.5x the median (a late recompile) is left out and counted (`slow_steps`). Every
case writes its JSON row to --out as soon as it ends, so a timeout keeps what was measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "8b8l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=49152, rope_theta=500000.0),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=49152, rope_theta=10000.0),
}
OPTIONS = {
    "none": dict(loss="plain", tiled_mlp=False, activation_offload=False),
    "fused": dict(loss="fused", tiled_mlp=False, activation_offload=False),
    "fused+tiled": dict(loss="fused", tiled_mlp=True, activation_offload=False),
    "fused+offload": dict(loss="fused", tiled_mlp=False, activation_offload=True),
    "all": dict(loss="fused", tiled_mlp=True, activation_offload=True),
}


def parse_len(s: str) -> int:
    s = s.lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "km" else s) * mult)


def fmt_len(n: int) -> str:
    return f"{n // (1024 * 1024)}m" if n % (1024 * 1024) == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


# -- rows of joined documents ---------------------------------------------------------------------------------
class JoinedDocs:
    """An endless loader of PackedBatch rows of `seq_len` tokens, documents of `doc_len` tokens, cut from the
    concatenated training documents of the corpus (held-out ones left out)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, doc_len: int, pad_id: int = 0):
        from data.packing import assemble_batch

        self.assemble = assemble_batch
        self.tokens, self.seq_len, self.doc_len, self.pad_id = tokens, seq_len, min(doc_len, seq_len), pad_id
        self.pos = 0

    def _take(self, n: int) -> np.ndarray:
        out = np.empty(n, np.int64)
        filled = 0
        while filled < n:
            k = min(n - filled, self.tokens.size - self.pos)
            out[filled:filled + k] = self.tokens[self.pos:self.pos + k]
            filled += k
            self.pos = (self.pos + k) % self.tokens.size
        return out

    def __iter__(self):
        return self

    def __next__(self):
        row, left = [], self.seq_len
        while left:
            n = min(self.doc_len, left)
            row.append((self._take(n), 0, n))
            left -= n
        return self.assemble([row], self.seq_len, self.pad_id)

    def state_dict(self) -> Dict:
        return {"pos": self.pos}


def corpus_tokens(cfg, tokenizer, cache_file: Optional[str]) -> np.ndarray:
    if cache_file and os.path.isfile(cache_file):
        return np.load(cache_file)
    from data.config import as_data_config
    from data.loader import _stores

    dcfg = as_data_config(cfg.data)
    stores, _ = _stores(dcfg, tokenizer)
    parts = []
    for store in stores:
        keep = np.nonzero(~store.heldout_mask(dcfg.holdout_fraction))[0]
        parts += [np.asarray(store.document(int(i))) for i in keep]
    tokens = np.concatenate(parts).astype(np.uint32)
    if cache_file:
        os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
        np.save(cache_file, tokens)
    return tokens


# -- one training case ----------------------------------------------------------------------------------------
def compose(model: str, attention: str, seq_len: int, options: str, out_dir: str, extra: List[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from infllm.config import to_object

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    overrides = ["model=smollm2_random", f"attention={attention}", "data=stdlib",
                 f"model.arch.max_position_embeddings={max(seq_len, 8192)}", f"trainer.seq_len={seq_len}",
                 "trainer.gradient_checkpointing=true", "trainer.micro_batch_size=1", "trainer.grad_accum_steps=1",
                 "trainer.time_selection=false", "trainer.progress_bar=false", "trainer.max_steps=1000",
                 "checkpoint.every_steps=0", "checkpoint.save_hf=false", "schedule=constant", "eval.every_steps=0",
                 f"output_dir={out_dir}"]
    overrides += [f"model.arch.{k}={v}" for k, v in MODELS[model].items()]
    overrides += [f"trainer.{k}={str(v).lower()}" for k, v in OPTIONS[options].items()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return to_object(hydra_compose(config_name="config", overrides=overrides + list(extra)))


def run_case(model: str, attention: str, seq_len: int, options: str, steps: int, warmup: int, doc_len: int,
             tokens_file: Optional[str], time_left_s: float, extra: List[str] = ()) -> Dict:
    import data
    from infllm.loss import FusedLossLMHead
    from infllm.memory import apply_memory_options, resolve_checkpoint_keep
    from infllm.trainer import Trainer

    row = dict(model=model, attention=attention, seq_len=seq_len, options=options, doc_len=min(doc_len, seq_len),
               **OPTIONS[options])
    cuda = torch.cuda.is_available()
    t_start = time.perf_counter()
    cfg = compose(model, attention, seq_len, options, f"/tmp/bench-long/{model}-{attention}-{seq_len}", extra)
    loaders = {}

    def build_loader(dcfg, tokenizer, seq_len, micro_batch_size, **_):
        toks = corpus_tokens(cfg, tokenizer, tokens_file)
        loaders["l"] = JoinedDocs(toks, seq_len, doc_len, pad_id=int(tokenizer.pad_token_id or 0))
        return loaders["l"]

    data.build_train_loader = build_loader
    trainer = module = head = None
    if cuda:
        # What an earlier case left allocated (nothing, when the driver's collection did its job).
        row["leftover_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    step_s: List[float] = []
    peaks: List[float] = []
    try:
        # Weights drawn on the GPU: a 2B-parameter random init on the host would take longer than the bench.
        with torch.device("cuda" if cuda else "cpu"):
            trainer = Trainer.build(cfg)
        module = trainer.engine.module
        if cfg.trainer.loss == "fused" and not isinstance(module.get_output_embeddings(), FusedLossLMHead) \
                or cfg.trainer.tiled_mlp and not getattr(module.get_decoder().layers[0].mlp, "_infllm_tiled", False) \
                or cfg.trainer.activation_offload and not getattr(module.get_decoder(), "_infllm_offload", False):
            apply_memory_options(module, cfg.trainer)
        module.train()
        head = module.get_output_embeddings()
        row["fused_impl"] = getattr(head, "loss_impl", None) if isinstance(head, FusedLossLMHead) else None
        row["checkpoint_keep"] = resolve_checkpoint_keep(cfg.trainer, cfg.attention, "cuda" if cuda else "cpu")
        row["build_s"] = round(time.perf_counter() - t_start, 1)
        if cuda:
            row["static_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        it = iter(trainer.loader)
        for i in range(steps):
            if step_s and (time.perf_counter() - t_start) + 1.2 * max(step_s[-1], step_s[0] / 3) > time_left_s:
                row["stopped"] = f"time guard after {i} steps"
                break
            batches = trainer._micro_batches(it)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = trainer.train_step(batches)
            if cuda:
                torch.cuda.synchronize()
                peaks.append(torch.cuda.max_memory_allocated() / 2**30)
            step_s.append(time.perf_counter() - t0)
            row.setdefault("losses", []).append(round(out["loss"], 4))
            row.setdefault("host_used_gib", []).append(host_used_gib())
        row["status"] = "ok"
    except torch.OutOfMemoryError as e:
        row["status"] = "oom"
        row["oom_at_step"] = len(step_s) + 1
        row["error"] = str(e).split("\n")[0][:300]
        if cuda:
            row["peak_before_oom_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    except Exception as e:  # a case that cannot run (a missing package, a kernel error) is a result too
        import traceback

        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["traceback"] = traceback.format_exc()[-1500:]
    finally:
        # The memory options put the model in reference cycles (forward wrappers): collect them here, or the
        # next case would measure this model's weights as its own.
        trainer = module = head = None
        data.build_train_loader = None
        del data.build_train_loader
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    row["step_s"] = [round(s, 3) for s in step_s]
    if peaks:
        row["peak_gib"] = round(max(peaks), 2)
        row["peak_gib_per_step"] = [round(x, 2) for x in peaks]
    steady = step_s[warmup:]
    if steady:
        med = statistics.median(steady)
        kept = [s for s in steady if s <= 1.5 * med]
        row["steady_steps"] = len(kept)
        row["slow_steps"] = len(steady) - len(kept)
        row["step_s_median"] = round(statistics.median(kept), 3)
        row["tokens_per_s"] = round(seq_len / statistics.median(kept))
    elif step_s:
        # Too few steps for a steady state: the last one, marked.
        row["tokens_per_s_last_step"] = round(seq_len / step_s[-1])
    row["case_s"] = round(time.perf_counter() - t_start, 1)
    return row


# -- the loss implementations alone ---------------------------------------------------------------------------
def bench_loss(n_tokens: int, vocab: int, hidden: int, impl: str, iters: int = 3) -> Dict:
    import torch.nn.functional as F

    from infllm.loss import causal_lm_loss

    dev = "cuda"
    row = dict(tokens=n_tokens, vocab=vocab, hidden=hidden, impl=impl)
    torch.manual_seed(0)
    try:
        # What reaches the lm_head in training: fp32 hidden states and fp32 master weights under bf16 autocast.
        h = torch.randn(1, n_tokens, hidden, device=dev, requires_grad=True)
        w = torch.nn.Parameter(torch.randn(vocab, hidden, device=dev) / hidden**0.5)
        labels = torch.randint(0, vocab, (1, n_tokens), device=dev)
        labels[:, ::7] = -100
        n = int((labels[:, 1:] != -100).sum())
        times, peak, losses = [], 0.0, []
        for i in range(iters + 1):
            h.grad = w.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast(dev, dtype=torch.bfloat16):
                if impl == "plain":
                    logits = F.linear(h, w)
                    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
                    loss = F.cross_entropy(logits.float().view(-1, vocab), targets.reshape(-1), ignore_index=-100,
                                           reduction="sum") / n
                else:
                    loss = causal_lm_loss(h, w, labels, num_items_in_batch=n, impl=impl)
            loss.backward()
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**30)
            losses.append(float(loss))
            del loss
        row.update(status="ok", ms=round(1e3 * statistics.median(times), 1), peak_extra_gib=round(peak, 2),
                   loss=round(losses[-1], 5))
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).split("\n")[0][:200])
    except Exception as e:  # an implementation that cannot run here (import, kernel launch) is a result too
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        h = w = labels = None
        gc.collect()
        torch.cuda.empty_cache()
    return row


def loss_grads_agree(vocab: int = 49152, hidden: int = 4096, n_tokens: int = 8192) -> Dict:
    """Each implementation's gradients against the plain loss's, on one bf16 case (max abs error, relative to
    the largest plain gradient)."""
    import torch.nn.functional as F

    from infllm.loss import causal_lm_loss

    torch.manual_seed(1)
    h0 = torch.randn(1, n_tokens, hidden, device="cuda")
    w0 = torch.randn(vocab, hidden, device="cuda") / hidden**0.5
    labels = torch.randint(0, vocab, (1, n_tokens), device="cuda")
    labels[:, ::5] = -100
    n = int((labels[:, 1:] != -100).sum())
    out = {}
    ref = None
    for impl in ("plain", "chunked", "cce", "liger", "deepspeed"):
        h, w = h0.clone().requires_grad_(), torch.nn.Parameter(w0.clone())
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if impl == "plain":
                    logits = F.linear(h, w).float().view(-1, vocab)
                    loss = F.cross_entropy(logits, F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1),
                                           reduction="sum") / n
                else:
                    loss = causal_lm_loss(h, w, labels, num_items_in_batch=n, impl=impl)
            loss.backward()
        except Exception as e:
            out[impl] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        if ref is None:
            ref = (float(loss), h.grad, w.grad)
            continue
        out[impl] = dict(loss_diff=abs(float(loss) - ref[0]),
                         dh_rel=float((h.grad - ref[1]).abs().max() / ref[1].abs().max()),
                         dw_rel=float((w.grad - ref[2]).abs().max() / ref[2].abs().max()))
    return out


# -- driver ---------------------------------------------------------------------------------------------------
def host_used_gib() -> Optional[float]:
    """Host memory in use (MemTotal - MemAvailable), GiB, after each step: a leak of host copies shows as growth."""
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) for line in fh}
        return round((info["MemTotal"] - info["MemAvailable"]) / 2**20, 1)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def apply_tuning(spec: str) -> Dict:
    """--tuning: JSON text or a file of it, {"attention": {TUNING overrides}, "select": {"G_PAD,d": [block_t,
    block_n, warps, stages]}} (what bench/kernels.py and bench/selection.py --pick-out write); returns it."""
    from kernels.infllm_v2 import attention, select

    text = open(spec).read() if os.path.exists(spec) else spec
    try:
        over = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise SystemExit(f"--tuning {spec!r}: neither a file nor JSON ({e})")
    unknown = set(over) - {"attention", "select"}
    if unknown:
        raise SystemExit(f"--tuning: unknown sections {sorted(unknown)}; expected 'attention' and/or 'select'")
    merged = attention.merged_tuning(attention.TUNING, over.get("attention", {}))
    attention.TUNING.clear()
    attention.TUNING.update(merged)
    for key, cfg in over.get("select", {}).items():
        g_pad, d = (int(x) for x in key.split(","))
        select.CONFIGS[(g_pad, d)] = select.SelectConfig(*cfg)
    return over


def card() -> Dict:
    info = dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    try:
        import transformers
        import triton

        info.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


class Results:
    def __init__(self, path: Optional[str]):
        self.path = path
        self.data = {"card": card(), "loss": [], "loss_grads": None, "cases": []}

    def add(self, key: str, row) -> None:
        if isinstance(self.data[key], list):
            self.data[key].append(row)
        else:
            self.data[key] = row
        print(json.dumps(row), flush=True)
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(tmp, self.path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", action="store_true", help="the fused-loss implementations alone")
    p.add_argument("--loss-lengths", default="32k,128k")
    p.add_argument("--loss-impls", default="plain,chunked,cce,liger,deepspeed")
    p.add_argument("--fused-impl", default=None, help="the fused loss's implementation on CUDA (default: "
                   "infllm.loss.CUDA_IMPL); a case that fails with it is run again with the chunked loss")
    p.add_argument("--case", action="append", default=[],
                   help="model:attention:seq_len:options:steps[:checkpoint_keep], e.g. 8b8l:infllm_v2:128k:all:12")
    p.add_argument("--probe", action="append", default=[],
                   help="model:attention:options:from-to: doubling lengths, 2 steps each, until the first OOM")
    p.add_argument("--probe-steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--doc-len", default="0", help="tokens per joined document (0 = the row)")
    p.add_argument("--tokens-file", default=os.path.join(".cache", "longctx", "stdlib_tokens.npy"))
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting cases after this many seconds")
    p.add_argument("--case-s", type=float, default=240, help="time guard of one case (steps are not started past)")
    p.add_argument("--smoke", action="store_true", help="tiny model, short rows, CPU: checks the bench runs")
    p.add_argument("--tuning", action="append", default=[],
                   help="kernel launch overrides: JSON or a file of it (bench/kernels.py / selection.py --pick-out)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = Results(args.out)
    results.data["tuning"] = [apply_tuning(t) for t in args.tuning]
    t0 = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t0)

    if args.smoke:
        for options in ("none", "all"):
            results.add("cases", run_case("tiny", "infllm_v2_cpu", 1024, options, 2, 1, 512, args.tokens_file, 120))
        return
    if args.loss:
        results.add("loss_grads", loss_grads_agree())
        for n in (parse_len(s) for s in args.loss_lengths.split(",")):
            for vocab, hidden in ((49152, 4096), (128256, 2048)):
                for impl in args.loss_impls.split(","):
                    if left() > 0:
                        results.add("loss", bench_loss(n, vocab, hidden, impl))
    import infllm.loss

    if args.fused_impl:
        infllm.loss.CUDA_IMPL = args.fused_impl

    def case(spec, *a, **kw):
        row = run_case(*a, **kw)
        if row["status"] == "error" and row["loss"] == "fused" and infllm.loss.CUDA_IMPL != "chunked":
            results.add("cases", dict(spec=spec, **row))
            infllm.loss.CUDA_IMPL = "chunked"
            row = run_case(*a, **kw)
        results.add("cases", dict(spec=spec, **row))
        return row

    for spec in args.case:
        model, attention, seq, options, steps, *keep = spec.split(":")
        seq_len = parse_len(seq)
        if left() <= 0:
            results.add("cases", dict(spec=spec, status="skipped (budget)"))
            continue
        doc_len = parse_len(args.doc_len) or seq_len
        case(spec, model, attention, seq_len, options, int(steps), args.warmup, doc_len, args.tokens_file,
             min(args.case_s, left()), extra=[f"trainer.checkpoint_keep={k}" for k in keep])
    for spec in args.probe:
        model, attention, options, span = spec.split(":")
        lo, hi = (parse_len(s) for s in span.split("-"))
        seq_len = lo
        while seq_len <= hi and left() > 0:
            doc_len = parse_len(args.doc_len) or seq_len
            row = case(f"probe {model}:{attention}:{fmt_len(seq_len)}:{options}", model, attention, seq_len, options,
                       args.probe_steps, args.probe_steps - 1, doc_len, args.tokens_file, min(args.case_s, left()))
            if row["status"] != "ok" or len(row["step_s"]) < args.probe_steps:
                break
            seq_len *= 2


if __name__ == "__main__":
    main()
