"""Public API of the attention kernels (docs/INTERFACES.md). Imports only torch (and triton, lazily).

    out = infllm_v2_attn_varlen(q, k, v, cu_seqlens, max_seqlen, *, ..., impl="auto")
    idx = infllm_v2_select(q, k, cu_seqlens, max_seqlen, *, ..., impl="auto")
    out = block_sparse_attn_varlen(q, k, v, block_idx, cu_seqlens, max_seqlen, *, ..., impl="auto")

impl: "auto" runs Triton when the tensors are on CUDA and the pure-PyTorch reference otherwise; "naive" and
"triton" force one (Triton on CPU tensors works under TRITON_INTERPRET=1). Shapes, dtypes, devices and
config values are always validated (metadata only). The values of cu_seqlens / block_idx need a host read,
so they are checked when `check` is True; `check=None` means "unless on CUDA", keeping the GPU hot path free
of host syncs. The naive path always checks them (it reads them anyway).
"""
from __future__ import annotations

import torch

from kernels.dense import dense_attn_varlen
from kernels.infllm_v2._validate import (
    check_block_idx,
    check_block_idx_values,
    check_block_size,
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_dense_len,
    check_impl,
    check_max_seqlen,
    check_qk,
    check_qkv,
    check_select_q,
    check_sparse_config,
    resolve_softmax_scale,
)
from kernels.infllm_v2.naive import (
    block_sparse_attn_naive,
    infllm_v2_attn_varlen_naive,
    infllm_v2_select_naive,
)

# The newest tokens of one document over its KV cache (decode steps, chunked prefill): a few queries a call,
# batched over heads and queries in PyTorch with no host read (kernels/infllm_v2/tail.py), on CPU and GPU alike.
from kernels.infllm_v2.tail import infllm_v2_attn_tail_batched as infllm_v2_attn_tail  # noqa: E402

__all__ = [
    "infllm_v2_attn_varlen",
    "infllm_v2_attn_tail",
    "infllm_v2_select",
    "block_sparse_attn_varlen",
    "dense_attn_varlen",
]


def _use_triton(impl: str, q: torch.Tensor) -> bool:
    check_impl(impl)
    return impl == "triton" or (impl == "auto" and q.is_cuda)


def _load_triton(module: str, name: str):
    """The Triton kernels live in their own files; import them only when asked for, with a clear error."""
    try:
        mod = __import__(f"kernels.infllm_v2.{module}", fromlist=[name])
        return getattr(mod, name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"impl='triton' needs kernels.infllm_v2.{module}.{name}, which could not be imported ({exc}); "
            "use impl='naive' for the PyTorch reference"
        ) from exc


def _wants_value_checks(check: bool | None, q: torch.Tensor) -> bool:
    return (not q.is_cuda) if check is None else bool(check)


def infllm_v2_select(q, k, cu_seqlens, max_seqlen, *, block_size=64, kernel_size=32, kernel_stride=16,
                     init_blocks=1, window_size=2048, topk=64, lse_approx=True, softmax_scale=None, impl="auto",
                     check=None):
    """Block selection. q [N, H_q, d], k [N, H_kv, d], cu_seqlens int32 [n_docs+1].
    Returns int32 [H_kv, N, k_eff] (k_eff = topk + window_size // block_size): per query token the selected
    block ids relative to its document start, ascending, padded with -1. Ignores dense_len; no gradient."""
    kwargs = dict(block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride,
                  init_blocks=init_blocks, window_size=window_size, topk=topk, lse_approx=lse_approx)
    if not _use_triton(impl, q):
        return infllm_v2_select_naive(q, k, cu_seqlens, max_seqlen, softmax_scale=softmax_scale, **kwargs)
    n, _, _, d = check_qk(q, k)
    check_sparse_config(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk)
    check_cu_seqlens(cu_seqlens, q.device)
    check_max_seqlen(max_seqlen)
    if _wants_value_checks(check, q):
        check_cu_seqlens_values(cu_seqlens, n, max_seqlen)
    select_triton = _load_triton("select", "infllm_v2_select_triton")
    with torch.no_grad():
        return select_triton(q, k, cu_seqlens, max_seqlen, softmax_scale=resolve_softmax_scale(softmax_scale, d),
                             **kwargs)


