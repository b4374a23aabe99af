"""Perplexity by position equals a direct computation from the full logits."""
import math

import pytest
import torch
import torch.nn.functional as F

from infllm.eval.perplexity import auto_bucket, perplexity_by_position, token_nll


def _direct(model, docs, length, bucket):
    sums, counts = {}, {}
    for doc in docs:
        x = torch.tensor([doc[:length]])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1].float()
        nll = F.cross_entropy(logits, x[0, 1:], reduction="none")
        for t in range(1, length):
            b = t // bucket
            sums[b] = sums.get(b, 0.0) + nll[t - 1].item()
            counts[b] = counts.get(b, 0) + 1
    return [math.exp(sums[b] / counts[b]) for b in sorted(sums)], sum(counts.values())


@pytest.mark.parametrize("prefill_chunk,logits_chunk", [(0, 1024), (0, 97), (256, 100)],
                         ids=["one-forward", "head-chunks", "prefill-chunks"])
def test_matches_direct_computation(tokenizer, tiny_llama, prefill_chunk, logits_chunk):
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, len(tokenizer), (720,), generator=g).tolist() for _ in range(2)]
    length, bucket = 700, 128
    p = perplexity_by_position(tiny_llama, docs, length, bucket, prefill_chunk, logits_chunk)
    expected, n_tokens = _direct(tiny_llama, docs, length, bucket)
    assert p.starts == [0, 128, 256, 384, 512, 640]
    assert p.labels()[-1] == "640-700"
    assert sum(p.counts) == n_tokens == 2 * 699
    assert p.ppl == pytest.approx(expected, rel=1e-4)


def test_token_nll_shape(tokenizer, tiny_llama):
    ids = list(range(100, 164))
    assert token_nll(tiny_llama, ids).shape == (63,)


def test_auto_bucket():
    assert auto_bucket(16384) == 4096
    assert auto_bucket(65536) == 4096
    assert auto_bucket(2048) == 512
    assert auto_bucket(512) == 256


def test_short_document_raises(tiny_llama):
    with pytest.raises(ValueError, match="fewer than the length"):
        perplexity_by_position(tiny_llama, [[1, 2, 3]], 10)
