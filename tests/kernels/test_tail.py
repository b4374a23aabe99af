"""`kernels.infllm_v2_attn_tail` (batched, kernels/infllm_v2/tail.py) and its reference
(`naive.infllm_v2_attn_tail_naive`): the newest L tokens of a document over its KV cache select and attend exactly
as the same tokens inside the whole document's `infllm_v2_attn_varlen` (outputs and gradients, fp64)."""
import pytest
import torch

from kernels import infllm_v2_attn_tail
from kernels.infllm_v2 import tail as tail_mod
from kernels.infllm_v2.naive import infllm_v2_attn_tail_naive, infllm_v2_attn_varlen_naive

IMPLS = {"batched": infllm_v2_attn_tail, "naive": infllm_v2_attn_tail_naive}

CFG = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3)


def _qkv(t, h_q, h_kv, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (h_q, h_kv, h_kv))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("t,n_new,h_q,h_kv,lse_approx", [
    (203, 1, 6, 2, True),     # one decode step, G = 3, odd length: really sparse (k_eff 5 blocks of 13)
    (203, 7, 4, 1, False),    # a chunk of 7 new tokens, G = 4, exact normaliser
    (150, 150, 2, 2, True),   # the whole document as the "new" tokens (batched: above its limit, the reference)
    (150, 64, 2, 2, True),    # the batched form's largest chunk
    (37, 3, 4, 2, True),      # shorter than k_eff blocks: exactly dense
    (140, 2, 8, 1, True),     # G = 8; 140 tokens: the coarse kernels (length 32) exist
    (30, 1, 2, 1, True),      # shorter than one coarse kernel: the exact normaliser
    (6, 1, 2, 1, True),       # shorter than one kernel: only the forced blocks
])
def test_tail_equals_whole_document(impl, t, n_new, h_q, h_kv, lse_approx):
    q, k, v = _qkv(t, h_q, h_kv, 16, seed=t + n_new)
    cu = torch.tensor([0, t], dtype=torch.int32)
    ref = infllm_v2_attn_varlen_naive(q, k, v, cu, t, dense_len=-1, lse_approx=lse_approx, **CFG)[-n_new:]
    q_new = q.detach()[-n_new:].clone().requires_grad_()
    out = IMPLS[impl](q_new, k, v, dense_len=-1, lse_approx=lse_approx, **CFG)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)

    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q_new, k, v))
    torch.testing.assert_close(g_out[0], g_ref[0][-n_new:], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_out[1], g_ref[1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_out[2], g_ref[2], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_tail_is_sparse_and_dense_below_dense_len(impl):
    q, k, v = _qkv(203, 4, 2, 16, seed=3)
    q1 = q.detach()[-3:]
    sparse = IMPLS[impl](q1, k, v, dense_len=-1, **CFG)
    dense = IMPLS[impl](q1, k, v, dense_len=204, **CFG)  # the document (203 so far) is short: dense
    mask = torch.arange(203)[None, :] <= torch.arange(200, 203)[:, None]
    full = torch.nn.functional.scaled_dot_product_attention(
        q1.transpose(0, 1), k.detach().repeat_interleave(2, 1).transpose(0, 1),
        v.detach().repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(dense, full, atol=1e-10, rtol=1e-10)
    assert (sparse - full).abs().max() > 1e-3  # 5 of 13 blocks: not the dense answer


@pytest.mark.parametrize("impl", list(IMPLS))
def test_tail_bad_shapes(impl):
    q, k, v = _qkv(40, 4, 2, 16, seed=0)
    with pytest.raises(ValueError, match=r"L <= T"):
        IMPLS[impl](torch.randn(41, 4, 16), k, v, **CFG)
    with pytest.raises(ValueError, match=r"expected q \[L, H_q, d\]"):
        IMPLS[impl](q[None], k, v, **CFG)


def test_batched_tail_fp32_matches_reference_and_reads_no_host_value(monkeypatch):
    """fp32 at a decode-like size (one query, 1000 cached keys): the same selection and output as the reference
    (to fp32 rounding), and no tensor is read back to the host on the way (.item / bool / tolist fail here)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, h, 32, generator=g) for n, h in ((1, 6), (1000, 2), (1000, 2)))
    ref = infllm_v2_attn_tail_naive(q, k, v, dense_len=-1, **CFG)

    def no_host(*_a, **_k):
        raise AssertionError("host read in the batched tail")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_host)
    out = tail_mod.infllm_v2_attn_tail_batched(q, k, v, dense_len=-1, **CFG)
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
