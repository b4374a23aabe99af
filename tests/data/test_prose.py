"""The prose sources (data/prose.py, data/rdata.py) on real files written here: an R lazy-load database and
.rda files in R's serialization format, a kernel-documentation tree; their failures name the fix."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import random
import struct
import zlib

import pytest
from omegaconf import OmegaConf

from data.config import DataConfig, DataError, SourceConfig
from data.prepare import prepare_all
from data.prose import AUSTEN_DIR, LINUX_DOC_DIR
from data.rdata import read_r_objects, read_rda
from data.shards import TokenStore
from data.sources import BadDocuments, iter_documents, resolve_source

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RWriter:
    """Writes R's XDR serialization (format 3, as R 3.5+ does): symbols once, then as references."""

    def __init__(self):
        self.symbols = {}

    @staticmethod
    def i(n: int) -> bytes:
        return struct.pack(">i", n)

    def flags(self, sxp: int, attr=False, tag=False, levels=0) -> bytes:
        return self.i(sxp | (attr << 9) | (tag << 10) | (levels << 12))

    def char(self, s):
        if s is None:
            return self.flags(9) + self.i(-1)
        raw = s.encode("utf-8")
        return self.flags(9, levels=64 if s.isascii() else 8) + self.i(len(raw)) + raw

    def sym(self, name: str) -> bytes:
        if name in self.symbols:
            return self.i((self.symbols[name] << 8) | 255)
        self.symbols[name] = len(self.symbols) + 1
        return self.flags(1) + self.char(name)

    def pairlist(self, items) -> bytes:
        out = b"".join(self.flags(2, tag=True) + self.sym(k) + v for k, v in items)
        return out + self.i(254)

    def strs(self, xs, names=None) -> bytes:
        body = self.i(len(xs)) + b"".join(self.char(x) for x in xs)
        return self.flags(16, attr=names is not None) + body + self._names(names)

    def ints(self, xs) -> bytes:
        return self.flags(13) + self.i(len(xs)) + b"".join(self.i(x) for x in xs)

    def lgl(self, xs) -> bytes:
        return self.flags(10) + self.i(len(xs)) + b"".join(self.i(int(x)) for x in xs)

    def vec(self, items, names=None) -> bytes:
        return self.flags(19, attr=names is not None) + self.i(len(items)) + b"".join(items) + self._names(names)

    def _names(self, names) -> bytes:
        return b"" if names is None else self.pairlist([("names", self.strs(names))])

    @staticmethod
    def header() -> bytes:
        return b"X\n" + struct.pack(">iii", 3, 0x40202, 0x30500) + struct.pack(">i", 5) + b"UTF-8"


def write_lazyload(data_dir, objects):
    """`objects` (name -> lines) as R installs a package's data: Rdata.rdx (gzip) + Rdata.rdb (zlib chunks)."""
    os.makedirs(data_dir, exist_ok=True)
    blob, index = b"", []
    for name, lines in objects.items():
        raw = RWriter.header() + RWriter().strs(lines)
        chunk = struct.pack(">i", len(raw)) + zlib.compress(raw)
        index.append((name, len(blob), len(chunk)))
        blob += chunk
    with open(os.path.join(data_dir, "Rdata.rdb"), "wb") as f:
        f.write(blob)
    w = RWriter()
    variables = w.vec([w.ints([off, n]) for _, off, n in index], names=[n for n, _, _ in index])
    rdx = w.vec([variables, w.vec([]), w.lgl([True])], names=["variables", "references", "compressed"])
    with open(os.path.join(data_dir, "Rdata.rdx"), "wb") as f:
        f.write(gzip.compress(RWriter.header() + rdx))


def write_rda(path, objects, compress):
    w = RWriter()
    raw = b"RDX3\n" + RWriter.header() + w.pairlist([(k, w.strs(v)) for k, v in objects.items()])
    with open(path, "wb") as f:
        f.write(compress(raw))


def random_novel(rng: random.Random, title: str):
    words = ["the", "of", "Elinor", "said", "Marianne", "house", "walk", "letter", "Émile", "—", "✓", "dear"]
    lines = [title.upper(), "", "by Jane Austen", ""]
    for _ in range(rng.randint(17, 61)):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 13))))
    lines[rng.randrange(4, len(lines))] = None  # an NA line
    return lines


def novel_text(lines):
    return "\n".join(line or "" for line in lines).strip() + "\n"


@pytest.fixture
def austen_pkg(tmp_path):
    rng = random.Random(7)
    novels = {n: random_novel(rng, n) for n in ("persuasion", "emma", "sensesensibility", "juvenilia")}
    write_lazyload(tmp_path / "janeaustenr" / "data", novels)
    return tmp_path / "janeaustenr", novels


def _docs(src: SourceConfig, policy="skip"):
    bad = BadDocuments(policy, src.label)
    return list(iter_documents(resolve_source(src), bad)), bad


