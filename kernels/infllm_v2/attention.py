"""Triton block-sparse attention for InfLLM-V2 (step 8 of README.md beside it), forward and backward.

    out = block_sparse_attn_triton(q, k, v, block_idx, cu_seqlens, max_seqlen, *, block_size=64,
                                   softmax_scale=None, dense_len=-1, dense_min=0)

Same math as `naive.block_sparse_attn_naive`: token t attends the keys u <= t of its document whose block
u // block_size is listed in block_idx[:, t] (-1 = padding). Tokens of documents shorter than `dense_len`
(when dense_len != -1) and longer than `dense_min` attend every earlier key of their document instead (the
dense/sparse switch, decided per document inside the kernels, so nothing is read back to the host; dense_min lets
documents whose selection already lists every block stay on the sparse launch).

Legend: N packed tokens, H_q / H_kv heads, G = H_q / H_kv, d head dim, B block size, K = k_eff (slots of
block_idx), NT query tiles, NBT key-block tiles, U = union slots of a tile.

Layout of the work
- Query tile = `tok` neighbouring tokens of one document x the G heads of one KV head: rows r = token * G + head,
  BLOCK_M = next power of two >= tok * G (>= 16, the smallest tensor-core tile). A tile of one token (G >= 16)
  walks its own block_idx row; a tile of several tokens walks the UNION of their selected blocks, each row
  masked to the blocks its own token selected (a per-block membership bitmask), instead of repeating heads up
  to 16. The unions come from a small Triton kernel (sort of (block, token) keys + a distinct-count scan), ids
  ascending. Two tile sizes, decided per tile and KV head on the GPU: a "wide" tile (64 rows, e.g. 4 tokens of
  G = 16 or 16 of G = 4) walks its union when that union is small enough (neighbouring tokens picked
  overlapping blocks, as in trained models), else its "narrow" sub-tiles (16 rows) walk their own. Both are
  static launches; each program reads a skip flag first, so nothing is read back to the host.
- Forward and dQ: one program per (query tile, KV head), online softmax in base 2, LSE kept for the backward;
  K/V blocks arrive through TMA descriptors (TUNING["kv_tma"]). The dQ kernel also computes
  delta = rowsum(dO * O) once per row and stores it for the dK/dV kernel.
- dK/dV: one program per (key block, KV head) over the queries that selected the block, read from an inverted
  index (a stable sort of the selections by (head, block), built on the GPU with static sizes), so no program
  scans queries that did not pick its block, and no atomics are needed. Lists longer than TUNING["dkdv_chunk"]
  (attention sinks: block 0 is picked by every token) are split: extra chunks write fp32 partials that the
  block's own program adds before its single store. With TUNING["dq_atomic"] the same programs also add each
  block's share of dQ atomically into an fp32 buffer, and the dQ launch (a second walk over every query tile's
  blocks) is skipped; delta then comes from a small kernel of its own. Off by default until measured.
- Dense documents run a second launch of the same kernels in dense mode (every causal block, larger tiles);
  each launch skips the documents of the other mode after one load. Documents no longer than `dense_min` stay
  on the sparse launch (InfLLM-V2 passes k_eff * B: their selection lists every block, so sparse = dense), and
  the dense launches are left out when no length in [1, max_seqlen] can be dense (Python ints only).
No host synchronisation: every size used on the host is a Python int (N, n_docs, K, max_seqlen) or shape
metadata; per-document decisions and loop bounds are loaded from device tensors inside the kernels.
Measured speed and the reasoning behind the defaults: bench/README.md ("Sparse attention").
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.infllm_v2._validate import (
    check_block_idx,
    check_block_size,
    check_cu_seqlens,
    check_dense_len,
    check_max_seqlen,
    check_qkv,
    resolve_softmax_scale,
)

__all__ = ["block_sparse_attn_triton", "dense_attn_triton", "TUNING"]

_LOG2E = 1.4426950408889634

# Launch parameters; the benchmark may override them (names as in the kernels).
TUNING = {
    # Sparse forward / dQ tiles (rows = tokens x G heads): each "wide" tile of neighbouring tokens walks the union
    # of their blocks when that costs less than its "narrow" sub-tiles walking their own (smaller) unions, decided
    # per tile and KV head on the GPU: wide iff union_wide * pack_cost <= sum of the narrow unions.
    "narrow_rows": 16,          # rows of a narrow tile (one token for G >= 16; 16 // G tokens below)
    "wide_rows": 64,            # rows of a wide tile (at most `tile_tokens` tokens)
    # Most tokens in one union tile: 16 by default; up to 32 (the int32 membership bits), for 128-row wide tiles of
    # G = 4 (or 96 rows of G = 3) on selections that overlap as real ones do (bench/README.md); not yet measured.
    "tile_tokens": 16,
    "pack_cost": 1.2,           # cost of one block walked by a wide tile relative to a narrow one
    "dense_rows": 64,           # BLOCK_M of the dense-document forward / dQ tile
    "dkdv_rows": 64,            # query rows per step of the dK/dV loop
    "dkdv_chunk": 16384,        # queries of one key block handled by one dK/dV program
    "dense_block": 64,          # key block of `dense_attn_triton` (no selection to match)
    "kv_tma": True,             # K/V blocks of the forward / dQ walks through TMA descriptors
    # dQ inside the dK/dV kernel (each block's share added atomically into an fp32 buffer) instead of a dQ launch
    # that walks the query tiles' blocks again: one pass over every (query, block) pair fewer, at the price of
    # fp32 atomics and a dQ whose summation order varies from run to run. Off: measured slower on an H200 (1b shape,
    # 128k, 96 blocks: +14% fwd+bwd on random selections, +60% on overlapping ones; bench/README.md, run 5).
    "dq_atomic": False,
    # (num_warps, num_stages) per kernel kind and head dim; nothing spills (ptxas report, sm_90).
    "fwd": {64: (4, 2), 128: (4, 2)},
    "dq": {64: (4, 2), 128: (4, 2)},
    "fwd_wide": {64: (4, 2), 128: (4, 3)},
    "dq_wide": {64: (4, 2), 128: (4, 2)},
    "dense": {64: (4, 3), 128: (8, 2)},
    "dkdv": {64: (4, 3), 128: (4, 3)},
}


def merged_tuning(base: dict, over: dict) -> dict:
    """`base` with `over`'s entries: a per-head-dim table (e.g. "dkdv") is updated entry by entry, so that
    {"dkdv": {64: (4, 2)}} leaves d 128 as it was; keys may be strings ("64") and values lists (from JSON)."""
    out = {key: dict(val) if isinstance(val, dict) else val for key, val in base.items()}
    for key, val in over.items():
        if key not in out:
            raise KeyError(f"TUNING has no entry {key!r}; known: {sorted(out)}")
        if isinstance(out[key], dict):
            if not isinstance(val, dict):
                raise TypeError(f"TUNING[{key!r}] is a table per head dim, got {val!r}")
            out[key].update({int(d): tuple(cfg) for d, cfg in val.items()})
        else:
            out[key] = val
    return out


# Allocation hooks: tests swap them for NaN-filled buffers to catch anything left unwritten.
_empty = torch.empty
_empty_like = torch.empty_like


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tile_rows(group: int, target_rows: int) -> tuple[int, int]:
    """(BLOCK_M, tokens per tile): BLOCK_M >= G rows, a power of two, at least 16; as many whole tokens as fit."""
    rows = max(16, target_rows, triton.next_power_of_2(group))
    return rows, rows // group


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _tile_doc(CU, TILE_DOC, pid, dense_len, dense_min, MODE: tl.constexpr):
    # Whether query tile `pid` belongs to this launch (not a spare tile; its document of this launch's kind:
    # MODE 2 dense, else sparse), and its document's start and length.
    doc = tl.load(TILE_DOC + pid)
    run = doc >= 0
    doc_c = tl.maximum(doc, 0)
    doc_start = tl.load(CU + doc_c)
    doc_len = tl.load(CU + doc_c + 1) - doc_start
    if MODE == 2:
        run = run & (doc_len < dense_len) & (doc_len > dense_min)
    else:
        run = run & ((doc_len >= dense_len) | (doc_len <= dense_min))
    return run, doc_start, doc_len


@triton.jit
def _tile_walk(TILE_START, LIST, MASKS, COUNT, pid, g, doc_start, doc_len, list_stride_h, list_stride_row,
               n_tiles, G: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr, MODE: tl.constexpr):
    # The rows of a query tile (row r = token r // G, head r % G of the group) and what its walk iterates:
    # MODE 0 its token's block_idx row, 1 the tile's union (ids + membership bits), 2 every causal block.
    tok0 = tl.load(TILE_START + pid)
    n_tok = tl.minimum(doc_start + doc_len - tok0, TOK)
    rows = tl.arange(0, BLOCK_M)
    r_tok = rows // G
    row_ok = (rows < TOK * G) & (r_tok < n_tok)
    q_pos = tok0 + r_tok - doc_start                         # [BLOCK_M] position in the document
    if MODE == 0:
        list_row = LIST + g * list_stride_h + tok0.to(tl.int64) * list_stride_row
        mask_row = list_row
        slots = tl.arange(0, SLOTS_P2)
        ids = tl.load(list_row + slots, mask=slots < SLOTS, other=-1)   # [SLOTS_P2]
        # One past the last valid slot: -1 padding anywhere is skipped by the membership test.
        n_iter = tl.max(tl.where(ids >= 0, slots + 1, 0), axis=0)
    elif MODE == 1:
        list_row = LIST + g * list_stride_h + pid.to(tl.int64) * list_stride_row
        mask_row = MASKS + g * list_stride_h + pid.to(tl.int64) * list_stride_row
        n_iter = tl.load(COUNT + g * n_tiles + pid)
    else:
        list_row = LIST
        mask_row = MASKS
        n_iter = (tok0 + n_tok - 1 - doc_start) // BLOCK_N + 1
    return tok0, r_tok, row_ok, q_pos, list_row, mask_row, n_iter


@triton.jit
def _walk_block(list_row, mask_row, i, r_bit, row_ok, MODE: tl.constexpr):
    # Step i of a tile's walk: the key block id (in its document) and which rows attend it (r_bit: each row's
    # token in the tile, its bit in the membership mask).
    if MODE == 0:
        blk = tl.load(list_row + i)
        member = row_ok & (blk >= 0)
    elif MODE == 1:
        blk = tl.load(list_row + i)
        bits = tl.load(mask_row + i)
        member = row_ok & (((bits >> r_bit) & 1) != 0)
    else:
        blk = i
        member = row_ok
    return blk, member


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, K_DESC, V_DESC,
    CU, TILE_DOC, TILE_START,
    LIST, MASKS, COUNT, SKIP,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    list_stride_h, list_stride_row, n_tiles, n_tokens, n_heads_q, qk_scale, dense_len, dense_min,
    G: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr, MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    KV_TMA: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    # KV_TMA: K/V blocks through tensor descriptors (TMA on Hopper) instead of pointer tiles; rows past the
    # document end are then read from the next document (or zero-filled past N) and masked out by causality.
    # MODE 0: one token per tile, its own block_idx row; 1: union of the tile's tokens; 2: dense documents.
    # HAS_SKIP: SKIP[g, tile] != 0 leaves the tile to the other sparse launch (wide / narrow tiles).
    pid = tl.program_id(0)
    g = tl.program_id(1)
    if HAS_SKIP:
        if tl.load(SKIP + g * n_tiles + pid) != 0:
            return
    run, doc_start, doc_len = _tile_doc(CU, TILE_DOC, pid, dense_len, dense_min, MODE)
    if not run:
        return
    tok0, r_tok, row_ok, q_pos, list_row, mask_row, n_iter = _tile_walk(
        TILE_START, LIST, MASKS, COUNT, pid, g, doc_start, doc_len, list_stride_h, list_stride_row, n_tiles,
        G, TOK, BLOCK_M, BLOCK_N, SLOTS, SLOTS_P2, MODE)
    rows = tl.arange(0, BLOCK_M)
    r_bit = tl.minimum(r_tok, 31)                            # membership bit of each row (padding rows clamped)
    head_q = g * G + rows % G                                # [BLOCK_M]
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    # 64-bit scalar bases, small 32-bit offsets inside the tile.
    tile_q = Q + tok0.to(tl.int64) * stride_qn + (g * G) * stride_qh
    tile_o = O + tok0.to(tl.int64) * stride_on + (g * G) * stride_oh
    q = tl.load(tile_q + r_tok[:, None] * stride_qn + (rows % G)[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)             # [BLOCK_M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)      # [BLOCK_M] running max (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)                    # [BLOCK_M] running sum
    acc = tl.zeros([BLOCK_M, D], tl.float32)                 # [BLOCK_M, D]

    for i in range(0, n_iter):
        blk, member = _walk_block(list_row, mask_row, i, r_bit, row_ok, MODE)
        k_pos = blk * BLOCK_N + offs_n                       # [BLOCK_N] position in the document
        k_ok = (k_pos < doc_len) & (blk >= 0)
        k_row0 = (doc_start + blk * BLOCK_N).to(tl.int64)
        if KV_TMA:
            k_t = tl.trans(K_DESC.load([doc_start + blk * BLOCK_N, g * D]))          # [D, BLOCK_N]
        else:
            k_t = tl.load(K + k_row0 * stride_kn + g * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None],
                          mask=k_ok[None, :], other=0.0)     # [D, BLOCK_N]
        s = tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale   # [BLOCK_M, BLOCK_N]
        allowed = member[:, None] & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing allowed yet keep m = -inf; shift them by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])                      # [BLOCK_M, BLOCK_N]
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_TMA:
            v = V_DESC.load([doc_start + blk * BLOCK_N, g * D])                         # [BLOCK_N, D]
        else:
            v = tl.load(V + k_row0 * stride_vn + g * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=k_ok[:, None], other=0.0)       # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    tl.store(tile_o + r_tok[:, None] * stride_on + (rows % G)[:, None] * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    # A row with no allowed key stores +inf: its probabilities are exactly 0 in the backward.
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    tl.store(LSE + head_q.to(tl.int64) * n_tokens + tok0 + r_tok, lse, mask=row_ok)


@triton.jit
def _dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, K_DESC, V_DESC,
    CU, TILE_DOC, TILE_START,
    LIST, MASKS, COUNT, SKIP,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    stride_don, stride_doh, stride_dqn, stride_dqh,
    list_stride_h, list_stride_row, n_tiles, n_tokens, n_heads_q, qk_scale, sm_scale, dense_len, dense_min,
    G: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr, MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    KV_TMA: tl.constexpr, HAS_SKIP: tl.constexpr,
):
    # Same tiles and block walk as _fwd_kernel; dQ = scale * sum_blocks dS K with dS = P * (dO V^T - delta).
    pid = tl.program_id(0)
    g = tl.program_id(1)
    if HAS_SKIP:
        if tl.load(SKIP + g * n_tiles + pid) != 0:
            return
    run, doc_start, doc_len = _tile_doc(CU, TILE_DOC, pid, dense_len, dense_min, MODE)
    if not run:
        return
    tok0, r_tok, row_ok, q_pos, list_row, mask_row, n_iter = _tile_walk(
        TILE_START, LIST, MASKS, COUNT, pid, g, doc_start, doc_len, list_stride_h, list_stride_row, n_tiles,
        G, TOK, BLOCK_M, BLOCK_N, SLOTS, SLOTS_P2, MODE)
    rows = tl.arange(0, BLOCK_M)
    r_bit = tl.minimum(r_tok, 31)
    head_q = g * G + rows % G
    head_in = rows % G
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)

    tile0 = tok0.to(tl.int64)
    q = tl.load(Q + tile0 * stride_qn + (g * G) * stride_qh
                + r_tok[:, None] * stride_qn + head_in[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)                                    # [BLOCK_M, D]
    do = tl.load(DO + tile0 * stride_don + (g * G) * stride_doh
                 + r_tok[:, None] * stride_don + head_in[:, None] * stride_doh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)                                   # [BLOCK_M, D]
    o = tl.load(O + tile0 * stride_on + (g * G) * stride_oh
                + r_tok[:, None] * stride_on + head_in[:, None] * stride_oh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)                                    # [BLOCK_M, D]
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)                   # [BLOCK_M]
    stat_off = head_q.to(tl.int64) * n_tokens + tok0 + r_tok
    tl.store(DELTA + stat_off, delta, mask=row_ok)
    lse = tl.load(LSE + stat_off, mask=row_ok, other=float("inf"))                # [BLOCK_M]
    dq = tl.zeros([BLOCK_M, D], tl.float32)

    for i in range(0, n_iter):
        blk, member = _walk_block(list_row, mask_row, i, r_bit, row_ok, MODE)
        k_pos = blk * BLOCK_N + offs_n
        k_ok = (k_pos < doc_len) & (blk >= 0)
        k_row0 = (doc_start + blk * BLOCK_N).to(tl.int64)
        if KV_TMA:
            k = K_DESC.load([doc_start + blk * BLOCK_N, g * D])                         # [BLOCK_N, D]
            v_t = tl.trans(V_DESC.load([doc_start + blk * BLOCK_N, g * D]))            # [D, BLOCK_N]
        else:
            k = tl.load(K + k_row0 * stride_kn + g * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=k_ok[:, None], other=0.0)                              # [BLOCK_N, D]
            v_t = tl.load(V + k_row0 * stride_vn + g * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None],
                          mask=k_ok[None, :], other=0.0)                            # [D, BLOCK_N]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale            # [BLOCK_M, BLOCK_N]
        allowed = member[:, None] & (k_pos[None, :] <= q_pos[:, None])
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)                       # [BLOCK_M, BLOCK_N]
        dp = tl.dot(do, v_t, input_precision=DOT_PREC)                             # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)                  # [BLOCK_M, D]

    tl.store(DQ + tile0 * stride_dqn + (g * G) * stride_dqh
             + r_tok[:, None] * stride_dqn + head_in[:, None] * stride_dqh + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _delta_kernel(O, DO, DELTA, stride_on, stride_oh, stride_don, stride_doh, n_tokens,
                  BLOCK_T: tl.constexpr, D: tl.constexpr):
    # delta[h, t] = rowsum(dO * O) in fp32 for the fused-dQ backward (the dQ kernel computes it otherwise).
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    ok = t < n_tokens
    t64 = t.to(tl.int64)
    offs_d = tl.arange(0, D)
    o = tl.load(O + t64[:, None] * stride_on + h * stride_oh + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + t64[:, None] * stride_don + h * stride_doh + offs_d[None, :], mask=ok[:, None], other=0.0)
    tl.store(DELTA + h.to(tl.int64) * n_tokens + t64, tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1), mask=ok)


@triton.jit
def _dkdv_steps(
    Q, DO, LSE, DELTA, QTOK, DQ_ACC, k, v, k_tok, k_ok, g, lo, n_q, q_base,
    stride_qn, stride_qh, stride_don, stride_doh, stride_dqn, n_tokens, qk_scale, sm_scale,
    G: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DENSE: tl.constexpr, DOT_PREC: tl.constexpr, FUSE_DQ: tl.constexpr,
):
    # dK, dV of one key block [BLOCK_N, D] (fp32, dK not yet scaled) over n_q query tokens, TOK at a time:
    # QTOK[lo : lo + n_q] (sparse) or q_base, q_base + 1, ... (dense). FUSE_DQ: also this block's share of dQ,
    # scaled, added atomically into DQ_ACC (fp32 [N, H_q, D], contiguous): each (query, block) pair is visited
    # once here, so the sum over the blocks a query attends is its dQ, and no dQ launch has to walk them again.
    offs_d = tl.arange(0, D)
    rows = tl.arange(0, BLOCK_M)
    r_tok = rows // G
    row_in = rows < TOK * G
    head_q = g * G + rows % G                                   # [BLOCK_M]
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for j in range(0, n_q, TOK):
        slot = j + r_tok
        ok = row_in & (slot < n_q)
        if DENSE:
            q_tok = q_base + slot
        else:
            q_tok = tl.load(QTOK + lo + slot, mask=ok, other=0)  # [BLOCK_M]
        q_tok64 = q_tok.to(tl.int64)
        q = tl.load(Q + q_tok64[:, None] * stride_qn + head_q[:, None] * stride_qh + offs_d[None, :],
                    mask=ok[:, None], other=0.0)                # [BLOCK_M, D]
        do = tl.load(DO + q_tok64[:, None] * stride_don + head_q[:, None] * stride_doh + offs_d[None, :],
                     mask=ok[:, None], other=0.0)               # [BLOCK_M, D]
        stat_off = head_q.to(tl.int64) * n_tokens + q_tok64
        lse = tl.load(LSE + stat_off, mask=ok, other=float("inf"))
        delta = tl.load(DELTA + stat_off, mask=ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale      # [BLOCK_M, BLOCK_N]
        allowed = ok[:, None] & k_ok[None, :] & (k_tok[None, :] <= q_tok[:, None])
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)                 # [BLOCK_M, BLOCK_N]
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)  # [BLOCK_N, D]
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)               # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)  # [BLOCK_N, D]
        if FUSE_DQ:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * sm_scale  # [BLOCK_M, D]
            tl.atomic_add(DQ_ACC + q_tok64[:, None] * stride_dqn + head_q[:, None] * D + offs_d[None, :], dq,
                          mask=ok[:, None])
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, DQ_ACC,
    CU, BLK_DOC, BLK_START, OFFSETS, QTOK,
    EX_KEY, EX_LO, EX_FIRST, DK_PART, DV_PART,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
    stride_don, stride_doh, stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_dqn,
    n_blk_tiles, n_tokens, qk_scale, sm_scale, dense_len, dense_min, chunk,
    G: tl.constexpr, TOK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    PHASE: tl.constexpr, DOT_PREC: tl.constexpr, FUSE_DQ: tl.constexpr,
):
    # PHASE 0: a key block of a dense document over every later token of the document.
    # PHASE 1: a key block of a sparse document over the first `chunk` queries of its inverted-index list, plus
    #          the partial sums that PHASE 2 left for the rest of a long list (attention-sink blocks are
    #          selected by every token: splitting keeps one program from serialising the whole launch).
    # PHASE 2: one further chunk of a long list -> fp32 partial dK, dV in DK_PART / DV_PART.
    pid = tl.program_id(0)
    if PHASE == 2:
        key = tl.load(EX_KEY + pid)
        if key < 0:
            return
        g = key // n_blk_tiles
        blk_tile = key % n_blk_tiles
    else:
        g = tl.program_id(1)
        blk_tile = pid
        key = g * n_blk_tiles + blk_tile
    doc = tl.load(BLK_DOC + blk_tile)
    if doc < 0:
        return
    doc_start = tl.load(CU + doc)
    doc_end = tl.load(CU + doc + 1)
    is_dense = (doc_end - doc_start < dense_len) & (doc_end - doc_start > dense_min)
    if PHASE == 0:
        if not is_dense:
            return
    else:
        if is_dense:
            return
    blk_tok0 = tl.load(BLK_START + blk_tile)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_tok = blk_tok0 + offs_n                                   # [BLOCK_N] global key tokens
    k_ok = k_tok < doc_end
    blk0 = blk_tok0.to(tl.int64)
    k = tl.load(K + blk0 * stride_kn + g * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)                  # [BLOCK_N, D]
    v = tl.load(V + blk0 * stride_vn + g * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=k_ok[:, None], other=0.0)                  # [BLOCK_N, D]
    part_off = offs_n[:, None] * D + offs_d[None, :]            # [BLOCK_N, D] in a partial tile

    if PHASE == 0:
        dk, dv = _dkdv_steps(Q, DO, LSE, DELTA, QTOK, DQ_ACC, k, v, k_tok, k_ok, g, 0, doc_end - blk_tok0,
                             blk_tok0, stride_qn, stride_qh, stride_don, stride_doh, stride_dqn, n_tokens, qk_scale,
                             sm_scale, G, TOK, BLOCK_M, BLOCK_N, D, True, DOT_PREC, FUSE_DQ)
    elif PHASE == 1:
        lo = tl.load(OFFSETS + key)
        hi = tl.load(OFFSETS + key + 1)
        dk, dv = _dkdv_steps(Q, DO, LSE, DELTA, QTOK, DQ_ACC, k, v, k_tok, k_ok, g, lo, tl.minimum(hi - lo, chunk),
                             0, stride_qn, stride_qh, stride_don, stride_doh, stride_dqn, n_tokens, qk_scale,
                             sm_scale, G, TOK, BLOCK_M, BLOCK_N, D, False, DOT_PREC, FUSE_DQ)
        first = tl.load(EX_FIRST + key)
        n_extra = tl.maximum(tl.cdiv(hi - lo, chunk) - 1, 0)
        for e in range(first, first + n_extra):
            dk += tl.load(DK_PART + e * (BLOCK_N * D) + part_off)
            dv += tl.load(DV_PART + e * (BLOCK_N * D) + part_off)
    else:
        lo = tl.load(EX_LO + pid)
        hi = tl.load(OFFSETS + key + 1)
        dk, dv = _dkdv_steps(Q, DO, LSE, DELTA, QTOK, DQ_ACC, k, v, k_tok, k_ok, g, lo, tl.minimum(hi - lo, chunk),
                             0, stride_qn, stride_qh, stride_don, stride_doh, stride_dqn, n_tokens, qk_scale,
                             sm_scale, G, TOK, BLOCK_M, BLOCK_N, D, False, DOT_PREC, FUSE_DQ)
        tl.store(DK_PART + pid * (BLOCK_N * D) + part_off, dk)
        tl.store(DV_PART + pid * (BLOCK_N * D) + part_off, dv)
        return

    tl.store(DK + blk0 * stride_dkn + g * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok[:, None])
    tl.store(DV + blk0 * stride_dvn + g * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=k_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# Host-side tables (torch ops on the device, static sizes, no host reads)
# ----------------------------------------------------------------------------------------------------------

def _tiles(cu_seqlens: torch.Tensor, n_tokens: int, tile: int):
    """Document-aligned tiles of `tile` tokens: (tile_doc int32 [NT], tile_start int32 [NT],
    first_tile int64 [n_docs]) with NT = ceil(N / tile) + n_docs, a static upper bound; unused tiles have
    doc = start = -1. first_tile[d] is the index of document d's first tile."""
    n_docs = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    tiles_per_doc = (lens + tile - 1) // tile
    ends = torch.cumsum(tiles_per_doc, 0)                     # [n_docs] inclusive
    n_tiles = triton.cdiv(n_tokens, tile) + n_docs
    t = torch.arange(n_tiles, device=cu.device)
    doc = torch.searchsorted(ends, t, right=True)             # first document whose tiles end after t
    valid = doc < n_docs
    doc_c = doc.clamp(max=max(n_docs - 1, 0))
    first = ends - tiles_per_doc
    start = cu[doc_c] + (t - first[doc_c]) * tile
    tile_doc = torch.where(valid, doc, -1).to(torch.int32)
    tile_start = torch.where(valid, start, -1).to(torch.int32)
    return tile_doc, tile_start, first


