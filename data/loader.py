"""The stateful training loader: prepared shards -> pieces -> (source, bucket) streams -> packed rows.

Pieces: every training document (not held out, at least min_tokens) is cut at seq_len (long_docs=split) or
left out when longer (drop). Each piece lands in a length bucket; one stream per (source, bucket).

Ranks: in epoch e of stream k, all ranks draw the same permutation of the stream's pieces (seeded by the data
seed, the trainer's seed, k and e), cut it to a multiple of world_size and deal it round-robin: rank r reads
positions r, r + W, ... So the ranks' shares are disjoint and equally long, and each rank moves through its
streams on its own.

State: per stream (epoch, position), the scheduler's token counters, the packer's buffered pieces, and
counters for the metrics; all plain ints. The permutations are recomputed from (seed, k, epoch), so restoring
the state resumes exactly where the loader stopped, with nothing replayed.
"""
from __future__ import annotations

import json
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data.batch import PackedBatch
from data.config import DataConfig, DataError, as_data_config
from data.mixture import DeficitScheduler, bucket_labels, bucket_of, plan_mix
from data.packing import PAD_STREAM, Piece, RowPacker, assemble_batch
from data.prepare import prepare_source, tokenizer_info
from data.shards import TokenStore
from data.sources import resolve_source

log = logging.getLogger(__name__)

STATE_VERSION = 1


class _Stream:
    """The pieces of one (source, bucket): token address (shard, start) and length, in corpus order."""

    def __init__(self, source: int, bucket: int, shard: np.ndarray, start: np.ndarray, length: np.ndarray):
        self.source, self.bucket = source, bucket
        self.shard, self.start, self.length = shard, start, length

    def __len__(self) -> int:
        return int(self.length.size)


