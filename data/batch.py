"""The one batch type that flows from the data pipeline to the model.

Legend: B = rows in the batch, L = tokens per row (seq_len), N = B * L flattened tokens.
Rows are packed with whole or split documents; `cu_seqlens` describes the documents over the flattened
[N] token axis, exactly as FlashAttention's varlen API expects, so the attention never needs to look at
`position_ids` to find boundaries (it can, as a fallback, since positions restart at 0 per document).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100


class PackedBatch(NamedTuple):
    input_ids: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64; IGNORE_INDEX where no target (first token of each document, padding)
    position_ids: torch.Tensor  # [B, L] int64, restarting at 0 at every document
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32 over the flattened N = B * L tokens, 0 .. N
    max_seqlen: int  # longest document, a Python int (no host sync needed downstream)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "PackedBatch":
        return PackedBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.position_ids.to(device, non_blocking=non_blocking),
            self.cu_seqlens.to(device, non_blocking=non_blocking),
            self.max_seqlen,
        )

    def model_kwargs(self) -> dict:
        """Keyword arguments for a Hugging Face causal LM forward. The varlen metadata travels through
        transformers' `TransformersKwargs` to the attention function (infllm.attention reads it)."""
        return dict(
            input_ids=self.input_ids,
            position_ids=self.position_ids,
            cu_seq_lens_q=self.cu_seqlens,
            cu_seq_lens_k=self.cu_seqlens,
            max_length_q=self.max_seqlen,
            max_length_k=self.max_seqlen,
        )