@triton.jit
def _distinct_combine(first_a, last_a, count_a, first_b, last_b, count_b):
    # Scan state of a run of sorted ids: (first id, last id, number of distinct ids).
    return first_a, last_b, count_a + count_b - (last_a == first_b).to(tl.int32)


@triton.jit
def _union_kernel(
    IDX, CU, TILE_DOC, TILE_START, UID, UMASK, COUNT,
    stride_ih, stride_in, n_tiles, n_slots,
    TOK: tl.constexpr, TOK_P2: tl.constexpr, LOG_TOK: tl.constexpr, K: tl.constexpr, K_P2: tl.constexpr,
):
    # Union of the block lists of one tile's tokens (one KV head): ascending ids in UID, in UMASK bit i set
    # when token i of the tile selected the id, COUNT the union size. UMASK must start at zero.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    doc = tl.load(TILE_DOC + pid)
    if doc < 0:
        return
    tok0 = tl.load(TILE_START + pid)
    n_tok = tl.minimum(tl.load(CU + doc + 1) - tok0, TOK)
    t = tl.arange(0, TOK_P2)
    slots = tl.arange(0, K_P2)
    ok = (t[:, None] < n_tok) & (slots[None, :] < K)
    ids = tl.load(IDX + g * stride_ih + (tok0 + t).to(tl.int64)[:, None] * stride_in + slots[None, :],
                  mask=ok, other=-1)                                          # [TOK_P2, K_P2]
    big = 2147483647
    # One sortable key per (token, slot): the id above, the token below.
    key = tl.where(ids >= 0, (ids << LOG_TOK) | t[:, None], big)
    key = tl.sort(tl.reshape(key, [TOK_P2 * K_P2]))                           # [TOK_P2 * K_P2]
    valid = key != big
    blk = key >> LOG_TOK
    _, _, n_distinct = tl.associative_scan((blk, blk, tl.full(blk.shape, 1, tl.int32)), 0, _distinct_combine)
    slot = n_distinct - 1                                                     # union slot of each entry
    row = (g * n_tiles + pid).to(tl.int64) * n_slots
    keep = valid & (slot < n_slots)
    tl.store(UID + row + slot, blk, mask=keep)
    tl.atomic_or(UMASK + row + slot, (1 << (key & (TOK_P2 - 1))).to(tl.int32), mask=keep, sem="relaxed")
    tl.store(COUNT + g * n_tiles + pid, tl.minimum(tl.max(tl.where(valid, n_distinct, 0), axis=0), n_slots))


