"""Fixtures for the data tests: a byte-level tokenizer (fast, picklable, no files) and data configs that keep
every cache under the test's tmp_path."""
from __future__ import annotations

import pytest

from data.config import DataConfig


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; 0 = pad, 1 = bos, 2 = eos. Implements the slice of the HF tokenizer API the
    data pipeline uses."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    unk_token_id, unk_token = None, None
    eos_token = "<eos>"

    def __init__(self, name: str = "bytes", shift: int = 3):
        self.name_or_path = name
        self.shift = shift

    def __len__(self) -> int:
        return 256 + self.shift

    def get_vocab(self):
        vocab = {f"<b{i}>": i + self.shift for i in range(256)}
        vocab.update({"<pad>": 0, "<bos>": 1, "<eos>": 2})
        return vocab

    def convert_tokens_to_ids(self, token):
        return self.get_vocab().get(token)

    def encode(self, text: str):
        return [b + self.shift for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - self.shift for i in ids if i >= self.shift).decode("utf-8", "replace")

    def __call__(self, texts, add_special_tokens=False, **kwargs):
        return {"input_ids": [self.encode(t) for t in texts]}


@pytest.fixture
def tok():
    return ByteTokenizer()


@pytest.fixture
def make_cfg(tmp_path):
    def make(**kw) -> DataConfig:
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        kw.setdefault("progress", False)
        kw.setdefault("num_proc", 1)
        return DataConfig(**kw)

    return make


class IntTokenizer:
    """Text is whitespace-separated integers, each one token: lets a test give every token a unique id and
    find it again in the batches. 0 = eos (and pad)."""

    pad_token_id, bos_token_id, eos_token_id = 0, None, 0
    unk_token_id, unk_token = None, None
    name_or_path = "ints"

    def __len__(self) -> int:
        return 1 << 30

    def get_vocab(self):
        return {"<int-tokenizer>": 0}

    def __call__(self, texts, add_special_tokens=False, **kwargs):
        return {"input_ids": [[int(x) for x in t.split()] for t in texts]}


def write_jsonl(path, texts, field="text"):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({field: t}) + "\n")
    return path


def int_docs(lengths, start=1):
    """Documents of consecutive unique ids (as IntTokenizer text) with the given lengths."""
    docs, nxt = [], start
    for n in lengths:
        docs.append(" ".join(str(i) for i in range(nxt, nxt + n)))
        nxt += n
    return docs


@pytest.fixture
def itok():
    return IntTokenizer()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing in the data tests may reach a hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
