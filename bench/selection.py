"""Benchmark of InfLLM-V2 block selection alone (kernels/infllm_v2/select.py): median ms and peak extra memory.

    python3 bench/selection.py                        # every case (H100: about a minute, compiles included)
    python3 bench/selection.py --cases minicpm4-128kx2 --out select.json
    python3 bench/selection.py --sweep minicpm4-32kx8  # also time a few launch configs on that case
    python3 bench/selection.py --smoke                # tiny shapes under the Triton interpreter (CPU)

Cases: MiniCPM4 shape (H_q 32, H_kv 2, d 128) at 32k x 8, 64k x 4, 128k x 2 documents (the public kernels'
batches); Llama-3 (32 / 8, d 128) and SmolLM2 (9 / 3, d 64) at 32k x 8 and 64k x 4. bf16, random inputs (q
scaled by 2 so that the probabilities are not uniform), the paper's selection (topk 64 + window 2048 = 96 blocks,
block 64, kernel 32 / 16, lse_approx) unless --topk / --window / --exact-lse say otherwise.
Timing: triton.testing.do_bench (CUDA events, L2 flushed between calls), median. Memory: the peak allocated
during one call minus what was allocated before it (the int32 [H_kv, N, k_eff] output included, and reported
apart). `bench_select(...)` returns the same numbers as a dict (bench/kernels.py may import it).
"""
from __future__ import annotations

import os
import sys

# Run as a script, this file's folder leads sys.path and its name would shadow the standard `select` module
# (imported by subprocess, hence by torch): drop the folder, put the repository root first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
if "--smoke" in sys.argv:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from kernels.infllm_v2.select import SelectConfig, _next_pow2, _select, default_config  # noqa: E402

# name -> (H_q, H_kv, d)
SHAPES = {"minicpm4": (32, 2, 128), "llama3": (32, 8, 128), "smollm2": (9, 3, 64), "llama1b": (32, 8, 64)}
# case name -> (shape, document length, documents)
CASES = {
    "minicpm4-32kx8": ("minicpm4", 32768, 8),
    "minicpm4-64kx4": ("minicpm4", 65536, 4),
    "minicpm4-128kx2": ("minicpm4", 131072, 2),
    "llama3-32kx8": ("llama3", 32768, 8),
    "smollm2-32kx8": ("smollm2", 32768, 8),
    "smollm2-64kx4": ("smollm2", 65536, 4),
    "llama1b-128kx1": ("llama1b", 131072, 1),       # Llama-3.2-1B's attention (bench/long_context.py's 1b)
}
SMOKE_CASES = {"smoke-g16": ("minicpm4", 700, 2), "smoke-g3": ("smollm2", 500, 2)}
# Public anchor (H100, MiniCPM4 shape, a Triton NSA's top-k selection alone), ms.
NSA_SELECT_MS = {"minicpm4-32kx8": 60.0, "minicpm4-64kx4": 94.0, "minicpm4-128kx2": 165.0}

DEFAULT_SELECTION = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=2048, topk=64)
SMOKE_SELECTION = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=64, topk=4)


def _inputs(shape: str, seq_len: int, n_docs: int, dtype, device, seed=0):
    h_q, h_kv, d = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(seed)
    n = seq_len * n_docs
    q = (2.0 * torch.randn(n, h_q, d, generator=gen, device=device)).to(dtype)
    k = torch.randn(n, h_kv, d, generator=gen, device=device).to(dtype)
    cu = torch.arange(0, n + 1, seq_len, dtype=torch.int32, device=device)
    return q, k, cu