def _tile_unions(block_idx: torch.Tensor, cu_seqlens: torch.Tensor, tile_doc, tile_start, tok: int,
                 max_seqlen: int, block_size: int):
    """Union of the selected blocks of each tile's tokens: ids int32 [H, NT, U] ascending (unset after the
    count), membership bits int32 [H, NT, U] (bit i = token i of the tile selected it), count int32 [H, NT].
    U = min(tok * K, blocks of the longest document) bounds every union."""
    h_kv, n_tokens, k_slots = block_idx.shape
    n_tiles = tile_doc.numel()
    n_slots = max(1, min(tok * k_slots, triton.cdiv(max_seqlen, block_size)))
    if _interpreting():
        # The interpreter runs tl.sort / associative_scan element by element; torch ops give the same tables.
        return _tile_unions_torch(block_idx, cu_seqlens, tile_doc, tile_start, tok, n_slots)
    uid = _empty((h_kv, n_tiles, n_slots), dtype=torch.int32, device=block_idx.device)
    umask = torch.zeros((h_kv, n_tiles, n_slots), dtype=torch.int32, device=block_idx.device)
    count = torch.zeros((h_kv, n_tiles), dtype=torch.int32, device=block_idx.device)
    tok_p2 = triton.next_power_of_2(tok)
    k_p2 = triton.next_power_of_2(max(k_slots, 1))
    opts = {} if _interpreting() else {"num_warps": 4 if tok_p2 * k_p2 <= 1024 else 8}
    _union_kernel[(n_tiles, h_kv)](
        block_idx, cu_seqlens, tile_doc, tile_start, uid, umask, count,
        block_idx.stride(0), block_idx.stride(1), n_tiles, n_slots,
        TOK=tok, TOK_P2=tok_p2, LOG_TOK=tok_p2.bit_length() - 1, K=k_slots, K_P2=k_p2, **opts,
    )
    return uid, umask, count


