"""Fused Triton block selection for InfLLM-V2 (README.md beside it, steps 1-7), no gradient.

Same signature and result as `naive.infllm_v2_select_naive`. Two launches, no host synchronisation:

1. `_compress_kernel` (twice with lse_approx): mean-pooled keys, fine (l, s) and coarse (4l, 4s), per
   document and KV head, into a packed buffer where document i's kernels start at row cu_seqlens[i] // s
   (a document of T tokens has at most T // s kernels, so the rows never collide and no prefix sum is needed).
2. `_select_kernel`: one program per (tile of BLOCK_T query tokens of one document, KV head). The rows of its
   tiles are the BLOCK_T tokens x G query heads of the group (head-major, padded to G_PAD = next power of 2).
   - pass 1: log-sum-exp per row over the visible kernels (exact), or over the visible coarse kernels
     (lse_approx; exact fallback for the tokens that see no coarse kernel yet);
   - pass 2: over the "stream" blocks only (init <= b < c - n_local: the forced init/local blocks and the
     future ones need no score), BLOCK_N kernels at a time: probabilities p = exp2(s - lse), the sum over the
     G heads as a second small matmul with a 0/1 matrix, max-pool to blocks (a kernel overlapping two blocks
     feeds the next block through a carried "tail"), then a running top-K_SEL per token kept in registers
     (bitonic merge of sorted int32 keys = truncated fp32 score bits | block id).
   Neither the [H_kv, N, NC] kernel scores nor the [H_kv, N, NB] block scores ever reach memory: the only
   outputs are the ids. Tiles whose tokens all have c + 1 <= k_eff select every block and skip both passes.

Output per token: init blocks, then the selected stream blocks ascending, then the local window, then -1.

Legend: N packed tokens, T tokens of one document, H_q / H_kv heads, G = H_q / H_kv, d head dim, l / s kernel
size / stride, B block size, NC kernels, NB blocks, K = k_eff. M = G_PAD * BLOCK_T rows of a query tile,
KPB = B // s kernels per block (by first block), NBI = BLOCK_N // KPB blocks per inner step.
Requires: kernel_size <= block_size, block_size % kernel_stride == 0, kernel_size % kernel_stride == 0,
block_size // kernel_stride a power of two (all hold for MiniCPM4's 64 / 32 / 16).
Precision: scores are ranked on their top 32 - ID_BITS bits (ID_BITS = bits of the largest block id: 11 at
128k tokens, i.e. 12 mantissa bits, finer than bf16); ties (common: neighbouring blocks share a kernel) go to
the lower block id; p is summed over heads in fp16 (fp32 for fp32 inputs), clamped at 65504, which only
matters when lse_approx underestimates a normaliser by more than e^11.
Memory: the compressed keys (N / s + N / 4s rows of d) and the int32 output; nothing of size N x NB.
Speed (H100, bench/README.md "Selection"): 10 / 20 / 39 ms at MiniCPM4's 32k x 8 / 64k x 4 / 128k x 2.
Known slack: the compiler if-converts the merge below, so the sort runs on every step instead of every SUBS-th.
A variant without that (a nested loop per chunk, pass 1 as [M, BLOCK_N] tiles, the visibility mask on the
head-summed tile) halved the instructions per step but measured the same for G = 16 and 2x slower for G = 3 / 4
on the H100 (not profiled yet), so this measured form stays.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.infllm_v2._validate import (
    check_cu_seqlens,
    check_max_seqlen,
    check_qk,
    check_sparse_config,
    resolve_softmax_scale,
)

_LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# --------------------------------------------------------------------------------------------------------------
# Step 1: compressed keys.


@triton.jit
def _compress_kernel(k_ptr, kc_ptr, cu_ptr, stride_kn, stride_kh, kc_stride_h,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr,
                     BLOCK_J: tl.constexpr):
    pid_j = tl.program_id(0)
    doc = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + doc)
    seq_len = tl.load(cu_ptr + doc + 1) - start
    n_kc = tl.where(seq_len >= KSIZE, (seq_len - KSIZE) // KSTRIDE + 1, 0)
    j0 = pid_j * BLOCK_J
    if j0 < n_kc:
        offs_j = j0 + tl.arange(0, BLOCK_J)                      # [BLOCK_J]
        offs_d = tl.arange(0, BLOCK_D)                           # [BLOCK_D]
        mask = (offs_j < n_kc)[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = (start + offs_j * KSTRIDE).to(tl.int64)          # first token of each kernel
        ptrs = k_ptr + rows[:, None] * stride_kn + head * stride_kh + offs_d[None, :]
        acc = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)     # [BLOCK_J, BLOCK_D]
        for i in range(KSIZE):
            acc += tl.load(ptrs + i * stride_kn, mask=mask, other=0.0).to(tl.float32)
        out_rows = (start // KSTRIDE + offs_j).to(tl.int64)
        out_ptrs = kc_ptr + head * kc_stride_h + out_rows[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(out_ptrs, (acc * (1.0 / KSIZE)).to(kc_ptr.dtype.element_ty), mask=mask)



# Reductions below call tl.reduce with triton's own max/min/sum combine functions, which is what tl.max /
# tl.min / tl.sum compile to for int32 and fp32; calling them directly skips a device-function call, which the
# interpreter (CPU tests) pays dearly for, and keeps its numpy fast path.
# --------------------------------------------------------------------------------------------------------------
# Bitonic sorting along the last dim of a [R, 2**LOG_N] tile, viewed as a hypercube [2] * N_DIMS (bit j of the
# flat index is axis N_DIMS - 1 - j). A compare-exchange layer takes the min and max over one size-2 axis: on
# the GPU that is an in-thread op or one shuffle, and the interpreter runs it as a numpy reduction.


@triton.jit
def _bitonic_rows(x, LOG_N: tl.constexpr, N_DIMS: tl.constexpr, FIRST_STAGE: tl.constexpr,
                  DESCENDING: tl.constexpr):
    """Sort each row of x [R, 2**LOG_N] (R * 2**LOG_N == 2**N_DIMS): FIRST_STAGE = 1 sorts anything,
    FIRST_STAGE = LOG_N only merges rows that are already bitonic. One function with inline layers: the
    interpreter pays per device-function call."""
    h = tl.reshape(x, [2] * N_DIMS)
    for stage in tl.static_range(FIRST_STAGE, LOG_N + 1):
        # Below the last stage, runs of 2**stage alternate direction (bit `stage` of the index) so that pairs
        # of them form the bitonic runs of the next stage.
        if stage < LOG_N:
            flip = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - stage - 1) + [2] + [1] * stage)
        else:
            flip = DESCENDING
        for i in tl.static_range(stage):
            # Compare-exchange the pairs that differ in bit j = stage - 1 - i of the index (hypercube axis
            # N_DIMS - 1 - j); written inline since a constexpr name cannot be reassigned in the loop.
            lo = tl.reduce(h, N_DIMS - stage + i, tl.standard._elementwise_min, keep_dims=True)
            hi = tl.reduce(h, N_DIMS - stage + i, tl.standard._elementwise_max, keep_dims=True)
            bit_j = tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - stage + i) + [2] + [1] * (stage - 1 - i))
            h = tl.where((bit_j ^ flip) != 0, hi, lo)
    return tl.reshape(h, x.shape)


# --------------------------------------------------------------------------------------------------------------
# Steps 2-7: scores, pooling, forced blocks, top-k.


@triton.jit
def _row_lse2(qT, kc_base, n_vis, t_r, qk_scale,
              KSIZE: tl.constexpr, KSTRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_N: tl.constexpr, M: tl.constexpr, DOT_PREC: tl.constexpr):
    """log2 of sum_j exp2(qk_scale * q_r . Kc[j]) over the kernels j < n_vis visible to row r's token t_r.
    [M] fp32, -inf for rows that see no kernel. Same [BLOCK_N, M] orientation as pass 2."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([M], float("-inf"), dtype=tl.float32)           # [M] running max
    l_i = tl.zeros([M], dtype=tl.float32)                         # [M] running sum
    for j0 in range(0, n_vis, BLOCK_N):
        offs_j = j0 + offs_n
        kc = tl.load(kc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=(offs_j < n_vis)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(kc, qT, input_precision=DOT_PREC) * qk_scale                                  # [BLOCK_N, M]
        visible = (offs_j[:, None] * KSTRIDE + (KSIZE - 1)) <= t_r[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 0, tl.standard._elementwise_max))
        # A row with nothing visible yet keeps max -inf; shift by 0 there so no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.reduce(tl.exp2(s - m_safe[None, :]), 0, tl.standard._sum_combine)
        m_i = m_new
    # l_i = 0 only where m_i = -inf: the result is -inf either way, without log2(0).
    return m_i + tl.log2(tl.maximum(l_i, 1e-30))


