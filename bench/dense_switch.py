"""The dense/sparse switch of InfLLM-V2 (`dense_len`) on one packed row: forward + backward of the attention
alone, SmolLM2 shape (H_q 9, H_kv 3, d 64), bf16, MiniCPM4 sparse config (B 64, kernel 32/16, window 2048,
topk 64 -> k_eff 96, k_eff * B = 6144).

    PYTHONPATH=. python3 bench/dense_switch.py              # the table (H100: about a minute)
    PYTHONPATH=. python3 bench/dense_switch.py --profile    # also per-kernel GPU time of the dense path
    python3 bench/dense_switch.py --backends --mixes one32k,mixed,many --out dense.json   # kernels.dense backends

Rows per document mix (median ms, triton.testing.do_bench, fwd+bwd unless marked):
- sdpa: dense causal per document, torch SDPA with the KV heads repeated (kernels.dense, backend "sdpa");
- sparse: dense_len=-1 (every document sparse);
- dense8192-old: dense_len=8192 with every document under 8192 on the dense launch (dense_min=0, the old rule);
- dense8192: kernels.infllm_v2_attn_varlen(dense_len=8192): only k_eff*B < T < 8192 on the dense launch;
- dense8192-rowsR / -wW-sS: the same with TUNING overrides of the dense launch (tile rows, warps / stages).
Selection is included in every InfLLM-V2 row (as in training).
"""
from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402
import triton.testing  # noqa: E402

import kernels  # noqa: E402
import kernels.infllm_v2.attention as attn  # noqa: E402
from kernels.dense import dense_attn_varlen  # noqa: E402

CFG = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=2048, topk=64)
MIXES = {
    "mixed": [3000, 7000, 9000, 13000, 768],          # 32768 tokens: one doc each below / inside / above
    "short": [4096] * 8,                               # every doc <= k_eff*B: old rule dense, new rule sparse
    "mid": [7500] * 4 + [2768],                        # every doc but one in (6144, 8192): the dense path itself
    "many": [512] * 64,                                # many short docs (max < dense_len: infllm/attention.py
    "many-mixed": [256] * 32 + [1024] * 24,            # sends such rows to dense_attn_varlen, the "sdpa" row)
    "one32k": [32768],                                 # the dense arm / eval at 32k: one long document
    "4x8k": [8192] * 4,
}
# --backends: H_q, H_kv, d of the shapes timed.
SHAPES = {"smollm2": (9, 3, 64), "llama3": (32, 8, 128), "minicpm4": (32, 2, 128)}


def _inputs(lens, hq=9, hkv=3, d=64):
    g = torch.Generator(device="cuda").manual_seed(0)
    n = sum(lens)
    mk = lambda h: torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()  # noqa
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return mk(hq), mk(hkv), mk(hkv), cu, max(lens)


def _old_rule(q, k, v, cu, max_len, dense_len):
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        idx = kernels.infllm_v2_select(q.detach(), k.detach(), cu, max_len, impl="triton", **CFG)
    return attn.block_sparse_attn_triton(q, k, v, idx, cu, max_len, block_size=CFG["block_size"],
                                         softmax_scale=scale, dense_len=dense_len, dense_min=0)


def _variants():
    new = lambda dl: (lambda q, k, v, cu, m: kernels.infllm_v2_attn_varlen(  # noqa: E731
        q, k, v, cu, m, dense_len=dl, impl="triton", **CFG))
    yield "sdpa", {}, lambda q, k, v, cu, m: dense_attn_varlen(q, k, v, cu, m, backend="sdpa")
    yield "sparse", {}, new(-1)
    yield "dense8192-old", {}, lambda q, k, v, cu, m: _old_rule(q, k, v, cu, m, 8192)
    yield "dense8192", {}, new(8192)
    yield "dense8192-rows128", {"dense_rows": 128}, new(8192)
    yield "dense8192-w8s3", {"dense": {64: (8, 3), 128: (8, 2)}}, new(8192)
    yield "dense8192-rows128-w8s3", {"dense_rows": 128, "dense": {64: (8, 3), 128: (8, 2)}}, new(8192)