def block_sparse_attn_varlen(q, k, v, block_idx, cu_seqlens, max_seqlen, *, block_size=64, softmax_scale=None,
                             impl="auto", check=None):
    """Attention restricted to given blocks: out[t] attends keys u <= t of its document whose block
    u // block_size is in block_idx[:, t] (int32 [H_kv, N, K], -1 = padding). [N, H_q, d], q's dtype."""
    if not _use_triton(impl, q):
        return block_sparse_attn_naive(q, k, v, block_idx, cu_seqlens, max_seqlen, block_size=block_size,
                                       softmax_scale=softmax_scale)
    n, _, h_kv, d = check_qkv(q, k, v)
    check_block_size(block_size)
    check_cu_seqlens(cu_seqlens, q.device)
    check_max_seqlen(max_seqlen)
    check_block_idx(block_idx, h_kv, n, q.device)
    if _wants_value_checks(check, q):
        bounds = check_cu_seqlens_values(cu_seqlens, n, max_seqlen)
        check_block_idx_values(block_idx, bounds, block_size)
    attn_triton = _load_triton("attention", "block_sparse_attn_triton")
    return attn_triton(q, k, v, block_idx, cu_seqlens, max_seqlen, block_size=block_size,
                       softmax_scale=resolve_softmax_scale(softmax_scale, d))


def infllm_v2_attn_varlen(q, k, v, cu_seqlens, max_seqlen, *, block_size=64, kernel_size=32, kernel_stride=16,
                          init_blocks=1, window_size=2048, topk=64, dense_len=8192, lse_approx=True,
                          softmax_scale=None, impl="auto", check=None, select_q=None):
    """InfLLM-V2 attention: documents shorter than dense_len (unless -1) attend densely and causally, the
    others attend their k_eff selected blocks. q [N, H_q, d], k, v [N, H_kv, d] -> [N, H_q, d], q's dtype,
    differentiable in q, k, v.

    select_q: the queries the block selection scores with, when they are not q: [N, G' * H_kv, d] holding the
    whole query groups of k's heads while q holds only some heads of them (sequence parallelism that splits a
    group over ranks; see kernels/infllm_v2/README.md). No gradient flows through it."""
    kwargs = dict(block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride,
                  init_blocks=init_blocks, window_size=window_size, topk=topk, lse_approx=lse_approx)
    if select_q is not None:
        check_select_q(select_q, q, k)
    if not _use_triton(impl, q):
        return infllm_v2_attn_varlen_naive(q, k, v, cu_seqlens, max_seqlen, dense_len=dense_len,
                                           softmax_scale=softmax_scale, select_q=select_q, **kwargs)
    n, _, _, d = check_qkv(q, k, v)
    sparse_cfg = check_sparse_config(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk)
    check_dense_len(dense_len)
    check_cu_seqlens(cu_seqlens, q.device)
    check_max_seqlen(max_seqlen)
    if _wants_value_checks(check, q):
        check_cu_seqlens_values(cu_seqlens, n, max_seqlen)
    scale = resolve_softmax_scale(softmax_scale, d)
    select_triton = _load_triton("select", "infllm_v2_select_triton")
    attn_triton = _load_triton("attention", "block_sparse_attn_triton")
    # Selection runs for every document (dense ones ignore it inside the attention kernel): deciding per
    # document on the host would need a sync. (Widening the ids so that dense documents become "every block
    # 0..c" selections and run through the sparse launch was measured slower on an H100: 3.1 s vs 2.2 s per
    # step, SmolLM2 shape at 32k.)
    with torch.no_grad():
        scoring_q = q if select_q is None else select_q
        block_idx = select_triton(scoring_q.detach(), k.detach(), cu_seqlens, max_seqlen, softmax_scale=scale,
                                  **kwargs)
    # Contract step 9: a document of T <= k_eff * B tokens selects every block 0..c for every token, so its sparse
    # output is dense attention already; only k_eff * B < T < dense_len needs the dense launch (the sparse one is
    # faster). dense_min is a Python int, so this costs no host sync.
    return attn_triton(q, k, v, block_idx, cu_seqlens, max_seqlen, block_size=block_size, softmax_scale=scale,
                       dense_len=dense_len, dense_min=sparse_cfg.k_eff * block_size)
