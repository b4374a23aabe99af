"""The whole Triton path of `infllm_v2_attn_varlen` (selection + the dense/sparse switch + block-sparse
attention) against the reference: dense documents equal dense causal attention, sparse documents equal the
reference attention on the Triton selection (compared on the same selection, so near-ties cannot flake)."""
import pytest
import torch

from kernels import block_sparse_attn_varlen, infllm_v2_attn_varlen, infllm_v2_select
from kernels.infllm_v2.naive import infllm_v2_attn_varlen_naive
from tests.conftest import DEVICE

CFG = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3)


def check_against_reference(lengths, hq, hkv, d, dense_len, seed):
    """Output and dq / dk / dv of the Triton path on random inputs against the contract's reference: documents
    below dense_len dense causal, the others the reference attention on the Triton selection. Returns it."""
    torch.manual_seed(seed)
    n = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(n, hq, d, device=DEVICE, requires_grad=True)
    k = torch.randn(n, hkv, d, device=DEVICE, requires_grad=True)
    v = torch.randn(n, hkv, d, device=DEVICE, requires_grad=True)
    grad = torch.randn(n, hq, d, device=DEVICE)

    out = infllm_v2_attn_varlen(q, k, v, cu, max(lengths), dense_len=dense_len, impl="triton", **CFG)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    idx = infllm_v2_select(q.detach(), k.detach(), cu, max(lengths), impl="triton", **CFG)
    ref_sparse = block_sparse_attn_varlen(q, k, v, idx, cu, max(lengths), block_size=CFG["block_size"],
                                          impl="naive")
    ref_dense = infllm_v2_attn_varlen_naive(q, k, v, cu, max(lengths), dense_len=10**9, **CFG)
    # The contract's reference: every document below dense_len dense.
    is_dense = torch.cat([torch.full((t,), t < dense_len) for t in lengths]).to(DEVICE)
    ref = torch.where(is_dense[:, None, None], ref_dense, ref_sparse)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    return idx


@pytest.mark.parametrize("lengths,hq,hkv,d,dense_len", [
    ([70, 150, 41, 200], 6, 2, 64, 100),   # dense docs (70, 41) between sparse ones, widened ids
    ([130, 33, 97], 4, 4, 64, 64),          # G = 1
    ([180, 120], 3, 1, 128, 2000),          # every document dense
], ids=["T461-Hq6-Hkv2-D64-docs4", "T260-Hq4-Hkv4-D64-docs3", "T300-Hq3-Hkv1-D128-docs2"])
def test_triton_attn_varlen_matches_reference(lengths, hq, hkv, d, dense_len):
    check_against_reference(lengths, hq, hkv, d, dense_len, seed=1)


@pytest.mark.parametrize("dense_len", [10**6, 81])
def test_short_documents_stay_sparse_at_the_k_eff_boundary(dense_len, monkeypatch):
    """Documents of exactly k_eff * B tokens (80 here) take the sparse launch and still equal dense causal
    attention (they select every block); one token more (81) is dense when below dense_len and sparse on its
    selection otherwise. Checked against the reference, and the boundary document through block_sparse_attn."""
    import kernels.infllm_v2.attention as attn

    seen = []
    real = attn.block_sparse_attn_triton
    monkeypatch.setattr(attn, "block_sparse_attn_triton", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    k_eff_b = (CFG["topk"] + CFG["window_size"] // CFG["block_size"]) * CFG["block_size"]   # 80
    lengths, hq, hkv, d = [k_eff_b, k_eff_b + 1, 30], 6, 2, 64
    idx = check_against_reference(lengths, hq, hkv, d, dense_len, seed=3)
    assert seen and seen[-1]["dense_min"] == k_eff_b
    # The sparse selection of the k_eff * B document lists every block 0..c for every token.
    first = idx[:, :k_eff_b]
    c = torch.arange(k_eff_b, device=DEVICE) // CFG["block_size"]
    n_listed = (first >= 0).sum(-1)
    assert torch.equal(n_listed, (c + 1).expand_as(n_listed).to(n_listed.dtype))
