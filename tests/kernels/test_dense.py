"""The dense varlen path (kernels/dense.py): every backend against the float64 oracle, outputs and dq/dk/dv,
G in {1, 2, 3, 4, 6, 8, 16}, d in {64, 128}, uneven documents (one token, shorter than a block, odd lengths),
NaN-poisoned buffers for the Triton dense mode, and no host synchronisation on CUDA. On CPU the Triton
backend runs under the interpreter (tiny shapes, fp32 / fp16); torch's varlen attention is CUDA-only."""
from __future__ import annotations

import functools

import pytest
import torch

import kernels.dense as dense
from kernels import dense_attn_varlen
from tests.conftest import DEVICE, HAS_CUDA, requires_cuda
from tests.kernels.oracle import dense_causal_attention
from tests.kernels.tolerance import check_fwd_bwd


def _inputs(lens, h_q, h_kv, d, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    mk = lambda h: torch.randn((n, h, d), generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    return {"q": mk(h_q), "k": mk(h_kv), "v": mk(h_kv)}, cu


# (lens, H_q, H_kv, d): G = 1, 3, 8, 16 on CPU in fp32 and fp16, G = 2, 4, 6 in fp32; every G on CUDA in bf16.
CPU_CASES = [([37, 1, 70], 2, 2, 64), ([45, 20], 3, 1, 64), ([33, 64], 8, 1, 128), ([50, 3], 16, 1, 64)]
CPU_MORE_G = [([29, 17], 4, 2, 64), ([40, 9], 8, 2, 64), ([21, 33], 6, 1, 128)]
GPU_CASES = [([700, 1, 333, 1200], 2 * g, 2, 64 if g % 2 else 128) for g in (1, 2, 3, 4, 6, 8, 16)]


def _id(case):
    lens, h_q, h_kv, d = case
    return f"T{sum(lens)}-Hq{h_q}-Hkv{h_kv}-D{d}-docs{len(lens)}"


def _check(backend, case, dtype, seed=0):
    lens, h_q, h_kv, d = case
    inputs, cu = _inputs(lens, h_q, h_kv, d, seed)
    scale = 0.7 * d ** -0.5
    kernel = functools.partial(dense_attn_varlen, cu_seqlens=cu, max_seqlen=max(lens), softmax_scale=scale,
                               backend=backend)
    reference = functools.partial(dense_causal_attention, cu_seqlens=cu, scale=scale)
    check_fwd_bwd(kernel, reference, inputs, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=[_id(c) for c in CPU_CASES])
def test_triton_dense_matches_oracle(case, dtype, nan_poison):
    _check("triton", case, dtype)


@pytest.mark.parametrize("case", CPU_MORE_G, ids=[_id(c) for c in CPU_MORE_G])
def test_triton_dense_matches_oracle_more_groups(case, nan_poison):
    _check("triton", case, torch.float32)


@pytest.mark.parametrize("case", CPU_CASES[:2], ids=[_id(c) for c in CPU_CASES[:2]])
def test_sdpa_dense_matches_oracle(case):
    _check("sdpa", case, torch.float32)


def test_auto_resolution_and_refusals():
    """auto: SDPA per document on CPU (a host read is free there); a named backend that cannot run the tensors
    is an error naming what it needs, never a silent fallback."""
    q = torch.randn(8, 4, 64)
    assert dense.resolve_backend("auto", q) == "sdpa"
    with pytest.raises(RuntimeError, match="torch_varlen.*CUDA"):
        dense.resolve_backend("torch_varlen", q)
    with pytest.raises(RuntimeError, match="triton.*power of two"):
        dense.resolve_backend("triton", torch.randn(8, 4, 48))
    with pytest.raises(ValueError, match="backend: must be one of"):
        dense.resolve_backend("xformers", q)


def test_empty_documents_and_empty_batch():
    inputs, cu = _inputs([20, 9], 4, 2, 64, seed=3)
    cu = torch.tensor([0, 0, 20, 20, 29], dtype=torch.int32, device=DEVICE)
    got = dense_attn_varlen(inputs["q"].float(), inputs["k"].float(), inputs["v"].float(), cu, 20,
                            backend="triton")
    want = dense_causal_attention(inputs["q"], inputs["k"], inputs["v"], cu)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    none = torch.empty(0, 4, 64, device=DEVICE)
    assert dense_attn_varlen(none, none[:, :2], none[:, :2], torch.zeros(2, dtype=torch.int32, device=DEVICE),
                             1, backend="triton").shape == (0, 4, 64)


@requires_cuda
@pytest.mark.parametrize("backend", ["torch_varlen", "triton"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[_id(c) for c in GPU_CASES])
def test_cuda_backends_match_oracle_bf16(backend, case, nan_poison):
    if not dense._usable(backend, torch.empty(1, 1, case[3], device="cuda", dtype=torch.bfloat16)):
        pytest.skip(f"{backend} not available in this torch")
    _check(backend, case, torch.bfloat16, seed=case[1])


@requires_cuda
@pytest.mark.parametrize("backend", ["auto", "torch_varlen", "triton"])
def test_cuda_backends_do_not_sync(backend):
    """Forward and backward issue no device-to-host synchronisation."""
    if backend != "auto" and not dense._usable(backend, torch.empty(1, 1, 64, device="cuda",
                                                                      dtype=torch.bfloat16)):
        pytest.skip(f"{backend} not available in this torch")
    inputs, cu = _inputs([900, 70, 2000], 12, 4, 64, seed=5)
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in inputs.values())
    assert dense.resolve_backend("auto", q) != "sdpa"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = dense_attn_varlen(q, k, v, cu, 2000, backend=backend)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_fp32_takes_the_triton_dense_mode():
    """fp32 on CUDA has no FlashAttention kernel: auto takes the Triton dense mode, not the host loop."""
    q = torch.empty(4, 2, 64)
    assert dense._usable("triton", q)
    assert not dense._usable("torch_varlen", q)
    if HAS_CUDA:
        assert dense.resolve_backend("auto", q.cuda()) in ("triton", "flash")
