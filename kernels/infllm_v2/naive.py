"""Pure-PyTorch reference of InfLLM-V2 attention (README.md beside it, steps 1-9), literal and readable.

Computation runs in fp32 (fp64 when the inputs are fp64, so autograd.gradcheck can use it) and the result is
cast back to q's dtype. It loops over documents and KV heads and chunks over query tokens so that selection
at T = 16k and masked-dense attention at T = 16k both fit in memory.

Legend: N packed tokens, T tokens of one document, H_q / H_kv heads, G = H_q / H_kv, d head dim,
NC fine kernels, NC2 coarse kernels, NB key blocks of the document, K = k_eff = topk + window_size / block_size.
Index conventions: token t, kernel j, block b are 0-based and relative to the document start.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.infllm_v2._validate import (
    SparseConfig,
    check_block_idx,
    check_block_idx_values,
    check_block_size,
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_dense_len,
    check_max_seqlen,
    check_qk,
    check_qkv,
    check_sparse_config,
    check_tail_qkv,
    resolve_softmax_scale,
)

# Upper bound on the elements of one [G, T_chunk, columns] fp32 intermediate (64 MiB).
_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _query_chunks(n_queries: int, n_heads: int, n_columns: int):
    """Ranges [t0, t1) of query tokens whose [n_heads, t1 - t0, n_columns] tensor stays under the budget."""
    step = max(1, _CHUNK_ELEMENTS // max(1, n_heads * n_columns))
    for t0 in range(0, n_queries, step):
        yield t0, min(n_queries, t0 + step)


def n_kernels(seq_len: int, kernel_size: int, kernel_stride: int) -> int:
    """NC = floor((T - l) / s) + 1, or 0 when the document is shorter than one kernel."""
    return 0 if seq_len < kernel_size else (seq_len - kernel_size) // kernel_stride + 1


def compress_keys(k_THD: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Step 1: Kc[j] = mean(K[j*s : j*s + l]) per KV head. Returns [H, NC, d] in the compute dtype."""
    seq_len, n_heads, head_dim = k_THD.shape
    nc = n_kernels(seq_len, kernel_size, kernel_stride)
    if nc == 0:
        return k_THD.new_zeros((n_heads, 0, head_dim), dtype=_compute_dtype(k_THD))
    # unfold: [NC, H, d, l], window j covers tokens j*s .. j*s + l - 1.
    windows = k_THD.to(_compute_dtype(k_THD)).unfold(0, kernel_size, kernel_stride)
    return windows.mean(dim=-1).permute(1, 0, 2).contiguous()


