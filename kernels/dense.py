"""Causal varlen dense attention, differentiable in q, k, v, through the fastest backend at hand:

    out = dense_attn_varlen(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, backend="auto")

Backends (none reads anything back to the host except "sdpa"):
- "flash": FlashAttention's `flash_attn_varlen_func` (the optional flash-attn package, imported lazily);
- "torch_varlen": torch's own `torch.nn.attention.varlen.varlen_attn` (FlashAttention kernels inside torch,
  CUDA fp16 / bf16 only; GQA natively where the installed torch takes `enable_gqa`, else K/V heads repeated);
- "triton": the dense mode of our block-sparse attention kernel (kernels/infllm_v2/attention.py), every causal
  block of every document; any float dtype on CUDA, and on CPU under TRITON_INTERPRET=1;
- "sdpa": torch SDPA one document at a time, the last fallback (one host read of cu_seqlens per tensor).
"auto" takes the first usable one of AUTO_ORDER on CUDA (fp32 on CUDA: "triton") and "sdpa" on CPU, where a
host read costs nothing. Measured order and numbers: bench/README.md ("Dense path").

Shapes: q [N, H_q, d], k, v [N, H_kv, d] (GQA when H_kv < H_q), cu_seqlens int32 [n_docs + 1].
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from kernels.infllm_v2._validate import (
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_max_seqlen,
    check_qkv,
    resolve_softmax_scale,
)

_BACKENDS = ("auto", "flash", "torch_varlen", "triton", "sdpa")
# "auto" on CUDA fp16 / bf16: the first usable of these. H200, 2026-12-02 (bench/README.md, "Dense path"): torch's
# varlen attention was the fastest sync-free backend in 4 of 6 cases, within 30% of the Triton dense mode in the others.
AUTO_ORDER = ("flash", "torch_varlen", "triton")


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    """flash_attn_varlen_func, or None when flash-attn is not installed (it is optional)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """(varlen_attn, names of its parameters), or None when this torch has no torch.nn.attention.varlen."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen_attn(q, k, v, cu_seqlens, max_seqlen, scale):
    varlen_attn, params = _torch_varlen()
    kwargs = {}
    # torch 2.10 spells causality is_causal; later versions take a (left, right) window.
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        q = q * (scale * q.shape[-1] ** 0.5)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _triton_dense(q, k, v, cu_seqlens, max_seqlen, scale):
    from kernels.infllm_v2.attention import dense_attn_triton

    return dense_attn_triton(q, k, v, cu_seqlens, max_seqlen, softmax_scale=scale)


def sdpa_causal(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA on [B, H, T, d] with GQA. On CUDA the K/V heads are repeated to the query heads: SDPA's
    flash and cuDNN kernels reject `enable_gqa` layouts and torch then falls back to the math kernel, which
    materialises the [H, T, T] scores (19 GiB per layer at 32k, 9 heads, bf16: seen as an OOM on an H100).
    The repeated K/V cost G x the K/V memory of one layer, a few MiB."""
    group = q_BHTD.shape[1] // k_BHTD.shape[1]
    if group > 1 and q_BHTD.is_cuda:
        k_BHTD = k_BHTD.repeat_interleave(group, dim=1)
        v_BHTD = v_BHTD.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True, scale=scale,
                                          enable_gqa=group > 1)


# The last boundaries read to the host: (the cu_seqlens tensor, its version counter, the list). Every layer of a
# forward passes the same cu_seqlens tensor, so the SDPA fallback syncs once per forward, not once per layer.
_host_bounds_cache: tuple | None = None


def _host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    global _host_bounds_cache
    cached = _host_bounds_cache
    if cached is not None and cached[0] is cu_seqlens and cached[1] == cu_seqlens._version:
        return cached[2]
    bounds = cu_seqlens.tolist()  # the one host read of this fallback
    _host_bounds_cache = (cu_seqlens, cu_seqlens._version, bounds)
    return bounds


def _sdpa_per_document(q_NHD, k_NHD, v_NHD, cu_seqlens, scale):
    bounds = _host_bounds(cu_seqlens)
    outs = []
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        # [T, H, d] -> [1, H, T, d]
        q_1HTD = q_NHD[start:end].transpose(0, 1)[None]
        k_1HTD = k_NHD[start:end].transpose(0, 1)[None]
        v_1HTD = v_NHD[start:end].transpose(0, 1)[None]
        outs.append(sdpa_causal(q_1HTD, k_1HTD, v_1HTD, scale)[0].transpose(0, 1))
    if not outs:
        return torch.empty_like(q_NHD)
    return torch.cat(outs, dim=0)


def _usable(backend: str, q: torch.Tensor) -> bool:
    half = q.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash":
        return q.is_cuda and half and _flash_varlen() is not None
    if backend == "torch_varlen":
        return q.is_cuda and half and _torch_varlen() is not None and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    if backend == "triton":
        d = q.shape[-1]
        return q.dtype != torch.float64 and 16 <= d <= 256 and d & (d - 1) == 0
    return True


_NEEDS = {
    "flash": "flash-attn installed and CUDA fp16/bf16 tensors",
    "torch_varlen": "torch.nn.attention.varlen (torch >= 2.10) and CUDA fp16/bf16 tensors, head_dim <= 256",
    "triton": "fp16/bf16/fp32 tensors with head_dim a power of two in [16, 256] (on CPU: TRITON_INTERPRET=1)",
}


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend `dense_attn_varlen` runs for these tensors (metadata only, no host read)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: must be one of {_BACKENDS}, got {backend!r}")
    if backend != "auto":
        if not _usable(backend, q):
            raise RuntimeError(f"backend: {backend!r} needs {_NEEDS[backend]}")
        return backend
    if not q.is_cuda:
        return "sdpa"
    for name in AUTO_ORDER:
        if _usable(name, q):
            return name
    return "sdpa"


def dense_attn_varlen(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, backend="auto"):
    """Causal attention within each document. backend: "auto" or one of "flash", "torch_varlen", "triton",
    "sdpa" (required: an error when it cannot run these tensors); see the module docstring. Returns
    [N, H_q, d] in q's dtype."""
    n, _, _, d = check_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens, q.device)
    check_max_seqlen(max_seqlen)
    scale = resolve_softmax_scale(softmax_scale, d)
    name = resolve_backend(backend, q)
    if not q.is_cuda:
        check_cu_seqlens_values(cu_seqlens, n, max_seqlen)
    if n == 0:
        return torch.empty_like(q)
    if name == "flash":
        return _flash_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale,
                               causal=True)
    if name == "torch_varlen":
        return _torch_varlen_attn(q, k, v, cu_seqlens, max_seqlen, scale)
    if name == "triton":
        return _triton_dense(q, k, v, cu_seqlens, max_seqlen, scale)
    return _sdpa_per_document(q, k, v, cu_seqlens, scale)
