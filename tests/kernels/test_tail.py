"""`kernels.infllm_v2_attn_tail`: the newest L tokens of a document over its KV cache select and attend exactly
as the same tokens inside the whole document's `infllm_v2_attn_varlen` (outputs and gradients, fp64)."""
import pytest
import torch

from kernels import infllm_v2_attn_tail
from kernels.infllm_v2.naive import infllm_v2_attn_varlen_naive

CFG = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3)


def _qkv(t, h_q, h_kv, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (h_q, h_kv, h_kv))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


@pytest.mark.parametrize("t,n_new,h_q,h_kv,lse_approx", [
    (203, 1, 6, 2, True),     # one decode step, G = 3, odd length: really sparse (k_eff 5 blocks of 13)
    (203, 7, 4, 1, False),    # a chunk of 7 new tokens, G = 4, exact normaliser
    (150, 150, 2, 2, True),   # the whole document as the "new" tokens: the varlen call itself
    (37, 3, 4, 2, True),      # shorter than k_eff blocks: exactly dense
])
def test_tail_equals_whole_document(t, n_new, h_q, h_kv, lse_approx):
    q, k, v = _qkv(t, h_q, h_kv, 16, seed=t + n_new)
    cu = torch.tensor([0, t], dtype=torch.int32)
    ref = infllm_v2_attn_varlen_naive(q, k, v, cu, t, dense_len=-1, lse_approx=lse_approx, **CFG)[-n_new:]
    q_new = q.detach()[-n_new:].clone().requires_grad_()
    out = infllm_v2_attn_tail(q_new, k, v, dense_len=-1, lse_approx=lse_approx, **CFG)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)

    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * w).sum(), (q_new, k, v))
    torch.testing.assert_close(g_out[0], g_ref[0][-n_new:], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_out[1], g_ref[1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_out[2], g_ref[2], atol=1e-10, rtol=1e-10)


def test_tail_is_sparse_and_dense_below_dense_len():
    q, k, v = _qkv(203, 4, 2, 16, seed=3)
    q1 = q.detach()[-1:]
    sparse = infllm_v2_attn_tail(q1, k, v, dense_len=-1, **CFG)
    dense = infllm_v2_attn_tail(q1, k, v, dense_len=204, **CFG)  # the document (203 so far) is short: dense
    full = torch.nn.functional.scaled_dot_product_attention(
        q1.transpose(0, 1), k.detach().repeat_interleave(2, 1).transpose(0, 1),
        v.detach().repeat_interleave(2, 1).transpose(0, 1)).transpose(0, 1)
    torch.testing.assert_close(dense, full, atol=1e-10, rtol=1e-10)
    assert (sparse - full).abs().max() > 1e-3  # 5 of 13 blocks: not the dense answer


def test_tail_bad_shapes():
    q, k, v = _qkv(40, 4, 2, 16, seed=0)
    with pytest.raises(ValueError, match=r"L <= T"):
        infllm_v2_attn_tail(torch.randn(41, 4, 16), k, v, **CFG)
    with pytest.raises(ValueError, match=r"expected q \[L, H_q, d\]"):
        infllm_v2_attn_tail(q[None], k, v, **CFG)
