"""Triton block selection (kernels/infllm_v2/select.py) against the float64 brute-force scorer, by score.

Selections are compared by the scores of the chosen blocks (tests/kernels/oracle.py), so near-tied blocks may
swap. Structure is checked too: ascending ids, -1 padding, min(c + 1, k_eff) entries, every forced block, no
future block. Outputs are poisoned (-2) before the kernel writes them. On CPU everything runs under the Triton
interpreter (tests/conftest.py), so shapes stay small; bf16 runs only on CUDA.
"""
from __future__ import annotations

import pytest
import torch

from kernels.infllm_v2 import naive
from kernels.infllm_v2.naive import block_scores_doc, infllm_v2_select_naive
from kernels.infllm_v2._validate import check_sparse_config
from kernels.infllm_v2.select import CONFIGS, _select, infllm_v2_select_triton
from tests.conftest import DEVICE, HAS_CUDA, requires_cuda
from tests.kernels.oracle import (
    assert_selection_matches_by_score,
    brute_force_block_scores,
    selection_score_deviation,
)

# Sparse from a few hundred tokens on: k_eff = 5 blocks of 16.
CFG = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3)
# MiniCPM4's kernel geometry (64 / 32 / 16) with a small top-k, so T = 700 is already sparse.
CFG_MINICPM = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=64, topk=4)
# No sink, no window, kernel as long as a block: the stream reaches the token's own block, whose overlapping
# kernels are not all visible yet.
CFG_EDGE = dict(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=0, window_size=0, topk=3)

