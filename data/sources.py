"""Where documents come from: the embedded standard-library corpus, local files, saved `datasets`, the hub.

`resolve_source` turns a SourceConfig into a ResolvedSource (concrete files, checked up front, and a `spec`
dict that identifies the content for the token cache); `iter_documents` yields `(text, where)` pairs.

jsonl and text files are read here line by line, so that one bad line (non-UTF-8 bytes, broken JSON, no text
field) is one skipped document rather than a failed file; parquet, json, arrow, saved datasets and hub
datasets go through Hugging Face `datasets`. Bad documents go to a `BadDocuments` tally, which either counts
them (on_bad_document=skip) or raises a DataError naming the document (error).
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import socket
import sys
import sysconfig
from typing import Dict, Iterator, List, Optional, Tuple

from data.config import PROSE_KINDS, DataError, SourceConfig
from data.documents import BadDocuments, ResolvedSource

log = logging.getLogger(__name__)

# Directory names inside stdlib packages that hold test suites, not library code.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "lib-dynload"}
# Generated codec tables (a fifth of the stdlib's tokens, and poor text); taken only when named in `include`.
STDLIB_SKIP_DEFAULT = {"encodings"}
EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".parquet": "parquet",
    ".arrow": "arrow", ".txt": "text", ".text": "text", ".md": "text", ".txt.gz": "text",
}


def file_kind(path: str) -> Optional[str]:
    name = path.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    return None


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _list_dir(path: str, where: str) -> List[str]:
    def fail(e: OSError):
        raise DataError(f"{where}: cannot read directory {e.filename!r} ({e.strerror}); expected a readable "
                        "data directory")

    out = []
    for root, dirs, files in os.walk(path, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
    return out


def resolve_source(src: SourceConfig, index: int = 0) -> ResolvedSource:
    """Check the source exists and is readable and list its files; raises DataError naming the setting."""
    where = f"data.sources[{index}].path"
    base = {"kind": src.kind, "text_field": src.text_field, "min_chars": src.min_chars}
    if src.kind == "stdlib":
        return _resolve_stdlib(src, base)
    if src.kind in PROSE_KINDS:
        from data.prose import resolve_prose

        return resolve_prose(src, index, base)
    if src.kind == "hub":
        spec = dict(base, name=src.path, subset=src.subset, split=src.split, revision=src.revision)
        return ResolvedSource(src, "hub", src.label, location=src.path, spec=spec)

    path = os.path.expanduser(src.path)
    if any(c in path for c in "*?["):
        paths = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not paths:
            raise DataError(f"{where}: the glob {src.path!r} matches no files")
    elif not os.path.exists(path):
        raise DataError(f"{where}: {src.path!r} does not exist; expected a data file, a directory of data files, "
                        "a saved `datasets` directory, or kind=hub with a dataset name")
    elif os.path.isdir(path):
        if not os.access(path, os.R_OK | os.X_OK):
            raise DataError(f"{where}: cannot read directory {src.path!r} (permission denied)")
        if src.kind in ("hf_saved", "prepared") or (src.kind == "auto" and _is_saved_dataset(path)):
            kind = "prepared" if src.kind == "prepared" else "hf_saved"
            spec = dict(base, kind=kind, path=os.path.abspath(path), split=src.split, files=_stat_files(
                [p for p in _list_dir(path, where) if not p.endswith(".lock")]))
            return ResolvedSource(src, kind, src.label, location=os.path.abspath(path), spec=spec)
        paths = _list_dir(path, where)
    else:
        paths = [path]
        if src.kind in ("hf_saved", "prepared"):
            raise DataError(f"{where}: kind={src.kind} expects a directory, got the file {src.path!r}")

    if src.kind == "auto":
        candidates = [(p, file_kind(p)) for p in paths]
    elif len(paths) == 1:
        candidates = [(paths[0], src.kind)]
    else:
        # A directory with an explicit kind: its files of that kind, or every file when none has the extension.
        candidates = [(p, src.kind) for p in paths if file_kind(p) == src.kind] or [(p, src.kind) for p in paths]
    files = []
    for p, kind in candidates:
        if kind is None:
            continue
        if not os.access(p, os.R_OK):
            raise DataError(f"{where}: cannot read {p!r} (permission denied)")
        files.append((os.path.abspath(p), kind))
    if not files:
        exts = ", ".join(sorted(EXTENSIONS))
        raise DataError(f"{where}: no data files under {src.path!r}; expected files ending in {exts} "
                        "(or set the source's kind)")
    spec = dict(base, text_unit=src.text_unit, files=_stat_files([p for p, _ in files]),
                kinds=sorted({k for _, k in files}))
    from data.prose import check_not_eval_text

    check_not_eval_text([p for p, _ in files], where)
    return ResolvedSource(src, "files", src.label, files=files, location=os.path.abspath(path), spec=spec)


def _stat_files(paths: List[str]) -> List[List]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


# ---------------------------------------------------------------------------------------------- stdlib corpus

def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_documents_index(include: Optional[List[str]] = None) -> List[Tuple[str, List[str]]]:
    """(name, files) per document: every package concatenated (its test directories left out), every top-level
    module on its own; sorted by name, so the order is the same on every machine with this Python."""
    root = stdlib_dir()
    wanted = set(include or [])
    docs = []
    for entry in sorted(os.listdir(root)):
        full = os.path.join(root, entry)
        if entry in STDLIB_SKIP_DIRS or entry.startswith((".", "config-")):
            continue
        if os.path.isdir(full):
            name = entry
            files = []
            for dirpath, dirs, names in os.walk(full):
                dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
                files.extend(os.path.join(dirpath, n) for n in sorted(names) if n.endswith(".py"))
        elif entry.endswith(".py"):
            name, files = entry[:-3], [full]
        else:
            continue
        if files and (name in wanted or (not wanted and name not in STDLIB_SKIP_DEFAULT)):
            docs.append((name, files))
    missing = wanted - {name for name, _ in docs}
    if missing:
        raise DataError(f"data.sources[*].include: {sorted(missing)} are not packages or modules of the standard "
                        f"library in {root}")
    return docs


def _resolve_stdlib(src: SourceConfig, base: Dict) -> ResolvedSource:
    root = stdlib_dir()
    if not os.path.isdir(root):
        raise DataError(f"the embedded corpus needs the Python standard library sources, but {root} is missing")
    index = stdlib_documents_index(src.include)
    spec = dict(base, python=sys.version, stdlib=root, include=sorted(src.include),
                documents=[[name, len(files)] for name, files in index],
                size=sum(os.path.getsize(f) for _, files in index for f in files))
    return ResolvedSource(src, "stdlib", src.label, location=root, spec=spec)


def read_stdlib_document(files: List[str], bad: BadDocuments) -> Optional[str]:
    """One document of the stdlib corpus: its files' text (strict UTF-8; a file that fails is a bad document),
    a `# file:` header before each when there are several, so the model sees where one module ends and the
    next begins. None when no file could be read. The one reader of the corpus: training (`iter_documents`)
    and the eval's haystacks (`infllm.eval.haystack`) both go through it."""
    root = stdlib_dir()
    parts = []
    for path in files:
        rel = os.path.relpath(path, root)
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add("non-UTF-8 bytes", rel, str(e))
            continue
        except OSError as e:
            bad.add("unreadable file", rel, e.strerror or str(e))
            continue
        parts.append(f"# file: {rel}\n{text}" if len(files) > 1 else text)
    return "\n".join(parts) if parts else None