def _tile_unions_torch(block_idx, cu_seqlens, tile_doc, tile_start, tok: int, n_slots: int):
    """`_tile_unions` with torch ops (a segmented sort): same tables, used under the interpreter."""
    h_kv, n_tokens, k_slots = block_idx.shape
    n_tiles = tile_doc.numel()
    device = block_idx.device
    big = torch.iinfo(torch.int32).max
    doc_end = cu_seqlens.to(torch.int64)[(tile_doc.to(torch.int64) + 1).clamp(min=0)]
    tokens = tile_start.to(torch.int64)[:, None] + torch.arange(tok, device=device)             # [NT, tok]
    tok_ok = (tile_start[:, None] >= 0) & (tokens < doc_end[:, None])
    ids = block_idx[:, tokens.clamp(0, max(n_tokens - 1, 0))]                                   # [H, NT, tok, K]
    ids = torch.where(tok_ok[None, :, :, None] & (ids >= 0), ids, big).reshape(h_kv, n_tiles, tok * k_slots)
    bits = (1 << torch.arange(tok, device=device, dtype=torch.int32))[:, None].expand(tok, k_slots)
    bits = bits.reshape(1, 1, tok * k_slots).expand(h_kv, n_tiles, -1)
    ids_sorted, order = ids.sort(dim=-1)
    bits_sorted = bits.gather(-1, order)
    first = torch.ones_like(ids_sorted, dtype=torch.bool)
    first[..., 1:] = ids_sorted[..., 1:] != ids_sorted[..., :-1]
    valid = ids_sorted != big
    first &= valid
    slot = torch.cumsum(first.to(torch.int32), -1) - 1
    # Entries go to their id's union slot (equal ids share it); padding and overflow to a spare column.
    slot = torch.where(valid & (slot < n_slots), slot, n_slots).to(torch.int64)
    uid = torch.full((h_kv, n_tiles, n_slots + 1), -1, dtype=torch.int32, device=device)
    uid.scatter_(-1, slot, ids_sorted)
    umask = torch.zeros((h_kv, n_tiles, n_slots + 1), dtype=torch.int32, device=device)
    # Each token lists a block at most once, so the sum of distinct bits is their OR.
    umask.scatter_add_(-1, slot, bits_sorted)
    count = first.sum(-1).clamp(max=n_slots).to(torch.int32)
    return uid[..., :n_slots].contiguous(), umask[..., :n_slots].contiguous(), count.contiguous()


