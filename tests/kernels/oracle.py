"""Independent oracles for the InfLLM-V2 kernels, written from kernels/infllm_v2/README.md separately from
kernels/infllm_v2/naive.py: a float64 brute-force block scorer, a masked-dense attention over the whole packed
batch, and a by-score comparison of selections (so near-ties between blocks never make a test flaky).

Legend: N packed tokens, T one document, H_q / H_kv heads, G = H_q / H_kv, d head dim, NC kernels, NB blocks.
"""
from __future__ import annotations

import math

import torch

# Rank of a past block with no visible kernel: below every real score (sums of probabilities are >= 0)
# and above the -inf of future blocks.
UNSCORED = -1e300


def doc_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    c = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(c[:-1], c[1:]))


def _mean_pool(k_TD: torch.Tensor, length: int, stride: int) -> tuple[torch.Tensor, list[int]]:
    """Kernels of `length` keys every `stride` tokens, one Python iteration per kernel.
    Returns ([NC, d] means, last token of each kernel)."""
    means, last = [], []
    start = 0
    while start + length <= k_TD.shape[0]:
        means.append(k_TD[start:start + length].mean(dim=0))
        last.append(start + length - 1)
        start += stride
    if not means:
        return k_TD.new_zeros((0, k_TD.shape[1])), []
    return torch.stack(means), last


def _softmax_weights(z_HTC: torch.Tensor, visible_TC: torch.Tensor, lse_HT: torch.Tensor) -> torch.Tensor:
    return torch.where(visible_TC, torch.exp(z_HTC - lse_HT[..., None]), torch.zeros_like(z_HTC))


def _masked_lse(z_HTC: torch.Tensor, visible_TC: torch.Tensor) -> torch.Tensor:
    """log sum exp over the visible columns, written out with a max shift; -inf where none is visible."""
    z = torch.where(visible_TC, z_HTC, torch.full_like(z_HTC, -math.inf))
    m = z.max(dim=-1, keepdim=True).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.where(visible_TC, torch.exp(z - m_safe), torch.zeros_like(z)).sum(dim=-1)
    return torch.log(total) + m_safe.squeeze(-1)