def _stdlib_docs(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    for name, files in stdlib_documents_index(src.cfg.include):
        text = read_stdlib_document(files, bad)
        if text is not None:
            yield text, f"stdlib:{name}"


# ---------------------------------------------------------------------------------------------------- files

def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _jsonl_docs(path: str, field_name: str, bad: BadDocuments, seen_keys: set) -> Iterator[Tuple[str, str]]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.add("non-UTF-8 bytes", where, str(e))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                bad.add("invalid JSON", where, str(e))
                continue
            if not isinstance(row, dict) or field_name not in row:
                if isinstance(row, dict) and len(seen_keys) < 50:
                    seen_keys.update(row.keys())
                bad.add(f"missing text field {field_name!r}", where)
                continue
            value = row[field_name]
            if not isinstance(value, str):
                bad.add(f"text field {field_name!r} is not a string", where, type(value).__name__)
                continue
            yield value, where


def _text_docs(path: str, unit: str, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    if unit == "line":
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    bad.add("non-UTF-8 bytes", f"{path}:{lineno}", str(e))
                    continue
                if line.strip():
                    yield line, f"{path}:{lineno}"
        return
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad.add("non-UTF-8 bytes", path, str(e))
        return
    if unit == "document":
        yield text, path
        return
    for i, para in enumerate(p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()):
        yield para, f"{path}#paragraph{i}"


def _check_column(names, field_name: str, where: str) -> None:
    if field_name not in names:
        raise DataError(f"{where}: no text field {field_name!r}; the columns are {sorted(names)} "
                        "(set the source's text_field)")


def _iter_dataset_column(ds, field_name: str, where: str, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    _check_column(list(ds.column_names or ds.features or []), field_name, where)
    row = 0
    for batch in ds.select_columns([field_name]).iter(batch_size=256):
        for value in batch[field_name]:
            if isinstance(value, str):
                yield value, f"{where}#{row}"
            else:
                bad.add(f"text field {field_name!r} is not a string", f"{where}#{row}", type(value).__name__)
            row += 1


def _datasets_file_docs(path: str, kind: str, field_name: str, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    import datasets

    if kind == "arrow":
        ds = datasets.Dataset.from_file(path)
    else:
        ds = datasets.load_dataset(kind, data_files=[path], split="train", streaming=True)
        if ds.column_names is None:  # json: the columns are only known after reading a row
            first = next(iter(ds), None)
            if first is None:
                return
            _check_column(list(first), field_name, path)
    yield from _iter_dataset_column(ds, field_name, path, bad)


def _file_docs(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    field_name = src.cfg.text_field
    for path, kind in src.files:
        if os.path.getsize(path) == 0:
            bad.add("empty file", path)
            continue
        seen_keys: set = set()
        before = bad.counts.get(f"missing text field {field_name!r}", 0)
        n_docs = 0
        try:
            if kind == "jsonl":
                for doc in _jsonl_docs(path, field_name, bad, seen_keys):
                    n_docs += 1
                    yield doc
            elif kind == "text":
                yield from _text_docs(path, src.cfg.text_unit, bad)
            else:
                yield from _datasets_file_docs(path, kind, field_name, bad)
        except DataError:
            raise
        except Exception as e:  # a broken file must not end a long preparation halfway
            bad.add("unreadable file", path, f"{type(e).__name__}: {e}")
            continue
        missing = bad.counts.get(f"missing text field {field_name!r}", 0) - before
        if kind == "jsonl" and n_docs == 0 and missing > 0:
            raise DataError(f"{path}: no row has the text field {field_name!r}; keys seen: {sorted(seen_keys)} "
                            f"(set data.sources[*].text_field)")


def _saved_docs(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    import datasets

    ds = datasets.load_from_disk(src.location)
    if isinstance(ds, datasets.DatasetDict):
        if src.cfg.split not in ds:
            raise DataError(f"{src.location}: no split {src.cfg.split!r}; the splits are {sorted(ds)} "
                            "(set the source's split)")
        ds = ds[src.cfg.split]
    yield from _iter_dataset_column(ds, src.cfg.text_field, src.location, bad)


def hub_offline_reason() -> Optional[str]:
    """Why the hub cannot be reached right now, or None. Checks the offline switches first and otherwise
    tries one TCP connection with a short timeout, so an offline machine fails at once, not after retries."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=3).close()
    except OSError as e:
        return f"cannot reach {host}: {e}"
    return None


def _hub_docs(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    reason = hub_offline_reason()
    if reason is not None:
        raise DataError(f"data.sources: hub dataset {src.location!r} needs the network, but the hub is offline "
                        f"({reason}); prepare it once on a machine with network (python prepare.py), or "
                        "download it and point the source's path at the local files")
    import datasets

    ds = datasets.load_dataset(src.location, src.cfg.subset, split=src.cfg.split, revision=src.cfg.revision,
                               streaming=True)
    yield from _iter_dataset_column(ds, src.cfg.text_field, src.location, bad)


def _prose_docs(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    from data.prose import iter_prose

    return iter_prose(src, bad)


def iter_documents(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    """(text, where) for every document of the source, in a deterministic order; documents shorter than
    min_chars are left out silently (a filter, not an error)."""
    readers = {"stdlib": _stdlib_docs, "files": _file_docs, "hf_saved": _saved_docs, "hub": _hub_docs,
               "prose": _prose_docs}
    if src.kind not in readers:
        raise DataError(f"source {src.label!r}: kind {src.kind} has no documents to read")
    min_chars = src.cfg.min_chars
    for text, where in readers[src.kind](src, bad):
        if len(text) >= min_chars:
            yield text, where
