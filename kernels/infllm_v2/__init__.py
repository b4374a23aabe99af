"""InfLLM-V2 block-sparse attention: `naive.py` is the reference; `select.py` and `attention.py` hold the
Triton kernels (imported lazily by `kernels/__init__.py`, so this package imports without them)."""
from kernels.infllm_v2.naive import (
    block_sparse_attn_naive,
    infllm_v2_attn_tail_naive,
    infllm_v2_attn_varlen_naive,
    infllm_v2_select_naive,
)

__all__ = [
    "block_sparse_attn_naive",
    "infllm_v2_attn_tail_naive",
    "infllm_v2_attn_varlen_naive",
    "infllm_v2_select_naive",
]
