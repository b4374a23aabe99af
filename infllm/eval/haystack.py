"""Haystacks: the token streams needles are hidden in, and the held-out documents perplexity is measured on.

A haystack is a token list plus the offsets where something may be inserted without splitting a word:
the ends of filler sentences, or the ends of lines of real text. Everything is built in token space so a
sample's length and its needle's position are exact.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import sysconfig
from dataclasses import dataclass
from typing import List, Optional, Sequence

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
    # Text that must precede / follow an inserted piece so it reads as its own sentence or line.
    lead: str
    tail: str

    def cut(self, start: int, length: int) -> "Haystack":
        """The window [start, start + length), boundaries kept relative to it (its two ends included)."""
        end = start + length
        inner = [b - start for b in self.boundaries if start < b < end]
        return Haystack(self.tokens[start:end], [0] + inner + [length], self.lead, self.tail)

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
    """`text` repeated until it has at least `min_tokens` tokens; insertions go between repetitions."""
    unit = encode(tokenizer, text)
    reps = -(-min_tokens // len(unit)) + 1
    return Haystack(unit * reps, [i * len(unit) for i in range(reps + 1)], lead="", tail=" ")


@functools.lru_cache(maxsize=8)
def _newline_token_ids(tokenizer) -> frozenset:
    # Only tokens that end a line: one like "\n    " would leave an inserted line indented.
    ids = set()
    for i in range(len(tokenizer)):
        if tokenizer.decode([i]).endswith("\n"):
            ids.add(i)
    return frozenset(ids)


def text_haystack(tokenizer, documents: Sequence[Sequence[int]]) -> Haystack:
    """Real documents back to back; insertions go after a token that ends with a newline."""
    newline_ids = _newline_token_ids(tokenizer)
    tokens: List[int] = []
    for doc in documents:
        tokens.extend(doc)
    boundaries = [0] + [i + 1 for i, t in enumerate(tokens) if t in newline_ids]
    if boundaries[-1] != len(tokens):
        boundaries.append(len(tokens))
    return Haystack(tokens, boundaries, lead="", tail="\n")


def _stdlib_package_documents(tokenizer):
    """One document per stdlib package (its modules concatenated in sorted order), from the end of the
    alphabet, so the training side, which reads from the start, is unlikely to reach them first."""
    root = sysconfig.get_paths()["stdlib"]
    packages = sorted((d for d in os.listdir(root)
                       if os.path.isfile(os.path.join(root, d, "__init__.py"))), reverse=True)
    for pkg in packages:
        texts = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "__pycache__", "idle_test"))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                        texts.append(f.read())
        if texts:
            yield encode(tokenizer, "\n\n".join(texts))


def stdlib_documents(tokenizer, min_tokens: int, n: int) -> List[List[int]]:
    """Fallback corpus when the data pipeline is absent: `n` stdlib packages of at least `min_tokens` tokens."""
    docs = []
    for ids in _stdlib_package_documents(tokenizer):
        if len(ids) >= min_tokens:
            docs.append(ids)
            if len(docs) == n:
                return docs
    raise RuntimeError(f"the stdlib has only {len(docs)} packages of at least {min_tokens} tokens; "
                       f"lower eval.ppl_length or eval.ppl_docs")


def _data_heldout():
    try:
        from data import heldout_documents as data_heldout
    except ImportError:
        return None
    return data_heldout


def heldout_documents(data_cfg, tokenizer, min_tokens: int, n: int) -> List[List[int]]:
    """Held-out documents of the user's corpus (data.heldout_documents), else stdlib packages."""
    data_heldout = _data_heldout() if data_cfg is not None else None
    if data_heldout is not None:
        try:
            return [list(d) for d in data_heldout(data_cfg, tokenizer, min_tokens=min_tokens, n=n)]
        except Exception as e:  # a corpus too small for this length still deserves an eval
            log.warning("data.heldout_documents failed (%s); using stdlib sources for the eval corpus", e)
    return stdlib_documents(tokenizer, min_tokens, n)


def corpus_haystack(data_cfg, tokenizer, min_tokens: int) -> Haystack:
    """A real-text haystack of at least `min_tokens` tokens: held-out documents back to back."""
    data_heldout = _data_heldout() if data_cfg is not None else None
    if data_heldout is not None:
        try:
            docs = [list(d) for d in data_heldout(data_cfg, tokenizer, min_tokens=256, n=256)]
            if sum(map(len, docs)) >= min_tokens:
                return text_haystack(tokenizer, docs)
            log.warning("the held-out corpus has fewer than %d tokens; using stdlib sources", min_tokens)
        except Exception as e:
            log.warning("data.heldout_documents failed (%s); using stdlib sources for the haystack", e)
    docs, total = [], 0
    for ids in _stdlib_package_documents(tokenizer):
        docs.append(ids)
        total += len(ids)
        if total >= min_tokens:
            return text_haystack(tokenizer, docs)
    raise RuntimeError(f"not enough stdlib text for a {min_tokens}-token haystack")


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
