"""Causal varlen dense attention: FlashAttention's `flash_attn_varlen_func` when it is installed and usable,
otherwise torch SDPA one document at a time. Differentiable in q, k, v.

Shapes: q [N, H_q, d], k, v [N, H_kv, d] (GQA when H_kv < H_q), cu_seqlens int32 [n_docs + 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.infllm_v2._validate import (
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_max_seqlen,
    check_qkv,
    resolve_softmax_scale,
)

_BACKENDS = ("auto", "flash", "sdpa")


def _flash_varlen():
    """flash_attn_varlen_func, or None when flash-attn is not installed (it is optional)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


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
    bounds = cu_seqlens.tolist()  # the one host read of this fallback (no flash-attn)
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


def dense_attn_varlen(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, backend="auto"):
    """Causal attention within each document. backend: "auto" (flash-attn on CUDA fp16/bf16 when
    installed, else SDPA), "flash" (required, error when unavailable) or "sdpa". Returns [N, H_q, d]."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: must be one of {_BACKENDS}, got {backend!r}")
    n, _, _, d = check_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens, q.device)
    check_max_seqlen(max_seqlen)
    scale = resolve_softmax_scale(softmax_scale, d)

    flash_ok = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    flash = _flash_varlen() if backend in ("auto", "flash") else None
    if backend == "flash" and (flash is None or not flash_ok):
        raise RuntimeError("backend: 'flash' needs flash-attn installed and CUDA fp16/bf16 tensors")
    if flash is not None and flash_ok:
        return flash(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    if not q.is_cuda:
        check_cu_seqlens_values(cu_seqlens, n, max_seqlen)
    return _sdpa_per_document(q, k, v, cu_seqlens, scale)
