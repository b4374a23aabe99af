"""Tokenize once, train many times: sources -> uint32 token shards + a manifest.

A prepared source is a directory holding, per shard `i`, `tokens_i.npy` (uint32, every document followed by the
separator token), `offsets_i.npy` (int64, document boundaries, n_docs + 1) and `hashes_i.npy` (uint64, a hash of
each document's text, which decides the held-out split without re-reading the text), plus `manifest.json`
(tokenizer name, vocab size and fingerprint, separator id, counts, a length histogram, skipped documents).

The directory name is the source label plus a key over the tokenizer fingerprint, the separator settings, the
source spec (files with sizes and mtimes, fields, Python version for the stdlib corpus) and the bad-document
policy, so a second run with the same tokenizer and data loads it instantly, and any change prepares a new one;
a reused cache repeats the summary of the documents its preparation skipped. Preparation writes to a temporary
directory renamed into place at the end, under a lock file, so concurrent ranks prepare once and a killed
preparation never leaves a half-written cache behind.

    python prepare.py                                        # the embedded stdlib corpus, embedded tokenizer
    python -m data.prepare --config conf/data/files.yaml --tokenizer /models/llama --num-proc 16
    python -m data.prepare --source /data/books/ --out /data/books.tok --tokenizer /models/llama
The data layer knows no model: `python -m data.prepare` needs --tokenizer; `python prepare.py` (repository
root) is the same CLI with the embedded model's tokenizer as the default.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import deque
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from filelock import FileLock, Timeout

from data.config import DataConfig, DataError
from data.sources import BadDocuments, ResolvedSource, iter_documents, resolve_source

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Length histogram bins: powers of two, [0, 1), [1, 2), [2, 4), ... up to 2^30 tokens.
HIST_EDGES = [0] + [1 << i for i in range(31)]


def default_cache_dir() -> str:
    from infllm import cache_root

    return os.path.join(cache_root(), "data")


# ------------------------------------------------------------------------------------------------ tokenizer

def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the fast tokenizer's full JSON (model, merges, normaliser,
    pre-tokenizer, added tokens) when there is one, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        payload = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        payload = repr(type(tokenizer))
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(payload.encode("utf-8"))
    return h.hexdigest()[:16]


def tokenizer_info(tokenizer, cfg: DataConfig) -> Dict:
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = int(tokenizer.vocab_size)
    if cfg.eos_token is not None:
        eos = tokenizer.convert_tokens_to_ids(cfg.eos_token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if eos is None or (eos == unk and cfg.eos_token != getattr(tokenizer, "unk_token", None)):
            raise DataError(f"data.eos_token: {cfg.eos_token!r} is not a token of the tokenizer "
                            f"{getattr(tokenizer, 'name_or_path', '')!r}")
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise DataError("data.eos_token: the tokenizer has no EOS token to separate documents; name one "
                            "(e.g. data.eos_token='<|endoftext|>')")
    bos = getattr(tokenizer, "bos_token_id", None) if cfg.add_bos else None
    if cfg.add_bos and bos is None:
        raise DataError("data.add_bos: the tokenizer has no BOS token; set data.add_bos=false")
    return {"name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
            "vocab_size": int(vocab), "fingerprint": tokenizer_fingerprint(tokenizer),
            "eos_id": int(eos), "bos_id": None if bos is None else int(bos)}


def _encode(tokenizer, texts: List[str]) -> List[List[int]]:
    try:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    except TypeError:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]


# Set in each worker process (and in the parent for num_proc=1).
_WORKER: Dict = {}


def _init_worker(tokenizer, eos_id: int, bos_id: Optional[int], child: bool = True) -> None:
    if child:
        # One tokenizer thread per worker process: the processes are the parallelism.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, eos_id=eos_id, bos_id=bos_id)


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _tokenize_batch(texts: List[str]):
    """-> (tokens uint32 [sum lengths], lengths int64 [n_ok], hashes uint64 [n_ok], [(i, reason, detail)])
    Documents that fail to tokenize or give zero tokens are reported by index, never raised."""
    tok, eos, bos = _WORKER["tokenizer"], _WORKER["eos_id"], _WORKER["bos_id"]
    try:
        ids_list = _encode(tok, texts)
        errors: List[Tuple[int, str, str]] = []
    except Exception:
        # Find the culprit: one document at a time.
        ids_list, errors = [], []
        for i, t in enumerate(texts):
            try:
                ids_list.append(_encode(tok, [t])[0])
            except Exception as e:  # noqa: BLE001 - reported as a bad document
                ids_list.append(None)
                errors.append((i, "tokenizer failed", f"{type(e).__name__}: {e}"))
    pieces, lengths, hashes = [], [], []
    extra = [bos] if bos is not None else []
    for i, (text, ids) in enumerate(zip(texts, ids_list)):
        if ids is None:
            continue
        if len(ids) == 0:
            errors.append((i, "zero tokens", f"{len(text)} characters"))
            continue
        doc = np.empty(len(extra) + len(ids) + 1, np.int64)
        doc[:len(extra)] = extra
        doc[len(extra):-1] = ids
        doc[-1] = eos
        pieces.append(doc)
        lengths.append(doc.size)
        hashes.append(_text_hash(text))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << 32):
        raise DataError("the tokenizer produced ids outside uint32")
    return (tokens.astype(np.uint32), np.asarray(lengths, np.int64), np.asarray(hashes, np.uint64), errors)


# A batch also ends at this many characters, so that long documents spread evenly over the processes.
BATCH_CHARS = 1 << 20


def _batched(docs: Iterable[Tuple[str, str]], size: int) -> Iterator[Tuple[List[str], List[str]]]:
    texts, wheres, chars = [], [], 0
    for text, where in docs:
        texts.append(text)
        wheres.append(where)
        chars += len(text)
        if len(texts) == size or chars >= BATCH_CHARS:
            yield texts, wheres
            texts, wheres, chars = [], [], 0
    if texts:
        yield texts, wheres


def _tokenized(batches: Iterator[Tuple[List[str], List[str]]], tokenizer, eos: int, bos: Optional[int],
               num_proc: int):
    """Yields (wheres, result) in input order; with num_proc > 1 a bounded window of batches is in flight, so
    memory stays flat however large the corpus."""
    if num_proc <= 1:
        _init_worker(tokenizer, eos, bos, child=False)
        for texts, wheres in batches:
            yield wheres, _tokenize_batch(texts)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, eos, bos)) as pool:
        window: deque = deque()
        for texts, wheres in batches:
            window.append((wheres, pool.apply_async(_tokenize_batch, (texts,))))
            if len(window) >= 2 * num_proc:
                w, r = window.popleft()
                yield w, r.get()
        while window:
            w, r = window.popleft()
            yield w, r.get()


# ----------------------------------------------------------------------------------------------- the writer

class _ShardWriter:
    def __init__(self, directory: str, shard_tokens: int):
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.shards: List[Dict] = []
        self._tokens: List[np.ndarray] = []
        self._lengths: List[np.ndarray] = []
        self._hashes: List[np.ndarray] = []
        self._pending = 0
        self.num_docs = 0
        self.num_tokens = 0
        self.max_token = -1
        self.hist = np.zeros(len(HIST_EDGES), np.int64)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, hashes: np.ndarray) -> None:
        if lengths.size == 0:
            return
        self._tokens.append(tokens)
        self._lengths.append(lengths)
        self._hashes.append(hashes)
        self._pending += tokens.size
        self.num_docs += lengths.size
        self.num_tokens += tokens.size
        self.max_token = max(self.max_token, int(tokens.max()))
        self.hist += np.bincount(np.searchsorted(HIST_EDGES, lengths, side="right") - 1, minlength=len(HIST_EDGES))
        if self._pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._tokens:
            return
        i = len(self.shards)
        tokens = np.concatenate(self._tokens)
        lengths = np.concatenate(self._lengths)
        offsets = np.zeros(lengths.size + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        names = {k: f"{k}_{i:05d}.npy" for k in ("tokens", "offsets", "hashes")}
        np.save(os.path.join(self.directory, names["tokens"]), tokens)
        np.save(os.path.join(self.directory, names["offsets"]), offsets)
        np.save(os.path.join(self.directory, names["hashes"]), np.concatenate(self._hashes))
        self.shards.append(dict(names, num_docs=int(lengths.size), num_tokens=int(tokens.size)))
        self._tokens, self._lengths, self._hashes, self._pending = [], [], [], 0


# ------------------------------------------------------------------------------------------------- prepare

def source_key(rsrc: ResolvedSource, tok: Dict, cfg: DataConfig) -> str:
    """What decides the prepared tokens: the tokenizer, the separators, the source's content and filters, and
    the bad-document policy (a cache prepared while skipping bad documents is not what `error` asks for)."""
    blob = json.dumps({"format": FORMAT_VERSION, "tokenizer": tok["fingerprint"], "eos": tok["eos_id"],
                       "bos": tok["bos_id"], "source": rsrc.spec, "on_bad_document": cfg.on_bad_document},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_prepared(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


@contextlib.contextmanager
def _lock(path: str, timeout_s: float = 6 * 3600.0):
    """One process prepares, the others wait (filelock: an flock the OS releases if the holder dies)."""
    try:
        with FileLock(path, timeout=timeout_s):
            yield
    except Timeout:
        raise DataError(f"waited {timeout_s:.0f}s for {path}; is another preparation still running?") from None


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:48] or "source"


def _num_proc(cfg: DataConfig) -> int:
    # Auto: half the cores, up to 8. With one process a fast (Rust) tokenizer still uses every core within a
    # batch, which measured faster than two processes on a 2-core machine (16 s vs 21 s for the stdlib corpus).
    return cfg.num_proc or max(1, min(8, (os.cpu_count() or 1) // 2))


def prepare_source(rsrc: ResolvedSource, tokenizer, cfg: DataConfig, out_dir: Optional[str] = None,
                   tok: Optional[Dict] = None) -> str:
    """Tokenize one source into shards (once) and return the prepared directory."""
    tok = tok or tokenizer_info(tokenizer, cfg)
    if rsrc.kind == "prepared":
        return rsrc.location
    key = source_key(rsrc, tok, cfg)
    if out_dir is None:
        root = cfg.cache_dir or default_cache_dir()
        target = os.path.join(os.path.expanduser(root), f"{_safe_name(rsrc.label)}-{key}")
    else:
        target = os.path.expanduser(out_dir)
    if is_prepared(target) and _manifest_key(target) == key:
        _report_reused(target, rsrc.label)
        return target
    parent = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.cache_dir: cannot create {parent!r} ({e.strerror}); expected a writable directory")
    with _lock(target + ".lock"):
        if is_prepared(target) and _manifest_key(target) == key:
            _report_reused(target, rsrc.label)
            return target
        tmp = f"{target}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            manifest = _write_shards(rsrc, tokenizer, cfg, tok, key, tmp)
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _manifest_key(directory: str) -> Optional[str]:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return json.load(f).get("key")
    except (OSError, ValueError):
        return None


# Caches whose skips were reported by this process: once per run is enough (the eval reads the cache again).
_REPORTED: set = set()


def _report_reused(directory: str, label: str) -> None:
    """A reused cache says again what its preparation skipped, so a skip is never silent on a later run."""
    if directory in _REPORTED:
        return
    _REPORTED.add(directory)
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return
    counts = manifest.get("bad_documents") or {}
    if not counts:
        return
    examples = manifest.get("bad_examples") or {}
    parts = [f"{n} x {reason}" + (f" (first: {examples[reason]})" if reason in examples else "")
             for reason, n in counts.items()]
    log.warning("source %r: reusing the prepared cache %s (made %s with on_bad_document=skip), which skipped %d "
                "bad documents: %s", label, directory, manifest.get("created", "earlier"), sum(counts.values()),
                "; ".join(parts))


def _write_shards(rsrc: ResolvedSource, tokenizer, cfg: DataConfig, tok: Dict, key: str, directory: str) -> Dict:
    from tqdm.auto import tqdm

    t0 = time.time()
    bad = BadDocuments(cfg.on_bad_document, rsrc.label)
    writer = _ShardWriter(directory, cfg.shard_tokens)
    num_proc = _num_proc(cfg)
    log.info("preparing source %r (%s) with %d process(es) into %s", rsrc.label, rsrc.location, num_proc, directory)
    batches = _batched(iter_documents(rsrc, bad), cfg.tokenize_batch)
    bar = tqdm(desc=f"tokenizing {rsrc.label}", unit="doc", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for wheres, (tokens, lengths, hashes, errors) in _tokenized(batches, tokenizer, tok["eos_id"],
                                                                    tok["bos_id"], num_proc):
            for i, reason, detail in errors:
                bad.add(reason, wheres[i], detail)
            writer.add(tokens, lengths, hashes)
            bar.update(len(wheres))
            bar.set_postfix(tokens=f"{writer.num_tokens:,}", refresh=False)
        writer.flush()
    finally:
        bar.close()
    bad.report()
    if writer.num_docs == 0:
        skipped = f"; {bad.total} bad documents skipped: {bad.counts}" if bad.total else ""
        raise DataError(f"source {rsrc.label!r} ({rsrc.location}): empty corpus, no documents to train on"
                        f"{skipped} (min_chars={rsrc.cfg.min_chars})")
    if writer.max_token >= tok["vocab_size"]:
        raise DataError(f"source {rsrc.label!r}: token id {writer.max_token} >= the tokenizer's vocab size "
                        f"{tok['vocab_size']}")
    last = int(np.nonzero(writer.hist)[0].max()) + 1
    seconds = time.time() - t0
    log.info("prepared %r: %d documents, %d tokens in %.1fs (%d skipped)", rsrc.label, writer.num_docs,
             writer.num_tokens, seconds, bad.total)
    return {
        "format": FORMAT_VERSION, "key": key, "label": rsrc.label, "kind": rsrc.kind, "location": rsrc.location,
        "source": {k: v for k, v in rsrc.spec.items() if k not in ("files", "documents")},
        "num_files": len(rsrc.spec.get("files", rsrc.spec.get("documents", []))),
        "tokenizer": tok, "num_documents": writer.num_docs, "num_tokens": writer.num_tokens,
        "max_token_id": writer.max_token, "shards": writer.shards,
        "length_histogram": {"edges": HIST_EDGES[:last + 1], "counts": writer.hist[:last].tolist()},
        "bad_documents": dict(bad.counts), "bad_examples": dict(bad.examples), "seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def prepare_all(cfg: DataConfig, tokenizer) -> List[Tuple[ResolvedSource, str]]:
    """Resolve every source first (so a missing path fails before any tokenizing), then prepare each."""
    tok = tokenizer_info(tokenizer, cfg)
    resolved = [resolve_source(s, i) for i, s in enumerate(cfg.effective_sources)]
    return [(r, prepare_source(r, tokenizer, cfg, tok=tok)) for r in resolved]


# ------------------------------------------------------------------------------------------------------ CLI

def local_tokenizer(path: Optional[str]):
    """The CLI's tokenizer: a local Hugging Face tokenizer directory. The data layer knows no model; the
    embedded model's tokenizer comes from the caller (`python prepare.py` passes it in)."""
    if path is None:
        raise DataError("--tokenizer: name a local tokenizer directory, or run `python prepare.py` from the "
                        "repository root to use the embedded model's tokenizer")
    from transformers import AutoTokenizer

    if not os.path.isdir(os.path.expanduser(path)):
        raise DataError(f"--tokenizer: {path!r} is not a local directory (nothing is fetched from a hub)")
    return AutoTokenizer.from_pretrained(os.path.expanduser(path))


