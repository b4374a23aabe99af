"""Fake causal LMs with known behaviour, for checking the scorers.

CopyOracle is an induction head in Python: at each position it finds the longest earlier occurrence of the
text that ends there and predicts the token that followed it, so it answers retrieval questions by copying
from its context. AnswerOracle knows the samples and predicts their exact continuation. Both follow the
HF call convention the scorers use (input_ids, logits_to_keep, past_key_values) and put all mass on one token.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast


class _FakeLM(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self._p = nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), {"name_or_path": type(self).__name__, "max_position_embeddings": None})()

    def next_token(self, ids: List[int], t: int) -> int:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0, **_) -> CausalLMOutputWithPast:
        ids = input_ids[0].tolist()
        L = len(ids)
        keep = logits_to_keep or L
        logits = torch.full((1, keep, self.vocab_size), -30.0)
        for i, t in enumerate(range(L - keep, L)):
            logits[0, i, self.next_token(ids, t)] = 30.0
        return CausalLMOutputWithPast(logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_) -> torch.Tensor:
        ids = input_ids[0].tolist()
        for _ in range(max_new_tokens):
            ids.append(self.next_token(ids, len(ids) - 1))
        return torch.tensor([ids])


class CopyOracle(_FakeLM):
    def __init__(self, vocab_size: int, max_match: int = 64):
        super().__init__(vocab_size)
        self.max_match = max_match

    def next_token(self, ids: List[int], t: int) -> int:
        best, best_len = 0, 0
        for j in range(t - 1, -1, -1):
            n = 0
            while n < self.max_match and j - n >= 0 and ids[j - n] == ids[t - n]:
                n += 1
            if n > best_len:
                best, best_len = ids[j + 1], n
        return best


class AnswerOracle(_FakeLM):
    """Continues each known prompt with its answer; `reverse_values` gives the values in reverse order
    (to test unordered scoring; meant for values of equal token length, so positions stay aligned)."""

    def __init__(self, vocab_size: int, samples: Sequence, reverse_values: bool = False):
        super().__init__(vocab_size)
        self.known = [(list(s.prompt_ids), list(s.prompt_ids) + (_reversed_values(s) if reverse_values
                                                                    else list(s.answer_ids))) for s in samples]

    def next_token(self, ids: List[int], t: int) -> int:
        for prompt, full in self.known:
            if ids[:len(prompt)] == prompt and t + 1 < len(full):
                return full[t + 1]
        return 0


def _reversed_values(sample) -> List[int]:
    """The answer with its values in reverse order, the separators kept where they were."""
    spans = sample.value_spans
    sep_ids = sample.answer_ids[spans[0][1]:spans[1][0]] if len(spans) > 1 else []
    out: List[int] = []
    for k, (a, b) in enumerate(reversed(spans)):
        out += (sep_ids if k else []) + sample.answer_ids[a:b]
    return out
