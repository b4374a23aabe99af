"""Scorers: 100% for models that copy / know the answer, chance level for a random model, and the teacher-forced
forward equal with and without chunked prefill."""
import math

import pytest
import torch

from infllm.eval.scoring import last_logits, score_generate, score_teacher_forced
from infllm.eval.tasks import generate_samples
from tests.eval.oracles import AnswerOracle, CopyOracle

ALL_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
             "common_words"]
# Tasks a pure induction head solves: the answer follows the same words in the needle and the answer prefix.
COPY_TASKS = ["passkey", "niah_single", "niah_multikey"]


def _samples(tokenizer, pool, task, haystack="auto", lengths=(512, 1024), depths=(0.0, 0.5, 1.0)):
    return generate_samples(task, tokenizer, list(lengths), list(depths), 1, seed=0, pool=pool, haystack=haystack)


@pytest.mark.parametrize("haystack", ["filler", "corpus"])
@pytest.mark.parametrize("task", COPY_TASKS)
def test_copy_oracle_scores_100(tokenizer, pool, task, haystack):
    model = CopyOracle(len(tokenizer))
    for s in _samples(tokenizer, pool, task, haystack):
        tf = score_teacher_forced(model, s)
        assert tf["exact"] == 1.0 and tf["value_acc"] == 1.0 and tf["token_acc"] == 1.0
        assert tf["logprob"] == pytest.approx(0.0, abs=1e-6)
        gen, text = score_generate(model, tokenizer, s)
        assert gen["exact"] == 1.0, text


@pytest.mark.parametrize("task", ALL_TASKS)
def test_answer_oracle_scores_100(tokenizer, pool, task):
    samples = _samples(tokenizer, pool, task, lengths=(1024,), depths=(0.3, 0.7))
    model = AnswerOracle(len(tokenizer), samples)
    for s in samples:
        assert score_teacher_forced(model, s)["exact"] == 1.0
        assert score_generate(model, tokenizer, s)[0]["exact"] == 1.0


def test_unordered_values_accept_any_order(tokenizer, pool):
    """Values listed in another order than the context's still count for order-free tasks, not for
    multi-query, whose answer order is the question's."""
    mv = _samples(tokenizer, pool, "niah_multivalue", lengths=(1024,), depths=(0.5,))
    tf = score_teacher_forced(AnswerOracle(len(tokenizer), mv, reverse_values=True), mv[0])
    assert tf["exact"] == 1.0 and tf["value_acc"] == 1.0
    assert tf["token_acc"] < 1.0  # it really answered in another order
    mq = _samples(tokenizer, pool, "niah_multiquery", lengths=(1024,), depths=(0.5,))
    tf = score_teacher_forced(AnswerOracle(len(tokenizer), mq, reverse_values=True), mq[0])
    assert tf["exact"] == 0.0


def test_copy_oracle_misses_what_it_cannot_copy(tokenizer, pool):
    """Variable tracking needs hops, not one copy: the induction head alone gets the first variable at most."""
    s = _samples(tokenizer, pool, "variable_tracking", lengths=(1024,), depths=(0.5,))[0]
    assert score_teacher_forced(CopyOracle(len(tokenizer)), s)["exact"] == 0.0


@pytest.mark.parametrize("task", ALL_TASKS)
def test_random_model_is_at_chance(tokenizer, pool, tiny_llama, task):
    samples = _samples(tokenizer, pool, task, lengths=(512,), depths=(0.25, 0.75))
    uniform = -math.log(len(tokenizer))
    for s in samples:
        tf = score_teacher_forced(tiny_llama, s)
        # Chance for an exact answer is V^-A, i.e. zero; a random model's log-probs sit at the uniform level.
        assert tf["exact"] == 0.0 and tf["value_acc"] == 0.0
        assert tf["logprob"] == pytest.approx(uniform, abs=0.3)


def test_random_model_generate_runs(tokenizer, pool, tiny_llama):
    s = _samples(tokenizer, pool, "passkey", lengths=(256,), depths=(0.5,))[0]
    gen, text = score_generate(tiny_llama, tokenizer, s, extra_new_tokens=2)
    assert gen["exact"] == 0.0 and isinstance(text, str)


def test_chat_template_generation(tokenizer, pool):
    s = _samples(tokenizer, pool, "niah_single", lengths=(512,), depths=(0.5,))[0]
    gen, text = score_generate(CopyOracle(len(tokenizer)), tokenizer, s, chat_template=True)
    assert gen["exact"] == 1.0, text


def test_prefill_chunks_match_one_forward(tokenizer, tiny_llama):
    ids = torch.randint(0, len(tokenizer), (700,)).tolist()
    full = last_logits(tiny_llama, ids, keep=9)
    chunked = last_logits(tiny_llama, ids, keep=9, prefill_chunk=128)
    assert full.shape == (9, len(tokenizer))
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)
