"""InfLLM (v1) training-free context memory (Xiao et al., 2024), forward only. Imports only torch.

    out, memory = infllm_v1_attn(q, k, v, inv_freq, *, memory=None, attention_scaling=1.0, block_size=128,
                                 n_init=128, n_local=4096, topk=16, repr_topk=4, exc_block_size=512,
                                 sink_position="memory", softmax_scale=None, return_selection=False)

q [L, H_q, d] (the newest L tokens), k / v [T, H_kv, d] (all T tokens so far), before RoPE; `memory` carries
the retrieval state from one call to the next (None for a fresh sequence). The math is in README.md. Only the
pure-PyTorch path exists (naive.py); it runs on any device.
"""
from kernels.infllm_v1.naive import (
    ChunkSelection,
    ContextMemory,
    check_v1_config,
    infllm_v1_attn_naive,
    rope,
)

__all__ = ["infllm_v1_attn", "infllm_v1_attn_naive", "ContextMemory", "ChunkSelection", "rope", "check_v1_config"]

infllm_v1_attn = infllm_v1_attn_naive
