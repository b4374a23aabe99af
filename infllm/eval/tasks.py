"""Synthetic long-context tasks: passkey (LongLoRA) and the RULER families, generated in token space.

Every sample is `prompt_ids + answer_ids`, exactly `length` tokens long (common_words: at most `length`).
The prompt is: task header, haystack with the needles inserted at line/sentence boundaries, question, and an
answer prefix ("The pass key is"), so a base model can be scored on the answer tokens with one forward pass.
Each value of the answer is tokenised once and the same token ids are placed in the context, so a model that
copies from its context can reproduce them exactly; only the values' tokens are scored (value_spans), not the
separators between them.

A sample's `depth` is where its target needle starts in the haystack (0 = first token after the header,
1 = last); the other needles of the multi-needle tasks get seeded random depths.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from infllm.eval.haystack import (NOISE_FILLER, PASSKEY_FILLER, Haystack, bos_prefix, encode, filler_haystack,
                                  random_window)

ADJECTIVES = ("ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "crimson", "curious", "damp",
              "eager", "early", "empty", "fancy", "fierce", "gentle", "giant", "golden", "green", "hollow",
              "humble", "icy", "jolly", "kind", "lazy", "little", "loud", "lucky", "modern", "narrow", "noisy",
              "odd", "pale", "plain", "polite", "proud", "quiet", "rapid", "rare", "rough", "royal", "rusty",
              "shiny", "silent", "silver", "sleepy", "slow", "smooth", "solid", "sour", "steep", "sticky",
              "strange", "sunny", "swift", "tall", "tender", "tiny", "warm", "wild", "wise", "young")
NOUNS = ("anchor", "apple", "arrow", "badge", "basket", "beacon", "bell", "blanket", "boat", "bottle", "bridge",
         "bucket", "button", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cloud", "coin",
         "compass", "desk", "door", "dragon", "drum", "engine", "feather", "fence", "forest", "garden",
         "glove", "hammer", "harbor", "helmet", "island", "jacket", "kettle", "ladder", "lantern", "lemon",
         "meadow", "mirror", "needle", "orchard", "palace", "pencil", "piano", "pillow", "planet", "pocket",
         "river", "rocket", "saddle", "shadow", "shovel", "sofa", "spoon", "statue", "tiger", "tower",
         "trumpet", "tunnel", "valley", "violin", "wagon", "window")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class Value:
    """A needle value inside a piece's template: tokenised as " " + text, the same ids as in the answer
    (see value_ids)."""
    text: str


@dataclass
class Sample:
    task: str
    length: int
    # Requested depth of the target needle; None for tasks without one (common_words).
    depth: Optional[float]
    index: int
    prompt_ids: List[int]
    answer_ids: List[int]
    # The answer's values as text and their [start, end) spans inside answer_ids.
    values: List[str]
    value_spans: List[Tuple[int, int]]
    # Where each value's tokens start in prompt_ids (aligned with `values`; -1 where a value is not copied).
    value_positions: List[int]
    # True when the values may be given in any order (multi-value, variable tracking, common words).
    unordered: bool
    # prompt_ids[:context_len] is header + haystack + question; the rest is the answer prefix.
    context_len: int
    haystack_span: Tuple[int, int]
    # Where the target needle really sits: its insertion offset / haystack length.
    actual_depth: Optional[float] = None
    # Which value is the target needle's (the one placed at `depth`).
    target: int = 0
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


class HaystackPool:
    """Filler and corpus haystacks built once and shared by all samples of a run."""

    def __init__(self, tokenizer, corpus_factory: Optional[Callable[[int], Haystack]] = None):
        self.tokenizer = tokenizer
        self.corpus_factory = corpus_factory
        self._filler: Dict[str, Haystack] = {}
        self._corpus: Optional[Haystack] = None

    def filler(self, text: str, min_tokens: int) -> Haystack:
        hay = self._filler.get(text)
        if hay is None or len(hay.tokens) < min_tokens:
            hay = filler_haystack(self.tokenizer, max(min_tokens, 1024), text)
            self._filler[text] = hay
        return hay

    def corpus(self, min_tokens: int) -> Haystack:
        if self.corpus_factory is None:
            raise ValueError("no corpus for a real-text haystack; pass corpus_factory or use haystack=filler")
        if self._corpus is None or len(self._corpus.tokens) < min_tokens:
            # Twice the length, so samples of one length start at different places.
            self._corpus = self.corpus_factory(2 * min_tokens)
        return self._corpus

    def window(self, kind: str, length: int, rng: random.Random, filler_text: str) -> Haystack:
        if kind == "filler":
            return self.filler(filler_text, length).cut(0, length)
        return random_window(self.corpus(length), length, rng)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _keys(rng: random.Random, n: int) -> List[str]:
    pairs = rng.sample([(a, b) for a in ADJECTIVES for b in NOUNS], n)
    return [f"{a}-{b}" for a, b in pairs]


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def value_ids(tokenizer, text: str) -> Tuple[List[int], List[int]]:
    """(space, value) token ids of " " + text. Tokenizers that split digits (SmolLM2, Llama 2) give the space a
    token of its own; it is layout, not answer, so it goes with the prompt or the separator, not the value."""
    ids = encode(tokenizer, " " + text)
    if len(ids) > 1 and not tokenizer.decode(ids[:1], clean_up_tokenization_spaces=False).strip():
        return ids[:1], ids[1:]
    return [], ids


def _compose(tokenizer, parts: Sequence) -> Tuple[List[int], List[Tuple[str, int]]]:
    """Token ids of a template (str and Value parts) and (value, offset) of each Value in it."""
    ids: List[int] = []
    found = []
    for part in parts:
        if isinstance(part, Value):
            space, value = value_ids(tokenizer, part.text)
            ids += space
            found.append((part.text, len(ids)))
            ids += value
        elif part:
            ids += encode(tokenizer, part)
    return ids, found


@dataclass
class _Spec:
    """What a task generator returns; `_assemble` lays it out at the requested length."""
    header: str
    # (depth, template parts); the first piece is the target whose depth is the sample's.
    pieces: List[Tuple[float, List]]
    question: str
    answer_prefix: str
    values: List[str]
    separator: str = ","
    unordered: bool = False
    # Index in `values` of the target needle's value.
    target: int = 0
    filler_text: str = NOISE_FILLER
    meta: Dict[str, Any] = field(default_factory=dict)


def _assemble(tokenizer, spec: _Spec, task: str, length: int, depth: Optional[float], index: int,
              haystack_kind: str, pool: Optional[HaystackPool], rng: random.Random,
              hay: Optional[Haystack] = None) -> Sample:
    """Lay the spec out in `length` tokens around a haystack window; a given `hay` is used as it is."""
    corpus = haystack_kind == "corpus"
    # A piece in running text is its own sentence (filler) or its own line (real text).
    lead, tail = ("\n", "") if corpus else (" ", "")
    bos = bos_prefix(tokenizer)
    header = encode(tokenizer, spec.header + ("\n" if corpus else ""))
    pieces = []
    for piece_depth, parts in spec.pieces:
        ids, found = _compose(tokenizer, [lead] + list(parts) + [tail])
        pieces.append((piece_depth, ids, found))
    question = encode(tokenizer, "\n\n" + spec.question)
    prefix = encode(tokenizer, " " + spec.answer_prefix if spec.question else spec.answer_prefix)
    answer: List[int] = []
    spans = []
    for i, v in enumerate(spec.values):
        space, value = value_ids(tokenizer, v)
        if i == 0:
            prefix += space
        else:
            answer += (encode(tokenizer, spec.separator) if spec.separator else []) + space
        spans.append((len(answer), len(answer) + len(value)))
        answer += value
    fixed = len(bos) + len(header) + sum(len(p[1]) for p in pieces) + len(question) + len(prefix) + len(answer)
    if hay is None:
        hay_len = length - fixed
        if hay_len < 16:
            raise ValueError(f"{task}: length {length} leaves {hay_len} haystack tokens; use a longer length")
        hay = pool.window(haystack_kind, hay_len, rng, spec.filler_text)
    hay_len = len(hay.tokens)
    offsets = [hay.nearest_boundary(round(d * hay_len)) for d, _, _ in pieces]
    # Stable order: pieces that land on the same boundary keep the order the task gave them.
    order = sorted(range(len(pieces)), key=lambda i: (offsets[i], i))
    prompt = list(bos) + header
    hay_start = len(prompt)
    value_pos: Dict[str, int] = {}
    cursor = 0
    for i in order:
        prompt += hay.tokens[cursor:offsets[i]]
        cursor = offsets[i]
        base = len(prompt)
        prompt += pieces[i][1]
        for text, off in pieces[i][2]:
            value_pos.setdefault(text, base + off)
    prompt += hay.tokens[cursor:]
    hay_end = len(prompt)
    prompt += question
    context_len = len(prompt)
    prompt += prefix
    return Sample(task=task, length=length, depth=depth, index=index, prompt_ids=prompt, answer_ids=answer,
                  values=list(spec.values), value_spans=spans,
                  value_positions=[value_pos.get(v, -1) for v in spec.values], unordered=spec.unordered,
                  context_len=context_len, haystack_span=(hay_start, hay_end),
                  actual_depth=(offsets[0] / hay_len) if (pieces and depth is not None) else None,
                  target=spec.target, meta=spec.meta)


NIAH_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.")


def _niah_needle(key: str, value: str) -> List:
    return [f"One of the special magic numbers for {key} is", Value(value), "."]


def _niah_answer(key: str) -> str:
    # Ends like the needle ("... for {key} is"), so the answer follows the same words in both places.
    return f"In the provided text, the special magic number for {key} is"


def passkey(rng: random.Random, depth: float, digits: int = 5) -> _Spec:
    v = _number(rng, digits)
    return _Spec(
        header=("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there."),
        pieces=[(depth, ["The pass key is", Value(v), ". Remember it.", Value(v), " is the pass key."])],
        question="What is the pass key?", answer_prefix="The pass key is", values=[v],
        filler_text=PASSKEY_FILLER)


def niah_single(rng: random.Random, depth: float, digits: int = 7) -> _Spec:
    key, v = _keys(rng, 1)[0], _number(rng, digits)
    return _Spec(header=NIAH_HEADER, pieces=[(depth, _niah_needle(key, v))],
                 question=f"What is the special magic number for {key} mentioned in the provided text?",
                 answer_prefix=_niah_answer(key), values=[v])


def niah_multikey(rng: random.Random, depth: float, num_keys: int = 4, digits: int = 7) -> _Spec:
    keys = _keys(rng, num_keys)
    vals = [_number(rng, digits) for _ in keys]
    pieces = [(depth, _niah_needle(keys[0], vals[0]))]
    pieces += [(rng.random(), _niah_needle(k, v)) for k, v in zip(keys[1:], vals[1:])]
    return _Spec(header=NIAH_HEADER, pieces=pieces,
                 question=f"What is the special magic number for {keys[0]} mentioned in the provided text?",
                 answer_prefix=_niah_answer(keys[0]),
                 values=[vals[0]], meta={"distractor_keys": keys[1:]})


def niah_multivalue(rng: random.Random, depth: float, num_values: int = 4, digits: int = 7) -> _Spec:
    key = _keys(rng, 1)[0]
    vals = [_number(rng, digits) for _ in range(num_values)]
    depths = [depth] + [rng.random() for _ in vals[1:]]
    # The answer lists the values in the order they appear; any order scores the same.
    in_order = [v for _, v in sorted(zip(depths, vals), key=lambda x: x[0])]
    return _Spec(header=NIAH_HEADER, pieces=[(d, _niah_needle(key, v)) for d, v in zip(depths, vals)],
                 question=f"What are all the special magic numbers for {key} mentioned in the provided text?",
                 answer_prefix=f"The special magic numbers for {key} mentioned in the provided text are",
                 values=in_order, unordered=True, target=in_order.index(vals[0]))


def niah_multiquery(rng: random.Random, depth: float, num_queries: int = 4, digits: int = 7) -> _Spec:
    keys = _keys(rng, num_queries)
    vals = [_number(rng, digits) for _ in keys]
    depths = [depth] + [rng.random() for _ in keys[1:]]
    asked = list(range(num_queries))
    rng.shuffle(asked)
    names = ", ".join(keys[i] for i in asked[:-1]) + f" and {keys[asked[-1]]}" if num_queries > 1 else keys[0]
    return _Spec(header=NIAH_HEADER, pieces=[(d, _niah_needle(k, v)) for d, k, v in zip(depths, keys, vals)],
                 question=f"What are the special magic numbers for {names} mentioned in the provided text?",
                 answer_prefix=f"The special magic numbers for {names} mentioned in the provided text are",
                 values=[vals[i] for i in asked], target=asked.index(0))


def variable_tracking(rng: random.Random, depth: float, num_hops: int = 4, num_chains: int = 1,
                      digits: int = 5) -> _Spec:
    """Chains `VAR A = 12345. VAR B = VAR A. ...`; the target chain starts at `depth` and its later
    assignments follow in order towards the end; other chains (distractors) are spread at random."""
    used = set()

    def name() -> str:
        while True:
            n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
            if n not in used:
                used.add(n)
                return n

    pieces = []
    target_vars: List[str] = []
    target_value = ""
    for c in range(num_chains):
        value = _number(rng, digits)
        names = [name() for _ in range(num_hops + 1)]
        if c == 0:
            starts = [depth + (1.0 - depth) * h / (num_hops + 1) for h in range(num_hops + 1)]
            target_vars, target_value = names, value
        else:
            starts = sorted(rng.random() for _ in names)
        pieces.append((starts[0], ["VAR", Value(names[0]), " =", Value(value), "."]))
        for h in range(1, num_hops + 1):
            pieces.append((starts[h], ["VAR", Value(names[h]), " = VAR", Value(names[h - 1]), "."]))
    # The target chain's first assignment must be piece 0 (the one at the sample's depth).
    return _Spec(
        header=("Memorize and track the chain(s) of variable assignment hidden in the following text."),
        pieces=pieces,
        question=f"Question: Find all variables that are assigned the value {target_value} in the text above.",
        answer_prefix=(f"Answer: According to the chain(s) of variable assignment in the text above, "
                       f"{num_hops + 1} variables are assigned the value {target_value}, they are:"),
        values=target_vars, separator="", unordered=True, meta={"value": target_value})


def common_words(tokenizer, rng: random.Random, length: int, num_common: int = 10, freq_common: int = 30,
                 freq_uncommon: int = 3, common_share: float = 0.5) -> Tuple[_Spec, List[int]]:
    """A numbered list of pseudo-words: `num_common` words appear often, the others `freq_uncommon` times.
    Returns the spec (no pieces) and the list's tokens, which replace the haystack."""
    vocab: List[str] = []
    seen = set()
    while len(vocab) < 4 * length:
        w = _pseudo_word(rng)
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    common, rest = vocab[:num_common], vocab[num_common:]
    word_len = {}

    def wlen(w: str) -> int:
        if w not in word_len:
            word_len[w] = len(encode(tokenizer, " " + w))
        return word_len[w]

    def index_len(i: int) -> int:
        return len(encode(tokenizer, f"\n{i}."))

    header = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.")
    question = f"Question: What are the {num_common} most common words in the above list?"
    prefix = f"Answer: The top {num_common} words that appear most often in the list are:"
    fixed = (len(bos_prefix(tokenizer)) + len(encode(tokenizer, header)) + len(encode(tokenizer, "\n\n" + question))
             + len(encode(tokenizer, " " + prefix))
             + sum(wlen(w) for w in common) + (num_common - 1) * len(encode(tokenizer, ",")))
    budget = length - fixed
    # At short lengths the common words are repeated less, but always more than the uncommon ones.
    avg_entry = 2 + sum(wlen(w) for w in common) / num_common + index_len(100)
    max_common_entries = int(common_share * budget / avg_entry)
    freq = max(freq_uncommon + 2, min(freq_common, max_common_entries // num_common))
    entries = [w for w in common for _ in range(freq)]
    used = sum(index_len(i + 1) + wlen(w) for i, w in enumerate(entries))
    if used > budget:
        raise ValueError(f"common_words: length {length} is too short for {num_common} words x {freq}")
    for w in rest:
        add = sum(index_len(len(entries) + j + 1) + wlen(w) for j in range(freq_uncommon))
        if used + add > budget:
            break
        entries += [w] * freq_uncommon
        used += add
    rng.shuffle(entries)
    tokens: List[int] = []
    for i, w in enumerate(entries):
        tokens += encode(tokenizer, f"\n{i + 1}.") + encode(tokenizer, " " + w)
    spec = _Spec(header=header, pieces=[], question=question, answer_prefix=prefix, values=common,
                 unordered=True, meta={"freq_common": freq, "freq_uncommon": freq_uncommon,
                                       "list_entries": len(entries)})
    return spec, tokens


_NEEDLE_TASKS = {"passkey": passkey, "niah_single": niah_single, "niah_multikey": niah_multikey,
                 "niah_multivalue": niah_multivalue, "niah_multiquery": niah_multiquery,
                 "variable_tracking": variable_tracking}
DEPTHLESS_TASKS = ("common_words",)


def make_sample(task: str, tokenizer, length: int, depth: Optional[float], index: int, seed: int,
                pool: HaystackPool, haystack: str = "auto", params: Optional[Dict[str, Any]] = None) -> Sample:
    """One sample, fully determined by (seed, task, length, depth, index) and the haystack source."""
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{index}")
    params = dict(params or {})
    if task == "common_words":
        spec, tokens = common_words(tokenizer, rng, length, **params)
        return _assemble(tokenizer, spec, task, length, None, index, "filler", None, rng,
                         hay=Haystack(tokens, [0, len(tokens)]))
    if task not in _NEEDLE_TASKS:
        raise ValueError(f"unknown task {task!r}")
    kind = haystack if haystack != "auto" else ("filler" if task == "passkey" else "corpus")
    spec = _NEEDLE_TASKS[task](rng, depth, **params)
    return _assemble(tokenizer, spec, task, length, depth, index, kind, pool, rng)


def generate_samples(task: str, tokenizer, lengths: Sequence[int], depths: Sequence[float], samples: int,
                     seed: int, pool: HaystackPool, haystack: str = "auto",
                     params: Optional[Dict[str, Any]] = None) -> List[Sample]:
    out = []
    for length in lengths:
        for depth in ([None] if task in DEPTHLESS_TASKS else depths):
            for i in range(samples if task not in DEPTHLESS_TASKS else samples * len(depths)):
                out.append(make_sample(task, tokenizer, length, depth, i, seed, pool, haystack, params))
    return out
