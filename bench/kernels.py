"""Kernel benchmark: InfLLM-V2 (selection, sparse attention, the whole switchable attention) against dense
causal attention through torch SDPA (flash backend = FlashAttention-2, and the cuDNN backend), in one run.

    python3 bench/kernels.py                 # every case (H100: about 4 minutes)
    python3 bench/kernels.py --quick         # MiniCPM4 shape at 32k x 8 and 128k x 2, and the G = 4 shape
    python3 bench/kernels.py --cases minicpm4-32kx8-64blk,llama3-32kx8-64blk --out results.json
    python3 bench/kernels.py --sweep-pack --cases smollm2-32kx8-64blk   # query-tile packing variants first
    python3 bench/kernels.py --sweep-pack --pack-variants '{"a": {"pack_cost": 1.0}}' --pack-cases CASE,...
    python3 bench/kernels.py --sweep-pack --pack-variants '{"t16": {}, "t32": {"tile_tokens": 32, "wide_rows": 128,
        "fwd_wide": {"64": [8, 2], "128": [8, 2]}, "dq_wide": {"64": [8, 2], "128": [8, 2]}}}'
        --pack-cases smollm2-32kx8-64blk-real,llama3-32kx8-64blk-smooth --cases none   # 32-token tiles (untimed)

For each case: median ms of the forward and of forward+backward, speedup over each dense backend measured in
the same run, effective TFLOP/s counting only the attended (query, key) pairs (4 d flops per pair and head
forward, 10 d backward, as FlashAttention counts), and the peak memory a call adds on top of its inputs.
Timing: CUDA events around each call with the L2 cache flushed in between, median of several calls after a
warm-up (triton.testing.do_bench for calls under 100 ms; the same method in a short loop for the slow dense
baselines, so that the whole table fits in a few minutes of GPU time). Inputs are random bf16, never zeros.

Rows per case: sdpa-flash, sdpa-cudnn (dense causal); select (selection alone, no gradient); sparse (block-sparse
attention alone on the selection of the same data); infllm (kernels.infllm_v2_attn_varlen(impl="triton"),
selection included). `--data smooth` draws queries that vary slowly along the sequence (a shared direction per
64 tokens plus noise) instead of i.i.d.: neighbouring tokens then select overlapping blocks, as in trained models,
which is what the token packing for G < 16 relies on; i.i.d. random data is its worst case. `-real` cases time
the sparse attention on the recorded selections of the real SmolLM2 on real text (bench/real_selection.py;
random q/k/v values, which do not change the work), beside the selection alone on random data.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Run as a script, this folder is sys.path[0]; a module here named like a standard one (say bench/select.py) would
# shadow it, so the repository root takes its place.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

if "--smoke" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels.infllm_v2 import attention as attn  # noqa: E402

from kernels.infllm_v2.select import infllm_v2_select_triton  # noqa: E402

# name -> (H_q, H_kv, d)
SHAPES = {"minicpm4": (32, 2, 128), "llama3": (32, 8, 128), "smollm2": (9, 3, 64), "llama1b": (32, 8, 64)}
# name -> selection config; k_eff = topk + window_size / block_size.
# "64blk": the public kernels' table ("64 selected blocks"): topk 64 with no window, so k_eff = 64 = the init
#          block + the current block + 62 chosen by score.
# "96blk": the paper's training setting, topk 64 + a 2048-token window (32 local blocks).
# "16blk": the forward-only long-context case, topk 16 with no window.
SELECTIONS = {
    "64blk": dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=0, topk=64),
    "96blk": dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=2048, topk=64),
    "16blk": dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=0, topk=16),
}


def _case(shape, seq_k, batch, sel, fwd_only=False, data="random"):
    name = f"{shape}-{seq_k}kx{batch}-{sel}" + ("-fwd" if fwd_only else "") + ("" if data == "random" else f"-{data}")
    return name, dict(shape=shape, seqlen=seq_k * 1024, batch=batch, sel=sel, fwd_only=fwd_only, data=data)


CASES = dict([
    _case("minicpm4", 32, 8, "64blk"), _case("minicpm4", 64, 4, "64blk"), _case("minicpm4", 128, 2, "64blk"),
    _case("llama3", 32, 8, "64blk"), _case("smollm2", 32, 8, "64blk"),
    _case("minicpm4", 128, 1, "16blk", fwd_only=True),
    _case("minicpm4", 32, 8, "96blk"), _case("minicpm4", 64, 4, "96blk"), _case("minicpm4", 128, 2, "96blk"),
    _case("llama3", 64, 4, "64blk"), _case("smollm2", 64, 4, "64blk"),
    _case("minicpm4", 32, 8, "64blk", data="smooth"), _case("llama3", 32, 8, "64blk", data="smooth"),
    _case("smollm2", 32, 8, "64blk", data="smooth"),
    _case("smollm2", 32, 8, "64blk", data="real"), _case("smollm2", 32, 8, "96blk", data="real"),
    # Llama-3.2-1B's attention (G 4, d 64) as bench/long_context.py's `1b` model trains it: one 128k row, 96 blocks.
    _case("llama1b", 128, 1, "96blk"), _case("llama1b", 128, 1, "96blk", data="smooth"),
])
QUICK = ["minicpm4-32kx8-64blk", "minicpm4-128kx2-64blk", "llama3-32kx8-64blk", "llama3-32kx8-64blk-smooth"]
# Tiny cases for a CPU smoke run under the Triton interpreter (no timing value, checks the script end to end).
SMOKE = {"smoke-minicpm4": dict(shape="tiny16", seqlen=128, batch=2, sel="tiny", fwd_only=False, data="random"),
         "smoke-g4": dict(shape="tiny4", seqlen=128, batch=1, sel="tiny", fwd_only=False, data="smooth")}
SHAPES.update({"tiny16": (16, 1, 64), "tiny4": (8, 2, 64)})
SELECTIONS["tiny"] = dict(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=1, window_size=0, topk=4)

_FLUSH = None


def _flush_l2():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _FLUSH.zero_()


def time_ms(fn, *, budget_ms=3000.0, max_reps=10):
    """Median ms of fn on the GPU (already warmed up). Fast calls go through triton.testing.do_bench; slow ones
    through the same method (events, L2 flush, median) with fewer repetitions."""
    import triton.testing

    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end)
    if estimate < 100.0:
        return triton.testing.do_bench(fn, warmup=25, rep=min(500.0, budget_ms), return_mode="median")
    reps = max(2, min(max_reps, int(budget_ms / estimate)))
    times = []
    for _ in range(reps):
        _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_gib(fn):
    """Peak memory (GiB) allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def make_inputs(cfg, device, dtype):
    h_q, h_kv, d = SHAPES[cfg["shape"]]
    n = cfg["seqlen"] * cfg["batch"]
    gen = torch.Generator(device=device).manual_seed(0)
    k = torch.randn((n, h_kv, d), device=device, dtype=dtype, generator=gen)
    v = torch.randn((n, h_kv, d), device=device, dtype=dtype, generator=gen)
    if cfg["data"] == "smooth":
        # One random direction per 64 tokens and head, plus noise: neighbours ask similar questions.
        seg = torch.randn((triton_cdiv(n, 64), h_q, d), device=device, dtype=torch.float32, generator=gen)
        noise = torch.randn((n, h_q, d), device=device, dtype=torch.float32, generator=gen)
        q = (0.9 * seg.repeat_interleave(64, dim=0)[:n] + 0.45 * noise).to(dtype)
    else:
        q = torch.randn((n, h_q, d), device=device, dtype=dtype, generator=gen)
    cu = torch.arange(0, n + 1, cfg["seqlen"], device=device, dtype=torch.int32)
    return q, k, v, cu


