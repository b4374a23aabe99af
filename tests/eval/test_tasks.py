"""Generators: deterministic per seed, exact lengths, every answer value really in the context where stated."""
from collections import Counter

import pytest

from infllm.eval.haystack import corpus_haystack
from infllm.eval.tasks import HaystackPool, generate_samples, make_sample

NEEDLE_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
                "variable_tracking"]


def _fresh_pool(tokenizer):
    return HaystackPool(tokenizer, lambda n: corpus_haystack(None, tokenizer, n))


@pytest.mark.parametrize("task", NEEDLE_TASKS + ["common_words"])
def test_deterministic_per_seed(tokenizer, task):
    a = make_sample(task, tokenizer, 1024, 0.3, 1, seed=7, pool=_fresh_pool(tokenizer))
    b = make_sample(task, tokenizer, 1024, 0.3, 1, seed=7, pool=_fresh_pool(tokenizer))
    c = make_sample(task, tokenizer, 1024, 0.3, 1, seed=8, pool=_fresh_pool(tokenizer))
    assert a.prompt_ids == b.prompt_ids and a.answer_ids == b.answer_ids and a.values == b.values
    assert a.values != c.values


@pytest.mark.parametrize("haystack", ["filler", "corpus"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("task", NEEDLE_TASKS)
def test_answer_in_context_at_depth(tokenizer, pool, task, haystack, depth):
    length = 2048
    s = make_sample(task, tokenizer, length, depth, 0, seed=0, pool=pool, haystack=haystack)
    assert s.total_len == length
    assert s.prompt_ids[s.context_len:] != [] and s.answer_ids
    # The answer's value tokens are copied verbatim from the context (the same ids, not just the same text).
    for (a, b), pos in zip(s.value_spans, s.value_positions):
        assert pos >= 0
        assert s.prompt_ids[pos:pos + b - a] == s.answer_ids[a:b]
        assert s.haystack_span[0] <= pos < s.haystack_span[1]
    # The target needle sits where it was asked: snapped to a sentence / line end, shifted only by the
    # other needles inserted before it.
    assert abs(s.actual_depth - depth) < 0.03
    hay_start, hay_end = s.haystack_span
    target = s.value_positions[s.target]
    assert abs((target - hay_start) / (hay_end - hay_start) - depth) < 0.08
    text = tokenizer.decode(s.prompt_ids[s.context_len:])
    assert text.strip().endswith(("is", "are", "are:", "they are:"))


def test_variable_chain_in_order(tokenizer, pool):
    s = make_sample("variable_tracking", tokenizer, 2048, 0.2, 0, seed=3, pool=pool, haystack="filler",
                    params={"num_hops": 4, "num_chains": 2})
    # Each variable is assigned after the one it copies: the chain can be followed left to right.
    assert s.value_positions == sorted(s.value_positions)
    assert len(s.values) == 5
    text = tokenizer.decode(s.prompt_ids)
    for prev, var in zip(s.values, s.values[1:]):
        assert f"VAR {var} = VAR {prev}." in text


@pytest.mark.parametrize("length", [1024, 4096])
def test_common_words_counts(tokenizer, pool, length):
    s = make_sample("common_words", tokenizer, length, None, 0, seed=0, pool=pool)
    assert length - 24 <= s.total_len <= length
    words = tokenizer.decode(s.prompt_ids[s.haystack_span[0]:s.haystack_span[1]]).split()
    counts = Counter(w for w in words if not w.endswith("."))
    top = [w for w, _ in counts.most_common(len(s.values))]
    assert sorted(top) == sorted(s.values)
    # The common words are strictly more frequent than every other word.
    least_common = min(counts[w] for w in s.values)
    assert all(c < least_common for w, c in counts.items() if w not in s.values)


def test_generate_samples_grid(tokenizer, pool):
    out = generate_samples("passkey", tokenizer, [512, 1024], [0.25, 0.75], 2, seed=0, pool=pool)
    assert [(s.length, s.depth, s.index) for s in out] == [
        (n, d, i) for n in (512, 1024) for d in (0.25, 0.75) for i in range(2)]
    assert len({tuple(s.values) for s in out}) == len(out)


def test_too_short_raises(tokenizer, pool):
    with pytest.raises(ValueError, match="length 64"):
        make_sample("niah_multiquery", tokenizer, 64, 0.5, 0, seed=0, pool=pool)
