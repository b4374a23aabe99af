"""The two types every source reader shares: where a source's documents come from (`ResolvedSource`) and the
count of the documents it skipped (`BadDocuments`). Their own module, so that the readers (data/sources.py,
data/prose.py) import them without importing each other."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from data.config import DataError, SourceConfig

log = logging.getLogger("data.sources")


class BadDocuments:
    """Counts skipped documents by reason, or raises at the first one (on_bad_document=error)."""

    def __init__(self, policy: str, source: str):
        self.policy = policy
        self.source = source
        self.counts: Dict[str, int] = {}
        self.examples: Dict[str, str] = {}

    def add(self, reason: str, where: str, detail: str = "") -> None:
        message = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.policy == "error":
            raise DataError(f"source {self.source!r}: bad document at {message}; set data.on_bad_document=skip "
                            "to skip such documents with a counted warning")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.examples.setdefault(reason, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> None:
        if self.total:
            parts = [f"{n} x {reason} (first: {self.examples[reason]})" for reason, n in self.counts.items()]
            log.warning("source %r: skipped %d bad documents: %s", self.source, self.total, "; ".join(parts))


@dataclass
class ResolvedSource:
    cfg: SourceConfig
    kind: str
    label: str
    # (path, kind) for file-based sources, sorted; a saved dataset dir or a hub name otherwise.
    files: List[Tuple[str, str]] = field(default_factory=list)
    location: str = ""
    # Identifies the content for the token cache (paths, sizes and mtimes, fields, Python version, ...).
    spec: Dict = field(default_factory=dict)