def test_austen_reads_the_lazyload_database(austen_pkg):
    pkg, novels = austen_pkg
    docs, bad = _docs(SourceConfig(kind="austen", path=str(pkg)))
    # Publication order for Austen's novels, then any other vector by name.
    assert [w for _, w in docs] == ["austen:sensesensibility", "austen:emma", "austen:persuasion", "austen:juvenilia"]
    assert [t for t, _ in docs] == [novel_text(novels[w.split(":")[1]]) for _, w in docs]
    assert bad.total == 0
    # The data directory or the .rdx itself work as paths too.
    for path in (pkg / "data", pkg / "data" / "Rdata.rdx"):
        assert _docs(SourceConfig(kind="austen", path=str(path)))[0] == docs


def test_austen_include_and_unknown_novel(austen_pkg):
    pkg, novels = austen_pkg
    docs, _ = _docs(SourceConfig(kind="austen", path=str(pkg), include=["emma"]))
    assert docs == [(novel_text(novels["emma"]), "austen:emma")]
    with pytest.raises(DataError, match=r"include: \['mansfield'\] are not novels"):
        resolve_source(SourceConfig(kind="austen", path=str(pkg), include=["mansfield", "emma"]))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress, lambda b: b],
                         ids=["gzip", "bzip2", "xz", "plain"])
def test_rda_files_in_every_compression(tmp_path, compress):
    rng = random.Random(3)
    objects = {"emma": random_novel(rng, "emma"), "persuasion": random_novel(rng, "persuasion")}
    path = tmp_path / "austen.rda"
    write_rda(path, objects, compress)
    assert {k: list(v) for k, v in read_rda(str(path)).items()} == objects
    docs, _ = _docs(SourceConfig(kind="austen", path=str(tmp_path)))
    assert docs == [(novel_text(objects["emma"]), "austen:emma"),
                    (novel_text(objects["persuasion"]), "austen:persuasion")]


def test_names_attribute_and_symbol_references(tmp_path):
    w = RWriter()
    # `names` is written twice: the second time as a reference to the first symbol.
    obj = w.vec([w.strs(["a", None, "ü"], names=["x", "y", "z"]), w.ints([5, -(2 ** 31), 7])], names=["s", "i"])
    path = tmp_path / "o.rds"
    path.write_bytes(gzip.compress(RWriter.header() + obj))
    objects, _ = read_r_objects(str(path))
    value = objects["o"]
    assert value.names == ["s", "i"]
    assert list(value[0]) == ["a", None, "ü"] and value[0].names == ["x", "y", "z"]
    assert list(value[1]) == [5, None, 7]