def triton_cdiv(a, b):
    return -(-a // b)


def attended_pairs(block_idx, seqlen, block_size):
    """Number of (query, key) pairs a sparse kernel computes: keys u <= t in the selected blocks (per KV head;
    every query head of the group computes the same pairs). Equal documents of length seqlen."""
    h_kv, n, _ = block_idx.shape
    t = (torch.arange(n, device=block_idx.device) % seqlen)[None, :, None]
    first = block_idx.to(torch.int64) * block_size
    keys = torch.clamp(t - first + 1, min=0, max=block_size)
    return int(torch.where(block_idx >= 0, keys, 0).sum(dim=(1, 2)).double().mean().item())


def random_block_idx(h_kv, n, seqlen, sel, device):
    """Stand-in selection: init, local and current blocks, then random earlier ones, ascending, -1 padded."""
    bs = sel["block_size"]
    k_eff = sel["topk"] + sel["window_size"] // bs
    t = torch.arange(n, device=device) % seqlen
    c = (t // bs)[None, :, None]
    gen = torch.Generator(device=device).manual_seed(1)
    r = torch.rand((h_kv, n, k_eff), device=device, generator=gen)
    ids = (r * (c + 1)).long()
    ids[..., 0] = 0
    ids[..., -1] = c[..., 0]
    ids = ids.sort(dim=-1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[..., 1:] = ids[..., 1:] == ids[..., :-1]
    ids = torch.where(dup, 1 << 30, ids).sort(dim=-1).values
    return torch.where(ids == 1 << 30, -1, ids).to(torch.int32)


def dense_pairs(seqlen, batch):
    return batch * seqlen * (seqlen + 1) // 2


def sdpa_fn(q, k, v, seqlen, batch, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    h_q, h_kv, d = q.shape[1], k.shape[1], q.shape[2]

    def to_bhtd(x):
        return x.view(batch, seqlen, x.shape[1], d).transpose(1, 2)

    def run(q, k, v, expand):
        group = h_q // h_kv
        kk, vv = (k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)) if expand else (k, v)
        with sdpa_kernel([be]):
            out = F.scaled_dot_product_attention(to_bhtd(q), to_bhtd(kk), to_bhtd(vv), is_causal=True,
                                                 enable_gqa=(not expand) and h_q != h_kv)
        return out.transpose(1, 2).reshape(q.shape)

    # GQA natively when the backend takes it (forward and backward), else K/V repeated per query head (that
    # copy is then part of the measured time).
    try:
        qs, ks, vs = (x[:256].detach().clone().requires_grad_() for x in (q, k, v))
        with sdpa_kernel([be]):
            out = F.scaled_dot_product_attention(qs.view(1, 256, h_q, d).transpose(1, 2),
                                                 ks.view(1, 256, h_kv, d).transpose(1, 2),
                                                 vs.view(1, 256, h_kv, d).transpose(1, 2),
                                                 is_causal=True, enable_gqa=h_q != h_kv)
        out.sum().backward()
        return (lambda q, k, v: run(q, k, v, False)), "gqa"
    except RuntimeError:
        return (lambda q, k, v: run(q, k, v, True)), "expanded-kv"


def run_case(name, cfg, args, results):
    device, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    h_q, h_kv, d = SHAPES[cfg["shape"]]
    sel = SELECTIONS[cfg["sel"]]
    k_eff = sel["topk"] + sel["window_size"] // sel["block_size"]
    seqlen, batch = cfg["seqlen"], cfg["batch"]
    q, k, v, cu = make_inputs(cfg, device, dtype)
    n = q.shape[0]
    do = torch.randn_like(q)
    on_gpu = device == "cuda"
    rows = []

    def record(impl, pass_, fn, pairs, note=""):
        flops_per_pair = 4 * d * h_q if pass_ == "fwd" else 14 * d * h_q
        try:
            # The memory probe is also the warm-up call (compilation, autotuning, allocator).
            mem = peak_extra_gib(fn) if on_gpu else float("nan")
            ms = time_ms(fn, budget_ms=args.budget_ms) if on_gpu else _cpu_ms(fn)
        except Exception as exc:  # a failing row must not lose the others
            print(f"  {name} {impl} {pass_}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append(dict(case=name, impl=impl, pass_=pass_, error=f"{type(exc).__name__}: {exc}"))
            return
        tflops = pairs * flops_per_pair / (ms * 1e-3) / 1e12 if pairs else float("nan")
        row = dict(case=name, impl=impl, pass_=pass_, ms=ms, tflops=tflops, peak_extra_gib=mem, note=note,
                   shape=cfg["shape"], seqlen=seqlen, batch=batch, h_q=h_q, h_kv=h_kv, d=d, k_eff=k_eff,
                   data=cfg["data"])
        rows.append(row)
        print(f"  {name:32s} {impl:11s} {pass_:7s} {ms:9.2f} ms {tflops:7.1f} TFLOP/s {mem:6.2f} GiB {note}",
              flush=True)

    def fwd_bwd(f):
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def call():
            qg.grad = kg.grad = vg.grad = None
            f(qg, kg, vg).backward(do)
        return call

    passes = ["fwd"] if cfg["fwd_only"] else ["fwd", "fwd+bwd"]
    pairs_dense = dense_pairs(seqlen, batch)

    # Dense baselines (skipped for the smooth-data variants: same cost as their random twins).
    if on_gpu and cfg["data"] == "random" and not args.no_dense:
        key = (cfg["shape"], seqlen, batch, cfg["fwd_only"])
        for backend in ("flash", "cudnn"):
            if (key, backend) in args.dense_cache:
                for row in args.dense_cache[(key, backend)]:
                    rows.append(dict(row, case=name))
                continue
            start = len(rows)
            try:
                f, note = sdpa_fn(q, k, v, seqlen, batch, backend)
            except Exception as exc:
                rows.append(dict(case=name, impl=f"sdpa-{backend}", pass_="fwd", error=str(exc)))
                continue
            for p in passes:
                record(f"sdpa-{backend}", p, (lambda: f(q, k, v)) if p == "fwd" else fwd_bwd(f), pairs_dense, note)
            args.dense_cache[(key, backend)] = rows[start:]

    with torch.no_grad():
        try:
            if cfg["data"] == "real":
                # The selections of the real SmolLM2 on real text (bench/real_selection.py), 8 documents of 32k.
                from bench.real_selection import load

                block_idx = load(cfg["sel"])[0].to(device)
                assert block_idx.shape[1] == n, f"recorded selections hold {block_idx.shape[1]} tokens, not {n}"
            else:
                block_idx = kernels.infllm_v2_select(q, k, cu, seqlen, impl="triton" if on_gpu else "naive",
                                                     check=False, **sel)
        except Exception as exc:  # keep measuring the attention on a stand-in selection
            print(f"  {name}: selection FAILED ({type(exc).__name__}: {exc}); random selection instead")
            block_idx = random_block_idx(h_kv, n, seqlen, sel, device)
    # Pairs per KV head; every query head of the group computes the same ones (record() multiplies by H_q).
    pairs_sparse = attended_pairs(block_idx, seqlen, sel["block_size"])
    if infllm_v2_select_triton is not None:
        record("select", "fwd", lambda: infllm_v2_select_triton(q, k, cu, seqlen, **sel), 0)
    else:
        rows.append(dict(case=name, impl="select", pass_="fwd", error="kernels.infllm_v2.select not importable"))

    def sparse(q_, k_, v_):
        return attn.block_sparse_attn_triton(q_, k_, v_, block_idx, cu, seqlen, block_size=sel["block_size"])

    def whole(q_, k_, v_):
        return kernels.infllm_v2_attn_varlen(q_, k_, v_, cu, seqlen, dense_len=8192, impl="triton", check=False,
                                             **sel)

    for p in passes:
        record("sparse", p, (lambda: sparse(q, k, v)) if p == "fwd" else fwd_bwd(sparse), pairs_sparse)
    # On recorded selections the whole path would select anew from random q/k: its row would not be "real".
    if infllm_v2_select_triton is not None and cfg["data"] != "real":
        for p in passes:
            record("infllm", p, (lambda: whole(q, k, v)) if p == "fwd" else fwd_bwd(whole), pairs_sparse)

    # Where the sparse time goes: index building on the host side (torch ops on the GPU).
    if on_gpu and not cfg["fwd_only"]:
        group = h_q // h_kv

        def index():
            bd, bs, fb = attn._tiles(cu, n, sel["block_size"])
            qt, off = attn._inverted_index(block_idx, cu, fb, bd.numel())
            attn._list_chunks(off, qt.numel(), attn.TUNING["dkdv_chunk"])
        record("inv-index", "bwd", index, 0)
        record("query-walks", "fwd", lambda: attn._query_walks(block_idx, cu, n, seqlen, sel["block_size"], group,
                                                               -1, 0), 0)
        stats = pack_stats(block_idx, cu, n, seqlen, group)
        rows.append(dict(case=name, impl="pack-stats", pass_="-", k_eff=k_eff, **stats))
        print(f"  {name:32s} tiles: {stats}")
    if on_gpu and name in args.profile.split(",") and not cfg["fwd_only"]:
        from torch.profiler import ProfilerActivity, profile

        for label, target in (("infllm", whole), ("sparse", sparse)):
            try:
                call = fwd_bwd(target)
                call()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    call()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=16,
                                                  max_name_column_width=50)
                print(f"profile {name} {label} fwd+bwd\n{table}")
                rows.append(dict(case=name, impl="profile", pass_="fwd+bwd", target=label, table=table))
                break
            except Exception as exc:
                print(f"  profile {name} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
    del q, k, v, do, block_idx
    if on_gpu:
        torch.cuda.empty_cache()
    results.extend(rows)


# Launch-parameter variants tried by --sweep on the sparse attention alone (fwd and fwd+bwd).
# Launch-parameter variants tried by --sweep on the sparse attention alone (fwd and fwd+bwd); the fastest stays
# for the rest of the run. Earlier sweeps (bench/README.md) chose the defaults now in attention.TUNING.
SWEEP = {
    "default": {},
    "pointer-kv": {"kv_tma": False},
    "dq-in-dkdv": {"dq_atomic": True},
}
# Query-tile packing (attention.TUNING["pack_cost"]): every tile narrow (16 rows: one token of G = 16 heads, or
# 16 // G tokens over their union), every tile wide (64 rows over the union of 4 x G = 16 or 16 x G = 4 tokens),
# and the per-tile decision at several costs; random and smooth data, G = 16, 4 and 3.
SWEEP_PACK = {"narrow": {"pack_cost": float("inf")}, "wide": {"pack_cost": 0.0},
              "cost1.2": {"pack_cost": 1.2}, "cost1.7": {"pack_cost": 1.7}, "cost2.5": {"pack_cost": 2.5}}
SWEEP_PACK_CASES = ("minicpm4-32kx8-64blk", "minicpm4-32kx8-64blk-smooth", "llama3-32kx8-64blk",
                    "llama3-32kx8-64blk-smooth", "smollm2-32kx8-64blk", "smollm2-32kx8-64blk-smooth")


def sweep(args, results):
    """Times the sparse attention alone under each SWEEP variant (MiniCPM4 shape, 32k x 8, random data) and keeps
    the fastest fwd+bwd as the TUNING of the rest of the run."""
    import copy

    base = copy.deepcopy(attn.TUNING)
    best, best_ms = None, float("inf")
    for case in ("minicpm4-32kx8-64blk",):
        cfg = CASES[case]
        q, k, v, cu = make_inputs(cfg, "cuda", torch.bfloat16)
        sel = SELECTIONS[cfg["sel"]]
        with torch.no_grad():
            block_idx = kernels.infllm_v2_select(q, k, cu, cfg["seqlen"], impl="triton", check=False, **sel)
        do = torch.randn_like(q)
        for name, over in SWEEP.items():
            attn.TUNING.clear()
            attn.TUNING.update(copy.deepcopy(base))
            attn.TUNING.update(over)
            row = dict(case=case, impl="sweep", variant=name, tuning=str(over))
            try:
                f = lambda: attn.block_sparse_attn_triton(q, k, v, block_idx, cu, cfg["seqlen"], block_size=64)
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

                def fb():
                    qg.grad = kg.grad = vg.grad = None
                    attn.block_sparse_attn_triton(qg, kg, vg, block_idx, cu, cfg["seqlen"], block_size=64).backward(do)
                f()
                fb()
                row["fwd_ms"] = time_ms(f, budget_ms=800)
                row["fwd_bwd_ms"] = time_ms(fb, budget_ms=1500)
                if row["fwd_bwd_ms"] < best_ms:
                    best, best_ms = name, row["fwd_bwd_ms"]
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"  sweep {case} {name:16s} fwd {row.get('fwd_ms', float('nan')):8.2f} ms  fwd+bwd "
                  f"{row.get('fwd_bwd_ms', float('nan')):8.2f} ms {row.get('error', '')[:300]}", flush=True)
            results.append(row)
        del q, k, v, do, block_idx
    attn.TUNING.clear()
    attn.TUNING.update(copy.deepcopy(base))
    if best is not None:
        attn.TUNING.update(SWEEP[best])
    print(f"  sweep: keeping '{best}' for the rest of the run", flush=True)
    torch.cuda.empty_cache()
    return best


def sweep_pack(args, results):
    """Times the sparse attention alone (fwd+bwd) under each SWEEP_PACK variant; TUNING is left unchanged.
    With --pick-out: then combines, greedily, the variants that beat the first one ("default") by over 1% on the
    summed fwd+bwd of the cases, and writes the fastest combination as bench/long_context.py --tuning JSON."""
    import copy

    tuned = copy.deepcopy(attn.TUNING)
    cases = args.pack_cases.split(",") if args.pack_cases else list(SWEEP_PACK_CASES)
    inputs = {}

    def case_inputs(case):
        if case not in inputs:
            cfg = CASES[case]
            q, k, v, cu = make_inputs(cfg, "cuda", torch.bfloat16)
            sel = SELECTIONS[cfg["sel"]]
            with torch.no_grad():
                if cfg["data"] == "real":
                    from bench.real_selection import load

                    block_idx = load(cfg["sel"])[0].to("cuda")
                else:
                    block_idx = kernels.infllm_v2_select(q, k, cu, cfg["seqlen"], impl="triton", check=False, **sel)
            inputs.clear()          # one case's tensors at a time
            inputs[case] = (q, k, v, cu, block_idx, torch.randn_like(q))
        return inputs[case]

    reference = {}

    def outputs(fwd, do):
        """The forward's output and the three gradients of one fwd+bwd, fp32 copies."""
        qg, kg, vg = fwd.leaves
        qg.grad = kg.grad = vg.grad = None
        out = fwd()
        out.backward(do)
        return [t.detach().float() for t in (out, qg.grad, kg.grad, vg.grad)]

    def time_variant(case, name, over, with_fwd=True):
        q, k, v, cu, block_idx, do = case_inputs(case)
        attn.TUNING.clear()
        attn.TUNING.update(attn.merged_tuning(tuned, over))
        row = dict(case=case, impl="sweep-pack", variant=name, tuning=str(over))
        try:
            fwd, fb = _sparse_calls(attn, q, k, v, block_idx, cu, CASES[case]["seqlen"], do)
            # Launch parameters must not change the result beyond summation order: each variant's output and
            # gradients against the first variant's, relative to the largest entry (bf16 inputs, fp32 sums).
            got = outputs(fwd, do)
            if case not in reference:
                reference.clear()
                reference[case] = got
            err = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
                      for a, b in zip(got, reference[case]))
            row["max_rel_err_vs_first"] = err
            del got
            if not err < 2e-2:
                raise AssertionError(f"result differs from the first variant's: max relative error {err:.3g}")
            fb()
            if with_fwd:
                with torch.no_grad():
                    row["fwd_ms"] = time_ms(fwd, budget_ms=600)
            row["fwd_bwd_ms"] = time_ms(fb, budget_ms=1200)
            row.update(pack_stats(block_idx, cu, q.shape[0], CASES[case]["seqlen"], q.shape[1] // k.shape[1]))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            attn.TUNING.clear()
            attn.TUNING.update(copy.deepcopy(tuned))
        print(f"  pack {case:30s} {name:16s} fwd {row.get('fwd_ms', float('nan')):8.2f} fwd+bwd "
              f"{row.get('fwd_bwd_ms', float('nan')):8.2f} ms  wide share {row.get('wide_share', 0):.2f} "
              f"{row.get('error', '')[:300]}", flush=True)
        results.append(row)
        return row.get("fwd_bwd_ms", float("inf"))

    totals = {}
    t_start = time.time()
    for name, over in SWEEP_PACK.items():
        if time.time() - t_start > args.sweep_s:
            print(f"  pack: time guard ({args.sweep_s:.0f} s), '{name}' and later variants not timed", flush=True)
            break
        totals[name] = sum(time_variant(case, name, over) for case in cases)
    if args.pick_out:
        skip = set(filter(None, args.pick_skip.split(",")))
        names = list(SWEEP_PACK)
        base = totals[names[0]]
        gains = sorted((t, n) for n, t in totals.items() if n not in skip and n != names[0] and t < 0.99 * base)
        best, best_t = ({**SWEEP_PACK[gains[0][1]]}, gains[0][0]) if gains else ({}, base)
        for i, (_, name) in enumerate(gains[1:], start=1):
            if time.time() - t_start > args.sweep_s:
                break
            trial = {**best, **SWEEP_PACK[name]}
            trial_t = sum(time_variant(case, f"combo{i}", trial, with_fwd=False) for case in cases)
            if trial_t < best_t:
                best, best_t = trial, trial_t
        pick = {"attention": best} if best else {}      # JSON: head-dim keys as strings, configs as lists
        print(f"  pick: '{names[0]}' {base:.1f} ms summed, picked {best_t:.1f} ms: {pick or 'default'}", flush=True)
        results.append(dict(impl="sweep-pick", cases=cases, base_ms=base, picked_ms=best_t, pick=pick))
        with open(args.pick_out, "w") as fh:
            json.dump(pick, fh)
    inputs.clear()
    torch.cuda.empty_cache()


def _sparse_calls(attn_module, q, k, v, block_idx, cu, seqlen, do):
    """(forward, forward+backward) closures of `attn_module`'s block-sparse attention on fresh leaves of q, k, v."""
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd():
        return attn_module.block_sparse_attn_triton(qg, kg, vg, block_idx, cu, seqlen, block_size=64)

    def fb():
        qg.grad = kg.grad = vg.grad = None
        fwd().backward(do)

    fwd.leaves = (qg, kg, vg)
    return fwd, fb


def _load_attention_copy(path):
    """Another version of kernels/infllm_v2/attention.py as its own module (its custom ops renamed), so that two
    versions can be timed in one process."""
    import importlib.util

    text = open(path).read().replace('"infllm::', '"infllm_ab::')
    spec = importlib.util.spec_from_loader("_attention_ab", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = os.path.abspath(path)
    sys.modules["_attention_ab"] = mod
    exec(compile(text, mod.__file__, "exec"), mod.__dict__)
    return mod


def ab_compare(args, results):
    """Sparse attention alone (fwd, fwd+bwd) of this attention.py against the copy at --ab, interleaved
    (A B A B ...) on the same selection of each case; the medians of each side."""
    other = _load_attention_copy(args.ab)
    for case in args.cases.split(","):
        cfg = CASES[case]
        q, k, v, cu = make_inputs(cfg, "cuda", torch.bfloat16)
        sel = SELECTIONS[cfg["sel"]]
        with torch.no_grad():
            block_idx = kernels.infllm_v2_select(q, k, cu, cfg["seqlen"], impl="triton", check=False, **sel)
        do = torch.randn_like(q)
        times = {}
        for side, mod in (("this", attn), ("ab", other)) * args.ab_rounds:
            fwd, fb = _sparse_calls(mod, q, k, v, block_idx, cu, cfg["seqlen"], do)
            fb()
            with torch.no_grad():
                times.setdefault((side, "fwd"), []).append(time_ms(fwd, budget_ms=300))
            times.setdefault((side, "fwd+bwd"), []).append(time_ms(fb, budget_ms=600))
        for (side, pass_), ms in times.items():
            row = dict(case=case, impl=f"ab-{side}", pass_=pass_, ms=statistics.median(ms), all_ms=ms,
                       file=args.ab if side == "ab" else attn.__file__)
            results.append(row)
            print(f"  ab {case:30s} {side:5s} {pass_:8s} {row['ms']:8.2f} ms  {['%.2f' % x for x in ms]}", flush=True)
        args.dump()
        del q, k, v, do, block_idx, fwd, fb
        torch.cuda.empty_cache()


def pack_stats(block_idx, cu, n, seqlen, group):
    """Mean union sizes of the narrow and wide query tiles and the share of wide tiles the decision picks."""
    (_, tok_n), wide = attn._sparse_plan(group)
    walks = attn._query_walks(block_idx, cu, n, seqlen, 64, group, -1, 0)    # [wide,] narrow (no dense walk)

    def counts(walk):  # a union walk's count table is its third list argument
        mode, tile_doc, tile_start, lists = walk[0], walk[3], walk[4], walk[5][0]
        return (lists[2] if mode == 1 else attn._row_counts(block_idx, tile_start))[:, tile_doc >= 0]

    stats = {"tokens_narrow": tok_n, "mean_narrow_blocks": float(counts(walks[-1]).float().mean().item())}
    if wide is not None:
        skip_w = walks[0][6][:, walks[0][3] >= 0]
        stats.update(tokens_wide=wide[1], mean_wide_blocks=float(counts(walks[0]).float().mean().item()),
                     wide_share=float((skip_w == 0).float().mean().item()))
    return stats


def _cpu_ms(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def summarise(results):
    """Per case: ms of each impl and pass, and the speedups of infllm / sparse over both dense backends."""
    by = {}
    for r in results:
        if "ms" in r:
            by.setdefault(r["case"], {})[(r["impl"], r["pass_"])] = r["ms"]
    lines = [f"{'case':32s} {'pass':8s} {'flash':>8s} {'cudnn':>8s} {'select':>8s} {'sparse':>8s} {'infllm':>8s}"
             f" {'x flash':>8s} {'x cudnn':>8s} {'sparse x cudnn':>14s}"]
    summary = []
    for case, m in by.items():
        for p in ("fwd", "fwd+bwd"):
            if ("sparse", p) not in m:
                continue
            fl, cd = m.get(("sdpa-flash", p)), m.get(("sdpa-cudnn", p))
            sp, inf, se = m.get(("sparse", p)), m.get(("infllm", p)), m.get(("select", "fwd"))
            x_fl = fl / inf if fl and inf else float("nan")
            x_cd = cd / inf if cd and inf else float("nan")
            sx_cd = cd / sp if cd and sp else float("nan")
            summary.append(dict(case=case, pass_=p, flash=fl, cudnn=cd, select=se, sparse=sp, infllm=inf,
                                speedup_vs_flash=x_fl, speedup_vs_cudnn=x_cd, sparse_speedup_vs_cudnn=sx_cd))

            def f(x):
                return f"{x:8.1f}" if x else f"{'-':>8s}"
            lines.append(f"{case:32s} {p:8s} {f(fl)} {f(cd)} {f(se)} {f(sp)} {f(inf)} {x_fl:8.2f} {x_cd:8.2f}"
                         f" {sx_cd:14.2f}")
    return "\n".join(lines), summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset: " + ", ".join(QUICK))
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all; none: sweeps only)")
    ap.add_argument("--out", default="", help="JSON output path (default: $OUT/kernels.json or bench/results/)")
    ap.add_argument("--budget-ms", type=float, default=2500.0, help="time spent per measured row (approx.)")
    ap.add_argument("--no-dense", action="store_true", help="skip the SDPA baselines")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
    ap.add_argument("--profile", default="", help="comma-separated cases whose infllm fwd+bwd is profiled")
    ap.add_argument("--sweep", action="store_true", help="try launch variants first, keep the fastest")
    ap.add_argument("--sweep-pack", action="store_true", help="time the query-tile packing variants first")
    ap.add_argument("--pack-variants", default="", help="JSON {name: TUNING overrides} replacing SWEEP_PACK")
    ap.add_argument("--pack-cases", default="", help="comma-separated cases of the packing sweep")
    ap.add_argument("--pick-out", default="", help="with --sweep-pack: write the fastest greedy combination of the "
                    "variants as bench/long_context.py --tuning JSON")
    ap.add_argument("--pick-skip", default="", help="comma-separated variants timed but never picked")
    ap.add_argument("--sweep-s", type=float, default=float("inf"), help="--sweep-pack starts no variant after this")
    ap.add_argument("--tuning", default="", help="JSON dict merged into kernels.infllm_v2.attention.TUNING")
    ap.add_argument("--ab", default="", help="another attention.py: time its sparse attention against this one on "
                    "--cases (interleaved) and stop")
    ap.add_argument("--ab-rounds", type=int, default=3, help="A/B rounds per case with --ab")
    args = ap.parse_args()
    if args.tuning:
        merged = attn.merged_tuning(attn.TUNING, json.loads(args.tuning))
        attn.TUNING.clear()
        attn.TUNING.update(merged)
    if args.pack_variants:
        SWEEP_PACK.clear()
        SWEEP_PACK.update(json.loads(args.pack_variants))
    args.dense_cache = {}
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.device = "cpu"
        names, table = list(SMOKE), SMOKE
    else:
        args.device = "cuda"
        table = CASES
        names = QUICK if args.quick else (args.cases.split(",") if args.cases else list(CASES))
        names = [] if names == ["none"] else names      # --cases none: only the sweeps
    unknown = [c for c in names if c not in table]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {list(table)}")

    meta = dict(argv=sys.argv[1:], torch=torch.__version__, tuning={k: (str(v)) for k, v in attn.TUNING.items()},
                time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.device == "cuda":
        import triton
        p = torch.cuda.get_device_properties(0)
        meta.update(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count, triton=triton.__version__)
        print(f"device {meta['device']} ({meta['sms']} SMs), torch {torch.__version__}, triton {triton.__version__}")
    results = []
    t0 = time.time()
    if args.sweep and args.device == "cuda":
        print(f"[{time.time() - t0:6.1f}s] sweep", flush=True)
        meta["sweep_best"] = sweep(args, results)
        meta["tuning"] = {k: str(v) for k, v in attn.TUNING.items()}
    if args.sweep_pack and args.device == "cuda":
        print(f"[{time.time() - t0:6.1f}s] sweep of the tile packing", flush=True)
        sweep_pack(args, results)
    out = args.out or (os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT")
                       else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kernels.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def dump():
        # Written after every case, so a run cut short keeps what it measured.
        text, summary = summarise(results)
        with open(out, "w") as fh:
            json.dump(dict(meta=meta, rows=results, summary=summary), fh, indent=1, default=str)
        return text

    if args.ab:
        args.dump = dump
        ab_compare(args, results)
        names = []
    for name in names:
        print(f"[{time.time() - t0:6.1f}s] {name}", flush=True)
        run_case(name, table[name], args, results)
        dump()
    text = dump()
    print(f"\n[{time.time() - t0:.0f}s] wrote {out}\n")
    print(text)


if __name__ == "__main__":
    main()