def _inverted_index(block_idx: torch.Tensor, cu_seqlens: torch.Tensor, first_block: torch.Tensor,
                    n_blk_tiles: int):
    """Queries per (KV head, key block): QTOK int32 [H * N * K] (token ids grouped by head-major global block,
    ascending tokens within a block) and OFFSETS int32 [H * NBT + 1] (the group of head h, block tile b is
    QTOK[OFFSETS[h * NBT + b] : OFFSETS[h * NBT + b + 1]]). A stable sort, so no atomics and no host read."""
    h_kv, n_tokens, k_slots = block_idx.shape
    device = block_idx.device
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(n_tokens, device=device)
    doc_of_token = torch.searchsorted(cu[1:], tokens, right=True).clamp(max=max(cu.numel() - 2, 0))
    global_block = (first_block[doc_of_token].to(torch.int32)[None, :, None] + block_idx)        # [H, N, K]
    head = torch.arange(h_kv, device=device, dtype=torch.int32)[:, None, None]
    sentinel = h_kv * n_blk_tiles
    key = torch.where(block_idx >= 0, head * n_blk_tiles + global_block, sentinel).reshape(-1)
    key_sorted, order = torch.sort(key, stable=True)
    qtok = ((order // k_slots) % n_tokens).to(torch.int32)
    bounds = torch.arange(sentinel + 1, device=device, dtype=key_sorted.dtype)
    offsets = torch.searchsorted(key_sorted, bounds).to(torch.int32)
    return qtok, offsets


def _list_chunks(offsets: torch.Tensor, n_entries: int, chunk: int):
    """Chunks after the first of each (head, block) list longer than `chunk`: EX_KEY int32 [E] (the list, or -1
    for unused items), EX_LO int32 [E] (first entry of the chunk), EX_FIRST int32 [H * NBT] (index of the list's
    first extra chunk). E = ceil(total entries / chunk) bounds the number of extra chunks statically."""
    lens = (offsets[1:] - offsets[:-1]).to(torch.int64)
    n_extra = ((lens + chunk - 1) // chunk - 1).clamp(min=0)
    ends = torch.cumsum(n_extra, 0)
    n_items = max(1, triton.cdiv(n_entries, chunk))
    e = torch.arange(n_items, device=offsets.device)
    key = torch.searchsorted(ends, e, right=True)
    valid = key < lens.numel()
    key_c = key.clamp(max=lens.numel() - 1)
    first = ends - n_extra
    lo = offsets[:-1].to(torch.int64)[key_c] + (e - first[key_c] + 1) * chunk
    ex_key = torch.where(valid, key_c, -1).to(torch.int32)
    ex_lo = torch.where(valid, lo, 0).to(torch.int32)
    return ex_key, ex_lo, first.to(torch.int32), n_items


# ----------------------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are for tests: keep them exact rather than tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_kernel_shapes(head_dim: int, block_size: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"q: the Triton kernel needs head_dim a power of two in [16, 256], got {head_dim}")
    if block_size < 16 or block_size > 128 or block_size & (block_size - 1):
        raise ValueError(f"block_size: the Triton kernel needs a power of two in [16, 128], got {block_size}")


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def _sparse_plan(group: int) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(rows, tokens) of the narrow sparse query tile and of the wide one (None when it would be the same).
    Token counts are powers of two (a wide tile is whole narrow tiles), at most TUNING["tile_tokens"] (<= 32: the
    int32 membership bits; the union sort stays small). G >= 16: a narrow tile is one token and walks its own
    block_idx row."""
    max_tok = min(32, int(TUNING["tile_tokens"]))

    def tile(target_rows: int) -> tuple[int, int]:
        tok = _pow2_floor(min(max(1, target_rows // group), max_tok))
        return max(16, triton.next_power_of_2(tok * group)), tok

    narrow, wide = tile(TUNING["narrow_rows"]), tile(TUNING["wide_rows"])
    return narrow, (wide if wide[1] > narrow[1] else None)


def _walk_lists(block_idx, cu_seqlens, tile_doc, tile_start, tok, max_seqlen, block_size):
    """(mode, kernel list args, their strides, per-tile block count [H, NT]) of a sparse walk over these tiles.
    One-token tiles walk their block_idx row; their count (needed only by the packing decision) is left None."""
    if tok == 1:
        return 0, (block_idx, block_idx, tile_doc), (block_idx.stride(0), block_idx.stride(1)), None
    uid, umask, count = _tile_unions(block_idx, cu_seqlens, tile_doc, tile_start, tok, max_seqlen, block_size)
    return 1, (uid, umask, count), (uid.stride(0), uid.stride(1)), count


def _row_counts(block_idx, tile_start):
    """int32 [H, NT]: the listed blocks of each one-token tile's block_idx row."""
    return (block_idx >= 0).sum(-1, dtype=torch.int32)[:, tile_start.clamp(min=0).long()]


def _pack_decision(cu_seqlens, narrow_tiles, narrow_count, wide_tiles, wide_count, tok_wide):
    """Per (KV head, wide tile): walk the wide union (skip flags of the narrow tiles inside set) or the narrow
    sub-tiles (skip flag of the wide tile set). Wide iff wide_count * pack_cost <= the sum of the narrow counts.
    Returns int8 skip tables ([H, NT_wide], [H, NT_narrow]); torch ops on the device, static shapes."""
    n_doc, n_start = narrow_tiles
    w_first = wide_tiles[2]
    n_wide = wide_tiles[0].numel()
    valid = n_doc >= 0
    doc = n_doc.clamp(min=0).long()
    cu = cu_seqlens.to(torch.int64)
    parent = w_first[doc] + (n_start.long() - cu[doc]) // tok_wide                    # [NT_narrow]
    parent = torch.where(valid, parent, n_wide)                                       # invalid -> spare column
    narrow_sum = torch.zeros((narrow_count.shape[0], n_wide + 1), dtype=torch.float32, device=cu.device)
    narrow_sum.index_add_(1, parent, narrow_count.to(torch.float32))
    use_wide = wide_count.to(torch.float32) * TUNING["pack_cost"] <= narrow_sum[:, :n_wide]   # [H, NT_wide]
    use_wide = torch.cat([use_wide, torch.zeros_like(use_wide[:, :1])], dim=1)
    skip_narrow = use_wide[:, parent]
    return (~use_wide[:, :n_wide]).to(torch.int8).contiguous(), skip_narrow.to(torch.int8).contiguous()


def _launch_opts(kind: str, head_dim: int) -> dict:
    if _interpreting():
        return {}
    table = TUNING[kind]
    warps, stages = table.get(head_dim, table[128] if head_dim > 128 else table[64])
    return {"num_warps": warps, "num_stages": stages}


def _any_dense(dense_len: int, dense_min: int, max_seqlen: int) -> bool:
    """Whether some document length T in [1, max_seqlen] can satisfy dense_min < T < dense_len (Python ints
    only: when none can, the dense launches are skipped)."""
    return dense_len > 0 and max(dense_min, 0) + 1 < min(dense_len, max_seqlen + 1)


def _all_dense(dense_len: int, dense_min: int, max_seqlen: int) -> bool:
    """Whether every document (of 1..max_seqlen tokens) is dense: the sparse launches and tables are left out."""
    return dense_min < 1 and (dense_len > max_seqlen)


def _query_walks(block_idx, cu_seqlens, n_tokens, max_seqlen, block_size, group, dense_len, dense_min):
    """Query-side launches: (mode, rows, tokens per tile, tile_doc, tile_start, (lists, strides), skip, kind)."""
    walks = []
    if _all_dense(dense_len, dense_min, max_seqlen):
        rows_d, tok_d = _tile_rows(group, TUNING["dense_rows"])
        doc_d, start_d, _ = _tiles(cu_seqlens, n_tokens, tok_d)
        return [(2, rows_d, tok_d, doc_d, start_d, ((doc_d, doc_d, doc_d), (0, 0)), None, "dense")]
    (rows_n, tok_n), wide = _sparse_plan(group)
    tiles_n = _tiles(cu_seqlens, n_tokens, tok_n)
    mode_n, lists_n, strides_n, count_n = _walk_lists(block_idx, cu_seqlens, tiles_n[0], tiles_n[1], tok_n,
                                                      max_seqlen, block_size)
    skip_n = None
    if wide is not None:
        rows_w, tok_w = wide
        tiles_w = _tiles(cu_seqlens, n_tokens, tok_w)
        _, lists_w, strides_w, count_w = _walk_lists(block_idx, cu_seqlens, tiles_w[0], tiles_w[1], tok_w,
                                                     max_seqlen, block_size)
        if count_n is None:
            count_n = _row_counts(block_idx, tiles_n[1])
        skip_w, skip_n = _pack_decision(cu_seqlens, tiles_n[:2], count_n, tiles_w, count_w, tok_w)
        walks.append((1, rows_w, tok_w, tiles_w[0], tiles_w[1], (lists_w, strides_w), skip_w, "wide"))
    walks.append((mode_n, rows_n, tok_n, tiles_n[0], tiles_n[1], (lists_n, strides_n), skip_n, "fwd"))
    if _any_dense(dense_len, dense_min, max_seqlen):
        rows_d, tok_d = _tile_rows(group, TUNING["dense_rows"])
        doc_d, start_d, _ = _tiles(cu_seqlens, n_tokens, tok_d)
        walks.append((2, rows_d, tok_d, doc_d, start_d, ((doc_d, doc_d, doc_d), (0, 0)), None, "dense"))
    return walks


def _kv_descs(k, v, block_size):
    """Tensor descriptors of K and V viewed as [N, H_kv * d] with [block_size, d] boxes (used when
    TUNING["kv_tma"]); otherwise the tensors themselves, unused by the kernel."""
    if not TUNING["kv_tma"]:
        return k, v
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, h_kv, d = k.shape
    return (TensorDescriptor.from_tensor(k.view(n, h_kv * d), [block_size, d]),
            TensorDescriptor.from_tensor(v.view(n, h_kv * d), [block_size, d]))


def _forward(q, k, v, block_idx, cu_seqlens, max_seqlen, block_size, scale, dense_len, dense_min):
    n_tokens, h_q, d = q.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    k_slots = block_idx.shape[2]
    out = _empty_like(q)
    lse = _empty((h_q, n_tokens), dtype=torch.float32, device=q.device)
    if n_tokens == 0:
        return out, lse
    prec = _dot_precision(q.dtype)
    for mode, rows, tok, tile_doc, tile_start, lists, skip, kind in _query_walks(
            block_idx, cu_seqlens, n_tokens, max_seqlen, block_size, group, dense_len, dense_min):
        n_tiles = tile_doc.numel()
        _fwd_kernel[(n_tiles, h_kv)](
            q, k, v, out, lse, *_kv_descs(k, v, block_size), cu_seqlens, tile_doc, tile_start, *lists[0],
            tile_doc if skip is None else skip,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), *lists[1], n_tiles, n_tokens, h_q, scale * _LOG2E, dense_len, dense_min,
            G=group, TOK=tok, BLOCK_M=rows, BLOCK_N=block_size, D=d, SLOTS=k_slots,
            SLOTS_P2=triton.next_power_of_2(max(k_slots, 1)), MODE=mode, DOT_PREC=prec,
            KV_TMA=TUNING["kv_tma"], HAS_SKIP=skip is not None,
            **_launch_opts({"fwd": "fwd", "wide": "fwd_wide", "dense": "dense"}[kind], d),
        )
    return out, lse


def _backward(do, q, k, v, out, lse, block_idx, cu_seqlens, max_seqlen, block_size, scale, dense_len, dense_min):
    n_tokens, h_q, d = q.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    k_slots = block_idx.shape[2]
    dk = _empty_like(k)
    dv = _empty_like(v)
    if n_tokens == 0:
        return _empty_like(q), dk, dv
    do = do.contiguous()
    prec = _dot_precision(q.dtype)
    delta = _empty((h_q, n_tokens), dtype=torch.float32, device=q.device)
    fuse_dq = TUNING["dq_atomic"]
    if fuse_dq:
        # dQ accumulated by the dK/dV kernel (atomic adds of each block's share): no query-tile walk at all.
        dq_acc = torch.zeros((n_tokens, h_q, d), dtype=torch.float32, device=q.device)
        _delta_kernel[(triton.cdiv(n_tokens, 64), h_q)](out, do, delta, out.stride(0), out.stride(1), do.stride(0),
                                                        do.stride(1), n_tokens, BLOCK_T=64, D=d)
    else:
        dq = _empty_like(q)
        dq_acc = delta  # never read (FUSE_DQ off)
        for mode, rows, tok, tile_doc, tile_start, lists, skip, kind in _query_walks(
                block_idx, cu_seqlens, n_tokens, max_seqlen, block_size, group, dense_len, dense_min):
            n_tiles = tile_doc.numel()
            _dq_kernel[(n_tiles, h_kv)](
                q, k, v, out, do, dq, lse, delta, *_kv_descs(k, v, block_size), cu_seqlens, tile_doc, tile_start,
                *lists[0], tile_doc if skip is None else skip,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                out.stride(0), out.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                *lists[1], n_tiles, n_tokens, h_q, scale * _LOG2E, scale, dense_len, dense_min,
                G=group, TOK=tok, BLOCK_M=rows, BLOCK_N=block_size, D=d, SLOTS=k_slots,
                SLOTS_P2=triton.next_power_of_2(max(k_slots, 1)), MODE=mode, DOT_PREC=prec,
                KV_TMA=TUNING["kv_tma"], HAS_SKIP=skip is not None,
                **_launch_opts({"fwd": "dq", "wide": "dq_wide", "dense": "dense"}[kind], d),
            )

    blk_doc, blk_start, first_block = _tiles(cu_seqlens, n_tokens, block_size)
    n_blk_tiles = blk_doc.numel()
    chunk = TUNING["dkdv_chunk"]
    rows, tok = _tile_rows(group, TUNING["dkdv_rows"])
    if _all_dense(dense_len, dense_min, max_seqlen):
        # Only the dense phase runs; the sparse tables it is passed are never read.
        qtok = offsets = ex_key = ex_lo = ex_first = blk_doc
        dk_part = dv_part = dk
        phases = [(0, (n_blk_tiles, h_kv))]
    else:
        qtok, offsets = _inverted_index(block_idx, cu_seqlens, first_block, n_blk_tiles)
        ex_key, ex_lo, ex_first, n_items = _list_chunks(offsets, qtok.numel(), chunk)
        dk_part = _empty((n_items, block_size, d), dtype=torch.float32, device=q.device)
        dv_part = _empty_like(dk_part)
        phases = [(2, (n_items, 1)), (1, (n_blk_tiles, h_kv))]
        if _any_dense(dense_len, dense_min, max_seqlen):
            phases.append((0, (n_blk_tiles, h_kv)))
    for phase, grid in phases:
        _dkdv_kernel[grid](
            q, k, v, do, dk, dv, lse, delta, dq_acc, cu_seqlens, blk_doc, blk_start, offsets, qtok,
            ex_key, ex_lo, ex_first, dk_part, dv_part,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq_acc.stride(0),
            n_blk_tiles, n_tokens, scale * _LOG2E, scale, dense_len, dense_min, chunk,
            G=group, TOK=tok, BLOCK_M=rows, BLOCK_N=block_size, D=d, PHASE=phase, DOT_PREC=prec,
            FUSE_DQ=fuse_dq, **_launch_opts("dkdv", d),
        )
    if fuse_dq:
        dq = dq_acc.to(q.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile, with fake implementations) and autograd
# ----------------------------------------------------------------------------------------------------------

@torch.library.custom_op("infllm::block_sparse_attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                 cu_seqlens: torch.Tensor, max_seqlen: int, block_size: int, scale: float,
                 dense_len: int, dense_min: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, block_idx, cu_seqlens, max_seqlen, block_size, scale, dense_len, dense_min)


@_attn_fwd_op.register_fake
def _(q, k, v, block_idx, cu_seqlens, max_seqlen, block_size, scale, dense_len, dense_min):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("infllm::block_sparse_attn_bwd", mutates_args=())
def _attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, block_idx: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 block_size: int, scale: float, dense_len: int,
                 dense_min: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, lse, block_idx, cu_seqlens, max_seqlen, block_size, scale, dense_len,
                     dense_min)


@_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, block_idx, cu_seqlens, max_seqlen, block_size, scale, dense_len, dense_min):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, block_idx, cu_seqlens, max_seqlen, block_size, scale, dense_len, dense_min = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_idx, cu_seqlens)
    ctx.params = (max_seqlen, block_size, scale, dense_len, dense_min)
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, d_out, d_lse):
    q, k, v, out, lse, block_idx, cu_seqlens = ctx.saved_tensors
    max_seqlen, block_size, scale, dense_len, dense_min = ctx.params
    dq, dk, dv = _attn_bwd_op(d_out, q, k, v, out, lse, block_idx, cu_seqlens, max_seqlen, block_size, scale,
                              dense_len, dense_min)
    return dq, dk, dv, None, None, None, None, None, None, None


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_setup_context)


