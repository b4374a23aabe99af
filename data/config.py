"""Schema of the `data` config group (owned by the data pipeline).

Every `conf/data/*.yaml` is merged into `DataConfig`, so a mistyped key fails at compose time; the checks in
`__post_init__` run when the config becomes objects and name the field. The same schema is read by
`python prepare.py --config conf/data/<name>.yaml` (or `python -m data.prepare ... --tokenizer DIR`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from infllm.errors import ConfigError, DataError

__all__ = ["DataConfig", "SourceConfig", "DataError", "as_data_config"]

# Long prose from Debian packages (data/prose.py); like stdlib, they need no path.
PROSE_KINDS = ("austen", "linux_doc")
SOURCE_KINDS = ("auto", "stdlib", "jsonl", "json", "parquet", "text", "arrow", "hf_saved", "hub",
                "prepared") + PROSE_KINDS
TEXT_UNITS = ("document", "line", "paragraph")


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass
class SourceConfig:
    # auto (from the path: *.jsonl, *.json, *.parquet, *.arrow, *.txt/*.md, a saved `datasets` dir, or a dir
    # of such files) | stdlib | jsonl | json | parquet | text | arrow | hf_saved | hub | prepared (a directory
    # written by `python -m data.prepare --out`).
    kind: str = "auto"
    # A file, a directory or a glob; for kind=hub the dataset name; unused for stdlib.
    path: Optional[str] = None
    # Label in logs and metrics; default: the kind, or the file / directory name.
    name: Optional[str] = None
    text_field: str = "text"
    # Share of the training tokens taken from this source (normalised over all sources).
    weight: float = 1.0
    # Documents shorter than this many characters are left out at preparation (part of the cache key).
    min_chars: int = 0
    # Documents shorter than this many tokens are left out of training (applied when loading, no re-tokenizing).
    min_tokens: int = 0
    # kind=text: one document per file (document), per line, or per blank-line separated paragraph.
    text_unit: str = "document"
    # hf_saved (a DatasetDict) and hub: which split; hub: config name and revision.
    split: str = "train"
    subset: Optional[str] = None
    revision: Optional[str] = None
    # kind=stdlib: only these top-level packages / modules (empty = the whole standard library);
    # austen: only these novels (emma, persuasion, ...); linux_doc: only these top-level directories.
    include: List[str] = field(default_factory=list)

    def validate(self, where: str) -> None:
        _check(self.kind in SOURCE_KINDS, f"{where}.kind", f"expected one of {SOURCE_KINDS}, got {self.kind!r}")
        _check(self.kind in ("stdlib",) + PROSE_KINDS or bool(self.path), f"{where}.path",
               f"kind={self.kind} needs a path (a file, directory, glob or hub name)")
        _check(self.weight > 0, f"{where}.weight", f"must be > 0, got {self.weight}")
        _check(self.min_chars >= 0, f"{where}.min_chars", f"must be >= 0, got {self.min_chars}")
        _check(self.min_tokens >= 0, f"{where}.min_tokens", f"must be >= 0, got {self.min_tokens}")
        _check(bool(self.text_field), f"{where}.text_field", "must name the column holding the text")
        _check(self.text_unit in TEXT_UNITS, f"{where}.text_unit",
               f"expected one of {TEXT_UNITS}, got {self.text_unit!r}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "stdlib" or not self.path:
            return self.kind
        import os

        return os.path.basename(os.path.normpath(self.path)) or self.kind


@dataclass
class DataConfig:
    # Empty = the embedded default corpus (the Python standard library's sources, one package per document).
    sources: List[SourceConfig] = field(default_factory=list)
    # Prepared token shards; null = $INFLLM_CACHE/data or ~/.cache/infllm/data.
    cache_dir: Optional[str] = None
    # Fraction of documents held out for evaluation (deterministic by a hash of the document text).
    # 0.05 keeps a few long real documents out of the stdlib corpus (~10 of ~200) for long-context perplexity.
    holdout_fraction: float = 0.05
    # Mixed with the trainer's seed: shuffling of every (source, bucket) stream, per epoch.
    seed: int = 0
    shuffle: bool = True

    # Packing. Documents longer than seq_len: split into seq_len pieces, or drop them.
    long_docs: str = "split"
    # When no buffered piece fits the rest of a row: split one (rows always full) or pad (its own document).
    row_fill: str = "split"
    # Pieces held back to fill rows first-fit; part of the loader state.
    pack_buffer: int = 64
    # Separator appended to every document; null = the tokenizer's EOS token.
    eos_token: Optional[str] = None
    add_bos: bool = False

    # Length buckets (the InfLLM-V2 recipe: 0-4k / 4-12k / 12-24k / 24-32k at 1:1:1:1 by tokens). Edges in
    # tokens of the pieces the model sees (after the split at seq_len), buckets (lo, hi]; the last bucket also
    # takes longer pieces. Buckets no piece falls in are dropped with a warning and the ratios renormalised.
    bucket_edges: List[int] = field(default_factory=lambda: [0, 4096, 12288, 24576, 32768])
    bucket_ratios: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    # source: source weights are the token shares, bucket ratios apply within each source;
    # bucket: bucket ratios are the token shares, source weights apply within each bucket.
    mix_by: str = "source"
    # Log the realised mix every this many batches (0 = never; mix_stats() is always available for metrics).
    log_mix_every: int = 1000

    # Preparation (tokenize once, write shards): tokenizer processes, 0 = auto (half the cores, at most 8).
    num_proc: int = 0
    # Documents per tokenizer call.
    tokenize_batch: int = 64
    # Tokens per shard file (uint32 .npy, memory-mapped when training).
    shard_tokens: int = 1 << 26
    # A bad document (non-UTF-8, missing text field, zero tokens, empty file): skip it with a counted warning,
    # or stop with an error naming it.
    on_bad_document: str = "skip"
    progress: bool = True

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**dict(s)) for s in self.sources]
        for i, s in enumerate(self.sources):
            s.validate(f"data.sources[{i}]")
        _check(0 <= self.holdout_fraction < 1, "data.holdout_fraction",
               f"must be in [0, 1), got {self.holdout_fraction}")
        _check(self.long_docs in ("split", "drop"), "data.long_docs", f"expected split or drop, got {self.long_docs!r}")
        _check(self.row_fill in ("split", "pad"), "data.row_fill", f"expected split or pad, got {self.row_fill!r}")
        _check(self.pack_buffer >= 1, "data.pack_buffer", f"must be >= 1, got {self.pack_buffer}")
        edges, ratios = list(self.bucket_edges), list(self.bucket_ratios)
        _check(len(edges) >= 2 and edges[0] == 0, "data.bucket_edges",
               f"expected [0, e1, ..., eK] (K >= 1 buckets, starting at 0), got {edges}")
        _check(all(a < b for a, b in zip(edges, edges[1:])), "data.bucket_edges",
               f"must be strictly increasing, got {edges}")
        _check(len(ratios) == len(edges) - 1, "data.bucket_ratios",
               f"expected one ratio per bucket ({len(edges) - 1} for edges {edges}), got {len(ratios)}: {ratios}")
        _check(all(r >= 0 for r in ratios) and sum(ratios) > 0, "data.bucket_ratios",
               f"expected non-negative ratios with a positive sum, got {ratios}")
        _check(self.mix_by in ("source", "bucket"), "data.mix_by", f"expected source or bucket, got {self.mix_by!r}")
        _check(self.log_mix_every >= 0, "data.log_mix_every", f"must be >= 0, got {self.log_mix_every}")
        _check(self.num_proc >= 0, "data.num_proc", f"must be >= 0 (0 = auto), got {self.num_proc}")
        _check(self.tokenize_batch >= 1, "data.tokenize_batch", f"must be >= 1, got {self.tokenize_batch}")
        _check(self.shard_tokens >= 1024, "data.shard_tokens", f"must be >= 1024, got {self.shard_tokens}")
        _check(self.on_bad_document in ("skip", "error"), "data.on_bad_document",
               f"expected skip or error, got {self.on_bad_document!r}")

    @property
    def effective_sources(self) -> List[SourceConfig]:
        return self.sources or [SourceConfig(kind="stdlib")]


def as_data_config(cfg: Any) -> DataConfig:
    """A DataConfig from a DataConfig, a DictConfig / dict of the `data` group, or None (the defaults)."""
    if isinstance(cfg, DataConfig):
        return cfg
    if cfg is None:
        return DataConfig()
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg)
    return OmegaConf.to_object(merged)