@triton.jit
def _select_kernel(q_ptr, kc_ptr, kc2_ptr, cu_ptr, out_ptr,
                   stride_qn, stride_qh, kc_stride_h, kc2_stride_h, out_stride_h, qk_scale, n_tile_slots,
                   G: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                   BSIZE: tl.constexpr, KSIZE: tl.constexpr, KSTRIDE: tl.constexpr,
                   INIT: tl.constexpr, N_LOCAL: tl.constexpr, K_EFF: tl.constexpr,
                   K_SEL: tl.constexpr, K_INIT: tl.constexpr, K_LOCAL: tl.constexpr, K_OUT: tl.constexpr,
                   ID_BITS: tl.constexpr, LOG_T: tl.constexpr, LOG_KSEL: tl.constexpr,
                   LSE_APPROX: tl.constexpr, P_FP16: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    # Late tiles of long documents do the most work: start them first.
    tile = n_tile_slots - 1 - tl.program_id(0)
    doc = tl.program_id(1)
    g = tl.program_id(2)
    start = tl.load(cu_ptr + doc)
    seq_len = tl.load(cu_ptr + doc + 1) - start
    t0 = tile * BLOCK_T
    if t0 >= seq_len:
        return

    M: tl.constexpr = G_PAD * BLOCK_T
    KPB: tl.constexpr = BSIZE // KSTRIDE                   # kernels whose first block is b
    NBI: tl.constexpr = BLOCK_N // KPB                     # blocks per inner step
    # Kernel i of a block (by first block) also overlaps the next block iff i*s + l - 1 >= B.
    I_TAIL: tl.constexpr = (BSIZE - KSIZE + KSTRIDE) // KSTRIDE
    KSIZE2: tl.constexpr = 4 * KSIZE
    KSTRIDE2: tl.constexpr = 4 * KSTRIDE
    ID_MASK: tl.constexpr = (1 << ID_BITS) - 1
    N_DIMS: tl.constexpr = LOG_T + LOG_KSEL               # [BLOCK_T, K_SEL] as a hypercube
    SCORE_MASK: tl.constexpr = -(1 << ID_BITS)            # keeps the score bits above the id

    offs_t = tl.arange(0, BLOCK_T)                         # [BLOCK_T]
    t_tok = t0 + offs_t                                    # document-relative token of each column
    tok_ok = t_tok < seq_len
    c_tok = t_tok // BSIZE                                 # the token's own block
    t_last = tl.minimum(t0 + BLOCK_T, seq_len) - 1
    c_last = t_last // BSIZE
    stream_hi = c_tok - N_LOCAL                            # stream blocks: INIT <= b < stream_hi
    offs_k = tl.arange(0, K_SEL)                           # [K_SEL]

    if c_last + 1 > K_EFF:
        offs_m = tl.arange(0, M)                           # [M] rows: head-major, h = m // BLOCK_T
        r_tok = offs_m % BLOCK_T
        r_head = offs_m // BLOCK_T
        t_r = t0 + r_tok
        row_ok = (t_r < seq_len) & (r_head < G)
        offs_d = tl.arange(0, BLOCK_D)
        q_ptrs = (q_ptr + (start + t_r).to(tl.int64)[:, None] * stride_qn
                  + (g * G + r_head)[:, None] * stride_qh + offs_d[None, :])
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [M, BLOCK_D]
        qT = tl.trans(q)                                                                         # [BLOCK_D, M]

        n_kc = tl.where(seq_len >= KSIZE, (seq_len - KSIZE) // KSTRIDE + 1, 0)
        kc_base = kc_ptr + g * kc_stride_h + (start // KSTRIDE).to(tl.int64) * HEAD_DIM
        n_vis = tl.where(t_last >= KSIZE - 1, (t_last - KSIZE + 1) // KSTRIDE + 1, 0)

        # Pass 1: the per-row normaliser, log2 domain.
        if LSE_APPROX:
            kc2_base = kc2_ptr + g * kc2_stride_h + (start // KSTRIDE2).to(tl.int64) * HEAD_DIM
            n_vis2 = tl.where(t_last >= KSIZE2 - 1, (t_last - KSIZE2 + 1) // KSTRIDE2 + 1, 0)
            lse2 = _row_lse2(qT, kc2_base, n_vis2, t_r, qk_scale, KSIZE2, KSTRIDE2, HEAD_DIM, BLOCK_D,
                             BLOCK_N, M, DOT_PREC)
            if t0 < KSIZE2 - 1:
                # Tokens before the first complete coarse kernel: the exact normaliser.
                t_cap = tl.minimum(t_last, KSIZE2 - 2)
                n_vis_f = tl.where(t_cap >= KSIZE - 1, (t_cap - KSIZE + 1) // KSTRIDE + 1, 0)
                lse_f = _row_lse2(qT, kc_base, n_vis_f, t_r, qk_scale, KSIZE, KSTRIDE, HEAD_DIM, BLOCK_D,
                                  BLOCK_N, M, DOT_PREC)
                lse2 = tl.where(t_r >= KSIZE2 - 1, lse2, lse_f)
        else:
            lse2 = _row_lse2(qT, kc_base, n_vis, t_r, qk_scale, KSIZE, KSTRIDE, HEAD_DIM, BLOCK_D, BLOCK_N,
                             M, DOT_PREC)
        # Rows that see no kernel only meet masked kernels below; keep their p finite.
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)

        # Pass 2. R [M, BLOCK_T] sums the G head rows of each token (padded heads excluded).
        if P_FP16:
            R = ((r_tok[:, None] == offs_t[None, :]) & (r_head < G)[:, None]).to(tl.float16)
        else:
            R = ((r_tok[:, None] == offs_t[None, :]) & (r_head < G)[:, None]).to(tl.float32)
        offs_n = tl.arange(0, BLOCK_N)                     # [BLOCK_N]
        offs_bi = tl.arange(0, NBI)                        # [NBI]
        offs_kpb = tl.arange(0, KPB)                       # [KPB]
        SUBS: tl.constexpr = K_SEL // NBI                  # inner steps per merge
        offs_sub = tl.arange(0, SUBS)                      # [SUBS]
        stream_end = c_last - N_LOCAL                      # no token of the tile scores a block >= this
        n_steps = tl.where(stream_end > INIT, tl.cdiv(stream_end, NBI), 0)
        state = tl.full([BLOCK_T, K_SEL], -1, dtype=tl.int32)   # [BLOCK_T, K_SEL] keys, descending
        carry = tl.zeros([BLOCK_T], dtype=tl.float32)           # tail of the block before the step
        buf = tl.full([BLOCK_T, K_SEL], -1, dtype=tl.int32)     # [BLOCK_T, K_SEL] keys of the last SUBS steps
        for step in range(0, n_steps):
            b0 = step * NBI
            offs_j = b0 * KPB + offs_n
            kc = tl.load(kc_base + offs_j[:, None] * HEAD_DIM + offs_d[None, :],
                         mask=(offs_j < n_kc)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            s = tl.dot(kc, qT, input_precision=DOT_PREC)                                 # [BLOCK_N, M]
            p = tl.exp2(s * qk_scale - lse2[None, :])                                    # [BLOCK_N, M]
            # Only steps that reach past the tile's first token hold invisible kernels.
            if (b0 * KPB + BLOCK_N - 1) * KSTRIDE + KSIZE - 1 > t0:
                visible = ((offs_j[:, None] * KSTRIDE + (KSIZE - 1)) <= t_r[None, :]) & (offs_j < n_kc)[:, None]
                p = tl.where(visible, p, 0.0)
            if P_FP16:
                S = tl.dot(tl.minimum(p, 65504.0).to(tl.float16), R)                     # [BLOCK_N, BLOCK_T]
            else:
                S = tl.dot(p, R, input_precision=DOT_PREC)                               # [BLOCK_N, BLOCK_T]
            S3 = tl.reshape(S, [NBI, KPB, BLOCK_T])                                      # [NBI, KPB, BLOCK_T]
            # Scores are >= 0 and every stream block has a visible kernel, so 0 is max's identity.
            head = tl.reduce(S3, 1, tl.standard._elementwise_max)                        # [NBI, BLOCK_T]
            tail = tl.reduce(tl.where(offs_kpb[None, :, None] >= I_TAIL, S3, 0.0), 1, tl.standard._elementwise_max)
            prev_idx = tl.maximum(offs_bi - 1, 0)[:, None] + tl.zeros([NBI, BLOCK_T], dtype=tl.int32)
            prev = tl.gather(tail, prev_idx, 0)                                          # tail[b - 1]
            prev = tl.where(offs_bi[:, None] == 0, carry[None, :], prev)
            carry = tl.reduce(tl.where(offs_bi[:, None] == NBI - 1, tail, 0.0), 0, tl.standard._elementwise_max)
            blk = tl.trans(tl.maximum(head, prev))                                       # [BLOCK_T, NBI]
            b = b0 + offs_bi                                                             # [NBI]
            # Low bits hold ID_MASK - b: among equal scores the lower block id ranks first.
            key = (blk.to(tl.int32, bitcast=True) & SCORE_MASK) | (ID_MASK - b)[None, :]
            in_stream = (b[None, :] >= INIT) & (b[None, :] < stream_hi[:, None])
            key = tl.where(in_stream, key, -1)                                           # [BLOCK_T, NBI]
            sub = step % SUBS
            buf3 = tl.reshape(buf, [BLOCK_T, SUBS, NBI])
            buf3 = tl.where((offs_sub == sub)[None, :, None], key[:, None, :], buf3)
            buf = tl.reshape(buf3, [BLOCK_T, K_SEL])
            if (sub == SUBS - 1) | (step == n_steps - 1):
                # Top K_SEL of state (descending) and buf: elementwise max against buf ascending is bitonic.
                # (Named intermediate: the interpreter mishandles a device-function call on an inline expression.)
                buf = _bitonic_rows(buf, LOG_KSEL, N_DIMS, 1, 0)
                top = tl.maximum(state, buf)
                state = _bitonic_rows(top, LOG_KSEL, N_DIMS, LOG_KSEL, 1)
                buf = tl.full([BLOCK_T, K_SEL], -1, dtype=tl.int32)
    else:
        # Every block of [0, c] is selected: the stream is taken whole, scores unneeded.
        b_all = INIT + offs_k
        state = tl.where(b_all[None, :] < stream_hi[:, None], ID_MASK - b_all[None, :], -1)  # [BLOCK_T, K_SEL]

    # Assemble: [0, n_init) | stream ascending | [lo_loc, c] | -1 padding.
    n_init = tl.minimum(c_tok + 1, INIT)
    lo_loc = tl.maximum(c_tok - N_LOCAL, INIT)
    n_loc = tl.where(c_tok >= INIT, c_tok - lo_loc + 1, 0)
    need = K_EFF - n_init - n_loc
    take = (offs_k[None, :] < need[:, None]) & (state >= 0)                              # [BLOCK_T, K_SEL]
    ids = tl.where(take, ID_MASK - (state & ID_MASK), 2147483647)                     # INT32_MAX sorts last
    ids = _bitonic_rows(ids, LOG_KSEL, N_DIMS, 1, 0)                                           # ascending
    n_sel = tl.reduce(take.to(tl.int32), 1, tl.standard._sum_combine)
    out_row = out_ptr + g * out_stride_h + (start + t_tok).to(tl.int64) * K_EFF          # [BLOCK_T]
    offs_i = tl.arange(0, K_INIT)
    tl.store(out_row[:, None] + offs_i[None, :], offs_i[None, :] + tl.zeros([BLOCK_T, K_INIT], dtype=tl.int32),
             mask=tok_ok[:, None] & (offs_i[None, :] < n_init[:, None]))
    tl.store(out_row[:, None] + n_init[:, None] + offs_k[None, :], ids,
             mask=tok_ok[:, None] & (offs_k[None, :] < n_sel[:, None]))
    offs_l = tl.arange(0, K_LOCAL)
    tl.store(out_row[:, None] + (n_init + n_sel)[:, None] + offs_l[None, :], lo_loc[:, None] + offs_l[None, :],
             mask=tok_ok[:, None] & (offs_l[None, :] < n_loc[:, None]))
    offs_o = tl.arange(0, K_OUT)
    total = n_init + n_sel + n_loc
    tl.store(out_row[:, None] + offs_o[None, :], tl.full([BLOCK_T, K_OUT], -1, dtype=tl.int32),
             mask=tok_ok[:, None] & (offs_o[None, :] >= total[:, None]) & (offs_o[None, :] < K_EFF))


# --------------------------------------------------------------------------------------------------------------
# Host side.


class SelectConfig(NamedTuple):
    """Launch parameters of `_select_kernel` (BLOCK_T tokens x G_PAD heads = M rows, BLOCK_N kernels)."""

    block_t: int
    block_n: int
    num_warps: int
    num_stages: int


# Measured launch parameters per (G_PAD, head_dim) that replace the formula of `default_config` on the GPU
# (bench/selection.py --sweep finds them; bench/long_context.py --tuning sets more for a run).
# (4, 64): Llama-3.2-1B's 32 / 8 heads of d 64 at 128k, H200: 16 tokens a tile (64 rows) 24.1 ms against the
# formula's 32 (26.0 ms); 8 warps or 3 stages were slower (bench/README.md, "Selection").
CONFIGS: dict[tuple[int, int], SelectConfig] = {(4, 64): SelectConfig(block_t=16, block_n=64, num_warps=4,
                                                                      num_stages=2)}


def default_config(group: int, head_dim: int, block_size: int, kernel_stride: int) -> SelectConfig:
    g_pad = _next_pow2(group)
    kpb = block_size // kernel_stride
    if _interpreting():
        # Few, large programs: the interpreter pays per operation, not per element.
        return SelectConfig(block_t=64, block_n=max(64, kpb), num_warps=4, num_stages=1)
    if (g_pad, head_dim) in CONFIGS:
        return CONFIGS[(g_pad, head_dim)]
    # About 128 rows per tile, at least 8 tokens (the head-sum matmul's N).
    block_t = min(64, max(8, 128 // g_pad))
    return SelectConfig(block_t=block_t, block_n=max(64, kpb), num_warps=4, num_stages=2)


def _check_kernel_geometry(block_size: int, kernel_size: int, kernel_stride: int) -> None:
    if kernel_size > block_size:
        raise ValueError(f"kernel_size: the Triton selection needs kernel_size <= block_size={block_size}, "
                         f"got {kernel_size}")
    if block_size % kernel_stride != 0:
        raise ValueError(f"kernel_stride: the Triton selection needs block_size={block_size} to be a multiple "
                         f"of kernel_stride, got {kernel_stride}")
    if kernel_size % kernel_stride != 0:
        raise ValueError(f"kernel_size: the Triton selection needs a multiple of kernel_stride={kernel_stride}, "
                         f"got {kernel_size}")
    kpb = block_size // kernel_stride
    if kpb & (kpb - 1):
        raise ValueError(f"kernel_stride: the Triton selection needs block_size / kernel_stride to be a power of "
                         f"two, got {block_size} / {kernel_stride}")


def compress_keys_packed(k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, kernel_size: int,
                         kernel_stride: int, dtype: torch.dtype) -> torch.Tensor:
    """Mean-pooled keys of every document, [H_kv, N // s + 1, d]; document i's kernels start at row
    cu_seqlens[i] // s. Rows between documents are left unwritten (never read)."""
    n, h_kv, d = k.shape
    n_docs = cu_seqlens.numel() - 1
    kc = torch.empty((h_kv, n // kernel_stride + 1, d), dtype=dtype, device=k.device)
    max_kc = 0 if max_seqlen < kernel_size else (max_seqlen - kernel_size) // kernel_stride + 1
    if max_kc == 0 or n_docs == 0:
        return kc
    block_j = 64 if _interpreting() else 16
    grid = (triton.cdiv(max_kc, block_j), n_docs, h_kv)
    _compress_kernel[grid](k, kc, cu_seqlens, k.stride(0), k.stride(1), kc.stride(0),
                           HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)), KSIZE=kernel_size, KSTRIDE=kernel_stride,
                           BLOCK_J=block_j, num_warps=4)
    return kc


def infllm_v2_select_triton(q, k, cu_seqlens, max_seqlen, *, block_size=64, kernel_size=32, kernel_stride=16,
                            init_blocks=1, window_size=2048, topk=64, lse_approx=True, softmax_scale=None):
    """Block selection (steps 1-7). Returns int32 [H_kv, N, k_eff]: per query token the ids of its selected
    blocks relative to its document start, ascending, padded with -1. No gradient, no host sync."""
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1]) if q.dim() == 3 else softmax_scale
    return _select_op(q.detach(), k.detach(), cu_seqlens, int(max_seqlen), int(block_size), int(kernel_size),
                      int(kernel_stride), int(init_blocks), int(window_size), int(topk), bool(lse_approx),
                      float(scale) if scale is not None else -1.0)


# A custom op with a fake (meta) implementation, so torch.compile traces through the selection instead of
# breaking the graph around the Triton launches.
@torch.library.custom_op("infllm::infllm_v2_select", mutates_args=())
def _select_op(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, block_size: int,
               kernel_size: int, kernel_stride: int, init_blocks: int, window_size: int, topk: int,
               lse_approx: bool, softmax_scale: float) -> torch.Tensor:
    return _select(q, k, cu_seqlens, max_seqlen, block_size=block_size, kernel_size=kernel_size,
                   kernel_stride=kernel_stride, init_blocks=init_blocks, window_size=window_size, topk=topk,
                   lse_approx=lse_approx, softmax_scale=None if softmax_scale < 0 else softmax_scale)


@_select_op.register_fake
def _(q, k, cu_seqlens, max_seqlen, block_size, kernel_size, kernel_stride, init_blocks, window_size, topk,
      lse_approx, softmax_scale):
    return q.new_empty((k.shape[1], q.shape[0], topk + window_size // block_size), dtype=torch.int32)


@torch.no_grad()
def _select(q, k, cu_seqlens, max_seqlen, *, block_size, kernel_size, kernel_stride, init_blocks, window_size,
            topk, lse_approx, softmax_scale, config: SelectConfig | None = None, out: torch.Tensor | None = None):
    """`config` overrides the launch parameters (benchmarks); `out` is a preallocated result (tests poison it)."""
    n, h_q, h_kv, d = check_qk(q, k)
    cfg = check_sparse_config(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk)
    n_docs = check_cu_seqlens(cu_seqlens, q.device)
    check_max_seqlen(max_seqlen)
    _check_kernel_geometry(block_size, kernel_size, kernel_stride)
    scale = resolve_softmax_scale(softmax_scale, d)
    k_eff = cfg.k_eff
    if out is None:
        out = torch.empty((h_kv, n, k_eff), dtype=torch.int32, device=q.device)
    if n == 0 or max_seqlen == 0:
        return out
    if q.dtype == torch.float64:
        q, k = q.float(), k.float()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    group = h_q // h_kv
    if config is None:
        config = default_config(group, d, block_size, kernel_stride)

    is_fp32 = q.dtype == torch.float32
    kc = compress_keys_packed(k, cu_seqlens, max_seqlen, kernel_size, kernel_stride, q.dtype)
    kc2 = compress_keys_packed(k, cu_seqlens, max_seqlen, 4 * kernel_size, 4 * kernel_stride, q.dtype) \
        if lse_approx else kc

    kpb = block_size // kernel_stride
    block_n = max(config.block_n, kpb)
    nbi = block_n // kpb
    # Non-forced blocks a token can need: k_eff minus its forced ones, at most topk - init_blocks - 1.
    k_sel = max(_next_pow2(max(1, topk - init_blocks - 1)), nbi)
    n_blocks_max = triton.cdiv(max_seqlen, block_size)
    # ID_BITS is a compile-time constant: derived from each batch's max_seqlen it recompiled the kernel
    # whenever a batch's longest document crossed a power of two (seconds per new value, seen as 5-20 s
    # training steps on an H100). A floor of 11 bits (2048 blocks, 128k tokens at B=64) keeps one variant;
    # the score keeps 21 bits, finer than bf16.
    id_bits = max(11, (n_blocks_max - 1).bit_length())
    if id_bits > 22:
        raise ValueError(f"max_seqlen: too long for the Triton selection's keys ({n_blocks_max} blocks)")
    n_tile_slots = triton.cdiv(max_seqlen, config.block_t)
    grid = (n_tile_slots, n_docs, h_kv)
    _select_kernel[grid](
        q, kc, kc2, cu_seqlens, out,
        q.stride(0), q.stride(1), kc.stride(0), kc2.stride(0), out.stride(0), scale * _LOG2E, n_tile_slots,
        G=group, G_PAD=_next_pow2(group), HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)),
        BLOCK_T=config.block_t, BLOCK_N=block_n,
        BSIZE=block_size, KSIZE=kernel_size, KSTRIDE=kernel_stride,
        INIT=init_blocks, N_LOCAL=cfg.n_local, K_EFF=k_eff,
        K_SEL=k_sel, K_INIT=_next_pow2(max(1, init_blocks)), K_LOCAL=_next_pow2(cfg.n_local + 1),
        K_OUT=_next_pow2(k_eff), ID_BITS=id_bits,
        LOG_T=config.block_t.bit_length() - 1, LOG_KSEL=k_sel.bit_length() - 1,
        LSE_APPROX=bool(lse_approx), P_FP16=not is_fp32,
        DOT_PREC="ieee" if is_fp32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
