"""Loader throughput from prepared shards: tokens/s of `next(loader)` (packing, bucket mixing, tensors), one
process, the embedded stdlib corpus tokenized with the embedded SmolLM2 tokenizer (prepared once in the cache;
the first run pays the tokenization, reported separately).

    python bench/loader.py                                   # seq_len 4k / 32k / 128k, batch 1 and 4
    python bench/loader.py --seq-len 32768 --batch 1 --seconds 5 --json outputs/bench/loader.json
"""
from __future__ import annotations

import os
import sys

# Run as a script, bench/ would come first on sys.path, where its modules shadow real ones (select, kernels):
# put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

from data import DataConfig, build_train_loader  # noqa: E402


def measure(cfg: DataConfig, tokenizer, seq_len: int, batch: int, seconds: float) -> dict:
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, tokenizer, seq_len=seq_len, micro_batch_size=batch)
    build_s = time.perf_counter() - t0
    for _ in range(3):  # warm the page cache and the permutations
        next(loader)
    n, t0 = 0, time.perf_counter()
    while True:
        next(loader)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 10:
            break
    tokens = n * batch * seq_len
    stats = loader.mix_stats()
    return {"seq_len": seq_len, "batch": batch, "batches": n, "seconds": round(elapsed, 3),
            "tokens_per_s": tokens / elapsed, "ms_per_batch": 1e3 * elapsed / n, "build_s": round(build_s, 3),
            "mix": {k: round(v, 4) for k, v in stats.items() if k.startswith("mix/bucket/")}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--seconds", type=float, default=3.0, help="time per configuration")
    p.add_argument("--cache-dir", default=None, help="prepared shards (default: $INFLLM_CACHE/data)")
    p.add_argument("--json", default="outputs/bench/loader.json", help="where the results go")
    args = p.parse_args()

    from infllm.config import ModelConfig
    from infllm.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    cfg = DataConfig(cache_dir=args.cache_dir, progress=True)
    t0 = time.perf_counter()
    build_train_loader(cfg, tokenizer, seq_len=max(args.seq_len), micro_batch_size=1)
    prepare_s = time.perf_counter() - t0

    rows = [measure(cfg, tokenizer, L, B, args.seconds) for L in args.seq_len for B in args.batch]
    header = f"{'seq_len':>8} {'batch':>5} {'tokens/s':>12} {'ms/batch':>9} {'build s':>8}  bucket mix"
    print(f"\nloader throughput, one process, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus (prepare/load of the corpus: {prepare_s:.1f}s)")
    print(header)
    for r in rows:
        mix = " ".join(f"{k.split('/')[-1]}={v:.2f}" for k, v in r["mix"].items())
        print(f"{r['seq_len']:>8} {r['batch']:>5} {r['tokens_per_s'] / 1e6:>10.1f}M {r['ms_per_batch']:>9.2f} "
              f"{r['build_s']:>8.2f}  {mix}")
    result = {"bench": "loader", "corpus": "stdlib (embedded), SmolLM2 tokenizer", "python": sys.version.split()[0],
              "cpus": os.cpu_count(), "machine": platform.machine(), "prepare_or_load_s": round(prepare_s, 2),
              "date": time.strftime("%Y-%m-%d"), "results": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