def brute_force_block_scores(q, k, cu_seqlens, *, block_size, kernel_size, kernel_stride, lse_approx=True,
                             softmax_scale=None) -> list[torch.Tensor]:
    """Steps 1-5 in float64 for every document: a list (one per document) of [H_kv, T, NB] block scores,
    -inf where a block has no visible overlapping kernel. Forced/future blocks are not applied."""
    h_q, d = q.shape[1], q.shape[2]
    h_kv = k.shape[1]
    group = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    q64, k64 = q.detach().double(), k.detach().double()
    out = []
    for start, end in doc_bounds(cu_seqlens):
        T = end - start
        n_blocks = -(-T // block_size)
        scores = torch.full((h_kv, T, n_blocks), -math.inf, dtype=torch.float64)
        t = torch.arange(T)
        for g in range(h_kv):
            kc, last = _mean_pool(k64[start:end, g], kernel_size, kernel_stride)
            if not last:
                continue
            q_HTD = q64[start:end, g * group:(g + 1) * group].permute(1, 0, 2)
            visible = torch.tensor(last)[None, :] <= t[:, None]  # [T, NC]
            z = scale * torch.einsum("htd,cd->htc", q_HTD, kc)
            lse = _masked_lse(z, visible)
            if lse_approx:
                kc2, last2 = _mean_pool(k64[start:end, g], 4 * kernel_size, 4 * kernel_stride)
                if last2:
                    visible2 = torch.tensor(last2)[None, :] <= t[:, None]
                    lse2 = _masked_lse(scale * torch.einsum("htd,cd->htc", q_HTD, kc2), visible2)
                    lse = torch.where(visible2.any(dim=-1)[None, :], lse2, lse)
            group_score = _softmax_weights(z, visible, lse).sum(dim=0)  # [T, NC]
            group_score = torch.where(visible, group_score, torch.full_like(group_score, -math.inf))
            for b in range(n_blocks):
                lo, hi = b * block_size, (b + 1) * block_size
                # Kernel j spans [j*s, j*s + l); test the interval overlap directly.
                cols = [j for j in range(len(last)) if j * kernel_stride < hi and j * kernel_stride + kernel_size > lo]
                if cols:
                    scores[g, :, b] = group_score[:, cols].max(dim=-1).values
        out.append(scores)
    return out


def selection_ranking(scores_HTB: torch.Tensor, *, block_size, init_blocks, window_size) -> torch.Tensor:
    """Step 6 applied to one document's block scores: +inf for forced blocks, -inf for future ones,
    UNSCORED for past blocks without a visible kernel."""
    h_kv, T, n_blocks = scores_HTB.shape
    c = (torch.arange(T) // block_size)[:, None]
    b = torch.arange(n_blocks)[None, :]
    n_local = window_size // block_size
    rank = torch.where(torch.isneginf(scores_HTB), torch.full_like(scores_HTB, UNSCORED), scores_HTB)
    forced = ((b < init_blocks) | (b >= c - n_local)) & (b <= c)
    rank = torch.where(forced, torch.full_like(rank, math.inf), rank)
    return torch.where(b > c, torch.full_like(rank, -math.inf), rank)


def assert_selection_matches_by_score(idx, ref_scores, cu_seqlens, *, block_size, init_blocks, window_size, topk,
                                      rtol=1e-4, atol=1e-6):
    """Checks a selection `idx` int32 [H_kv, N, k_eff] against float64 reference block scores (the output of
    `brute_force_block_scores`): structure (ascending ids, -1 padding, min(c+1, k_eff) entries, no future block,
    every forced block present) and, per token, that the scores of the selected set sorted descending equal the
    reference's top scores within rtol/atol. Swapping two near-tied blocks therefore passes."""
    n_local = window_size // block_size
    k_eff = topk + n_local
    assert idx.dtype == torch.int32, f"selection dtype {idx.dtype}, expected int32"
    assert idx.shape[-1] == k_eff, f"selection width {idx.shape[-1]}, expected k_eff={k_eff}"
    idx = idx.detach().cpu().long()
    for d_i, ((start, end), scores) in enumerate(zip(doc_bounds(cu_seqlens), ref_scores)):
        T = end - start
        if T == 0:
            continue
        sel = idx[:, start:end]  # [H_kv, T, K]
        c = torch.arange(T) // block_size
        n_sel = torch.clamp(c + 1, max=k_eff)
        valid = sel >= 0
        where = f"document {d_i} (tokens [{start}, {end}))"
        expected_valid = torch.arange(k_eff)[None, None, :] < n_sel[None, :, None]
        bad = valid != expected_valid
        if bad.any():
            g, t, _ = bad.nonzero()[0].tolist()
            raise AssertionError(f"{where}, head {g}, token {t}: expected {int(n_sel[t])} ids then -1, got "
                                 f"{sel[g, t].tolist()}")
        unordered = valid[..., 1:] & (sel[..., 1:] <= sel[..., :-1])
        if unordered.any():
            g, t = unordered.any(-1).nonzero()[0].tolist()
            raise AssertionError(f"{where}, head {g}, token {t}: ids not strictly ascending: {sel[g, t].tolist()}")
        future = valid & (sel > c[None, :, None])
        if future.any():
            g, t, _ = future.nonzero()[0].tolist()
            raise AssertionError(f"{where}, head {g}, token {t}: future block selected (c={int(c[t])}): "
                                 f"{sel[g, t].tolist()}")

        rank = selection_ranking(scores, block_size=block_size, init_blocks=init_blocks, window_size=window_size)
        n_blocks = rank.shape[-1]
        chosen = _chosen(sel, n_blocks)
        missing = torch.isposinf(rank) & ~chosen
        if missing.any():
            g, t, b = missing.nonzero()[0].tolist()
            raise AssertionError(f"{where}, head {g}, token {t}: forced block {b} missing from {sel[g, t].tolist()}")

        got, want = _sorted_scores(chosen, rank)
        keep = torch.arange(rank.shape[-1])[None, None, :] < n_sel[None, :, None]
        same = (got == want) | ((got - want).abs() <= atol + rtol * want.abs())
        wrong = keep & ~same
        if wrong.any():
            g, t, r = wrong.nonzero()[0].tolist()
            n = int(n_sel[t])
            raise AssertionError(
                f"{where}, head {g}, token {t}: selected blocks {sel[g, t, :n].tolist()} have scores "
                f"{got[g, t, :n].tolist()}, the reference's best are {want[g, t, :n].tolist()} (rank {r} differs)"
            )


def _chosen(sel, n_blocks):
    """bool [H_kv, T, NB]: the blocks a selection [H_kv, T, K] lists (padding goes to a spare column)."""
    chosen = torch.zeros(sel.shape[:-1] + (n_blocks + 1,), dtype=torch.bool)
    chosen.scatter_(2, torch.where(sel >= 0, sel, n_blocks), True)
    return chosen[..., :n_blocks]


def _sorted_scores(chosen, rank):
    """Scores of the chosen blocks and the reference's best, each sorted descending: [H_kv, T, NB] twice."""
    got = torch.where(chosen, rank, torch.full_like(rank, -math.inf)).sort(dim=-1, descending=True).values
    return got, rank.sort(dim=-1, descending=True).values


def selection_score_deviation(idx, ref_scores, cu_seqlens, *, block_size, init_blocks, window_size, topk):
    """The largest relative gap between the sorted scores of a selection and the reference's best (the quantity
    `assert_selection_matches_by_score` bounds by rtol), over scored (finite, non-forced) ranks. Used to
    calibrate a low-precision tolerance on the reference itself run in low precision."""
    k_eff = topk + window_size // block_size
    worst = 0.0
    idx = idx.detach().cpu().long()
    for (start, end), scores in zip(doc_bounds(cu_seqlens), ref_scores):
        T = end - start
        if T == 0:
            continue
        rank = selection_ranking(scores, block_size=block_size, init_blocks=init_blocks, window_size=window_size)
        n_blocks = rank.shape[-1]
        got, want = _sorted_scores(_chosen(idx[:, start:end], n_blocks), rank)
        n_sel = torch.clamp(torch.arange(T) // block_size + 1, max=k_eff)
        keep = (torch.arange(n_blocks)[None, None, :] < n_sel[None, :, None]) & torch.isfinite(want) & (want > 0)
        gap = torch.where(keep, (got - want).abs() / want.abs().clamp(min=1e-30), torch.zeros_like(want))
        worst = max(worst, float(gap.max()))
    return worst


def reference_selection(q, k, cu_seqlens, *, block_size, kernel_size, kernel_stride, init_blocks, window_size,
                        topk, lse_approx=True, softmax_scale=None) -> torch.Tensor:
    """A selection built from the brute-force scores (ties broken by block id): int32 [H_kv, N, k_eff]."""
    k_eff = topk + window_size // block_size
    scores = brute_force_block_scores(q, k, cu_seqlens, block_size=block_size, kernel_size=kernel_size,
                                      kernel_stride=kernel_stride, lse_approx=lse_approx, softmax_scale=softmax_scale)
    out = torch.full((k.shape[1], q.shape[0], k_eff), -1, dtype=torch.int32)
    for (start, end), s in zip(doc_bounds(cu_seqlens), scores):
        rank = selection_ranking(s, block_size=block_size, init_blocks=init_blocks, window_size=window_size)
        for t in range(end - start):
            n = min(t // block_size + 1, k_eff)
            # stable sort on -rank keeps lower block ids first among equal scores
            order = torch.sort(-rank[:, t], dim=-1, stable=True).indices[:, :n]
            out[:, start + t, :n] = order.sort(dim=-1).values.int()
    return out


def masked_dense_attention(q, k, v, block_idx, cu_seqlens, block_size, scale=None) -> torch.Tensor:
    """Dense attention over the whole packed batch under the mask: same document, u <= t, and u's block
    (relative to the document start) listed in block_idx[g, t] (-1 ignored). block_idx None = dense causal.
    Runs in the dtype of q (cast the inputs to float64 for a reference). Rows with no allowed key give 0."""
    n, h_q, d = q.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    doc = torch.zeros(n, dtype=torch.long)
    pos = torch.zeros(n, dtype=torch.long)
    for i, (start, end) in enumerate(doc_bounds(cu_seqlens)):
        doc[start:end] = i
        pos[start:end] = torch.arange(end - start)
    same_doc_causal = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])  # [N(t), N(u)]
    if block_idx is None:
        allowed = same_doc_causal.expand(h_kv, n, n)
    else:
        blk_u = pos // block_size
        idx = block_idx.detach().cpu().long()
        listed = torch.zeros(h_kv, n, n, dtype=torch.bool)
        for slot in range(idx.shape[-1]):
            listed |= (idx[:, :, slot:slot + 1] == blk_u[None, None, :]) & (idx[:, :, slot:slot + 1] >= 0)
        allowed = listed & same_doc_causal[None]
    allowed = allowed.to(q.device).repeat_interleave(group, dim=0)  # [H_q, N, N]
    k_full = k.repeat_interleave(group, dim=1)
    v_full = v.repeat_interleave(group, dim=1)
    logits = scale * torch.einsum("thd,uhd->htu", q, k_full)
    any_allowed = allowed.any(dim=-1, keepdim=True)
    logits = logits.masked_fill(~allowed, -math.inf).masked_fill(~any_allowed, 0.0)
    probs = torch.softmax(logits, dim=-1) * any_allowed
    return torch.einsum("htu,uhd->thd", probs, v_full)


def dense_causal_attention(q, k, v, cu_seqlens, scale=None) -> torch.Tensor:
    """Causal attention within each document (the masked oracle with every block allowed)."""
    return masked_dense_attention(q, k, v, None, cu_seqlens, 1, scale)
