"""Block selections of the real SmolLM2-135M on real long text, stored compactly, for the kernel benchmark.

    .venv/bin/python bench/real_selection.py --record     # CPU: q/k of a few layers at 32k, selections, stats
    python3 bench/kernels.py --cases smollm2-32kx8-64blk-real,...   # times the kernels on them (CUDA)

Recording (CPU is enough: no kernel is timed here): the converted weights (INFLLM_MODEL, default
.cache/infllm-full/models/smollm2-135m-instruct), fp32, two documents of the embedded stdlib corpus (whole
packages, the text training reads) cut to their first 32768 tokens, attention captured after RoPE at LAYERS
(the forward stops after the last of them). Each (text, layer) gives one 32k document; per selection config
("64blk": topk 64, no window; "96blk": topk 64 + 2048 window, the paper's training setting; block 64, kernels
32 / 16, lse_approx) `kernels.infllm_v2_select(impl="naive")` picks the blocks, stored as one bit per (KV head,
token, block), packed and zlib-compressed (neighbouring tokens repeat their rows, so this is small).
Stats per document: how much neighbouring tokens' selections overlap (|S_t & S_t+1| / |S_t|) and the mean
union of 4 / 16 neighbouring tokens' blocks (what the query-tile packing walks), beside the same numbers for
i.i.d. random q/k of the same shape.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEQ = 32768
TEXTS = ("asyncio", "email")
LAYERS = (2, 7, 12, 17)
BLOCK = 64
CONFIGS = {
    "64blk": dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=0, topk=64),
    "96blk": dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=2048, topk=64),
}
DEFAULT_FILE = os.path.join(_HERE, "results", "real_selection_smollm2_32k.npz")


class _Stop(Exception):
    pass


def _texts(tokenizer):
    from data.sources import BadDocuments, read_stdlib_document, stdlib_documents_index

    index = dict(stdlib_documents_index(list(TEXTS)))
    out = {}
    for name in TEXTS:
        ids = tokenizer(read_stdlib_document(index[name], BadDocuments("error", "stdlib")))["input_ids"]
        if len(ids) < SEQ:
            raise SystemExit(f"{name}: only {len(ids)} tokens, need {SEQ}")
        out[name] = ids[:SEQ]
    return out


def capture_qk(model_dir: str):
    """{(text, layer): (q [T, H_q, d], k [T, H_kv, d])} of the real model after RoPE, fp32."""
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import AttentionMaskInterface
    import torch.nn.functional as F

    got = {}
    state = {"text": None}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        if layer in LAYERS:
            got[(state["text"], layer)] = (query[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1).contiguous())
            if layer == max(LAYERS):
                raise _Stop
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2), None

    AttentionInterface.register("capture_qk", attend)
    AttentionMaskInterface.register("capture_qk", lambda *a, **kw: None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="capture_qk")
    model.eval()
    for name, ids in _texts(tok).items():
        state["text"] = name
        t0 = time.time()
        with torch.no_grad():
            try:
                model.model(input_ids=torch.tensor([ids]), use_cache=False)
            except _Stop:
                pass
        print(f"  {name}: layers {LAYERS} captured in {time.time() - t0:.0f} s", flush=True)
    return got, model.config.head_dim ** -0.5


def select(q, k, cfg, scale):
    import kernels

    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    return kernels.infllm_v2_select(q, k, cu, q.shape[0], softmax_scale=scale, impl="naive", **cfg)


def to_bits(block_idx: torch.Tensor, n_blocks: int) -> np.ndarray:
    """int32 [H, T, K] ids (-1 padding) -> uint8 [H, T, n_blocks / 8] packed membership bits."""
    h, t, _ = block_idx.shape
    dense = torch.zeros((h, t, n_blocks + 1), dtype=torch.bool)
    dense.scatter_(-1, torch.where(block_idx >= 0, block_idx, n_blocks).long(), True)
    return np.packbits(dense[..., :n_blocks].numpy(), axis=-1)


def from_bits(bits: np.ndarray, k_slots: int) -> torch.Tensor:
    """Inverse of to_bits: int32 [H, T, k_slots] ascending ids, -1 padded."""
    dense = torch.from_numpy(np.unpackbits(bits, axis=-1).astype(bool))
    n_blocks = dense.shape[-1]
    ids = torch.where(dense, torch.arange(n_blocks), n_blocks + 1)
    ids = ids.sort(dim=-1).values[..., :k_slots]
    return torch.where(ids > n_blocks, -1, ids).to(torch.int32)


def overlap_stats(block_idx: torch.Tensor) -> dict:
    """Neighbour overlap and the mean union sizes of 4 / 16 neighbouring tokens (after the first 64 tokens,
    per KV head, averaged)."""
    h, t, k = block_idx.shape
    n_blocks = int(block_idx.max()) + 1
    dense = torch.zeros((h, t, n_blocks + 1), dtype=torch.bool)
    dense.scatter_(-1, torch.where(block_idx >= 0, block_idx, n_blocks).long(), True)
    dense = dense[..., :n_blocks]
    start = 4096          # past the region where every block is selected anyway (k_eff * B <= 6144)
    a, b = dense[:, start:-1], dense[:, start + 1:]
    share = ((a & b).sum(-1).float() / a.sum(-1).clamp(min=1).float()).mean().item()
    stats = {"neighbour_overlap": share, "mean_selected": a.sum(-1).float().mean().item()}
    for tile in (4, 16):
        usable = (t - start) // tile * tile
        grouped = dense[:, start:start + usable].reshape(h, -1, tile, n_blocks).any(2)
        stats[f"union{tile}"] = grouped.sum(-1).float().mean().item()
    return stats


def record(args):
    import zlib

    model_dir = os.environ.get("INFLLM_MODEL", os.path.join(os.path.dirname(_HERE), ".cache", "infllm-full",
                                                             "models", "smollm2-135m-instruct"))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    qk, scale = capture_qk(model_dir)
    n_blocks = SEQ // BLOCK
    arrays, meta = {}, {"seq": SEQ, "texts": list(TEXTS), "layers": list(LAYERS), "configs": CONFIGS,
                        "model": os.path.basename(model_dir), "docs": [], "stats": {}}
    gen = torch.Generator().manual_seed(0)
    h_q, d = next(iter(qk.values()))[0].shape[1:]
    h_kv = next(iter(qk.values()))[1].shape[1]
    rand_q = torch.randn((SEQ, h_q, d), generator=gen)
    rand_k = torch.randn((SEQ, h_kv, d), generator=gen)
    for name, cfg in CONFIGS.items():
        rows = []
        for (text, layer), (q, k) in sorted(qk.items()):
            idx = select(q, k, cfg, scale)
            rows.append(to_bits(idx, n_blocks))
            meta["stats"][f"{text}-L{layer}-{name}"] = overlap_stats(idx)
            print(f"  {text} L{layer} {name}: {meta['stats'][f'{text}-L{layer}-{name}']}", flush=True)
        bits = np.stack(rows)                                   # [docs, H, T, NB / 8]
        packed = zlib.compress(bits.tobytes(), 9)
        arrays[name] = np.frombuffer(packed, dtype=np.uint8)
        arrays[name + "_shape"] = np.array(bits.shape)
        meta["stats"][f"random-{name}"] = overlap_stats(select(2 * rand_q, rand_k, cfg, scale))
        print(f"  random {name}: {meta['stats'][f'random-{name}']}; {name} packed {len(packed) / 2**20:.1f} MiB",
              flush=True)
    meta["docs"] = [f"{t}-L{l}" for t, l in sorted(qk)]
    meta["seconds"] = time.time() - t0
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(args.file, **arrays)
    print(f"wrote {args.file} ({os.path.getsize(args.file) / 2**20:.1f} MiB) in {meta['seconds']:.0f} s")


def load(name: str, path: str = DEFAULT_FILE):
    """(block_idx int32 [H_kv, docs * T, k_eff], meta) of a recorded config, documents one after another."""
    import zlib

    data = np.load(path)
    meta = json.loads(bytes(data["meta"]).decode())
    shape = tuple(int(x) for x in data[name + "_shape"])
    bits = np.frombuffer(zlib.decompress(bytes(data[name])), dtype=np.uint8).reshape(shape)
    cfg = meta["configs"][name]
    k_eff = cfg["topk"] + cfg["window_size"] // cfg["block_size"]
    docs = [from_bits(bits[i], k_eff) for i in range(shape[0])]
    return torch.cat(docs, dim=1), meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="record q/k on CPU and store the selections")
    ap.add_argument("--file", default=DEFAULT_FILE)
    args = ap.parse_args()
    if args.record:
        record(args)
    else:
        data = np.load(args.file)
        print(json.dumps(json.loads(bytes(data["meta"]).decode())["stats"], indent=1))


if __name__ == "__main__":
    main()