def _dense_backends():
    """(name, TUNING overrides, fn) of every dense path of kernels.dense, and SDPA cuDNN over one row per document
    (equal lengths only) as the dense baseline of bench/kernels.py."""
    import kernels.dense as dense

    call = lambda backend: (lambda q, k, v, cu, m: dense_attn_varlen(q, k, v, cu, m, backend=backend))  # noqa
    if dense._flash_varlen() is not None:
        yield "flash", {}, call("flash")
    if dense._torch_varlen() is not None:
        yield "torch_varlen", {}, call("torch_varlen")
    yield "triton", {}, call("triton")
    yield "triton-b128", {"dense_block": 128}, call("triton")
    yield "triton-rows128", {"dense_rows": 128}, call("triton")
    yield "sdpa", {}, call("sdpa")

    def cudnn_rows(q, k, v, cu, m):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        rows, g = q.shape[0] // m, q.shape[1] // k.shape[1]
        bhtd = lambda x: x.view(rows, m, x.shape[1], x.shape[2]).transpose(1, 2)  # noqa: E731
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = torch.nn.functional.scaled_dot_product_attention(
                bhtd(q), bhtd(k.repeat_interleave(g, 1)), bhtd(v.repeat_interleave(g, 1)), is_causal=True)
        return out.transpose(1, 2).reshape(q.shape)
    yield "sdpa-cudnn-rows", {}, cudnn_rows


def backends_table(args):
    """Every dense backend on each (shape, mix), fwd and fwd+bwd, in one run; JSON to --out."""
    import json

    results = []
    tuned = dict(attn.TUNING)
    for shape in args.shapes.split(","):
        for mix in args.mixes.split(","):
            lens = MIXES[mix]
            q, k, v, cu, m = _inputs(lens, *SHAPES[shape])
            print(f"\n## {shape} {mix}: docs {lens[:6]}{'...' if len(lens) > 6 else ''}")
            print("| backend | fwd ms | fwd+bwd ms |\n|---|---:|---:|")
            for name, tuning, fn in _dense_backends():
                if name == "sdpa-cudnn-rows" and len(set(lens)) != 1:
                    continue
                attn.TUNING.update(tuning)
                row = dict(shape=shape, mix=mix, lens=lens, backend=name)
                try:
                    row["fwd_ms"] = _bench(fn, q, k, v, cu, m, backward=False)
                    row["fwd_bwd_ms"] = _bench(fn, q, k, v, cu, m)
                    print(f"| {name} | {row['fwd_ms']:.2f} | {row['fwd_bwd_ms']:.2f} |", flush=True)
                except Exception as exc:  # keep the table going
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(f"| {name} | error: {row['error'][:200]} | |", flush=True)
                finally:
                    attn.TUNING.clear()
                    attn.TUNING.update(tuned)
                results.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           rows=results), fh, indent=1)


def _bench(fn, q, k, v, cu, m, backward=True):
    grad = torch.randn_like(q)

    def step():
        out = fn(q, k, v, cu, m)
        if backward:
            out.backward(grad)
    return triton.testing.do_bench(step, warmup=3, rep=25, grad_to_none=[q, k, v])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--mixes", default="mixed,short,mid")
    ap.add_argument("--variants", default="", help="comma-separated names (default: all)")
    ap.add_argument("--backends", action="store_true", help="time every dense backend of kernels.dense instead")
    ap.add_argument("--shapes", default="smollm2,llama3", help="with --backends: " + ", ".join(SHAPES))
    ap.add_argument("--out", default="", help="with --backends: JSON path")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.backends:
        return backends_table(args)
    saved = {key: attn.TUNING[key] for key in ("dense_rows", "dense")}
    for mix in args.mixes.split(","):
        lens = MIXES[mix]
        q, k, v, cu, m = _inputs(lens)
        print(f"\n## {mix}: docs {lens}")
        print("| variant | fwd ms | fwd+bwd ms |\n|---|---:|---:|")
        for name, tuning, fn in _variants():
            if args.variants and name not in args.variants.split(","):
                continue
            attn.TUNING.update(tuning)
            try:
                fwd = _bench(fn, q, k, v, cu, m, backward=False)
                both = _bench(fn, q, k, v, cu, m)
                print(f"| {name} | {fwd:.2f} | {both:.2f} |", flush=True)
            except Exception as exc:  # keep the table going
                print(f"| {name} | error: {type(exc).__name__}: {str(exc)[:200]} | |", flush=True)
            finally:
                attn.TUNING.update(saved)
        if args.profile and mix == "mid":
            from torch.profiler import ProfilerActivity, profile
            for name, _, fn in _variants():
                if name not in ("sparse", "dense8192-old", "dense8192"):
                    continue
                grad = torch.randn_like(q)
                fn(q, k, v, cu, m).backward(grad)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        fn(q, k, v, cu, m).backward(grad)
                    torch.cuda.synchronize()
                print(f"\n### {mix} / {name}: GPU time per call by kernel (ms, 3 calls averaged)")
                rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]
                for e in rows:
                    print(f"  {e.device_time_total / 3e3:8.2f}  x{e.count // 3:<3d} {e.key[:70]}")


if __name__ == "__main__":
    main()
