"""Shared fixtures for the eval tests: the embedded tokenizer (real BPE, digits split), a tiny random Llama on
its vocabulary, and a haystack pool on stdlib text (no corpus preparation)."""
import pytest
import torch

from infllm.config import ModelConfig
from infllm.eval.haystack import corpus_haystack
from infllm.eval.tasks import HaystackPool


@pytest.fixture(scope="session")
def tokenizer():
    from infllm.model import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def pool(tokenizer):
    return HaystackPool(tokenizer, lambda n: corpus_haystack(None, tokenizer, n))
