"""Triton block-sparse attention (kernels/infllm_v2/attention.py) against the float64 masked-dense oracle.

Outputs and dq/dk/dv on the same block ids, FlashAttention-style tolerance (tests/kernels/tolerance.py),
NaN-poisoned buffers, uneven documents (shorter than a block, odd lengths), G in {1, 3, 4, 16}, d in {64, 128},
the dense_len switch mixed within one batch, fp32/fp16 everywhere and bf16 on CUDA. On CPU everything runs
under the Triton interpreter (tests/conftest.py), so shapes stay tiny.
"""
from __future__ import annotations

import functools

import pytest
import torch

import kernels.infllm_v2.attention as attn
from kernels.infllm_v2.attention import block_sparse_attn_triton
from kernels.infllm_v2.naive import infllm_v2_select_naive
from tests.conftest import DEVICE, HAS_CUDA, requires_cuda
from tests.kernels.oracle import masked_dense_attention
from tests.kernels.tolerance import check_fwd_bwd


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def random_selection(h_kv, lens, block_size, k_slots, gen):
    """int32 [H_kv, N, K]: per token its current block (always, as selection forces it) and random earlier
    blocks, min(c + 1, K) ids ascending, then -1."""
    parts = []
    for T in lens:
        n_blocks = max(1, -(-T // block_size))
        c = torch.arange(T) // block_size
        b = torch.arange(n_blocks)
        score = torch.rand((h_kv, T, n_blocks), generator=gen)
        score = torch.where(b[None, None, :] == c[None, :, None], 2.0, score)
        score = torch.where(b[None, None, :] > c[None, :, None], -1.0, score)
        k_top = min(k_slots, n_blocks)
        top = score.topk(k_top, dim=-1)
        ids = torch.where(top.values >= 0, top.indices, n_blocks).sort(dim=-1).values
        ids = torch.where(ids == n_blocks, -1, ids)
        out = torch.full((h_kv, T, k_slots), -1, dtype=torch.int64)
        out[..., :k_top] = ids
        parts.append(out)
    return torch.cat(parts, dim=1).to(torch.int32).to(DEVICE)


def _inputs(lens, h_q, h_kv, d, gen):
    n = sum(lens)
    return {
        "q": torch.randn((n, h_q, d), generator=gen, dtype=torch.float64).to(DEVICE),
        "k": torch.randn((n, h_kv, d), generator=gen, dtype=torch.float64).to(DEVICE),
        "v": torch.randn((n, h_kv, d), generator=gen, dtype=torch.float64).to(DEVICE),
    }


def _reference(q, k, v, *, block_idx, cu_seqlens, block_size, dense_len, dense_min=0):
    """The oracle; tokens of documents with dense_min < T < dense_len list every block (dense causal attention)."""
    if dense_len > 0:
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()
        h_kv, n, k_slots = block_idx.shape
        width = max(k_slots, -(-int(lens.max()) // block_size))
        wide = torch.full((h_kv, n, width), -1, dtype=torch.int32)
        wide[..., :k_slots] = block_idx.cpu()
        dense_tok = torch.repeat_interleave((lens < dense_len) & (lens > dense_min), lens)
        wide[:, dense_tok] = torch.arange(width, dtype=torch.int32)
        block_idx = wide
    return masked_dense_attention(q, k, v, block_idx, cu_seqlens, block_size)


def _dtypes():
    return [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


# (lens, H_q, H_kv, d, block_size, k_slots, dense_len): G = 16, 4, 3, 1, mixed dense/sparse, docs shorter
# than a block, odd lengths.
CASES = [
    ([70, 1, 37], 16, 1, 64, 16, 3, -1),
    ([83, 40], 8, 2, 128, 16, 4, -1),
    ([61, 9, 90], 12, 4, 64, 16, 3, -1),
    ([77, 15, 50], 2, 2, 64, 16, 3, -1),
    ([100, 20, 45, 7], 8, 2, 64, 16, 3, 40),
]
CUDA_CASES = [
    ([1000, 333, 2], 12, 4, 64, 64, 8, -1),
    ([1500, 701], 32, 2, 128, 64, 8, -1),
    ([900, 64, 1300], 9, 3, 64, 64, 6, 1000),
    ([1100, 17], 7, 1, 128, 64, 4, 500),
]


def _case_id(case, dtype=None):
    lens, h_q, h_kv, d, bs, k, dl = case
    s = f"T{sum(lens)}-Hq{h_q}-Hkv{h_kv}-D{d}-docs{len(lens)}-B{bs}-K{k}"
    if dl != -1:
        s += f"-dense{dl}"
    return s + (f"-{str(dtype).split('.')[-1]}" if dtype is not None else "")


def _params(cases, dtypes):
    return [pytest.param(c, dt, id=_case_id(c, dt)) for c in cases for dt in dtypes]


def _run_case(case, dtype, seed=0):
    lens, h_q, h_kv, d, block_size, k_slots, dense_len = case
    gen = torch.Generator().manual_seed(seed)
    cu = _cu(lens)
    block_idx = random_selection(h_kv, lens, block_size, k_slots, gen)
    inputs = _inputs(lens, h_q, h_kv, d, gen)
    kernel = functools.partial(block_sparse_attn_triton, block_idx=block_idx, cu_seqlens=cu,
                               max_seqlen=max(lens), block_size=block_size, dense_len=dense_len)
    reference = functools.partial(_reference, block_idx=block_idx, cu_seqlens=cu, block_size=block_size,
                                  dense_len=dense_len)
    check_fwd_bwd(kernel, reference, inputs, dtype=dtype)


@pytest.mark.parametrize("case,dtype", _params(CASES[:1], [torch.float32, torch.float16])
                         + _params(CASES[1:], [torch.float32]) + _params(CASES[2:4], [torch.float16]))
def test_matches_oracle(case, dtype, nan_poison):
    _run_case(case, dtype)


@requires_cuda
@pytest.mark.parametrize("case,dtype", _params(CASES + CUDA_CASES, [torch.bfloat16])
                         + _params(CUDA_CASES[:2], [torch.float16]))
def test_matches_oracle_cuda(case, dtype, nan_poison):
    _run_case(case, dtype)


@pytest.mark.parametrize("group", [1, 4])
def test_long_lists_split_across_programs(group, nan_poison, monkeypatch):
    """Key blocks picked by more queries than one dK/dV program takes (attention sinks) are split into
    chunks whose partial sums are added back; a tiny chunk forces that path everywhere."""
    monkeypatch.setitem(attn.TUNING, "dkdv_chunk", 5)
    _run_case(([90, 33], 4 * group, 4, 64, 16, 3, -1), torch.float32, seed=1)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=_case_id)
def test_dq_inside_dkdv_matches_oracle(case, nan_poison, monkeypatch):
    """TUNING dq_atomic: dQ accumulated by the dK/dV kernel (sparse and dense documents) instead of its own launch."""
    monkeypatch.setitem(attn.TUNING, "dq_atomic", True)
    _run_case(case, torch.float32, seed=2)


def test_dq_inside_dkdv_with_split_lists(nan_poison, monkeypatch):
    """The fused dQ from the extra chunks of long inverted-index lists too (PHASE 2 programs)."""
    monkeypatch.setitem(attn.TUNING, "dq_atomic", True)
    monkeypatch.setitem(attn.TUNING, "dkdv_chunk", 5)
    _run_case(([90, 33], 16, 4, 64, 16, 3, -1), torch.float32, seed=3)


@requires_cuda
@pytest.mark.parametrize("case,dtype", _params(CASES[1:] + CUDA_CASES, [torch.bfloat16]))
def test_dq_inside_dkdv_matches_oracle_cuda(case, dtype, nan_poison, monkeypatch):
    monkeypatch.setitem(attn.TUNING, "dq_atomic", True)
    _run_case(case, dtype)


def test_on_selection_from_reference(nan_poison):
    """Block ids produced by the reference selection (init + local + top-k), G = 4, several documents."""
    lens, h_q, h_kv, d, block_size = [130, 50, 3], 8, 2, 64, 16
    gen = torch.Generator().manual_seed(3)
    inputs = _inputs(lens, h_q, h_kv, d, gen)
    cu = _cu(lens)
    block_idx = infllm_v2_select_naive(inputs["q"].float(), inputs["k"].float(), cu, max(lens),
                                       block_size=block_size, kernel_size=16, kernel_stride=8, init_blocks=1,
                                       window_size=16, topk=3)
    assert block_idx.shape[-1] == 4
    kernel = functools.partial(block_sparse_attn_triton, block_idx=block_idx, cu_seqlens=cu, max_seqlen=max(lens),
                               block_size=block_size)
    reference = functools.partial(_reference, block_idx=block_idx, cu_seqlens=cu, block_size=block_size,
                                  dense_len=-1)
    check_fwd_bwd(kernel, reference, inputs, dtype=torch.float32)


def test_dense_documents_ignore_block_idx(nan_poison):
    """Every document shorter than dense_len: the result is dense causal attention whatever block_idx says
    (here all padding)."""
    lens, h_q, h_kv, d, block_size = [50, 3, 29], 4, 1, 64, 16
    gen = torch.Generator().manual_seed(4)
    inputs = _inputs(lens, h_q, h_kv, d, gen)
    cu = _cu(lens)
    block_idx = torch.full((h_kv, sum(lens), 2), -1, dtype=torch.int32, device=DEVICE)
    kernel = functools.partial(block_sparse_attn_triton, block_idx=block_idx, cu_seqlens=cu, max_seqlen=max(lens),
                               block_size=block_size, dense_len=64)
    reference = functools.partial(masked_dense_attention, block_idx=None, cu_seqlens=cu, block_size=block_size)
    check_fwd_bwd(kernel, reference, inputs, dtype=torch.float32)


@pytest.mark.parametrize("dense_min", [0, 40, 48, 100])
def test_dense_min_keeps_short_documents_sparse(dense_min, nan_poison):
    """dense_min < T < dense_len is dense; T <= dense_min follows block_idx (random, so a wrongly dense
    document fails). Lengths straddle the bounds: 48 = dense_min, 49 just above, 47 below."""
    lens, h_q, h_kv, d, block_size, k_slots, dense_len = [47, 48, 49, 100, 101, 20], 6, 2, 64, 16, 2, 101
    gen = torch.Generator().manual_seed(8)
    cu = _cu(lens)
    block_idx = random_selection(h_kv, lens, block_size, k_slots, gen)
    inputs = _inputs(lens, h_q, h_kv, d, gen)
    kernel = functools.partial(block_sparse_attn_triton, block_idx=block_idx, cu_seqlens=cu, max_seqlen=max(lens),
                               block_size=block_size, dense_len=dense_len, dense_min=dense_min)
    reference = functools.partial(_reference, block_idx=block_idx, cu_seqlens=cu, block_size=block_size,
                                  dense_len=dense_len, dense_min=dense_min)
    check_fwd_bwd(kernel, reference, inputs, dtype=torch.float32)


def test_dense_launch_skipped_when_no_length_qualifies():
    """Python-int pruning of the dense launches: none when no T in [1, max_seqlen] has dense_min < T < dense_len."""
    assert not attn._any_dense(-1, 0, 10**6)
    assert not attn._any_dense(100, 99, 10**6)       # no integer strictly between
    assert attn._any_dense(100, 98, 10**6)            # T = 99
    assert not attn._any_dense(8192, 6144, 6144)      # every document short enough to stay sparse
    assert attn._any_dense(8192, 6144, 6145)
    assert attn._any_dense(8192, 0, 1)


def test_rejects_bad_dense_min():
    q = torch.randn(8, 2, 64, device=DEVICE)
    k = torch.randn(8, 1, 64, device=DEVICE)
    idx = torch.zeros((1, 8, 1), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="dense_min"):
        block_sparse_attn_triton(q, k, k, idx, _cu([8]), 8, block_size=16, dense_len=4, dense_min=-1)


def test_custom_op_traces_under_compile():
    """The launches are opaque custom ops with fake implementations: torch.compile captures one graph."""
    lens, h_q, h_kv, d, block_size = [40, 9], 4, 1, 64, 16
    gen = torch.Generator().manual_seed(5)
    inputs = {n: t.float().requires_grad_() for n, t in _inputs(lens, h_q, h_kv, d, gen).items()}
    cu = _cu(lens)
    block_idx = random_selection(h_kv, lens, block_size, 2, gen)

    def f(q, k, v):
        return block_sparse_attn_triton(q, k, v, block_idx, cu, max(lens), block_size=block_size).sum()

    eager = f(**inputs)
    grads_eager = torch.autograd.grad(eager, list(inputs.values()))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(**inputs)
    grads_compiled = torch.autograd.grad(compiled, list(inputs.values()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)


def test_rejects_unsupported_shapes():
    q = torch.randn(8, 2, 96, device=DEVICE)
    k = torch.randn(8, 1, 96, device=DEVICE)
    idx = torch.zeros((1, 8, 1), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_attn_triton(q, k, k, idx, _cu([8]), 8, block_size=16)
    q, k = q[..., :64].contiguous(), k[..., :64].contiguous()
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attn_triton(q, k, k, idx, _cu([8]), 8, block_size=48)


@requires_cuda
def test_no_host_sync():
    """Forward and backward issue no device-to-host synchronisation (mixed dense and sparse documents)."""
    lens, h_q, h_kv, d, block_size = [700, 90, 400], 16, 2, 128, 64
    gen = torch.Generator().manual_seed(6)
    inputs = {n: t.to(torch.bfloat16).requires_grad_() for n, t in _inputs(lens, h_q, h_kv, d, gen).items()}
    cu = _cu(lens)
    block_idx = random_selection(h_kv, lens, block_size, 4, gen)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = block_sparse_attn_triton(inputs["q"], inputs["k"], inputs["v"], block_idx, cu, max(lens),
                                       block_size=block_size, dense_len=300)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_kv_through_pointer_tiles(nan_poison, monkeypatch):
    """The pointer-tile variant of the forward / dQ block walks (the default reads K/V through TMA
    descriptors), with dense and sparse documents, G = 4 token packing and 16-row tiles."""
    monkeypatch.setitem(attn.TUNING, "kv_tma", False)
    monkeypatch.setitem(attn.TUNING, "wide_rows", 16)
    _run_case(([61, 9, 30], 8, 2, 64, 16, 3, 20), torch.float32, seed=2)


@pytest.mark.parametrize("tok", [4, 5, 16])
def test_union_kernel_matches_torch_tables(tok):
    """The Triton union kernel (used on the GPU; the interpreter path uses the torch tables) against the torch
    construction: same ascending ids, membership bits and counts for every tile."""
    lens, h_kv, block_size, k_slots = [70, 5, 33], 2, 16, 4
    gen = torch.Generator().manual_seed(7)
    block_idx = random_selection(h_kv, lens, block_size, k_slots, gen)
    cu = _cu(lens)
    n = sum(lens)
    tile_doc, tile_start, _ = attn._tiles(cu, n, tok)
    n_slots = min(tok * k_slots, -(-max(lens) // block_size))
    uid = torch.full((h_kv, tile_doc.numel(), n_slots), -1, dtype=torch.int32, device=DEVICE)
    umask = torch.zeros_like(uid)
    count = torch.zeros((h_kv, tile_doc.numel()), dtype=torch.int32, device=DEVICE)
    tok_p2 = 1 << (tok - 1).bit_length()
    attn._union_kernel[(tile_doc.numel(), h_kv)](
        block_idx, cu, tile_doc, tile_start, uid, umask, count, block_idx.stride(0), block_idx.stride(1),
        tile_doc.numel(), n_slots, TOK=tok, TOK_P2=tok_p2, LOG_TOK=tok_p2.bit_length() - 1, K=k_slots,
        K_P2=k_slots)
    ref_uid, ref_umask, ref_count = attn._tile_unions_torch(block_idx, cu, tile_doc, tile_start, tok, n_slots)
    assert torch.equal(count, ref_count)
    used = torch.arange(n_slots, device=DEVICE)[None, None, :] < count[..., None]
    assert torch.equal(torch.where(used, uid, -1), torch.where(used, ref_uid, -1))
    assert torch.equal(torch.where(used, umask, 0), torch.where(used, ref_umask, 0))


def _local_selection(h_kv, T, block_size, k_slots):
    """int32 [H_kv, T, K]: every token lists block 0 and its current block (neighbouring tokens share them)."""
    c = torch.arange(T) // block_size
    ids = torch.full((h_kv, T, k_slots), -1, dtype=torch.int32)
    ids[:, :, 0] = 0
    ids[:, :, 1] = torch.where(c > 0, c, -1).to(torch.int32)
    return ids.to(DEVICE)


def _walks_per_token(walk, cu, n_tokens):
    """int64 [H_kv, N]: how many tiles of this launch that are not skipped contain each token."""
    tok, tile_doc, tile_start, skip = walk[2], walk[3], walk[4], walk[6]
    doc_end = cu.to(torch.int64)[(tile_doc.to(torch.int64) + 1).clamp(min=0)]                 # [NT]
    tokens = tile_start.to(torch.int64)[:, None] + torch.arange(tok, device=cu.device)        # [NT, tok]
    inside = (tile_doc[:, None] >= 0) & (tokens < doc_end[:, None])
    runs = (skip == 0)[:, :, None] & inside[None]                                             # [H, NT, tok]
    count = torch.zeros((skip.shape[0], n_tokens), dtype=torch.int64, device=cu.device)
    index = tokens.clamp(0, n_tokens - 1).reshape(1, -1).expand(skip.shape[0], -1)
    return count.scatter_add_(1, index, runs.reshape(skip.shape[0], -1).to(torch.int64))


@pytest.mark.parametrize("group,h_kv", [(16, 1), (4, 2), (3, 2)])
@pytest.mark.parametrize("pack_cost", [0.0, 3.0, float("inf")])
def test_wide_and_narrow_tiles(group, h_kv, pack_cost, nan_poison, monkeypatch):
    """Per-tile packing decision: every tile wide (pack_cost 0), every tile narrow (inf), or a mix (3.0: the
    document of shared local selections packs, the random one mostly not); same outputs and gradients."""
    monkeypatch.setitem(attn.TUNING, "pack_cost", pack_cost)
    lens, d, block_size, k_slots = [90, 300], 64, 16, 4
    gen = torch.Generator().manual_seed(8)
    block_idx = torch.cat([_local_selection(h_kv, lens[0], block_size, k_slots),
                           random_selection(h_kv, lens[1:], block_size, k_slots, gen)], dim=1)
    cu = _cu(lens)
    walks = attn._query_walks(block_idx, cu, sum(lens), max(lens), block_size, group, -1, 0)
    wide, narrow = walks[0], walks[1]
    skip_w = wide[6][:, wide[3] >= 0]                       # wide tiles that exist
    if pack_cost == 0.0:
        assert not skip_w.any()
    elif pack_cost == float("inf"):
        assert skip_w.all()
    else:
        assert not skip_w.all() and skip_w.any(), "expected both wide and narrow tiles"
    # Every token is walked exactly once per KV head: by its wide tile or by its narrow tile, never both.
    walked = _walks_per_token(wide, cu, sum(lens)) + _walks_per_token(narrow, cu, sum(lens))
    assert torch.equal(walked, torch.ones_like(walked))
    _check_sparse_fp32(lens, group, h_kv, d, gen, block_idx, cu, block_size)


@pytest.mark.parametrize("group,pack_cost", [(4, 0.0), (3, 3.0)])
def test_32_token_union_tiles(group, pack_cost, nan_poison, monkeypatch):
    """TUNING tile_tokens 32 with 128-row wide tiles (G = 4: 32 tokens x 4 heads; G = 3: 96 rows of 128): the
    membership bits use all 32 bits of the int32 mask; every token walked once, outputs and gradients exact."""
    monkeypatch.setitem(attn.TUNING, "tile_tokens", 32)
    monkeypatch.setitem(attn.TUNING, "wide_rows", 128)
    monkeypatch.setitem(attn.TUNING, "pack_cost", pack_cost)
    h_kv, lens, d, block_size, k_slots = 1, [75, 140], 64, 16, 4
    assert attn._sparse_plan(group)[1] == (128, 32)
    gen = torch.Generator().manual_seed(12)
    block_idx = torch.cat([_local_selection(h_kv, lens[0], block_size, k_slots),
                           random_selection(h_kv, lens[1:], block_size, k_slots, gen)], dim=1)
    cu = _cu(lens)
    walks = attn._query_walks(block_idx, cu, sum(lens), max(lens), block_size, group, -1, 0)
    walked = _walks_per_token(walks[0], cu, sum(lens)) + _walks_per_token(walks[1], cu, sum(lens))
    assert torch.equal(walked, torch.ones_like(walked))
    if pack_cost == 0.0:
        assert not walks[0][6][:, walks[0][3] >= 0].any()
    _check_sparse_fp32(lens, group, h_kv, d, gen, block_idx, cu, block_size)


def _check_sparse_fp32(lens, group, h_kv, d, gen, block_idx, cu, block_size):
    """Outputs and every gradient of the sparse kernel on `block_idx` against the oracle, fp32."""
    inputs = _inputs(lens, group * h_kv, h_kv, d, gen)
    kernel = functools.partial(block_sparse_attn_triton, block_idx=block_idx, cu_seqlens=cu, max_seqlen=max(lens),
                               block_size=block_size)
    reference = functools.partial(_reference, block_idx=block_idx, cu_seqlens=cu, block_size=block_size,
                                  dense_len=-1)
    check_fwd_bwd(kernel, reference, inputs, dtype=torch.float32)


def test_sparse_plan_tile_sizes():
    """Narrow / wide tile (rows, tokens) per group size: wide tiles are whole narrow tiles, at most 16 tokens."""
    plans = {g: attn._sparse_plan(g) for g in (1, 2, 3, 4, 7, 8, 16, 32, 64)}
    assert plans[16] == ((16, 1), (64, 4))
    assert plans[4] == ((16, 4), (64, 16))
    assert plans[3] == ((16, 4), (64, 16))
    assert plans[8] == ((16, 2), (64, 8))
    assert plans[1] == ((16, 16), None)
    assert plans[64] == ((64, 1), None)
    for (rows_n, tok_n), wide in plans.values():
        if wide is not None:
            assert wide[1] % tok_n == 0 and wide[1] <= 16


def test_merged_tuning_updates_per_head_dim_tables():
    """A JSON-born override (string head dims, list configs) changes one entry of a per-head-dim table and
    leaves the rest and the base as they were; unknown keys and a scalar for a table are refused."""
    base = attn.TUNING
    before = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    merged = attn.merged_tuning(base, {"dkdv": {"64": [4, 2]}, "pack_cost": 1.0})
    assert merged["dkdv"] == {**before["dkdv"], 64: (4, 2)} and merged["dkdv"][128] == before["dkdv"][128]
    assert merged["pack_cost"] == 1.0
    assert base == before
    with pytest.raises(KeyError, match="no_such_knob"):
        attn.merged_tuning(base, {"no_such_knob": 1})
    with pytest.raises(TypeError, match="dkdv"):
        attn.merged_tuning(base, {"dkdv": 3})