def _pieces(store: TokenStore, keep: np.ndarray, seq_len: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, start, length) of every seq_len piece of the kept documents."""
    shard, start, length = store.doc_shard[keep], store.doc_start[keep], store.doc_len[keep]
    n_pieces = (length + seq_len - 1) // seq_len
    first = np.zeros(n_pieces.size + 1, np.int64)
    np.cumsum(n_pieces, out=first[1:])
    j = np.arange(first[-1], dtype=np.int64) - np.repeat(first[:-1], n_pieces)
    doc_len = np.repeat(length, n_pieces)
    return (np.repeat(shard, n_pieces), np.repeat(start, n_pieces) + j * seq_len,
            np.minimum(seq_len, doc_len - j * seq_len))


class PackedLoader:
    """An infinite iterable of PackedBatch with exact resume (`state_dict` / `load_state_dict`) and the
    realised mix (`mix_stats`). Build it with `build_train_loader`."""

    def __init__(self, cfg: DataConfig, stores: Sequence[TokenStore], seq_len: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, pad_id: int = 0):
        self.cfg = cfg
        self.stores = list(stores)
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.pad_id = pad_id
        sources = cfg.effective_sources
        self.source_labels = _unique([src.name or store.label for store, src in zip(self.stores, sources)])
        self.bucket_names = bucket_labels(cfg.bucket_edges)

        n_buckets = len(self.bucket_names)
        per_pair: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        avail = np.zeros((len(self.stores), n_buckets), np.int64)
        notes = []
        for s, (store, src) in enumerate(zip(self.stores, sources)):
            keep = ~store.heldout_mask(cfg.holdout_fraction) & (store.doc_len >= max(1, src.min_tokens))
            if cfg.long_docs == "drop":
                too_long = keep & (store.doc_len > seq_len)
                if too_long.any():
                    notes.append(f"source {self.source_labels[s]!r}: dropped {int(too_long.sum())} documents "
                                 f"longer than seq_len={seq_len} (long_docs=drop)")
                keep &= ~too_long
            shard, start, length = _pieces(store, keep, seq_len)
            bucket = bucket_of(length, cfg.bucket_edges)
            for b in range(n_buckets):
                sel = bucket == b
                n = int(sel.sum())
                if n == 0:
                    continue
                if n < world_size:
                    notes.append(f"source {self.source_labels[s]!r}, bucket {self.bucket_names[b]}: {n} pieces "
                                 f"cannot be shared by {world_size} ranks; left out")
                    continue
                per_pair[(s, b)] = (shard[sel], start[sel], length[sel])
                avail[s, b] = int(length[sel].sum())
        weights = [src.weight for src in sources]
        shares, warnings = plan_mix(avail, weights, cfg.bucket_ratios, cfg.mix_by, self.source_labels,
                                    self.bucket_names)
        for message in notes + warnings:
            log.warning("data: %s", message)

        self.streams: List[_Stream] = []
        targets = []
        for (s, b), (shard, start, length) in sorted(per_pair.items()):
            if shares[s, b] > 0:
                self.streams.append(_Stream(s, b, shard, start, length))
                targets.append(shares[s, b])
        self.targets = targets
        self._share_cache: Dict[int, Tuple[int, np.ndarray]] = {}
        self._reset_state()
        self._log_plan()

    # ---------------------------------------------------------------------------------------------- sampling

    def _reset_state(self) -> None:
        self.position = [[0, 0] for _ in self.streams]  # per stream: [epoch, index into this rank's share]
        self.scheduler = DeficitScheduler(self.targets)
        self.packer = RowPacker(self.seq_len, self.cfg.pack_buffer, self.cfg.row_fill, self._next_piece)
        self.emitted = [0] * len(self.streams)
        self.padding = 0
        self.batches = 0

    def _share(self, k: int, epoch: int) -> np.ndarray:
        cached = self._share_cache.get(k)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        n = len(self.streams[k])
        if self.cfg.shuffle:
            seq = np.random.SeedSequence([self.cfg.seed & 0xFFFFFFFF, self.seed & 0xFFFFFFFF, k, epoch])
            order = np.random.default_rng(seq).permutation(n)
        else:
            order = np.arange(n)
        share = order[: n - n % self.world_size][self.rank::self.world_size]
        self._share_cache[k] = (epoch, share)
        return share

    def _next_piece(self) -> Piece:
        k = self.scheduler.pick()
        epoch, pos = self.position[k]
        share = self._share(k, epoch)
        if pos >= share.size:
            epoch, pos = epoch + 1, 0
            share = self._share(k, epoch)
        index = int(share[pos])
        self.position[k] = [epoch, pos + 1]
        length = int(self.streams[k].length[index])
        self.scheduler.add(k, length)
        return (k, index, 0, length)

    # ----------------------------------------------------------------------------------------------- batches

    def __iter__(self) -> "PackedLoader":
        return self

    def __next__(self) -> PackedBatch:
        rows = []
        for _ in range(self.micro_batch_size):
            row = []
            for k, index, offset, n in self.packer.next_row():
                if k == PAD_STREAM:
                    row.append((None, 0, n))
                    self.padding += n
                    continue
                stream = self.streams[k]
                tokens = self.stores[stream.source].tokens[int(stream.shard[index])]
                row.append((tokens, int(stream.start[index]) + offset, n))
                self.emitted[k] += n
            rows.append(row)
        self.batches += 1
        if self.cfg.log_mix_every and self.batches % self.cfg.log_mix_every == 0:
            log.info("data mix after %d batches: %s", self.batches,
                     ", ".join(f"{k}={v:.3f}" for k, v in self.mix_stats().items() if k.startswith("mix/")))
        return assemble_batch(rows, self.seq_len, self.pad_id)

    # ----------------------------------------------------------------------------------------------- metrics

    def target_mix(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for stream, p in zip(self.streams, self.targets):
            for key in (f"mix/bucket/{self.bucket_names[stream.bucket]}",
                        f"mix/source/{self.source_labels[stream.source]}"):
                out[key] = out.get(key, 0.0) + float(p)
        return out

    def mix_stats(self) -> Dict[str, float]:
        """The realised token mix so far (this rank), for metrics: `mix/bucket/<name>`, `mix/source/<name>` and
        `mix/padding` token shares, `tokens` emitted, `split_pieces` (pieces cut to fill a row) and
        `epoch/<source>` (the epoch its slowest stream has reached)."""
        total = sum(self.emitted) + self.padding
        out: Dict[str, float] = {f"mix/bucket/{name}": 0.0 for name in self.bucket_names}
        out.update({f"mix/source/{name}": 0.0 for name in self.source_labels})
        for stream, n in zip(self.streams, self.emitted):
            share = n / total if total else 0.0
            out[f"mix/bucket/{self.bucket_names[stream.bucket]}"] += share
            out[f"mix/source/{self.source_labels[stream.source]}"] += share
        out["mix/padding"] = self.padding / total if total else 0.0
        out["tokens"] = float(total)
        out["split_pieces"] = float(self.packer.splits)
        for s, name in enumerate(self.source_labels):
            epochs = [pos[0] for stream, pos in zip(self.streams, self.position) if stream.source == s]
            if epochs:
                out[f"epoch/{name}"] = float(min(epochs))
        return out

    def _log_plan(self) -> None:
        target = self.target_mix()
        pieces = sum(len(s) for s in self.streams)
        log.info("data: %d sources, %d streams, %d training pieces at seq_len=%d, rank %d/%d; target mix: %s",
                 len(self.stores), len(self.streams), pieces, self.seq_len, self.rank, self.world_size,
                 ", ".join(f"{k}={v:.3f}" for k, v in sorted(target.items())))

    # -------------------------------------------------------------------------------------------------- state

    def _identity(self) -> Dict:
        cfg = self.cfg
        return {
            "seq_len": self.seq_len, "seed": [cfg.seed, self.seed], "shuffle": cfg.shuffle,
            "sources": [[s.label, s.manifest.get("key"), src.weight, src.min_tokens]
                        for s, src in zip(self.stores, cfg.effective_sources)],
            "holdout_fraction": cfg.holdout_fraction, "long_docs": cfg.long_docs, "row_fill": cfg.row_fill,
            "pack_buffer": cfg.pack_buffer, "bucket_edges": list(cfg.bucket_edges),
            "bucket_ratios": [float(r) for r in cfg.bucket_ratios], "mix_by": cfg.mix_by,
        }

    def state_dict(self) -> Dict:
        """Plain ints and lists (JSON-serialisable). Restoring it resumes with the next batch."""
        return {
            "version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
            "identity": self._identity(), "batches": self.batches,
            "position": [list(p) for p in self.position], "scheduled": list(self.scheduler.scheduled),
            "emitted": list(self.emitted), "padding": self.padding, "splits": self.packer.splits,
            "buffer": [list(p) for p in self.packer.buffer],
        }

    def load_state_dict(self, state: Dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise DataError(f"loader state was saved by rank {state['rank']} of {state['world_size']}, but this "
                            f"is rank {self.rank} of {self.world_size}; an exact resume needs the same world size")
        saved, mine = json.loads(json.dumps(state["identity"])), json.loads(json.dumps(self._identity()))
        if saved != mine:
            changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise DataError(f"the data setup changed since the loader state was saved ({', '.join(changed)}); "
                            "it cannot resume exactly. Start the data from scratch or restore the settings")
        self._reset_state()
        self.position = [[int(e), int(p)] for e, p in state["position"]]
        self.scheduler.scheduled = [int(c) for c in state["scheduled"]]
        self.scheduler.total = sum(self.scheduler.scheduled)
        self.emitted = [int(c) for c in state["emitted"]]
        self.padding = int(state["padding"])
        self.batches = int(state["batches"])
        self.packer.splits = int(state["splits"])
        self.packer.buffer = [tuple(int(x) for x in p) for p in state["buffer"]]


def _unique(labels: List[str]) -> List[str]:
    out, seen = [], {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}_{seen[label]}")
    return out


def _stores(cfg: DataConfig, tokenizer) -> Tuple[List[TokenStore], Dict]:
    tok = tokenizer_info(tokenizer, cfg)
    resolved = [resolve_source(s, i) for i, s in enumerate(cfg.effective_sources)]
    stores = [TokenStore(prepare_source(r, tokenizer, cfg, tok=tok), expect=tok) for r in resolved]
    if max(int(s.manifest.get("max_token_id", -1)) for s in stores) >= tok["vocab_size"]:
        raise DataError(f"prepared tokens exceed the tokenizer's vocab size {tok['vocab_size']}")
    return stores, tok


def build_train_loader(cfg, tokenizer, seq_len: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                       seed: int = 0) -> PackedLoader:
    """The training loader: prepares (tokenizes) every source once into the cache, then packs rows of seq_len
    from the shards. cfg: a DataConfig (or the `data` DictConfig)."""
    cfg = as_data_config(cfg)
    for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size), ("world_size", world_size)):
        if not isinstance(value, int) or value <= 0:
            raise DataError(f"{name}: expected a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    stores, tok = _stores(cfg, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return PackedLoader(cfg, stores, seq_len, micro_batch_size, rank, world_size, seed,
                        pad_id=tok["eos_id"] if pad_id is None else int(pad_id))


def heldout_documents(cfg, tokenizer, min_tokens: int = 0, n: Optional[int] = None) -> List[List[int]]:
    """Up to n held-out documents (token ids, without the appended separator) of at least min_tokens tokens,
    from every source in order, in corpus order. Never used for training."""
    cfg = as_data_config(cfg)
    stores, tok = _stores(cfg, tokenizer)
    extra = 1  # the separator appended to every document
    out: List[List[int]] = []
    for store in stores:
        idx = np.nonzero(store.heldout_mask(cfg.holdout_fraction) & (store.doc_len - extra >= max(1, min_tokens)))[0]
        for i in idx:
            if n is not None and len(out) >= n:
                return out
            out.append(store.document(int(i))[:-extra].tolist())
    if n is not None and len(out) < n:
        log.warning("data: only %d held-out documents of >= %d tokens (asked for %d; holdout_fraction=%s)",
                    len(out), min_tokens, n, cfg.holdout_fraction)
    return out
