"""Haystacks: the token streams needles are hidden in, and the held-out documents perplexity is measured on.

A haystack is a token list plus the offsets where something may be inserted without splitting a word:
between repetitions of the filler (which starts with a space: insert " <needle>"), or at the ends of lines of
real text, before the newline token (insert "\n<needle>"). Everything is built in token space so a
sample's length and its needle's position are exact.
"""
from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from data.loader import heldout_documents as data_heldout
from data.sources import BadDocuments, read_stdlib_document, stdlib_documents_index

log = logging.getLogger(__name__)

# LongLoRA's passkey filler, and a second noise paragraph for the other tasks.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NOISE_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
                "The river runs to the sea. The wind moves the trees. The day follows the night. ")


@dataclass
class Haystack:
    tokens: List[int]
    # Sorted offsets in [0, len(tokens)] where an insertion keeps words and lines whole.
    boundaries: List[int]

    def cut(self, start: int, length: int) -> "Haystack":
        """The window [start, start + length), boundaries kept relative to it (its two ends included)."""
        end = start + length
        inner = [b - start for b in self.boundaries if start < b < end]
        return Haystack(self.tokens[start:end], [0] + inner + [length])

    def nearest_boundary(self, offset: int) -> int:
        return min(self.boundaries, key=lambda b: (abs(b - offset), b))


def encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_prefix(tokenizer) -> List[int]:
    """The special tokens the tokenizer puts before a text (e.g. <s> for Llama 2; none for SmolLM2)."""
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    plain = encode(tokenizer, "x")
    if len(with_special) > len(plain) and with_special[-len(plain):] == plain:
        return with_special[: len(with_special) - len(plain)]
    return []


def filler_haystack(tokenizer, min_tokens: int, text: str = PASSKEY_FILLER) -> Haystack:
    """`text` repeated until it has at least `min_tokens` tokens; insertions go between repetitions. Each
    repetition starts with a space, so the words tokenise as they would in running text."""
    unit = encode(tokenizer, " " + text.strip())
    reps = -(-min_tokens // len(unit)) + 1
    return Haystack(unit * reps, [i * len(unit) for i in range(reps + 1)])


@functools.lru_cache(maxsize=8)
def _line_start_token_ids(tokenizer) -> frozenset:
    """Tokens that begin with a newline ("\n", "\n\n", "\n    " ...): the place before one is a line end."""
    return frozenset(i for i in range(len(tokenizer))
                     if tokenizer.decode([i], clean_up_tokenization_spaces=False).startswith("\n"))


def text_haystack(tokenizer, documents: Sequence[Sequence[int]]) -> Haystack:
    """Real documents back to back; insertions go at line ends, before the newline token, so an inserted
    "\n<needle>" becomes a line of its own and the next line keeps its indentation."""
    line_starts = _line_start_token_ids(tokenizer)
    tokens: List[int] = []
    for doc in documents:
        tokens.extend(doc)
    boundaries = [0] + [i for i, t in enumerate(tokens) if i > 0 and t in line_starts] + [len(tokens)]
    return Haystack(tokens, boundaries)


def _stdlib_package_documents(tokenizer):
    """The training corpus's stdlib documents (`data.sources`: same files, same text), from the end of the
    alphabet, so the training side, which reads from the start, is unlikely to reach them first."""
    bad = BadDocuments("skip", "stdlib (eval)")
    for _, files in reversed(stdlib_documents_index()):
        text = read_stdlib_document(files, bad)
        if text is not None:
            yield encode(tokenizer, text)


def stdlib_documents(tokenizer, min_tokens: int, n: int) -> List[List[int]]:
    """The top-up when the held-out documents are too few: `n` stdlib documents of at least `min_tokens` tokens."""
    docs = []
    for ids in _stdlib_package_documents(tokenizer):
        if len(ids) >= min_tokens:
            docs.append(ids)
            if len(docs) == n:
                return docs
    raise RuntimeError(f"the stdlib has only {len(docs)} documents of at least {min_tokens} tokens; "
                       f"lower eval.ppl_length or eval.ppl_docs")


def heldout_documents(data_cfg, tokenizer, min_tokens: int, n: int) -> Tuple[List[List[int]], int]:
    """`n` documents of at least `min_tokens` tokens: the held-out documents of the user's corpus
    (data.heldout_documents; data_cfg None = skip it), topped up with stdlib packages when there are too few.
    Returns (documents, how many are really held out): the top-up may be text a model was trained on."""
    docs: List[List[int]] = []
    if data_cfg is not None:
        try:
            docs = [list(d) for d in data_heldout(data_cfg, tokenizer, min_tokens=min_tokens, n=n)][:n]
        except Exception as e:  # a broken corpus should not cost the whole eval
            log.warning("data.heldout_documents failed (%s); using stdlib sources for the eval corpus", e)
    heldout = len(docs)
    if heldout < n:
        if data_cfg is not None:
            log.warning("eval: %d of %d perplexity documents are held out; the rest are stdlib packages, which "
                        "training on the embedded corpus may have seen", heldout, n)
        docs += stdlib_documents(tokenizer, min_tokens, n - heldout)
    return docs, heldout


def corpus_haystack(data_cfg, tokenizer, min_tokens: int) -> Haystack:
    """A real-text haystack of at least `min_tokens` tokens: held-out documents back to back (data_cfg None =
    skip them), followed by stdlib packages if they are too short. Needles make the answer, not the text, so
    text seen in training is fine here."""
    docs: List[List[int]] = []
    if data_cfg is not None:
        try:
            docs = [list(d) for d in data_heldout(data_cfg, tokenizer, min_tokens=256)]
        except Exception as e:
            log.warning("data.heldout_documents failed (%s); using stdlib sources for the haystack", e)
    total = sum(map(len, docs))
    if total < min_tokens:
        for ids in _stdlib_package_documents(tokenizer):
            docs.append(ids)
            total += len(ids)
            if total >= min_tokens:
                break
    if total < min_tokens:
        raise RuntimeError(f"not enough text for a {min_tokens}-token haystack")
    return text_haystack(tokenizer, docs)


def random_window(hay: Haystack, length: int, rng: random.Random) -> Haystack:
    """A window of `length` tokens starting at a seeded line boundary (so it starts on a fresh line)."""
    if length > len(hay.tokens):
        raise ValueError(f"haystack of {len(hay.tokens)} tokens is shorter than the {length} needed")
    starts = [b for b in hay.boundaries if b + length <= len(hay.tokens)] or [0]
    return hay.cut(rng.choice(starts), length)


def pick_offsets(hay: Haystack, depths: Sequence[float]) -> List[int]:
    """Boundary offsets closest to each depth (fraction of the haystack)."""
    return [hay.nearest_boundary(round(d * len(hay.tokens))) for d in depths]


def first_token_pos(tokens: Sequence[int], pattern: Sequence[int], start: int = 0) -> Optional[int]:
    n = len(pattern)
    for i in range(start, len(tokens) - n + 1):
        if list(tokens[i:i + n]) == list(pattern):
            return i
    return None