def kernel_visibility(t_T: torch.Tensor, nc: int, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Step 2: [T, NC] bool, kernel j usable by token t iff its last token j*s + l - 1 <= t."""
    last_token_NC = torch.arange(nc, device=t_T.device) * kernel_stride + kernel_size - 1
    return last_token_NC[None, :] <= t_T[:, None]


def block_kernel_table(n_blocks: int, nc: int, cfg: SparseConfig, device) -> torch.Tensor:
    """Step 5's pooling window: [NB, W] kernel ids whose span [j*s, j*s + l) overlaps block b's span
    [b*B, (b+1)*B); unused slots hold NC (an always -inf column appended by the caller).

    Overlap <=> j*s < (b+1)*B and j*s + l > b*B, so j runs from floor((b*B - l) / s) + 1 to
    floor(((b+1)*B - 1) / s), clipped to [0, NC). With B=64, l=32, s=16 that is 4b-1 .. 4b+3.
    """
    B, l, s = cfg.block_size, cfg.kernel_size, cfg.kernel_stride
    b = torch.arange(n_blocks, device=device)
    first_j = torch.div(b * B - l, s, rounding_mode="floor") + 1
    last_j = torch.div((b + 1) * B - 1, s, rounding_mode="floor")
    first_j = first_j.clamp(min=0)
    last_j = last_j.clamp(max=nc - 1)
    # last - first + 1 <= ceil((B + l - 1) / s) for every b.
    width = (B + l - 2) // s + 1
    table = first_j[:, None] + torch.arange(width, device=device)[None, :]
    return torch.where(table <= last_j[:, None], table, torch.full_like(table, nc))


def block_scores_doc(q_THD: torch.Tensor, k_THD: torch.Tensor, cfg: SparseConfig, scale: float,
                     lse_approx: bool, q_offset: int = 0) -> torch.Tensor:
    """Steps 1-5 for one document: the block scores [H_kv, L, NB] (compute dtype), -inf where block b has no
    visible overlapping kernel. Forced and future blocks are not applied here (see `select_doc`).
    q holds L queries at positions q_offset .. q_offset + L - 1 of the document whose T keys k holds
    (q_offset = 0, L = T: every token; q_offset = T - L: the newest tokens of a KV cache)."""
    n_q, h_q, _ = q_THD.shape
    seq_len, h_kv = k_THD.shape[0], k_THD.shape[1]
    group = h_q // h_kv
    n_blocks = -(-seq_len // cfg.block_size)
    dtype = _compute_dtype(q_THD)
    l, s = cfg.kernel_size, cfg.kernel_stride

    kc_HCD = compress_keys(k_THD, l, s)
    nc = kc_HCD.shape[1]
    # The coarse kernels of lse_approx: length 4l, stride 4s, each the mean of K over its own span.
    kc2_HCD = compress_keys(k_THD, 4 * l, 4 * s) if lse_approx else kc_HCD[:, :0]
    nc2 = kc2_HCD.shape[1]
    table_BW = block_kernel_table(n_blocks, nc, cfg, q_THD.device)

    scores_HTB = torch.full((h_kv, n_q, n_blocks), float("-inf"), dtype=dtype, device=q_THD.device)
    if nc == 0:
        return scores_HTB
    q_all = q_THD.to(dtype)
    for g in range(h_kv):
        for t0, t1 in _query_chunks(n_q, group, nc + nc2):
            t_T = torch.arange(t0 + q_offset, t1 + q_offset, device=q_THD.device)
            # Folding the scale into q keeps the [G, T, NC] products cheaper; same math.
            q_GTD = scale * q_all[t0:t1, g * group:(g + 1) * group].transpose(0, 1)
            # Only kernels complete by the chunk's last token can be visible to any token of the chunk.
            nc_chunk = n_kernels(t1 + q_offset, l, s)
            nc2_chunk = n_kernels(t1 + q_offset, 4 * l, 4 * s) if nc2 > 0 else 0
            score_TC = q_GTD.new_full((t1 - t0, nc + 1), float("-inf"))
            if nc_chunk == 0:
                continue

            # Step 3: per-head probabilities over the visible kernels.
            visible_TC = kernel_visibility(t_T, nc_chunk, l, s)
            logits_GTC = (q_GTD @ kc_HCD[g, :nc_chunk].T).masked_fill(~visible_TC, float("-inf"))
            if nc2_chunk > 0:
                visible2_TC = kernel_visibility(t_T, nc2_chunk, 4 * l, 4 * s)
                logits2_GTC = (q_GTD @ kc2_HCD[g, :nc2_chunk].T).masked_fill(~visible2_TC, float("-inf"))
                lse_GT = torch.logsumexp(logits2_GTC, dim=-1)
                # Before the first coarse kernel completes, the exact normaliser.
                has_coarse_T = visible2_TC.any(dim=-1)
                if not bool(has_coarse_T.all()):
                    lse_GT = torch.where(has_coarse_T, lse_GT, torch.logsumexp(logits_GTC, dim=-1))
            else:
                lse_GT = torch.logsumexp(logits_GTC, dim=-1)
            # Tokens with no visible kernel have lse = -inf; the where zeroes their row.
            p_GTC = torch.where(visible_TC, torch.exp(logits_GTC - lse_GT[..., None]), 0.0)

            # Step 4: group score; -inf marks kernels the token cannot see.
            score_TC[:, :nc_chunk] = p_GTC.sum(dim=0).masked_fill(~visible_TC, float("-inf"))

            # Step 5: block score = max over the visible kernels overlapping the block (column nc is -inf).
            scores_HTB[g, t0:t1] = score_TC[:, table_BW].amax(dim=-1)
    return scores_HTB


def select_from_scores(scores_HTB: torch.Tensor, t_T: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Steps 6-7 from the block scores [H_kv, L, NB] of the queries at positions t_T: int64 [H_kv, L, k_top]
    block ids (k_top = min(k_eff, NB)), ascending, padded with -1."""
    n_blocks = scores_HTB.shape[-1]
    device = scores_HTB.device
    k_eff = cfg.k_eff
    # Step 6: forced and forbidden blocks.
    c_T = t_T // cfg.block_size
    b_B = torch.arange(n_blocks, device=device)
    future_TB = b_B[None, :] > c_T[:, None]
    local_TB = (b_B[None, :] >= c_T[:, None] - cfg.n_local) & ~future_TB
    forced_TB = ((b_B[None, :] < cfg.init_blocks) & ~future_TB) | local_TB
    # A past block with no visible kernel still counts as a candidate, below every scored block
    # (scores are sums of probabilities, so >= 0).
    key_HTB = scores_HTB.masked_fill(scores_HTB == float("-inf"), -1.0)
    key_HTB = key_HTB.masked_fill(forced_TB, float("inf")).masked_fill(future_TB, float("-inf"))

    # Step 7: the k_eff best of [0, c]; every candidate when c + 1 <= k_eff.
    k_top = min(k_eff, n_blocks)
    top_HTK = key_HTB.topk(k_top, dim=-1, sorted=True).indices
    n_selected_T = torch.clamp(c_T + 1, max=k_eff)
    keep_TK = torch.arange(k_top, device=device)[None, :] < n_selected_T[:, None]
    # Dropped slots sort to the end as n_blocks, then become the -1 padding.
    top_HTK = torch.where(keep_TK, top_HTK, n_blocks).sort(dim=-1).values
    return torch.where(top_HTK == n_blocks, -1, top_HTK)


def select_doc(q_THD: torch.Tensor, k_THD: torch.Tensor, cfg: SparseConfig, scale: float,
               lse_approx: bool, q_offset: int = 0) -> torch.Tensor:
    """Steps 1-7 for one document: int32 [H_kv, L, K] block ids, ascending, padded with -1 (queries at
    q_offset .. q_offset + L - 1, as in `block_scores_doc`)."""
    n_q = q_THD.shape[0]
    device = q_THD.device
    k_eff = cfg.k_eff
    scores_HTB = block_scores_doc(q_THD, k_THD, cfg, scale, lse_approx, q_offset)
    h_kv = scores_HTB.shape[0]
    top_HTK = select_from_scores(scores_HTB, torch.arange(n_q, device=device) + q_offset, cfg)
    k_top = top_HTK.shape[-1]
    out = torch.full((h_kv, n_q, k_eff), -1, dtype=torch.int32, device=device)
    out[..., :k_top] = top_HTK.to(torch.int32)
    return out


def masked_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim (-inf = masked) that leaves fully masked rows at zero instead of NaN."""
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, 1.0)


def attend_doc(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, block_idx_HTK: torch.Tensor | None,
               block_size: int, scale: float, q_offset: int = 0) -> torch.Tensor:
    """Step 8 for one document: softmax over keys u <= t in the blocks of I(t) (every block when
    block_idx_HTK is None: dense causal). Returns [L, H_q, d] in the compute dtype (queries at q_offset ..
    q_offset + L - 1, as in `block_scores_doc`). A token with no allowed key (possible only with a hand-made
    block_idx) gets a zero output."""
    n_q, h_q, _ = q_THD.shape
    seq_len, h_kv = k_THD.shape[0], k_THD.shape[1]
    group = h_q // h_kv
    n_blocks = -(-seq_len // block_size)
    device = q_THD.device
    dtype = _compute_dtype(q_THD)
    q_c, k_c, v_c = q_THD.to(dtype), k_THD.to(dtype), v_THD.to(dtype)
    block_of_u = torch.arange(seq_len, device=device) // block_size

    if block_idx_HTK is None:
        allowed_HTB = torch.ones((h_kv, n_q, n_blocks), dtype=torch.bool, device=device)
    else:
        # Scatter the selected ids into a [H_kv, T, NB] mask; -1 padding goes to a spare column.
        ids = block_idx_HTK.long()
        ids = torch.where(ids < 0, n_blocks, ids)
        allowed_HTB = torch.zeros((h_kv, n_q, n_blocks + 1), dtype=torch.bool, device=device)
        allowed_HTB.scatter_(2, ids, True)
        allowed_HTB = allowed_HTB[..., :n_blocks]

    out_heads = []
    for g in range(h_kv):
        k_UD, v_UD = k_c[:, g], v_c[:, g]
        chunks = []
        for t0, t1 in _query_chunks(n_q, group, seq_len):
            t_T = torch.arange(t0 + q_offset, t1 + q_offset, device=device)
            q_GTD = q_c[t0:t1, g * group:(g + 1) * group].transpose(0, 1)
            # Keys after the chunk's last token are masked for every row of it: leave them out.
            u_end = t1 + q_offset
            u_U = torch.arange(u_end, device=device)
            mask_TU = allowed_HTB[g, t0:t1][:, block_of_u[:u_end]] & (u_U[None, :] <= t_T[:, None])
            if bool(mask_TU.any(dim=-1).all()):
                # The same masked softmax through SDPA's fused CPU/GPU kernels (much faster, also in the
                # backward); the explicit form below is kept for rows with no allowed key.
                k_GUD = k_UD[:u_end].expand(group, u_end, k_UD.shape[-1])
                v_GUD = v_UD[:u_end].expand(group, u_end, v_UD.shape[-1])
                out_GTD = F.scaled_dot_product_attention(q_GTD[None], k_GUD[None], v_GUD[None],
                                                         attn_mask=mask_TU, scale=scale)[0]
                chunks.append(out_GTD.transpose(0, 1))
                continue
            logits_GTU = (scale * q_GTD @ k_UD[:u_end].T).masked_fill(~mask_TU, float("-inf"))
            probs_GTU = masked_softmax(logits_GTU)
            chunks.append((probs_GTU @ v_UD[:u_end]).transpose(0, 1))  # [T_chunk, G, d]
        out_heads.append(torch.cat(chunks, dim=0) if chunks else q_c.new_zeros((0, group, q_c.shape[-1])))
    return torch.cat(out_heads, dim=1)


def infllm_v2_select_naive(q, k, cu_seqlens, max_seqlen, *, block_size=64, kernel_size=32, kernel_stride=16,
                           init_blocks=1, window_size=2048, topk=64, lse_approx=True, softmax_scale=None):
    """Block selection (steps 1-7). Returns int32 [H_kv, N, k_eff]: per query token the ids of its selected
    blocks relative to its document start, ascending, padded with -1. No gradient."""
    n, _, h_kv, d = check_qk(q, k)
    cfg = check_sparse_config(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk)
    check_cu_seqlens(cu_seqlens, q.device)
    bounds = check_cu_seqlens_values(cu_seqlens, n, check_max_seqlen(max_seqlen))
    scale = resolve_softmax_scale(softmax_scale, d)
    out = torch.full((h_kv, n, cfg.k_eff), -1, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        for start, end in zip(bounds, bounds[1:]):
            if end > start:
                out[:, start:end] = select_doc(q[start:end], k[start:end], cfg, scale, lse_approx)
    return out


def block_sparse_attn_naive(q, k, v, block_idx, cu_seqlens, max_seqlen, *, block_size=64, softmax_scale=None):
    """Attention restricted to the given blocks (step 8): out[t] attends keys u <= t of its document whose
    block u // block_size is listed in block_idx[:, t] (-1 entries ignored). [N, H_q, d], q's dtype."""
    n, _, h_kv, d = check_qkv(q, k, v)
    check_block_size(block_size)
    check_cu_seqlens(cu_seqlens, q.device)
    check_block_idx(block_idx, h_kv, n, q.device)
    bounds = check_cu_seqlens_values(cu_seqlens, n, check_max_seqlen(max_seqlen))
    check_block_idx_values(block_idx, bounds, block_size)
    scale = resolve_softmax_scale(softmax_scale, d)
    docs = [
        attend_doc(q[a:b], k[a:b], v[a:b], block_idx[:, a:b], block_size, scale)
        for a, b in zip(bounds, bounds[1:])
    ]
    return torch.cat(docs, dim=0).to(q.dtype)


def infllm_v2_attn_varlen_naive(q, k, v, cu_seqlens, max_seqlen, *, block_size=64, kernel_size=32,
                                kernel_stride=16, init_blocks=1, window_size=2048, topk=64, dense_len=8192,
                                lse_approx=True, softmax_scale=None, select_q=None):
    """InfLLM-V2 attention (steps 1-9): documents shorter than dense_len attend densely and causally, the
    others attend their selected blocks. [N, H_q, d], q's dtype, differentiable in q, k, v. `select_q`: the
    queries the selection scores with when not q (whole groups of k's heads; see infllm_v2_attn_varlen)."""
    n, _, _, d = check_qkv(q, k, v)
    cfg = check_sparse_config(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk)
    check_dense_len(dense_len)
    check_cu_seqlens(cu_seqlens, q.device)
    bounds = check_cu_seqlens_values(cu_seqlens, n, check_max_seqlen(max_seqlen))
    scale = resolve_softmax_scale(softmax_scale, d)
    docs = []
    for start, end in zip(bounds, bounds[1:]):
        q_doc, k_doc, v_doc = q[start:end], k[start:end], v[start:end]
        if dense_len != -1 and end - start < dense_len:
            idx_doc = None
        else:
            with torch.no_grad():
                scoring_q = q_doc if select_q is None else select_q[start:end]
                idx_doc = select_doc(scoring_q.detach(), k_doc.detach(), cfg, scale, lse_approx)
        docs.append(attend_doc(q_doc, k_doc, v_doc, idx_doc, block_size, scale))
    return torch.cat(docs, dim=0).to(q.dtype)


def infllm_v2_attn_tail_naive(q, k, v, *, block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1,
                              window_size=2048, topk=64, dense_len=8192, lse_approx=True, softmax_scale=None):
    """InfLLM-V2 attention of the newest L tokens of one document over all its T keys (a KV cache: decode steps
    and chunked prefill). q [L, H_q, d] holds the queries of positions T - L .. T - 1, k / v [T, H_kv, d] the
    document's keys so far. Each query selects and attends exactly as it would inside the whole document's
    `infllm_v2_attn_varlen` (the same steps 1-9, the same selection); the document is dense while
    T < dense_len (T: its length so far). [L, H_q, d], q's dtype."""
    n_q, seq_len, h_q, h_kv, d = check_tail_qkv(q, k, v)
    cfg = check_sparse_config(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk)
    check_dense_len(dense_len)
    scale = resolve_softmax_scale(softmax_scale, d)
    offset = seq_len - n_q
    if dense_len != -1 and seq_len < dense_len:
        idx = None
    else:
        with torch.no_grad():
            idx = select_doc(q.detach(), k.detach(), cfg, scale, lse_approx, offset)
    return attend_doc(q, k, v, idx, block_size, scale, offset).to(q.dtype)