def test_corrupt_or_truncated_r_data_fails_naming_the_file(austen_pkg, tmp_path):
    pkg, _ = austen_pkg
    rdb = pkg / "data" / "Rdata.rdb"
    rdb.write_bytes(rdb.read_bytes()[: rdb.stat().st_size // 2])
    with pytest.raises(DataError, match=r"Rdata\.rdb"):
        _docs(SourceConfig(kind="austen", path=str(pkg)))
    bad = tmp_path / "bad.rda"
    bad.write_bytes(gzip.compress(b"RDX3\nA\n" + b"\0" * 32))
    with pytest.raises(DataError, match=r"bad\.rda: not a readable R serialization \(format b'A\\n'"):
        read_rda(str(bad))


@pytest.fixture
def doc_tree(tmp_path):
    root = tmp_path / "Documentation"
    files = {
        "index.rst": "Linux kernel docs\n=================\n",
        "admin-guide/README.rst.gz": "Admin guide intro ✓\n",
        "admin-guide/mm/zswap.txt.gz": "zswap is a lightweight compressed cache\n",
        "admin-guide/bug-hunting.rst": "Bug hunting\n",
        "ABI/testing/sysfs-bus-foo.gz": "What: /sys/bus/foo\nDate: 2022\n",
        "ABI/README": "This directory documents the ABI\n",
        "devicetree/bindings/foo.yaml.gz": "$id: foo\n",
        "images/logo.svg": "<svg/>",
        "tools/.hidden.rst": "hidden\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()) if rel.endswith(".gz") else text.encode())
    return root, files


def test_linux_doc_joins_each_top_level_directory(doc_tree):
    root, files = doc_tree

    def part(rel):
        return f"File: {rel[:-3] if rel.endswith('.gz') else rel}\n\n{files[rel].strip()}\n"

    docs, bad = _docs(SourceConfig(kind="linux_doc", path=str(root)))
    # Text files only (the YAML schemas, images and hidden files are left out), in path order per directory.
    assert docs == [
        ("\n".join([part("ABI/README"), part("ABI/testing/sysfs-bus-foo.gz")]), "linux_doc:ABI"),
        (part("index.rst"), "linux_doc:Documentation"),
        ("\n".join([part("admin-guide/README.rst.gz"), part("admin-guide/bug-hunting.rst"),
                    part("admin-guide/mm/zswap.txt.gz")]), "linux_doc:admin-guide"),
    ]
    assert bad.total == 0
    assert _docs(SourceConfig(kind="linux_doc", path=str(root), include=["ABI"]))[0] == docs[:1]


def test_linux_doc_bad_file_is_a_counted_bad_document(doc_tree):
    root, _ = doc_tree
    (root / "ABI" / "broken.txt").write_bytes(b"caf\xe9\n")
    docs, bad = _docs(SourceConfig(kind="linux_doc", path=str(root)))
    assert bad.counts == {"non-UTF-8 bytes": 1} and "ABI/broken.txt" not in docs[0][0]
    with pytest.raises(DataError, match=r"ABI/broken\.txt: non-UTF-8 bytes"):
        _docs(SourceConfig(kind="linux_doc", path=str(root)), policy="error")


@pytest.mark.parametrize("kind,package", [("austen", "r-cran-janeaustenr"), ("linux_doc", "linux-doc-6.1")])
def test_missing_package_names_the_apt_line(tmp_path, monkeypatch, kind, package):
    with pytest.raises(DataError, match=rf"data\.sources\[0\]\.path: kind={kind} .*`sudo apt-get install {package}`"):
        resolve_source(SourceConfig(kind=kind, path=str(tmp_path / "absent")))
    # The default location, as on a machine without the package.
    import data.prose as prose

    monkeypatch.setitem(prose.DEFAULT_PATHS, kind, str(tmp_path / "usr" / "share" / "absent"))
    with pytest.raises(DataError, match=rf"apt-get install {package}"):
        resolve_source(SourceConfig(kind=kind))


def test_empty_package_dirs_fail_clearly(tmp_path):
    (tmp_path / "janeaustenr" / "data").mkdir(parents=True)
    with pytest.raises(DataError, match="no R data file .* apt-get install r-cran-janeaustenr"):
        resolve_source(SourceConfig(kind="austen", path=str(tmp_path / "janeaustenr")))
    (tmp_path / "Documentation" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no documentation files .* apt-get install linux-doc-6.1"):
        resolve_source(SourceConfig(kind="linux_doc", path=str(tmp_path / "Documentation")))


def test_prose_sources_prepare_into_shards(austen_pkg, doc_tree, tok, make_cfg):
    pkg, _ = austen_pkg
    root, _ = doc_tree
    cfg = make_cfg(sources=[{"kind": "austen", "path": str(pkg)}, {"kind": "linux_doc", "path": str(root)}],
                   holdout_fraction=0.0)
    prepared = prepare_all(cfg, tok)
    for (rsrc, directory), src in zip(prepared, cfg.sources):
        store = TokenStore(directory)
        expected = [t for t, _ in _docs(src)[0]]
        assert [tok.decode(store.document(i)[:-1].tolist()) for i in range(store.num_documents)] == expected


def test_eval_texts_are_refused_for_training(tmp_path):
    essays = tmp_path / "PaulGrahamEssays.json"
    essays.write_text('{"text": "How to do great work."}')
    with pytest.raises(DataError, match="eval text .*RULER"):
        resolve_source(SourceConfig(path=str(essays)))
    lce = pytest.importorskip("long_context_eval")
    data_dir = os.path.join(os.path.dirname(lce.__file__), "data", "synthetic", "json")
    with pytest.raises(DataError, match="eval text"):
        resolve_source(SourceConfig(path=os.path.join(data_dir, "squad.json")))


def test_prose_mix_preset():
    raw = OmegaConf.load(os.path.join(ROOT, "conf", "data", "prose_mix.yaml"))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw))
    assert [s.kind for s in cfg.sources] == ["linux_doc", "austen", "stdlib"]
    assert abs(sum(s.weight for s in cfg.sources) - 1.0) < 1e-9 and all(s.path is None for s in cfg.sources)


@pytest.mark.skipif(not os.path.isdir(AUSTEN_DIR), reason="r-cran-janeaustenr is not installed")
def test_installed_janeaustenr():
    docs, bad = _docs(SourceConfig(kind="austen"))
    assert [w for _, w in docs] == ["austen:sensesensibility", "austen:prideprejudice", "austen:mansfieldpark",
                                    "austen:emma", "austen:northangerabbey", "austen:persuasion"]
    assert docs[3][0].startswith("EMMA") and all(len(t) > 400_000 for t, _ in docs) and bad.total == 0


@pytest.mark.skipif(not os.path.isdir(LINUX_DOC_DIR), reason="linux-doc-6.1 is not installed")
def test_installed_linux_doc():
    rsrc = resolve_source(SourceConfig(kind="linux_doc", include=["filesystems", "networking"]))
    docs = list(iter_documents(rsrc, BadDocuments("skip", "linux_doc")))
    assert [w for _, w in docs] == ["linux_doc:filesystems", "linux_doc:networking"]
    assert all(len(t) > 1_000_000 for t, _ in docs)
