"""Fixtures of the kernel tests."""
import pytest
import torch

import kernels.infllm_v2.attention as attn


@pytest.fixture
def nan_poison(monkeypatch):
    """Every buffer the Triton kernels allocate starts as NaN (ints as -1): an unwritten element cannot pass."""
    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)

    monkeypatch.setattr(attn, "_empty", lambda *a, **kw: poison(torch.empty(*a, **kw)))
    monkeypatch.setattr(attn, "_empty_like", lambda *a, **kw: poison(torch.empty_like(*a, **kw)))