def block_sparse_attn_triton(q, k, v, block_idx, cu_seqlens, max_seqlen, *, block_size=64, softmax_scale=None,
                             dense_len=-1, dense_min=0):
    """Block-sparse attention over the given blocks, Triton forward and backward (see the module docstring).

    q [N, H_q, d], k, v [N, H_kv, d] (fp16 / bf16 / fp32, d a power of two in [16, 256]); block_idx int32
    [H_kv, N, K]: per token its selected block ids relative to its document start, each at most once, -1 =
    padding; cu_seqlens int32 [n_docs + 1]; max_seqlen a Python int; block_size a power of two in [16, 128].
    Documents shorter than dense_len (when != -1) and longer than dense_min attend causally to all their blocks
    and ignore block_idx; the others use block_idx. dense_min (default 0: every document under dense_len) lets a
    caller whose block_idx already lists every block 0..c for short documents (InfLLM-V2 with T <= k_eff * B,
    contract step 9) keep those documents on the faster sparse launch.
    Returns [N, H_q, d] in q's dtype, differentiable in q, k, v. Reads nothing back to the host."""
    n, _, h_kv, d = check_qkv(q, k, v)
    check_block_size(block_size)
    check_cu_seqlens(cu_seqlens, q.device)
    check_max_seqlen(max_seqlen)
    check_block_idx(block_idx, h_kv, n, q.device)
    check_dense_len(dense_len)
    if isinstance(dense_min, bool) or not isinstance(dense_min, int) or dense_min < 0:
        raise ValueError(f"dense_min: must be an int >= 0, got {dense_min!r}")
    _check_kernel_shapes(d, block_size)
    if q.dtype == torch.float64:
        raise TypeError("q: the Triton kernel takes float16 / bfloat16 / float32, got float64")
    scale = resolve_softmax_scale(softmax_scale, d)
    out, _ = _attn_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), block_idx.contiguous(),
                          cu_seqlens.contiguous(), max_seqlen, block_size, float(scale), dense_len,
                          dense_min)
    return out


def dense_attn_triton(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale=None):
    """Causal attention within each document through the dense mode of the kernels above (every document
    dense: no selection, no sparse tables). Same inputs as `block_sparse_attn_triton` without block_idx;
    reads nothing back to the host. Returns [N, H_q, d] in q's dtype, differentiable in q, k, v."""
    n, _, h_kv, d = check_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens, q.device)
    check_max_seqlen(max_seqlen)
    block_size = TUNING["dense_block"]
    _check_kernel_shapes(d, block_size)
    if q.dtype == torch.float64:
        raise TypeError("q: the Triton kernel takes float16 / bfloat16 / float32, got float64")
    scale = resolve_softmax_scale(softmax_scale, d)
    # Never read in the all-dense launches; one broadcast element stands in for [H_kv, N, 1].
    no_blocks = torch.full((1, 1, 1), -1, dtype=torch.int32, device=q.device).expand(h_kv, n, 1)
    out, _ = _attn_fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), no_blocks, cu_seqlens.contiguous(),
                          max_seqlen, block_size, float(scale), max_seqlen + 1, 0)
    return out
