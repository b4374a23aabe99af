"""Reading prepared sources: memory-mapped token shards and a flat document table, checked against the
tokenizer that will consume them."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from data.config import DataError
from data.prepare import FORMAT_VERSION, MANIFEST


class TokenStore:
    """One prepared source. Documents are addressed by (shard, start, length) in token units; `doc_hash`
    (uint64) decides the held-out split: a document is held out when doc_hash / 2^64 < holdout_fraction."""

    def __init__(self, directory: str, expect: Optional[Dict] = None):
        self.directory = directory
        path = os.path.join(directory, MANIFEST)
        try:
            with open(path) as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{directory}: not a prepared data directory (no {MANIFEST}); write one with "
                            "`python -m data.prepare --out DIR`") from None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable manifest ({e})") from None
        m = self.manifest
        if m.get("format") != FORMAT_VERSION:
            raise DataError(f"{path}: shard format {m.get('format')!r}, this code reads {FORMAT_VERSION}; "
                            "prepare the source again")
        if expect is not None:
            self._check_tokenizer(m.get("tokenizer", {}), expect, path)
        self.label = m["label"]
        self.tokens: List[np.memmap] = []
        shard_ids, starts, lengths, hashes = [], [], [], []
        for i, shard in enumerate(m["shards"]):
            try:
                tokens = np.load(os.path.join(directory, shard["tokens"]), mmap_mode="r")
                offsets = np.load(os.path.join(directory, shard["offsets"]))
                doc_hash = np.load(os.path.join(directory, shard["hashes"]))
            except (OSError, ValueError) as e:
                raise DataError(f"{directory}: shard {i} is missing or corrupt ({e}); prepare the source again") \
                    from None
            if (tokens.dtype != np.uint32 or tokens.size != shard["num_tokens"] or offsets[-1] != tokens.size
                    or offsets.size != shard["num_docs"] + 1 or doc_hash.size != shard["num_docs"]):
                raise DataError(f"{directory}: shard {i} does not match its manifest (truncated copy?); "
                                "prepare the source again")
            self.tokens.append(tokens)
            shard_ids.append(np.full(offsets.size - 1, i, np.int32))
            starts.append(offsets[:-1])
            lengths.append(np.diff(offsets))
            hashes.append(doc_hash)
        self.doc_shard = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self.doc_start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.doc_len = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.doc_hash = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)

    @staticmethod
    def _check_tokenizer(have: Dict, want: Dict, path: str) -> None:
        problems = []
        if have.get("fingerprint") != want["fingerprint"]:
            problems.append(f"fingerprint {have.get('fingerprint')} != {want['fingerprint']}")
        if have.get("vocab_size") != want["vocab_size"]:
            problems.append(f"vocab size {have.get('vocab_size')} != {want['vocab_size']}")
        if have.get("eos_id") != want["eos_id"]:
            problems.append(f"separator id {have.get('eos_id')} != {want['eos_id']}")
        if problems:
            raise DataError(f"{path}: these shards were tokenized with {have.get('name')!r}, not with the run's "
                            f"tokenizer {want['name']!r} ({'; '.join(problems)}); prepare the source again with "
                            "this tokenizer")

    @property
    def num_documents(self) -> int:
        return int(self.doc_len.size)

    def heldout_mask(self, fraction: float) -> np.ndarray:
        if fraction <= 0:
            return np.zeros(self.num_documents, bool)
        # Compare in integers: fraction * 2^64 as a uint64 threshold.
        threshold = np.uint64(min(int(fraction * 2.0 ** 64), 2 ** 64 - 1))
        return self.doc_hash < threshold

    def document(self, i: int) -> np.ndarray:
        s = int(self.doc_start[i])
        return np.asarray(self.tokens[int(self.doc_shard[i])][s:s + int(self.doc_len[i])])
