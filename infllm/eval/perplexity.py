"""Perplexity of held-out long documents, per position bucket.

Legend: L = document tokens, D = hidden size, V = vocabulary, C = logits_chunk.

The decoder runs once over the document (or in KV-cached pieces of `prefill_chunk`), giving hidden states
[L, D]; lm_head is then applied C rows at a time, so at most [C, V] logits exist at once. The loss of the
token at position t (predicted from positions < t) goes to bucket t // bucket_size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from infllm.eval.scoring import new_cache, model_device


def auto_bucket(length: int) -> int:
    """length // 4 between 256 and 4096: 0-4k, 4k-8k, ... at 16k; 512-token buckets at 2k."""
    return int(min(4096, max(256, length // 4)))


@torch.no_grad()
def _hidden_states(decoder, x: torch.Tensor, prefill_chunk: int, model) -> torch.Tensor:
    if prefill_chunk and x.shape[1] > prefill_chunk:
        cache = new_cache(model)
        parts = [decoder(input_ids=x[:, s:s + prefill_chunk], past_key_values=cache, use_cache=True).last_hidden_state
                 for s in range(0, x.shape[1], prefill_chunk)]
        return torch.cat(parts, dim=1)[0]
    return decoder(input_ids=x, use_cache=False).last_hidden_state[0]


@torch.no_grad()
def token_nll(model, ids: Sequence[int], prefill_chunk: int = 0, logits_chunk: int = 1024) -> torch.Tensor:
    """fp32 [L - 1]: -log p(ids[t] | ids[:t]) for t = 1 .. L-1."""
    x = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
    target = x[0, 1:]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or head is None:
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        return F.cross_entropy(logits, target, reduction="none")
    hidden = _hidden_states(decoder, x, prefill_chunk, model)[:-1]  # [L-1, D]
    softcap = getattr(model.config, "final_logit_softcapping", None)
    out = []
    for s in range(0, hidden.shape[0], logits_chunk):
        logits = head(hidden[s:s + logits_chunk]).float()  # [C, V]
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        out.append(F.cross_entropy(logits, target[s:s + logits_chunk], reduction="none"))
    return torch.cat(out)


@dataclass
class PositionPerplexity:
    length: int
    bucket: int
    docs: int
    # Per bucket [start, end) of predicted-token positions, with summed nll and token counts.
    starts: List[int] = field(default_factory=list)
    nll_sum: List[float] = field(default_factory=list)
    counts: List[int] = field(default_factory=list)

    @property
    def ppl(self) -> List[float]:
        return [math.exp(s / c) for s, c in zip(self.nll_sum, self.counts)]

    @property
    def overall(self) -> float:
        return math.exp(sum(self.nll_sum) / sum(self.counts))

    def labels(self) -> List[str]:
        return [f"{s}-{min(s + self.bucket, self.length)}" for s in self.starts]

    def as_dict(self) -> Dict:
        return {"length": self.length, "bucket": self.bucket, "docs": self.docs, "overall": self.overall,
                "buckets": [{"range": lab, "start": s, "ppl": p, "tokens": c}
                            for lab, s, p, c in zip(self.labels(), self.starts, self.ppl, self.counts)]}


def perplexity_by_position(model, docs: Sequence[Sequence[int]], length: int, bucket: int = 0,
                           prefill_chunk: int = 0, logits_chunk: int = 1024) -> PositionPerplexity:
    """Each document's first `length` tokens; bucket 0 = auto_bucket(length)."""
    bucket = bucket or auto_bucket(length)
    n_buckets = -(-length // bucket)
    sums = torch.zeros(n_buckets, dtype=torch.float64)
    counts = torch.zeros(n_buckets, dtype=torch.long)
    for doc in docs:
        if len(doc) < length:
            raise ValueError(f"a perplexity document has {len(doc)} tokens, fewer than the length {length}")
        nll = token_nll(model, doc[:length], prefill_chunk, logits_chunk).double().cpu()
        which = torch.arange(1, length) // bucket
        sums.index_add_(0, which, nll)
        counts.index_add_(0, which, torch.ones_like(which))
    return PositionPerplexity(length=length, bucket=bucket, docs=len(docs),
                              starts=[i * bucket for i in range(n_buckets)],
                              nll_sum=sums.tolist(), counts=counts.tolist())
