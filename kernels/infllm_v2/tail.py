"""InfLLM-V2 for the newest tokens of one document over its KV cache (decode steps, short prefill chunks).

`naive.infllm_v2_attn_tail_naive` is the literal reference (loops over KV heads and query chunks, host reads).
This is the same math for a few queries at once, batched over every head and query with no host read, so that a
decode step costs a fixed handful of kernels per layer on the GPU: steps 1-7 (compressed keys, visible kernels,
per-head probabilities, group sum, block pooling, forced blocks, top-k) and step 8 over the k_eff selected
blocks only (their keys gathered, [H_kv, L, k_eff * B, d]). Legend as in naive.py; L new queries at positions
T - L .. T - 1 of a T-token document.
"""
from __future__ import annotations

import torch

from kernels.infllm_v2._validate import check_dense_len, check_sparse_config, check_tail_qkv, resolve_softmax_scale
from kernels.infllm_v2.naive import (
    _compute_dtype,
    block_kernel_table,
    compress_keys,
    infllm_v2_attn_tail_naive,
    kernel_visibility,
    masked_softmax,
    select_from_scores,
)

# Queries per call up to which the batched form runs; above it (a long prefill chunk) the reference's chunked
# loops keep the [H_q, L, NC] intermediates bounded.
BATCHED_MAX_QUERIES = 64


def _select(q_KGLD, k_THD, cfg, lse_approx: bool, t_L: torch.Tensor) -> torch.Tensor:
    """Steps 1-7 batched: int64 [H_kv, L, k_top] selected block ids (ascending, -1 padded). q is pre-scaled."""
    seq_len = k_THD.shape[0]
    l, s = cfg.kernel_size, cfg.kernel_stride
    n_blocks = -(-seq_len // cfg.block_size)
    kc_KCD = compress_keys(k_THD, l, s)
    nc = kc_KCD.shape[1]
    h_kv, _, n_q, _ = q_KGLD.shape
    if nc == 0:
        scores_KLB = q_KGLD.new_full((h_kv, n_q, n_blocks), float("-inf"))
    else:
        vis_LC = kernel_visibility(t_L, nc, l, s)
        logits = torch.einsum("kgld,kcd->kglc", q_KGLD, kc_KCD).masked_fill(~vis_LC, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        kc2_KCD = compress_keys(k_THD, 4 * l, 4 * s) if lse_approx else kc_KCD[:, :0]
        if kc2_KCD.shape[1] > 0:
            vis2_LC = kernel_visibility(t_L, kc2_KCD.shape[1], 4 * l, 4 * s)
            logits2 = torch.einsum("kgld,kcd->kglc", q_KGLD, kc2_KCD).masked_fill(~vis2_LC, float("-inf"))
            # Before the first coarse kernel completes, the exact normaliser (as the reference).
            lse = torch.where(vis2_LC.any(-1), torch.logsumexp(logits2, dim=-1), lse)
        p = torch.where(vis_LC, torch.exp(logits - lse[..., None]), 0.0)
        score_KLC = p.sum(dim=1).masked_fill(~vis_LC, float("-inf"))
        score_KLC = torch.cat([score_KLC, score_KLC.new_full((h_kv, n_q, 1), float("-inf"))], dim=-1)
        table_BW = block_kernel_table(n_blocks, nc, cfg, k_THD.device)
        scores_KLB = score_KLC[..., table_BW].amax(dim=-1)

    return select_from_scores(scores_KLB, t_L, cfg)


def infllm_v2_attn_tail_batched(q, k, v, *, block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1,
                                window_size=2048, topk=64, dense_len=8192, lse_approx=True, softmax_scale=None):
    """Same contract and result as `naive.infllm_v2_attn_tail_naive` (q [L, H_q, d], k / v [T, H_kv, d]), for
    L <= BATCHED_MAX_QUERIES; longer L goes to the reference. [L, H_q, d], q's dtype."""
    n_q, seq_len, h_q, h_kv, d = check_tail_qkv(q, k, v)
    kw = dict(block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride, init_blocks=init_blocks,
              window_size=window_size, topk=topk, dense_len=dense_len, lse_approx=lse_approx,
              softmax_scale=softmax_scale)
    if n_q > BATCHED_MAX_QUERIES:
        return infllm_v2_attn_tail_naive(q, k, v, **kw)
    cfg = check_sparse_config(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk)
    check_dense_len(dense_len)
    scale = resolve_softmax_scale(softmax_scale, d)
    dtype = _compute_dtype(q)
    group = h_q // h_kv
    t_L = torch.arange(seq_len - n_q, seq_len, device=q.device)
    q_KGLD = q.to(dtype).view(n_q, h_kv, group, d).permute(1, 2, 0, 3)
    k_c, v_c = k.to(dtype), v.to(dtype)

    if dense_len != -1 and seq_len < dense_len:
        # Dense causal over the cache.
        logits = torch.einsum("kgld,tkd->kglt", scale * q_KGLD, k_c)
        allowed = torch.arange(seq_len, device=q.device)[None, :] <= t_L[:, None]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        out = torch.einsum("kglt,tkd->lkgd", probs, v_c)
        return out.reshape(n_q, h_q, d).to(q.dtype)

    with torch.no_grad():
        idx_KLS = _select(scale * q_KGLD.detach(), k.detach(), cfg, lse_approx, t_L)
    # Step 8 over the selected blocks: key positions [H_kv, L, S * B], padding and future keys masked.
    u = idx_KLS[..., None] * block_size + torch.arange(block_size, device=q.device)
    u = u.flatten(-2)
    ok = (idx_KLS[..., None] >= 0).expand(*idx_KLS.shape, block_size).flatten(-2) & (u <= t_L[None, :, None])
    u = u.clamp(0, seq_len - 1)
    head = torch.arange(h_kv, device=q.device)[:, None, None]
    k_KLUD, v_KLUD = k_c[u, head], v_c[u, head]
    logits = torch.einsum("kgld,klud->kglu", scale * q_KGLD, k_KLUD).masked_fill(~ok[:, None], float("-inf"))
    out = torch.einsum("kglu,klud->lkgd", masked_softmax(logits), v_KLUD)
    return out.reshape(n_q, h_q, d).to(q.dtype)
