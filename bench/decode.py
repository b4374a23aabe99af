"""One decode step of attention over a KV cache, per layer: what a sparse-mode eval (generation) pays per token.

    python3 bench/decode.py                                  # GPU: the table, JSON with --out
    python3 bench/decode.py --shapes smollm2 --lengths 8192,32768 --out decode.json
    python3 bench/decode.py --smoke                          # CPU: tiny sizes, checks the script runs

Rows per (shape, cached length T), one new token (L = 1), bf16 on the GPU, median ms of CUDA-event-timed calls
after warm-up (fp32 and perf_counter on the CPU):
- sdpa: dense attention of the new token over the whole cache (torch SDPA, what dense mode decodes with);
- tail-naive: kernels.infllm_v2.naive.infllm_v2_attn_tail_naive (the reference: loops and host reads);
- tail: kernels.infllm_v2_attn_tail (batched over heads, no host read; what sparse mode decodes with).
Sparse config: infllm_v2_smollm2's (B 64, kernel 32 / stride 16, window 512, topk 24 -> k_eff 32) unless --cfg
minicpm4 (window 2048, topk 64 -> k_eff 96).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import infllm_v2_attn_tail  # noqa: E402
from kernels.infllm_v2.naive import infllm_v2_attn_tail_naive  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "llama3": (32, 8, 128), "minicpm4": (32, 2, 128)}
CFGS = {"smollm2": dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=512, topk=24),
        "minicpm4": dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=2048, topk=64)}


def _time(fn, device: torch.device, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(shapes, lengths, cfg_name: str, device: torch.device, reps: int):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = dict(CFGS[cfg_name], dense_len=-1)
    rows = []
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        for n in lengths:
            g = torch.Generator(device=device).manual_seed(n)
            q = torch.randn(1, hq, d, device=device, dtype=dtype, generator=g)
            k = torch.randn(n, hkv, d, device=device, dtype=dtype, generator=g)
            v = torch.randn(n, hkv, d, device=device, dtype=dtype, generator=g)
            q4, k4, v4 = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            calls = {
                "sdpa": lambda: F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=hq != hkv),
                "tail-naive": lambda: infllm_v2_attn_tail_naive(q, k, v, **cfg),
                "tail": lambda: infllm_v2_attn_tail(q, k, v, **cfg),
            }
            with torch.no_grad():
                row = {"shape": shape, "T": n, **{name: round(_time(fn, device, reps), 4) for name, fn in calls.items()}}
                diff = (infllm_v2_attn_tail(q, k, v, **cfg).float() - infllm_v2_attn_tail_naive(q, k, v, **cfg).float())
                row["max_abs_diff_tail_vs_naive"] = float(diff.abs().max())
            row["tail_speedup_vs_naive"] = round(row["tail-naive"] / row["tail"], 2)
            row["tail_vs_sdpa"] = round(row["tail"] / row["sdpa"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2,llama3,minicpm4")
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--cfg", default="smollm2", choices=sorted(CFGS))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        device, shapes, lengths, reps = torch.device("cpu"), ["smollm2"], [1000], 2
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA device (or --smoke)")
        device, reps = torch.device("cuda"), args.reps
        shapes, lengths = args.shapes.split(","), [int(x) for x in args.lengths.split(",")]
    rows = run(shapes, lengths, args.cfg, device, reps)
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})"
    print(f"\n{card}, torch {torch.__version__}, cfg {args.cfg}, one new token, median ms per layer call")
    print("| shape | T | sdpa | tail-naive | tail | tail vs naive | tail / sdpa |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['T']} | {r['sdpa']:.3f} | {r['tail-naive']:.3f} | {r['tail']:.3f} | "
              f"{r['tail_speedup_vs_naive']}x | {r['tail_vs_sdpa']}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "cfg": args.cfg, "rows": rows,
                       "command": " ".join(sys.argv)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