def _build_config(args) -> DataConfig:
    from omegaconf import OmegaConf

    from data.config import as_data_config

    cfg = OmegaConf.structured(DataConfig)
    if args.config:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(args.config))
    if args.overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    if args.source:
        srcs = [{"kind": "stdlib"} if s == "stdlib" else {"path": s, "text_field": args.text_field}
                for s in args.source]
        cfg = OmegaConf.merge(cfg, {"sources": srcs})
    for name in ("cache_dir", "num_proc"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    return as_data_config(cfg)


def main(argv: Optional[Sequence[str]] = None,
         load_tokenizer: Callable[[Optional[str]], Any] = local_tokenizer, prog: str = "python -m data.prepare") -> int:
    """The CLI. `load_tokenizer(path_or_None)` turns --tokenizer (None when not given) into a tokenizer."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a conf/data/*.yaml file (default: the built-in defaults, the stdlib corpus)")
    p.add_argument("--source", action="append", help="a path, or 'stdlib' (repeatable; replaces the config's)")
    p.add_argument("--text-field", default="text", help="text field for --source (default: text)")
    p.add_argument("--tokenizer", help="a local Hugging Face tokenizer directory (python prepare.py: default the "
                                       "embedded model's)")
    p.add_argument("--cache-dir", help="where prepared sources go (default: $INFLLM_CACHE/data)")
    p.add_argument("--out", help="write the one source here instead of the cache (use it as kind: prepared)")
    p.add_argument("--num-proc", type=int, help="tokenizer processes (default: half the cpus, at most 8)")
    p.add_argument("overrides", nargs="*", help="DataConfig overrides as key=value, e.g. holdout_fraction=0.05")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = _build_config(args)
        tokenizer = load_tokenizer(args.tokenizer)
        tok = tokenizer_info(tokenizer, cfg)
        resolved = [resolve_source(s, i) for i, s in enumerate(cfg.effective_sources)]
        if args.out and len(resolved) != 1:
            raise DataError(f"--out takes exactly one source, got {len(resolved)}")
        for r in resolved:
            t0 = time.time()
            directory = prepare_source(r, tokenizer, cfg, out_dir=args.out, tok=tok)
            with open(os.path.join(directory, MANIFEST)) as f:
                m = json.load(f)
            print(f"{r.label}: {m['num_documents']:,} documents, {m['num_tokens']:,} tokens, "
                  f"{len(m['shards'])} shard(s) -> {directory} ({time.time() - t0:.1f}s)")
            hist = m["length_histogram"]
            rows = [f"  [{lo:>8,}, {hi:>9,}) {n:>8,}" for lo, hi, n in zip(hist["edges"], hist["edges"][1:],
                                                                           hist["counts"]) if n]
            print("  document lengths (tokens):\n" + "\n".join(rows))
            if m["bad_documents"]:
                print(f"  skipped: {m['bad_documents']}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
