"""Steady-state tokens/s of one training step: dense attention against InfLLM-V2, random weights, one GPU.

    python3 bench/train_step.py                                   # every model x length x arm (H200: minutes)
    python3 bench/train_step.py --models llama3-8b-slice --seqs 32768 --arms dense,infllm96 --steps 20

Models (random weights, fp32 master weights, bf16 autocast, gradient checkpointing, fused AdamW, the project's
loss as the trainer resolves it): "llama3-8b-slice" = 8 decoder layers of Llama-3-8B (hidden 4096, MLP 14336,
32 / 8 heads of d 128, rope_theta 5e5) with SmolLM2's 49152-token vocabulary (the embedded tokenizer; Llama-3's
128k vocabulary would add ~1 GFLOP per token to every arm alike); "smollm2" = SmolLM2-135M's architecture
(conf/model/smollm2_random.yaml: 30 layers, 9 / 3 heads of d 64).
Arms (infllm/attention.py's swap, as train.py applies it): "dense" (attention.name=dense: one document per row
runs SDPA with the KV heads repeated), "dense-varlen" (the same batch given as packed documents, so it runs
kernels.dense_attn_varlen's "auto" backend), "infllm96" (the paper's training setting: topk 64 + 2048-token
window, k_eff 96), "infllm64" (topk 64, no window); block 64, kernels 32 / 16, dense_len 8192 (no document is
dense). Batch: one row of seq_len tokens, one document, random token ids.
Timing: CUDA-synchronised wall time of forward + backward + optimizer step, after --warmup steps; a step during
which Triton compiled a kernel (counted by triton's jit_post_compile_hook) is excluded and replaced, up to
--steps clean steps. Reported: median step time, tokens/s, compiles seen in warm-up and in the timed loop.
Needs the project's Python dependencies (hydra-core and omegaconf, through infllm.config); on a machine without
them, unpack the wheels of .whl/ onto PYTHONPATH (`python -m zipfile -e W /tmp/whl` for each, pure Python).
`--smoke` runs the tiny model on the CPU with the reference kernels (checks the script only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402

MODELS = {
    "llama3-8b-slice": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                            rms_norm_eps=1e-5, tie_word_embeddings=False, vocab_size=49152),
    "smollm2": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=49152),
    # --smoke: checks the script on the CPU (the Triton kernels under the interpreter would be too slow).
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512),
}
SPARSE = dict(name="infllm_v2", block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, dense_len=8192)
ARMS = {
    "dense": dict(name="dense"),
    "dense-varlen": dict(name="dense"),
    "infllm96": dict(SPARSE, topk=64, window_size=2048),
    "infllm64": dict(SPARSE, topk=64, window_size=0),
}


class CompileCounter:
    """Counts Triton kernel compilations (cache misses) through triton's post-compile hook."""

    def __init__(self):
        import triton

        self.n = 0
        self._knobs = triton.knobs.runtime
        self._prev = self._knobs.jit_post_compile_hook
        self._knobs.jit_post_compile_hook = self._hook

    def _hook(self, *args, **kwargs):
        self.n += 1
        return False

    def close(self):
        self._knobs.jit_post_compile_hook = self._prev


def build(model_name: str, arm: str, seq_len: int, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    from infllm.attention import apply_attention
    from infllm.config import AttentionConfig
    from infllm.loss import apply_loss

    arch = dict(MODELS[model_name])
    config = AutoConfig.for_model(arch.pop("model_type"), max_position_embeddings=seq_len, **arch)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = apply_attention(model, AttentionConfig(**ARMS[arm]))
    loss = apply_loss(model, types.SimpleNamespace(loss="auto", loss_chunk_tokens=0), device.type)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    return model, opt, loss


def run_one(model_name, arm, seq_len, args, device):
    model, opt, loss_kind = build(model_name, arm, seq_len, device)
    gen = torch.Generator(device=device).manual_seed(1)
    kwargs = {}
    if arm == "dense-varlen":
        cu = torch.tensor([0, seq_len], dtype=torch.int32, device=device)
        kwargs.update(position_ids=torch.arange(seq_len, device=device)[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=seq_len, max_length_k=seq_len)

    def step():
        # A new batch every step (drawn on the device), so the loss does not fall by memorising one batch.
        ids = torch.randint(0, MODELS[model_name]["vocab_size"], (1, seq_len), device=device, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids, **kwargs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    counter = CompileCounter()
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step()
        sync()
        warm_compiles = counter.n
        times, excluded, loss = [], 0, None
        while len(times) < args.steps and excluded <= args.max_excluded:
            before = counter.n
            t0 = time.perf_counter()
            loss = step()
            sync()
            dt = time.perf_counter() - t0
            if counter.n != before:
                excluded += 1
                continue
            times.append(dt)
        row = dict(model=model_name, arm=arm, seq_len=seq_len, steps=len(times), warmup=args.warmup,
                   loss_impl=loss_kind, compiles_warmup=warm_compiles, compiles_timed=counter.n - warm_compiles,
                   steps_excluded=excluded, step_s=statistics.median(times), step_s_mean=statistics.fmean(times),
                   step_s_min=min(times), step_s_max=max(times), tokens_per_s=seq_len / statistics.median(times),
                   peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
                   last_loss=float(loss))
    finally:
        counter.close()
        del model, opt
        if cuda:
            torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seqs", default="32768,65536")
    ap.add_argument("--arms", default="dense,infllm96,infllm64")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (compile-free) per case")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-excluded", type=int, default=5, help="stop replacing steps with compiles after this")
    ap.add_argument("--out", default="", help="JSON path (default: $OUT/train_step.json)")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, reference kernels")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        args.models, args.seqs = "tiny", "256"
        ARMS.update({name: dict(cfg, impl="naive") for name, cfg in ARMS.items() if name.startswith("infllm")})
    out = args.out or os.path.join(os.environ.get("OUT", "."), "train_step.json")
    meta = dict(device="cpu" if args.smoke else torch.cuda.get_device_name(), torch=torch.__version__,
                argv=sys.argv[1:], time=time.strftime("%Y-%m-%d %H:%M:%S"))
    rows = []
    for model_name in args.models.split(","):
        for seq_len in (int(s) for s in args.seqs.split(",")):
            for arm in args.arms.split(","):
                t0 = time.time()
                try:
                    row = run_one(model_name, arm, seq_len, args, device)
                except Exception as exc:  # a failing case (OOM) is a row, the others go on
                    row = dict(model=model_name, arm=arm, seq_len=seq_len, error=f"{type(exc).__name__}: {exc}"[:500])
                    if not args.smoke:
                        torch.cuda.empty_cache()
                row["wall_s"] = time.time() - t0
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(out, "w") as fh:
                    json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print("\n| model | seq | arm | step s | tokens/s | x dense | peak GiB | compiles (warm-up / timed, excluded) |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['seq_len']} | {r['arm']} | error: {r['error'][:80]} | | | | |")
            continue
        dense = [d for d in rows if d.get("arm") == "dense" and d["model"] == r["model"]
                 and d["seq_len"] == r["seq_len"] and "error" not in d]
        x = r["tokens_per_s"] / dense[0]["tokens_per_s"] if dense else float("nan")
        print(f"| {r['model']} | {r['seq_len']} | {r['arm']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{x:.2f} | {r['peak_gib']:.1f} | {r['compiles_warmup']} / {r['compiles_timed']}, "
              f"{r['steps_excluded']} |")


if __name__ == "__main__":
    main()