def _time_ms(fn) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))
    import time

    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def bench_select(cases=None, *, dtype=torch.bfloat16, selection=None, lse_approx=True, config=None,
                 verbose=True, reference: dict | None = None) -> dict:
    """Times `infllm_v2_select_triton` on each named case. Returns {case: {"ms", "peak_extra_mib",
    "output_mib", "tokens", "shape", ...}}. `config` (a SelectConfig) overrides the launch parameters.
    `reference` ({case: sorted ids}, filled on first use) adds "same_ids_share": the share of (head, token)
    rows whose chosen blocks equal the reference's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = not torch.cuda.is_available()
    if smoke and dtype == torch.bfloat16:
        dtype = torch.float32  # the interpreter's bf16 matmul is not trustworthy
    table = SMOKE_CASES if smoke else CASES
    cases = list(table) if cases is None else list(cases)
    selection = dict(SMOKE_SELECTION if smoke else DEFAULT_SELECTION, **(selection or {}))
    k_eff = selection["topk"] + selection["window_size"] // selection["block_size"]
    results = {}
    for name in cases:
        shape, seq_len, n_docs = table[name]
        h_q, h_kv, d = SHAPES[shape]
        q, k, cu = _inputs(shape, seq_len, n_docs, dtype, device)
        cfg = config or default_config(h_q // h_kv, d, selection["block_size"], selection["kernel_stride"])

        def call():
            return _select(q, k, cu, seq_len, lse_approx=lse_approx, softmax_scale=None, config=cfg, **selection)

        ids = call()  # compile
        same = None
        if reference is not None:
            # Launch parameters change summation order only: the chosen blocks must agree with the reference
            # config's (as sets per token and head; an exact score tie may rarely flip).
            ids = ids.sort(dim=-1).values
            if name not in reference:
                reference[name] = ids
            same = float((ids == reference[name]).all(dim=-1).float().mean())
        del ids
        peak_mib = 0.0
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = call()
            torch.cuda.synchronize()
            peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
            del out
        ms = _time_ms(call)
        output_mib = h_kv * q.shape[0] * k_eff * 4 / 2**20
        row = dict(ms=ms, peak_extra_mib=peak_mib, output_mib=output_mib,
                   peak_extra_without_output_mib=max(0.0, peak_mib - output_mib), tokens=q.shape[0],
                   seq_len=seq_len, n_docs=n_docs, h_q=h_q, h_kv=h_kv, head_dim=d, dtype=str(dtype),
                   lse_approx=lse_approx, k_eff=k_eff, config=cfg._asdict(), nsa_select_ms=NSA_SELECT_MS.get(name),
                   same_ids_share=same)
        results[name] = row
        if verbose:
            print(f"  {name}: {ms:.2f} ms, peak extra {peak_mib:.0f} MiB (output {output_mib:.0f} MiB), "
                  f"config {tuple(cfg)}", flush=True)
        del q, k, cu
    return results


def sweep_configs(case: str, *, dtype=torch.bfloat16, selection=None, lse_approx=True,
                  budget_s: float = float("inf")) -> dict:
    """A few launch configs on one case (each compiles once), the default first: {config tuple as str: ms}.
    No config is started after `budget_s` seconds."""
    import time

    h_q, h_kv, d = SHAPES[CASES[case][0]]
    group = h_q // h_kv
    g_pad = _next_pow2(group)
    sel = dict(DEFAULT_SELECTION, **(selection or {}))
    configs = [default_config(group, d, sel["block_size"], sel["kernel_stride"])]
    for block_t in sorted({max(8, 128 // g_pad), max(8, 256 // g_pad), max(8, 64 // g_pad)}):
        for block_n, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 2), (128, 8, 2)):
            configs.append(SelectConfig(block_t=min(block_t, 64), block_n=block_n, num_warps=warps,
                                        num_stages=stages))
    out, reference = {}, {}
    t_start = time.time()
    for cfg in configs:
        if str(tuple(cfg)) in out:
            continue
        if time.time() - t_start > budget_s:
            print(f"  sweep: time guard ({budget_s:.0f} s), {cfg} and later configs not timed", flush=True)
            break
        try:
            row = bench_select([case], dtype=dtype, selection=selection, lse_approx=lse_approx, config=cfg,
                               verbose=False, reference=reference)[case]
            # A config whose blocks differ from the default's is wrong, whatever its speed.
            ms = row["ms"] if row["same_ids_share"] >= 0.999 else f"wrong: same ids for {row['same_ids_share']:.4f}"
        except Exception as exc:  # a config that does not compile or run is reported, not fatal
            ms = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        out[str(tuple(cfg))] = ms
        print(f"  sweep {case} {tuple(cfg)}: {ms}", flush=True)
    return out


def write_pick(case: str, timings: dict, path: str) -> dict:
    """The sweep's fastest config as `{"select": {"G_PAD,d": [block_t, block_n, warps, stages]}}` (what
    bench/long_context.py --tuning takes), or `{}` when it is within 2% of the default config's time."""
    h_q, h_kv, d = SHAPES[CASES[case][0]]
    base = next(iter(timings), None)     # sweep_configs times the default config first
    ok = {cfg: ms for cfg, ms in timings.items() if isinstance(ms, float)}
    pick = {}
    if base in ok:
        best = min(ok, key=ok.get)
        if ok[best] < 0.98 * ok[base]:
            pick = {"select": {f"{_next_pow2(h_q // h_kv)},{d}": list(ast.literal_eval(best))}}
        print(f"  pick: default {base} {ok[base]:.2f} ms, fastest {best} {ok[best]:.2f} ms -> {pick or 'default'}",
              flush=True)
    with open(path, "w") as fh:
        json.dump(pick, fh)
    return pick


def format_table(results: dict) -> str:
    lines = [f"{'case':18s} {'tokens':>8s} {'Hq/Hkv/d':>10s} {'ms':>8s} {'NSA ms':>7s} {'peak MiB':>9s} "
             f"{'w/o out':>8s}"]
    for name, r in results.items():
        nsa = f"{r['nsa_select_ms']:.0f}" if r.get("nsa_select_ms") else "-"
        lines.append(f"{name:18s} {r['tokens']:8d} {r['h_q']:>3d}/{r['h_kv']}/{r['head_dim']:<4d} {r['ms']:8.2f} "
                     f"{nsa:>7s} {r['peak_extra_mib']:9.0f} {r['peak_extra_without_output_mib']:8.0f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--out", default="select_bench.json", help="JSON results path")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--exact-lse", action="store_true", help="lse_approx=False")
    ap.add_argument("--sweep", default=None, help="case on which to time a few launch configs")
    ap.add_argument("--smoke", action="store_true", help="tiny cases on CPU under the Triton interpreter")
    ap.add_argument("--sweep-s", type=float, default=float("inf"), help="--sweep starts no config after this")
    ap.add_argument("--pick-out", default=None, help="with --sweep: write the fastest config, when it beats the "
                    "default by over 2%%, as bench/long_context.py --tuning JSON")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    selection = {}
    if args.topk is not None:
        selection["topk"] = args.topk
    if args.window is not None:
        selection["window_size"] = args.window
    cases = args.cases.split(",") if args.cases else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    report = dict(device=device, torch=torch.__version__, selection=dict(DEFAULT_SELECTION, **selection),
                  dtype=args.dtype, lse_approx=not args.exact_lse)
    if args.sweep:
        report["sweep"] = {args.sweep: sweep_configs(args.sweep, dtype=dtype, selection=selection,
                                                     lse_approx=not args.exact_lse, budget_s=args.sweep_s)}
        if args.pick_out:
            report["pick"] = write_pick(args.sweep, report["sweep"][args.sweep], args.pick_out)
    results = bench_select(cases, dtype=dtype, selection=selection, lse_approx=not args.exact_lse)
    report["results"] = results
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(format_table(results))


if __name__ == "__main__":
    main()