# Score tolerance of the by-score check: fp32 is exact up to the key's truncated mantissa (scores are ranked on
# 32 - ID_BITS bits, ID_BITS >= 11: 12 mantissa bits, a relative step of 2^-12 = 2.4e-4); the 16-bit paths round
# the compressed keys and the head-summed probabilities.
RTOL = {torch.float32: 3e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def make_inputs(doc_lens, h_q, h_kv, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(doc_lens)
    # q scaled up a little so block scores are well spread (selection is then far from uniform).
    q = (2.0 * torch.randn(n, h_q, d, generator=gen)).to(dtype).to(DEVICE)
    k = torch.randn(n, h_kv, d, generator=gen).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(doc_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return q, k, cu, max(doc_lens)


def case_id(doc_lens, h_q, h_kv, d):
    return f"T{sum(doc_lens)}-Hq{h_q}-Hkv{h_kv}-D{d}-docs{len(doc_lens)}"


def run_poisoned(q, k, cu, max_len, cfg, lse_approx):
    """The kernel writing into a -2 filled output: every slot must be overwritten."""
    k_eff = cfg["topk"] + cfg["window_size"] // cfg["block_size"]
    out = torch.full((k.shape[1], q.shape[0], k_eff), -2, dtype=torch.int32, device=q.device)
    idx = _select(q, k, cu, max_len, lse_approx=lse_approx, softmax_scale=None, out=out, **cfg)
    assert idx.data_ptr() == out.data_ptr()
    assert not (idx == -2).any(), "unwritten output slots"
    return idx


def check_by_score(idx, q, k, cu, cfg, lse_approx, rtol):
    scores = brute_force_block_scores(q.cpu(), k.cpu(), cu.cpu(), block_size=cfg["block_size"],
                                      kernel_size=cfg["kernel_size"], kernel_stride=cfg["kernel_stride"],
                                      lse_approx=lse_approx)
    assert_selection_matches_by_score(idx.cpu(), scores, cu.cpu(), block_size=cfg["block_size"],
                                      init_blocks=cfg["init_blocks"], window_size=cfg["window_size"],
                                      topk=cfg["topk"], rtol=rtol)


# G in {1, 3, 4, 16}, head_dim 64 and 128, uneven documents including ones shorter than a kernel or a block.
SHAPES = [
    ([300], 4, 4, 64),
    ([157, 211, 5], 12, 4, 64),
    ([233, 1, 130], 8, 2, 128),
    ([250, 7, 97], 16, 1, 64),
]


@pytest.mark.parametrize("lse_approx", [True, False], ids=["lse_approx", "exact_lse"])
@pytest.mark.parametrize("doc_lens,h_q,h_kv,d", SHAPES, ids=[case_id(*s) for s in SHAPES])
def test_select_matches_brute_force_by_score(doc_lens, h_q, h_kv, d, lse_approx):
    q, k, cu, max_len = make_inputs(doc_lens, h_q, h_kv, d)
    idx = run_poisoned(q, k, cu, max_len, CFG, lse_approx)
    check_by_score(idx, q, k, cu, CFG, lse_approx, RTOL[torch.float32])


LOWP_SHAPES = [([211, 90], 12, 4, 64), ([180], 16, 1, 128)]


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32], ids=str)
@pytest.mark.parametrize("doc_lens,h_q,h_kv,d", LOWP_SHAPES, ids=[case_id(*s) for s in LOWP_SHAPES])
def test_select_low_precision(doc_lens, h_q, h_kv, d, dtype):
    q, k, cu, max_len = make_inputs(doc_lens, h_q, h_kv, d, dtype=dtype)
    idx = run_poisoned(q, k, cu, max_len, CFG, True)
    check_by_score(idx, q, k, cu, CFG, True, RTOL[dtype])


CFG_CASES = [
    ("minicpm", CFG_MINICPM, ([700, 130], 6, 2, 64)),
    ("edge", CFG_EDGE, ([260, 3, 150], 3, 1, 64)),
]


@pytest.mark.parametrize("lse_approx", [True, False], ids=["lse_approx", "exact_lse"])
@pytest.mark.parametrize("name,cfg,shape", CFG_CASES, ids=[f"{c[0]}-{case_id(*c[2])}" for c in CFG_CASES])
def test_select_other_configs(name, cfg, shape, lse_approx):
    q, k, cu, max_len = make_inputs(*shape)
    idx = run_poisoned(q, k, cu, max_len, cfg, lse_approx)
    check_by_score(idx, q, k, cu, cfg, lse_approx, RTOL[torch.float32])


def test_select_packing_independent():
    """A document's selection does not depend on its neighbours in the batch (bit-identical)."""
    q, k, cu, max_len = make_inputs([190, 37, 260], 8, 2, 64)
    packed = infllm_v2_select_triton(q, k, cu, max_len, **CFG)
    a, b = int(cu[2]), int(cu[3])
    alone = infllm_v2_select_triton(q[a:b].contiguous(), k[a:b].contiguous(),
                                    torch.tensor([0, b - a], dtype=torch.int32, device=DEVICE), b - a, **CFG)
    assert torch.equal(packed[:, a:b], alone)


def test_select_agrees_with_naive_mostly():
    """Beyond the by-score check: the same ids as the reference on nearly every token (exact ties between
    neighbouring blocks, which share a kernel, go to the lower id in both)."""
    q, k, cu, max_len = make_inputs([400], 8, 2, 64)
    got = infllm_v2_select_triton(q, k, cu, max_len, **CFG)
    ref = infllm_v2_select_naive(q, k, cu, max_len, **CFG)
    same_rows = (got == ref).all(dim=-1).float().mean().item()
    assert same_rows > 0.9, f"only {same_rows:.1%} of the rows equal the reference's"


def test_select_rejects_unsupported_geometry():
    q, k, cu, max_len = make_inputs([64], 2, 1, 64)
    with pytest.raises(ValueError, match="kernel_size"):
        infllm_v2_select_triton(q, k, cu, max_len, block_size=16, kernel_size=32, kernel_stride=16,
                                window_size=0, topk=2)
    with pytest.raises(ValueError, match="kernel_stride"):
        infllm_v2_select_triton(q, k, cu, max_len, block_size=48, kernel_size=16, kernel_stride=16,
                                window_size=0, topk=2)


@requires_cuda
def test_select_no_host_sync_and_large_bf16():
    """MiniCPM4 shape and default config at 12k tokens: no host synchronisation inside the call, and the
    selection matches the fp32 reference scores."""
    doc_lens, h_q, h_kv, d = [12000, 3000, 700], 32, 2, 128
    q, k, cu, max_len = make_inputs(doc_lens, h_q, h_kv, d, dtype=torch.bfloat16)
    cfg = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=2048, topk=64)
    infllm_v2_select_triton(q, k, cu, max_len, **cfg)  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx = infllm_v2_select_triton(q, k, cu, max_len, **cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sc = check_sparse_config(**cfg)
    scores = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        scores.append(block_scores_doc(q[a:b], k[a:b], sc, d ** -0.5, True).double().cpu())
    assert_selection_matches_by_score(idx.cpu(), scores, cu.cpu(), block_size=64, init_blocks=1, window_size=2048,
                                      topk=64, rtol=RTOL[torch.bfloat16])


def test_selection_is_a_custom_op_with_a_fake_implementation():
    """torch.compile traces the selection through its registered fake instead of breaking the graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels.infllm_v2.select import infllm_v2_select_triton

    with FakeTensorMode():
        q = torch.empty(300, 6, 64)
        k = torch.empty(300, 2, 64)
        cu = torch.tensor([0, 100, 300], dtype=torch.int32)
        idx = infllm_v2_select_triton(q, k, cu, 200, block_size=16, kernel_size=8, kernel_stride=4,
                                      init_blocks=1, window_size=32, topk=3)
    assert idx.shape == (2, 300, 5) and idx.dtype == torch.int32


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_select_long_document_planted_needle(dtype):
    """Past 32k tokens (over 2048 kernels, 640 blocks), SmolLM2 shape and the short-to-long config: the selection
    matches the reference by score on every token, and a block whose keys align with the last queries (a planted
    needle far back) is selected by all of them. (launch/LOG.md: sparse-mode retrieval drops at 32k; this rules
    out the kernel at that length. Checked on CPU under the interpreter at 32,768 tokens, fp32, 2026-11-28.)"""
    doc_lens, h_q, h_kv, d = [40000, 900], 3, 1, 64
    cfg = dict(block_size=64, kernel_size=32, kernel_stride=16, init_blocks=1, window_size=512, topk=24)
    gen = torch.Generator().manual_seed(3)
    q = 2.0 * torch.randn(sum(doc_lens), h_q, d, generator=gen)
    k = torch.randn(sum(doc_lens), h_kv, d, generator=gen)
    needle, block = torch.randn(d, generator=gen), 37
    q[doc_lens[0] - 256:doc_lens[0]] += 3 * needle
    k[block * 64:(block + 1) * 64] += 3 * needle
    q, k = q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE)
    cu = torch.tensor([0, doc_lens[0], sum(doc_lens)], dtype=torch.int32, device=DEVICE)
    idx = infllm_v2_select_triton(q, k, cu, max(doc_lens), **cfg)
    assert (idx[0, doc_lens[0] - 256:doc_lens[0]] == block).any(dim=-1).all(), "the planted block is missed"
    sc = check_sparse_config(**cfg)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    scores = [block_scores_doc(q[a:b], k[a:b], sc, d ** -0.5, True).double().cpu() for a, b in bounds]
    rtol = RTOL[dtype]
    if dtype != torch.float32:
        # FlashAttention-style calibration: the reference itself with its compressed keys stored in `dtype` (as
        # the kernel stores them) misses the fp32 reference's best scores by `dev` at near-ties; allow twice that.
        with pytest.MonkeyPatch.context() as mp:
            exact = naive.compress_keys
            mp.setattr(naive, "compress_keys", lambda k_, l, s: exact(k_, l, s).to(dtype).float())
            low = torch.cat([naive.select_doc(q[a:b], k[a:b], sc, d ** -0.5, True) for a, b in bounds], dim=1)
        dev = selection_score_deviation(low.cpu(), scores, cu.cpu(), block_size=64, init_blocks=1,
                                        window_size=512, topk=24)
        rtol = max(rtol, 2 * dev)
    assert_selection_matches_by_score(idx.cpu(), scores, cu.cpu(), block_size=64, init_blocks=1, window_size=512,
                                      topk=24, rtol=rtol)


def test_measured_config_replaces_the_formula(monkeypatch):
    """select.CONFIGS (set by bench/long_context.py --tuning) overrides the launch formula on the GPU for its
    (G_PAD, head_dim) only; the interpreter keeps its own few-large-programs config."""
    from kernels.infllm_v2 import select

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delitem(select.CONFIGS, (4, 128), raising=False)
    formula = select.default_config(4, 128, 64, 16)
    assert formula == (32, 64, 4, 2)                                     # about 128 rows of 4 heads
    monkeypatch.setitem(select.CONFIGS, (4, 64), select.SelectConfig(16, 128, 4, 3))
    assert select.default_config(4, 64, 64, 16) == (16, 128, 4, 3)
    assert select.default_config(3, 64, 64, 16) == (16, 128, 4, 3)      # G 3 pads to 4
    assert select.default_config(4, 128, 64, 16) == formula              # another head dim: the formula
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select.default_config(4, 64, 64, 16).num_stages == 1


@pytest.mark.parametrize("key", sorted(CONFIGS), ids=lambda key: f"gpad{key[0]}-d{key[1]}")
def test_measured_configs_select_by_score(key):
    """Each measured GPU launch config (its BLOCK_T tiling, not the interpreter's) selects the top blocks by
    score, on uneven documents of G 3 and G 4 at its head dim, into a poisoned output."""
    g_pad, d = key
    cfg = CONFIGS[key]._replace(num_stages=1)
    for h_q, h_kv, doc_lens in ((g_pad * 2, 2, [700, 37, 290]), (3 * 2, 2, [520, 64])):
        if h_q // h_kv > g_pad or 2 * (h_q // h_kv) <= g_pad:
            continue
        q, k, cu, max_len = make_inputs(doc_lens, h_q, h_kv, d)
        k_eff = CFG_MINICPM["topk"] + CFG_MINICPM["window_size"] // CFG_MINICPM["block_size"]
        out = torch.full((h_kv, q.shape[0], k_eff), -2, dtype=torch.int32, device=q.device)
        idx = _select(q, k, cu, max_len, lse_approx=True, softmax_scale=None, config=cfg, out=out, **CFG_MINICPM)
        assert not (idx == -2).any(), "unwritten output slots"
        check_by_score(idx, q, k, cu, CFG_MINICPM, True, RTOL[torch.float32])
