"""The pure-PyTorch reference (impl="naive") against the contract (kernels/infllm_v2/README.md) and against the
independent oracles in tests/kernels/oracle.py. Small configs so sparse != dense at a few hundred tokens:
block 16, kernel 8, stride 4, window 32 (n_local 2), topk 3 -> k_eff 5, sparse once T > 80."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import (
    block_sparse_attn_varlen,
    dense_attn_varlen,
    infllm_v2_attn_varlen,
    infllm_v2_select,
)
from tests.kernels.oracle import (
    assert_selection_matches_by_score,
    brute_force_block_scores,
    dense_causal_attention,
    masked_dense_attention,
    reference_selection,
)
from tests.kernels.tolerance import check_fwd_bwd

CFG = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3)
SCORE_CFG = {k: CFG[k] for k in ("block_size", "kernel_size", "kernel_stride")}
MATCH_CFG = {k: CFG[k] for k in ("block_size", "init_blocks", "window_size", "topk")}
K_EFF = CFG["topk"] + CFG["window_size"] // CFG["block_size"]


def make_inputs(doc_lens, h_q, h_kv, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(doc_lens)
    # q scaled up a little so block scores are well spread (selection is then far from uniform).
    q = (2.0 * torch.randn(n, h_q, d, generator=gen)).to(dtype)
    k = torch.randn(n, h_kv, d, generator=gen).to(dtype)
    v = torch.randn(n, h_kv, d, generator=gen).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(doc_lens).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, cu, max(doc_lens)


def case_id(doc_lens, h_q, h_kv, d):
    return f"T{sum(doc_lens)}-Hq{h_q}-Hkv{h_kv}-D{d}-docs{len(doc_lens)}"


# G in {1, 3, 4, 16}, head_dim 64 and 128, uneven documents including ones shorter than a kernel or a block.
SHAPES = [
    ([300], 4, 4, 64),
    ([157, 211, 5], 12, 4, 64),
    ([233, 1, 130], 8, 2, 128),
    ([250, 7, 97], 16, 1, 64),
]
SHAPE_IDS = [case_id(*s) for s in SHAPES]


@pytest.mark.parametrize("lse_approx", [True, False], ids=["lse_approx", "exact_lse"])
@pytest.mark.parametrize("doc_lens,h_q,h_kv,d", SHAPES, ids=SHAPE_IDS)
def test_selection_matches_brute_force_by_score(doc_lens, h_q, h_kv, d, lse_approx):
    q, k, _, cu, max_len = make_inputs(doc_lens, h_q, h_kv, d)
    idx = infllm_v2_select(q, k, cu, max_len, lse_approx=lse_approx, impl="naive", **CFG)
    assert idx.shape == (h_kv, sum(doc_lens), K_EFF) and idx.dtype == torch.int32
    ref = brute_force_block_scores(q, k, cu, lse_approx=lse_approx, **SCORE_CFG)
    assert_selection_matches_by_score(idx, ref, cu, **MATCH_CFG)


@pytest.mark.parametrize("lse_approx", [True, False], ids=["lse_approx", "exact_lse"])
def test_block_scores_match_brute_force_numerically(lse_approx):
    """Steps 1-5 of the reference, before any top-k, equal the float64 brute force (fp32 rounding only)."""
    from kernels.infllm_v2._validate import check_sparse_config
    from kernels.infllm_v2.naive import block_scores_doc

    doc_lens = [297, 6, 140]
    q, k, _, cu, _ = make_inputs(doc_lens, 12, 4, 64)
    ref = brute_force_block_scores(q, k, cu, lse_approx=lse_approx, **SCORE_CFG)
    cfg = check_sparse_config(**CFG)
    for (start, end), want in zip(zip(cu.tolist(), cu.tolist()[1:]), ref):
        got = block_scores_doc(q[start:end], k[start:end], cfg, 1 / 8, lse_approx)
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-4, atol=1e-6)


def test_by_score_check_accepts_ties_and_rejects_wrong_blocks():
    """The selection checker itself: a reference selection passes; replacing one chosen data-dependent block by
    an unchosen one, dropping a forced block or adding a future block fails."""
    q, k, _, cu, n = make_inputs([260], 8, 2, 64)
    ref = brute_force_block_scores(q, k, cu, **SCORE_CFG)
    good = reference_selection(q, k, cu, **CFG)
    assert_selection_matches_by_score(good, ref, cu, **MATCH_CFG)
    t, g = 250, 0  # c = 15: forced {0, 13, 14, 15}, one data-dependent pick among 1..12
    row = good[g, t].tolist()
    free = [b for b in row if b not in (0, 13, 14, 15)]
    other = next(b for b in range(1, 13) if b not in row)
    cases = {
        "swap": sorted([b for b in row if b != free[0]] + [other]),
        "drop-forced": sorted([b for b in row if b != 14] + [other]),
        "future": sorted([b for b in row if b != free[0]] + [16]),
    }
    for name, bad_row in cases.items():
        bad = good.clone()
        bad[g, t] = torch.tensor(bad_row, dtype=torch.int32)
        with pytest.raises(AssertionError):
            assert_selection_matches_by_score(bad, ref, cu, **MATCH_CFG)


def test_lse_approx_reweights_heads_only():
    """With one head per group the normaliser cannot change the ranking; with several it can."""
    q, k, _, cu, n = make_inputs([400], 1, 1, 64)
    idx = infllm_v2_select(q, k, cu, n, lse_approx=True, impl="naive", **CFG)
    exact = brute_force_block_scores(q, k, cu, lse_approx=False, **SCORE_CFG)
    assert_selection_matches_by_score(idx, exact, cu, **MATCH_CFG)
    q, k, _, cu, n = make_inputs([400], 8, 1, 64, seed=1)
    approx = infllm_v2_select(q, k, cu, n, lse_approx=True, impl="naive", **CFG)
    exact = infllm_v2_select(q, k, cu, n, lse_approx=False, impl="naive", **CFG)
    assert not torch.equal(approx, exact)


@pytest.mark.parametrize("init_blocks,window_size", [(1, 32), (2, 0), (0, 16), (3, 48)],
                         ids=["init1-w32", "init2-w0", "init0-w16", "init3-w48"])
def test_forced_blocks_present_and_no_future_block(init_blocks, window_size):
    cfg = dict(CFG, init_blocks=init_blocks, window_size=window_size, topk=init_blocks + 2)
    q, k, _, cu, n = make_inputs([350, 90], 6, 2, 64)
    idx = infllm_v2_select(q, k, cu, n, impl="naive", **cfg).long()
    k_eff = cfg["topk"] + window_size // 16
    n_local = window_size // 16
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        for t in range(end - start):
            c = t // 16
            for g in range(idx.shape[0]):
                row = idx[g, start + t]
                chosen = set(row[row >= 0].tolist())
                assert len(chosen) == min(c + 1, k_eff)
                assert max(chosen) <= c, f"token {t}: future block in {sorted(chosen)}"
                forced = set(range(min(init_blocks, c + 1))) | set(range(max(0, c - n_local), c + 1))
                assert forced <= chosen, f"token {t}: forced {sorted(forced)} not in {sorted(chosen)}"


@pytest.mark.parametrize("doc_lens,h_q,h_kv,d", SHAPES, ids=SHAPE_IDS)
def test_sparse_equals_masked_dense_oracle(doc_lens, h_q, h_kv, d):
    q, k, v, cu, max_len = make_inputs(doc_lens, h_q, h_kv, d, dtype=torch.float64)
    idx = infllm_v2_select(q, k, cu, max_len, impl="naive", **CFG)
    want = masked_dense_attention(q, k, v, idx, cu, CFG["block_size"])
    got = infllm_v2_attn_varlen(q, k, v, cu, max_len, dense_len=-1, impl="naive", **CFG)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    given = block_sparse_attn_varlen(q, k, v, idx, cu, max_len, block_size=CFG["block_size"], impl="naive")
    torch.testing.assert_close(given, want, rtol=1e-10, atol=1e-10)
    # The long documents really are sparse here.
    dense = dense_causal_attention(q, k, v, cu)
    assert (got - dense).abs().max() > 1e-3


@pytest.mark.parametrize("doc_lens,h_q,h_kv,d", [([80, 17, 64, 1], 6, 2, 64), ([79, 80], 16, 1, 128)],
                         ids=[case_id([80, 17, 64, 1], 6, 2, 64), case_id([79, 80], 16, 1, 128)])
def test_equals_dense_when_documents_fit_in_k_eff_blocks(doc_lens, h_q, h_kv, d):
    q, k, v, cu, max_len = make_inputs(doc_lens, h_q, h_kv, d)
    got = infllm_v2_attn_varlen(q, k, v, cu, max_len, dense_len=-1, impl="naive", **CFG)
    want = dense_causal_attention(q.double(), k.double(), v.double(), cu)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_attn_varlen(q, k, v, cu, max_len).double(), want, rtol=1e-5, atol=1e-5)


def test_dense_below_dense_len_sparse_above():
    q, k, v, cu, max_len = make_inputs([300, 150], 8, 2, 64, dtype=torch.float64)
    dense = dense_causal_attention(q, k, v, cu)
    all_dense = infllm_v2_attn_varlen(q, k, v, cu, max_len, dense_len=301, impl="naive", **CFG)
    torch.testing.assert_close(all_dense, dense, rtol=1e-10, atol=1e-10)
    # dense_len=200: the 300-token document is sparse, the 150-token one dense.
    mixed = infllm_v2_attn_varlen(q, k, v, cu, max_len, dense_len=200, impl="naive", **CFG)
    torch.testing.assert_close(mixed[300:], dense[300:], rtol=1e-10, atol=1e-10)
    sparse = infllm_v2_attn_varlen(q, k, v, cu, max_len, dense_len=-1, impl="naive", **CFG)
    torch.testing.assert_close(mixed[:300], sparse[:300], rtol=1e-10, atol=1e-10)
    assert (mixed[:300] - dense[:300]).abs().max() > 1e-3
    # T == dense_len is sparse (the switch is T < dense_len).
    at_len = infllm_v2_attn_varlen(q, k, v, cu, max_len, dense_len=300, impl="naive", **CFG)
    torch.testing.assert_close(at_len[:300], sparse[:300], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t0", [40, 130, 223], ids=lambda t: f"t{t}")
def test_causal_later_tokens_change_neither_selection_nor_output(t0):
    q, k, v, cu, n = make_inputs([120, 260], 8, 2, 64)
    start = 120
    idx = infllm_v2_select(q, k, cu, n, impl="naive", **CFG)
    out = infllm_v2_attn_varlen(q, k, v, cu, n, dense_len=-1, impl="naive", **CFG)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    later = slice(start + t0 + 1, None)
    q2[later] += torch.randn_like(q2[later])
    k2[later] += 3 * torch.randn_like(k2[later])
    v2[later] += torch.randn_like(v2[later])
    idx2 = infllm_v2_select(q2, k2, cu, n, impl="naive", **CFG)
    out2 = infllm_v2_attn_varlen(q2, k2, v2, cu, n, dense_len=-1, impl="naive", **CFG)
    upto = slice(None, start + t0 + 1)
    assert torch.equal(idx[:, upto], idx2[:, upto])
    torch.testing.assert_close(out[upto], out2[upto], rtol=1e-6, atol=1e-6)
    assert not torch.equal(idx[:, later], idx2[:, later])  # the perturbation did reach later tokens


def test_packed_documents_are_independent_outputs_and_grads():
    h_q, h_kv, d = 12, 4, 64
    q, k, v, cu, n = make_inputs([140, 211, 97], h_q, h_kv, d, dtype=torch.float64)
    a, b = 140, 351  # the middle document

    def run(q_, k_, v_, cu_, n_):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q_, k_, v_)]
        out = infllm_v2_attn_varlen(*leaves, cu_, n_, dense_len=-1, impl="naive", **CFG)
        gen = torch.Generator().manual_seed(3)
        out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
        return out.detach(), [t.grad for t in leaves]

    out_packed, g_packed = run(q, k, v, cu, n)
    # Upstream gradient drawn for the packed output: use the same rows for the document alone.
    gen = torch.Generator().manual_seed(3)
    dout = torch.randn(out_packed.shape, generator=gen, dtype=torch.float64)[a:b]
    alone = [t[a:b].detach().clone().requires_grad_(True) for t in (q, k, v)]
    out_alone = infllm_v2_attn_varlen(*alone, torch.tensor([0, b - a], dtype=torch.int32), b - a, dense_len=-1,
                                      impl="naive", **CFG)
    out_alone.backward(dout)
    torch.testing.assert_close(out_packed[a:b], out_alone.detach(), rtol=1e-12, atol=1e-12)
    for g_p, leaf in zip(g_packed, alone):
        torch.testing.assert_close(g_p[a:b], leaf.grad, rtol=1e-12, atol=1e-12)


def test_group_heads_share_selection():
    """The selection is per KV group: invariant to reordering heads inside a group, blind to other groups."""
    h_q, h_kv, d = 12, 3, 64
    q, k, _, cu, n = make_inputs([330, 70], h_q, h_kv, d)
    idx = infllm_v2_select(q, k, cu, n, impl="naive", **CFG)
    assert idx.shape[0] == h_kv
    perm = torch.cat([g * 4 + torch.randperm(4) for g in range(h_kv)])
    assert torch.equal(infllm_v2_select(q[:, perm], k, cu, n, impl="naive", **CFG), idx)
    q_other = q.clone()
    q_other[:, 8:] = torch.randn_like(q_other[:, 8:])  # group 2 only
    idx_other = infllm_v2_select(q_other, k, cu, n, impl="naive", **CFG)
    assert torch.equal(idx_other[:2], idx[:2]) and not torch.equal(idx_other[2], idx[2])
    # Each head's output is the oracle's under its group's selection.
    v = torch.randn_like(k)
    out = infllm_v2_attn_varlen(q, k, v, cu, n, dense_len=-1, impl="naive", **CFG)
    want = masked_dense_attention(q.double(), k.double(), v.double(), idx, cu, CFG["block_size"])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("doc_lens,h_q,h_kv,d", SHAPES, ids=SHAPE_IDS)
def test_gradients_match_oracle_autograd_float64(doc_lens, h_q, h_kv, d):
    q, k, v, cu, max_len = make_inputs(doc_lens, h_q, h_kv, d, dtype=torch.float64)
    idx = infllm_v2_select(q, k, cu, max_len, impl="naive", **CFG)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        gen = torch.Generator().manual_seed(1)
        out.backward(torch.randn(out.shape, generator=gen, dtype=out.dtype))
        return [t.grad for t in leaves]

    got = grads(lambda q_, k_, v_: infllm_v2_attn_varlen(q_, k_, v_, cu, max_len, dense_len=-1, impl="naive",
                                                        **CFG))
    want = grads(lambda q_, k_, v_: masked_dense_attention(q_, k_, v_, idx, cu, CFG["block_size"]))
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_gradcheck_tiny():
    cfg = dict(block_size=4, kernel_size=4, kernel_stride=2, init_blocks=1, window_size=4, topk=2)
    q, k, v, cu, n = make_inputs([23, 6], 2, 1, 4, dtype=torch.float64, seed=5)
    idx = infllm_v2_select(q, k, cu, n, impl="naive", **cfg)
    assert (idx[:, :23] >= 0).sum(-1).max() == 3 and 23 > 3 * 4  # really sparse
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: block_sparse_attn_varlen(q_, k_, v_, idx, cu, n, block_size=4, impl="naive"),
        (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: infllm_v2_attn_varlen(q_, k_, v_, cu, n, dense_len=-1, impl="naive", **cfg), (q, k, v),
        fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_within_flash_style_tolerance(dtype):
    """The reference in low precision (fp32 inside) is at least as accurate as the plain math in that dtype:
    this exercises tests/kernels/tolerance.py the way the Triton tests use it."""
    q, k, v, cu, n = make_inputs([190, 45], 12, 4, 64)
    idx = infllm_v2_select(q, k, cu, n, impl="naive", **CFG)
    check_fwd_bwd(
        lambda q, k, v: block_sparse_attn_varlen(q, k, v, idx, cu, n, block_size=CFG["block_size"], impl="naive"),
        lambda q, k, v: masked_dense_attention(q, k, v, idx, cu, CFG["block_size"]),
        {"q": q, "k": k, "v": v}, dtype=dtype)


def test_dense_attn_varlen_matches_oracle_with_grads():
    q, k, v, cu, n = make_inputs([77, 1, 130], 12, 4, 64)
    check_fwd_bwd(lambda q, k, v: dense_attn_varlen(q, k, v, cu, n),
                  lambda q, k, v: dense_causal_attention(q, k, v, cu), {"q": q, "k": k, "v": v},
                  dtype=torch.float32)
    scale = 0.3
    torch.testing.assert_close(dense_attn_varlen(q, k, v, cu, n, softmax_scale=scale).double(),
                               dense_causal_attention(q.double(), k.double(), v.double(), cu, scale),
                               rtol=1e-5, atol=1e-5)


def test_empty_documents_and_custom_scale():
    q, k, v, _, _ = make_inputs([100, 3], 4, 2, 64, dtype=torch.float64)
    cu = torch.tensor([0, 0, 100, 100, 103], dtype=torch.int32)
    scale = 0.05
    idx = infllm_v2_select(q, k, cu, 100, softmax_scale=scale, impl="naive", **CFG)
    ref = brute_force_block_scores(q, k, cu, softmax_scale=scale, **SCORE_CFG)
    assert_selection_matches_by_score(idx, ref, cu, **MATCH_CFG)
    out = infllm_v2_attn_varlen(q, k, v, cu, 100, dense_len=-1, softmax_scale=scale, impl="naive", **CFG)
    torch.testing.assert_close(out, masked_dense_attention(q, k, v, idx, cu, 16, scale), rtol=1e-10, atol=1e-10)


def test_output_dtype_and_no_grad_selection():
    q, k, v, cu, n = make_inputs([200], 4, 2, 64, dtype=torch.bfloat16)
    q.requires_grad_(True)
    idx = infllm_v2_select(q, k, cu, n, impl="naive", **CFG)
    assert not idx.requires_grad
    out = infllm_v2_attn_varlen(q, k, v, cu, n, dense_len=-1, impl="naive", **CFG)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_selection_at_16k_default_config():
    """Selection at T = 16k with the MiniCPM4 defaults runs on CPU (a few seconds) and is well formed."""
    T = 16384
    q, k, _, cu, n = make_inputs([T], 2, 1, 64)
    idx = infllm_v2_select(q, k, cu, n, impl="naive")
    assert idx.shape == (1, T, 96)
    c = torch.arange(T) // 64
    n_valid = (idx >= 0).sum(-1)[0]
    assert torch.equal(n_valid, torch.clamp(c + 1, max=96))
    last = idx[0, -1].long()
    assert last[0] == 0 and torch.equal(last[-33:], torch.arange(255 - 32, 256))  # init + 32 local + current


def test_impl_dispatch():
    q, k, v, cu, n = make_inputs([150], 4, 2, 64)
    auto = infllm_v2_attn_varlen(q, k, v, cu, n, dense_len=-1, **CFG)
    naive = infllm_v2_attn_varlen(q, k, v, cu, n, dense_len=-1, impl="naive", **CFG)
    assert torch.equal(auto, naive)
    with pytest.raises(ValueError, match="impl"):
        infllm_v2_select(q, k, cu, n, impl="cuda", **CFG)
    with pytest.raises(ImportError, match="impl='triton' needs kernels.infllm_v2.no_such_module"):
        kernels._load_triton("no_such_module", "fn")


def _bad_cases():
    q, k, v, cu, n = make_inputs([70, 30], 4, 2, 16)
    idx = infllm_v2_select(q, k, cu, n, impl="naive", **CFG)
    sel = lambda **kw: lambda: infllm_v2_select(**{**dict(q=q, k=k, cu_seqlens=cu, max_seqlen=n), **CFG, **kw})
    att = lambda **kw: lambda: infllm_v2_attn_varlen(
        **{**dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=n, dense_len=-1), **CFG, **kw})
    bsa = lambda **kw: lambda: block_sparse_attn_varlen(
        **{**dict(q=q, k=k, v=v, block_idx=idx, cu_seqlens=cu, max_seqlen=n, block_size=16), **kw})
    cu_long = cu.long()
    return [
        ("q-2d", sel(q=q[:, 0]), r"q: expected \[N, H_q, d\]"),
        ("q-int", sel(q=q.int()), "q: dtype"),
        ("k-wrong-N", sel(k=k[:50]), r"k: expected \[N, H_kv, d\] with N=100"),
        ("k-wrong-d", att(k=k[..., :8]), r"k: expected \[N, H_kv, d\] with N=100, d=16"),
        ("k-heads-not-divisor", sel(k=torch.randn(100, 3, 16)), "k: H_q=4 must be a multiple of H_kv"),
        ("k-dtype", sel(k=k.double()), "k: dtype"),
        ("v-shape", att(v=v[:, :1]), "v: expected"),
        ("v-dtype", bsa(v=v.half()), "v: dtype"),
        ("cu-int64", sel(cu_seqlens=cu_long), "cu_seqlens: must be int32"),
        ("cu-end", sel(cu_seqlens=torch.tensor([0, 70, 99], dtype=torch.int32)), "cu_seqlens: .*ending at N=100"),
        ("cu-start", att(cu_seqlens=torch.tensor([1, 70, 100], dtype=torch.int32)), "cu_seqlens: .*starting at 0"),
        ("cu-decreasing", bsa(cu_seqlens=torch.tensor([0, 70, 60, 100], dtype=torch.int32)), "cu_seqlens"),
        ("max_seqlen-small", sel(max_seqlen=50), r"max_seqlen: must be >= the longest document \(70\)"),
        ("max_seqlen-tensor", att(max_seqlen=torch.tensor(70)), "max_seqlen: must be a Python int"),
        ("window-not-multiple", sel(block_size=64, window_size=100),
         "window_size: must be a multiple of block_size=64, got 100"),
        ("stride-gt-kernel", sel(kernel_stride=16), "kernel_stride: must be <= kernel_size=8"),
        ("topk-too-small", sel(topk=1, init_blocks=1), "topk: must be >= init_blocks"),
        ("block_size-zero", att(block_size=0), "block_size: must be a positive int"),
        ("kernel_size-float", sel(kernel_size=8.0), "kernel_size: must be a positive int"),
        ("init_blocks-negative", sel(init_blocks=-1), "init_blocks: must be a non-negative int"),
        ("dense_len", att(dense_len=-2), "dense_len"),
        ("softmax_scale", att(softmax_scale=-1.0), "softmax_scale"),
        ("impl", bsa(impl="fast"), "impl: must be"),
        ("block_idx-dtype", bsa(block_idx=idx.long()), "block_idx: dtype must be int32"),
        ("block_idx-shape", bsa(block_idx=idx[:, :50]), r"block_idx: expected \[H_kv, N, K\]"),
        ("block_idx-range", bsa(block_idx=torch.full_like(idx, 5)), r"block_idx: ids must be -1 or in \[0, 5\)"),
        ("dense-backend", lambda: dense_attn_varlen(q, k, v, cu, n, backend="xformers"), "backend"),
    ]


@pytest.mark.parametrize("name,call,message", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_errors_naming_the_argument(name, call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_dense_sdpa_fallback_reads_the_bounds_once_per_tensor(monkeypatch):
    """The SDPA fallback reads cu_seqlens to the host once for a given tensor (every layer of a forward passes
    the same one), and again when the tensor or its contents change."""
    import kernels.dense as dense_mod

    reads = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        reads.append(self.numel())
        return real_tolist(self)

    q, k, v = (torch.randn(10, 2, 16), torch.randn(10, 1, 16), torch.randn(10, 1, 16))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    first = dense_mod._sdpa_per_document(q, k, v, cu, 0.25)
    for _ in range(3):
        torch.testing.assert_close(dense_mod._sdpa_per_document(q, k, v, cu, 0.25), first)
    assert reads == [3]
    cu[1] = 6  # in place: a new version, read again
    dense_mod._sdpa_per_document(q, k, v, cu, 0.25)
    other = torch.tensor([0, 4, 10], dtype=torch.int32)
    torch.testing.assert_close(dense_mod._sdpa_per_document(q, k, v, other, 0.25), first)
    assert reads == [3, 3, 3]
