"""Argument checks shared by the public API, the reference and the Triton host functions.

Every error names the argument it is about. The checks on shapes, dtypes, devices and config values read
only tensor metadata, so they are free on the GPU hot path. The checks on the *values* of cu_seqlens and
block_idx read the tensors on the host; `check_cu_seqlens_values` / `check_block_idx_values` are therefore
separate functions that the naive path always calls and the Triton path calls only when asked (`check=True`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class SparseConfig(NamedTuple):
    """The selection hyper-parameters, validated. Field names follow MiniCPM4's `sparse_config`."""

    block_size: int
    kernel_size: int
    kernel_stride: int
    init_blocks: int
    window_size: int
    topk: int

    @property
    def n_local(self) -> int:
        return self.window_size // self.block_size

    @property
    def k_eff(self) -> int:
        return self.topk + self.n_local


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    if not _is_int(value) or value < 0 or (value == 0 and not allow_zero):
        want = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"{name}: must be {want}, got {value!r}")
    return value


def check_block_size(block_size) -> int:
    return check_positive_int("block_size", block_size)


def check_sparse_config(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk) -> SparseConfig:
    check_positive_int("block_size", block_size)
    check_positive_int("kernel_size", kernel_size)
    check_positive_int("kernel_stride", kernel_stride)
    check_positive_int("init_blocks", init_blocks, allow_zero=True)
    check_positive_int("window_size", window_size, allow_zero=True)
    check_positive_int("topk", topk)
    if window_size % block_size != 0:
        raise ValueError(f"window_size: must be a multiple of block_size={block_size}, got {window_size}")
    if kernel_stride > kernel_size:
        raise ValueError(f"kernel_stride: must be <= kernel_size={kernel_size}, got {kernel_stride}")
    # The forced blocks (init + local + current) must always fit in the k_eff selected ones.
    if topk < init_blocks + 1:
        raise ValueError(f"topk: must be >= init_blocks + 1 = {init_blocks + 1}, got {topk}")
    return SparseConfig(block_size, kernel_size, kernel_stride, init_blocks, window_size, topk)


def check_dense_len(dense_len) -> int:
    if not _is_int(dense_len) or dense_len < -1:
        raise ValueError(f"dense_len: must be -1 (always sparse) or a non-negative int, got {dense_len!r}")
    return dense_len


def check_impl(impl) -> str:
    if impl not in ("auto", "naive", "triton"):
        raise ValueError(f"impl: must be 'auto', 'naive' or 'triton', got {impl!r}")
    return impl


def resolve_softmax_scale(softmax_scale, head_dim: int) -> float:
    """None -> 1/sqrt(d), the model default; otherwise a finite positive number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: must be None or a float, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale: must be finite and > 0, got {softmax_scale}")
    return float(softmax_scale)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_qk(q, k) -> tuple[int, int, int, int]:
    """q [N, H_q, d], k [N, H_kv, d], H_q % H_kv == 0, same float dtype and device. Returns (N, H_q, H_kv, d)."""
    _check_tensor("q", q)
    _check_tensor("k", k)
    if q.dim() != 3:
        raise ValueError(f"q: expected [N, H_q, d], got {_shape(q)}")
    n, h_q, d = q.shape
    if h_q == 0 or d == 0:
        raise ValueError(f"q: expected [N, H_q, d] with H_q > 0 and d > 0, got {_shape(q)}")
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q: dtype must be one of float16/bfloat16/float32/float64, got {q.dtype}")
    if k.dim() != 3 or k.shape[0] != n or k.shape[2] != d or k.shape[1] == 0:
        raise ValueError(f"k: expected [N, H_kv, d] with N={n}, d={d}, got {_shape(k)}")
    h_kv = k.shape[1]
    if h_q % h_kv != 0:
        raise ValueError(f"k: H_q={h_q} must be a multiple of H_kv, got H_kv={h_kv}")
    if k.dtype != q.dtype:
        raise TypeError(f"k: dtype must match q ({q.dtype}), got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k: must be on q's device ({q.device}), got {k.device}")
    return n, h_q, h_kv, d


def check_qkv(q, k, v) -> tuple[int, int, int, int]:
    n, h_q, h_kv, d = check_qk(q, k)
    _check_tensor("v", v)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected [N, H_kv, d] = {_shape(k)} like k, got {_shape(v)}")
    if v.dtype != q.dtype:
        raise TypeError(f"v: dtype must match q ({q.dtype}), got {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"v: must be on q's device ({q.device}), got {v.device}")
    return n, h_q, h_kv, d


def check_select_q(select_q, q, k) -> None:
    """select_q [N, m * H_kv, d] (whole query groups of k's heads), q's dtype and device."""
    _check_tensor("select_q", select_q)
    n, d, h_kv = q.shape[0], q.shape[2], k.shape[1]
    if select_q.dim() != 3 or select_q.shape[0] != n or select_q.shape[2] != d or select_q.shape[1] % h_kv:
        raise ValueError(f"select_q: expected [N, m * H_kv, d] with N={n}, H_kv={h_kv}, d={d}, got "
                         f"{_shape(select_q)}")
    if select_q.dtype != q.dtype or select_q.device != q.device:
        raise ValueError(f"select_q: must match q's dtype and device ({q.dtype}, {q.device}), got "
                         f"{select_q.dtype}, {select_q.device}")


def check_cu_seqlens(cu_seqlens, device: torch.device) -> int:
    """Metadata only (no host read). Returns n_docs."""
    _check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "cu_seqlens: must be int32 [n_docs + 1] starting at 0 and ending at N, "
            f"got {cu_seqlens.dtype} {_shape(cu_seqlens)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: must be on q's device ({device}), got {cu_seqlens.device}")
    return cu_seqlens.numel() - 1


def check_max_seqlen(max_seqlen) -> int:
    if not _is_int(max_seqlen) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: must be a Python int >= 0, got {max_seqlen!r}")
    return max_seqlen


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, n_tokens: int, max_seqlen: int | None = None) -> list[int]:
    """Host read: starts at 0, ends at N, non-decreasing, and max_seqlen >= the longest document.
    Returns the boundaries as a Python list."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != n_tokens or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(
            f"cu_seqlens: must be int32 starting at 0, non-decreasing and ending at N={n_tokens}, got {bounds[:8]}"
            + (" ..." if len(bounds) > 8 else "")
        )
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen: must be >= the longest document ({longest}), got {max_seqlen}")
    return bounds


def check_block_idx(block_idx, h_kv: int, n_tokens: int, device: torch.device) -> int:
    """block_idx int32 [H_kv, N, K]. Metadata only. Returns K."""
    _check_tensor("block_idx", block_idx)
    if block_idx.dtype != torch.int32:
        raise TypeError(f"block_idx: dtype must be int32, got {block_idx.dtype}")
    if block_idx.dim() != 3 or block_idx.shape[0] != h_kv or block_idx.shape[1] != n_tokens:
        raise ValueError(f"block_idx: expected [H_kv, N, K] with H_kv={h_kv}, N={n_tokens}, got {_shape(block_idx)}")
    if block_idx.device != device:
        raise ValueError(f"block_idx: must be on q's device ({device}), got {block_idx.device}")
    return block_idx.shape[2]


def check_block_idx_values(block_idx: torch.Tensor, bounds: list[int], block_size: int) -> None:
    """Host read: every id is -1 (padding) or a block of the token's own document, [0, ceil(T / block_size))."""
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        n_blocks = -(-(end - start) // block_size)
        ids = block_idx[:, start:end]
        bad = (ids < -1) | (ids >= n_blocks)
        if bool(bad.any()):
            value = int(ids[bad][0])
            raise ValueError(
                f"block_idx: ids must be -1 or in [0, {n_blocks}) for the document at tokens [{start}, {end}), "
                f"got {value}"
            )


def check_tail_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    """The KV-cache call's shapes: q [L, H_q, d] (the newest L tokens), k, v [T, H_kv, d] with L <= T and
    H_q a multiple of H_kv. Returns (L, T, H_q, H_kv, d)."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q [L, H_q, d] and k, v [T, H_kv, d], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    n_q, h_q, d = q.shape
    seq_len, h_kv = k.shape[0], k.shape[1]
    if n_q > seq_len or h_q % h_kv:
        raise ValueError(f"q has {n_q} tokens of {h_q} heads but k {seq_len} tokens of {h_kv} heads: expected "
                         "L <= T and H_q a multiple of H_kv")
    return n_q, seq_len, h_q, h_kv, d
