"""A minimal reader of R's serialization format, enough for the data files of R packages that hold text.

R writes objects in its serialization format (XDR, big-endian; format versions 2 and 3) in three kinds of file:
`.rds` (one object, saveRDS), `.rda` / `.RData` (save(): the magic "RDX2\\n" / "RDX3\\n" and a pairlist of
name = object), each gzip-, bzip2- or xz-compressed or plain; and an installed package's lazy-load database
`data/Rdata.rdx` + `data/Rdata.rdb` (the .rdx is an .rds whose `variables` map each object to an
(offset, length) chunk of the .rdb; a chunk is a 4-byte big-endian length and the zlib stream of one
serialized object, or, for bzip2 / xz databases, the length, a type byte and the stream).

Only what data files use is read: NULL, symbols, pairlists, character / logical / integer / double / complex
vectors, lists, environments (as dicts), references, attributes (names, class, ...) and the compact ALTREP
forms R 3.5+ writes. Anything else (closures, byte code, external pointers) is an error naming the type.
Vectors come back as RVector (a list with `.attrs`); R's NA is None.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from typing import Any, Dict, List, Optional, Tuple

from infllm.errors import DataError

__all__ = ["RVector", "read_rds", "read_rda", "read_lazyload", "read_r_objects"]

NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP, VECSXP, EXPRSXP = 9, 10, 13, 14, 15, 16, 17, 19, 20
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP = 238, 239, 240
BASEENV_SXP, EMPTYENV_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 241, 242, 250, 249, 248, 247
GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, NILVALUE_SXP, REFSXP = 253, 252, 251, 254, 255
NA_INTEGER = -(2 ** 31)
# CHARSXP encoding flags (in the `levels` bits of the item's flags).
_LATIN1, _BYTES = 1 << 2, 1 << 1


class RVector(list):
    """An R vector or pairlist as a Python list; `attrs` holds its attributes (`names`, `class`, ...)."""

    def __init__(self, items=(), attrs: Optional[Dict[str, Any]] = None):
        super().__init__(items)
        self.attrs = attrs or {}

    @property
    def names(self) -> Optional[List[str]]:
        return self.attrs.get("names")


class _Symbol(str):
    pass


def decompress(blob: bytes) -> bytes:
    """The bytes of a gzip-, bzip2- or xz-compressed file (R's save() compressions), or `blob` as it is."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:3] == b"BZh":
        return bz2.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(blob)
    return blob


class _Unserializer:
    def __init__(self, buf: bytes, where: str):
        self.buf, self.pos, self.where = buf, 0, where
        self.refs: List[Any] = []

    def fail(self, msg: str):
        raise DataError(f"{self.where}: not a readable R serialization ({msg} at byte {self.pos})")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            self.fail(f"truncated: {n} bytes wanted, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        fmt = self.take(2)
        if fmt != b"X\n":
            self.fail(f"format {fmt!r}; only the XDR (binary) format is read")
        version = self.int()
        self.int(), self.int()  # R version that wrote it, minimal R version to read it
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            self.fail(f"serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        sxp = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sxp in (NILVALUE_SXP, NILSXP):
            return None
        if sxp in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP):
            return {}
        if sxp == REFSXP:
            index = flags >> 8 or self.int()
            if not 0 < index <= len(self.refs):
                self.fail(f"reference {index} to an unread object")
            return self.refs[index - 1]
        if sxp == SYMSXP:
            sym = _Symbol(self.item() or "")
            self.refs.append(sym)
            return sym
        if sxp in (PACKAGESXP, NAMESPACESXP, PERSISTSXP):
            self.int()
            names = RVector(self.item_charsxp() for _ in range(self.int()))
            self.refs.append(names)
            return names
        if sxp == ENVSXP:
            env: Dict[str, Any] = {}
            self.refs.append(env)
            self.int()  # locked
            self.item()  # enclosing environment
            frame, table = self.item(), self.item()
            self.item()  # attributes
            for pairs in [frame] + list(table or []):
                for tag, value in (pairs or []):
                    env[tag] = value
            return env
        if sxp in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP):
            # A pairlist, read iteratively: (attributes, tag, CAR) per cell, then the CDR's own flags.
            cells, attrs = [], None
            while True:
                cell_attrs = self.attributes() if has_attr else None
                attrs = attrs if attrs is not None else cell_attrs
                tag = self.item() if has_tag else None
                cells.append((tag, self.item()))
                flags = self.int()
                sxp = flags & 0xFF
                if sxp not in (LISTSXP, LANGSXP, ATTRLISTSXP, ATTRLANGSXP):
                    self.pos -= 4
                    self.item()  # the last CDR (NULL for a proper pairlist)
                    break
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            return RVector(cells, attrs)
        if sxp == CHARSXP:
            self.pos -= 4
            return self.item_charsxp()
        if sxp == ALTREP_SXP:
            return self.altrep()
        if sxp in (LGLSXP, INTSXP):
            n = self.length()
            raw = struct.unpack(f">{n}i", self.take(4 * n))
            values = [None if v == NA_INTEGER else (bool(v) if sxp == LGLSXP else v) for v in raw]
        elif sxp == REALSXP:
            n = self.length()
            values = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif sxp == CPLXSXP:
            n = self.length()
            raw = struct.unpack(f">{2 * n}d", self.take(16 * n))
            values = [complex(raw[2 * i], raw[2 * i + 1]) for i in range(n)]
        elif sxp == STRSXP:
            values = [self.item_charsxp() for _ in range(self.length())]
        elif sxp in (VECSXP, EXPRSXP):
            values = [self.item() for _ in range(self.length())]
        else:
            self.fail(f"R type {sxp} (only data objects are read: vectors, lists, pairlists, environments)")
        return RVector(values, self.attributes() if has_attr else None)

    def item_charsxp(self) -> Optional[str]:
        flags = self.int()
        if flags & 0xFF != CHARSXP:
            self.fail(f"expected a string (CHARSXP), got type {flags & 0xFF}")
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        levels = flags >> 12
        if levels & _BYTES:
            return raw.decode("latin-1")
        return raw.decode("latin-1" if levels & _LATIN1 else "utf-8", errors="replace")

    def attributes(self) -> Dict[str, Any]:
        pairs = self.item()
        return {str(tag): value for tag, value in (pairs or [])}

    def altrep(self) -> RVector:
        info, state, attr = self.item(), self.item(), self.item()
        kind = str(info[0][1]) if info else ""
        attrs = {str(t): v for t, v in (attr or [])} if isinstance(attr, list) else {}
        if kind in ("compact_intseq", "compact_realseq"):
            n, start, step = (int(x) if kind == "compact_intseq" else x for x in state)
            return RVector([start + i * step for i in range(int(n))], attrs)
        if kind.startswith("wrap_"):
            return RVector(state[0], attrs or getattr(state[0], "attrs", {}))
        if kind == "deferred_string":
            values = state[0][1] if state and isinstance(state[0], tuple) else state[0]
            return RVector([None if v is None else str(v) for v in values], attrs)
        self.fail(f"ALTREP class {kind!r}")


def unserialize(buf: bytes, where: str) -> Any:
    """One object from the bytes of an R serialization (after any compression is removed)."""
    u = _Unserializer(buf, where)
    u.header()
    return u.item()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise DataError(f"cannot read the R data file {path!r} ({e.strerror or e})") from e
    try:
        return decompress(blob)
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        raise DataError(f"{path}: corrupt compressed R data file ({e})") from e


def read_rds(path: str) -> Any:
    return unserialize(_read(path), path)


def read_rda(path: str) -> Dict[str, Any]:
    """name -> object of an .rda / .RData file (save())."""
    buf = _read(path)
    if buf[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise DataError(f"{path}: not an .rda/.RData file (magic {buf[:5]!r}; expected RDX2 or RDX3)")
    pairs = unserialize(buf[5:], path)
    return {str(tag): value for tag, value in (pairs or [])}


def _lazyload_chunk(blob: bytes, offset: int, length: int, compressed: int, where: str) -> bytes:
    chunk = blob[offset:offset + length]
    if len(chunk) != length or length < 5:
        raise DataError(f"{where}: chunk at {offset} (+{length}) lies outside the file ({len(blob)} bytes)")
    try:
        if compressed in (2, 3):
            kind, data = chunk[4:5], chunk[5:]
            if kind == b"Z":
                return zlib.decompress(data)
            if kind == b"2":
                return bz2.decompress(data)
            if kind == b"X":
                return lzma.decompress(data)
            return data
        return zlib.decompress(chunk[4:])
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:
        raise DataError(f"{where}: corrupt chunk at {offset} ({e})") from e


def read_lazyload(rdx_path: str, names: Optional[List[str]] = None) -> Dict[str, Any]:
    """name -> object of a lazy-load database (`<base>.rdx` beside `<base>.rdb`); `names`: only these."""
    index = read_rds(rdx_path)
    if not isinstance(index, RVector) or not index.names or "variables" not in index.names:
        raise DataError(f"{rdx_path}: not a lazy-load index (expected a list with `variables`)")
    fields = dict(zip(index.names, index))
    variables = fields["variables"]
    compressed = fields.get("compressed")
    compressed = int(compressed[0]) if compressed else 1
    rdb_path = rdx_path[:-4] + ".rdb"
    try:
        with open(rdb_path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise DataError(f"cannot read the lazy-load database {rdb_path!r} ({e.strerror or e})") from e
    out = {}
    for name, (offset, length) in zip(variables.names or [], variables):
        if names is None or name in names:
            out[name] = unserialize(_lazyload_chunk(blob, int(offset), int(length), compressed, rdb_path),
                                    f"{rdb_path}[{name}]")
    return out


def read_r_objects(path: str, names: Optional[List[str]] = None) -> Tuple[Dict[str, Any], str]:
    """The objects of an R data location: a lazy-load database (its .rdx or .rdb, or a directory holding
    Rdata.rdx), an .rda/.RData file or an .rds file (one object, named after the file). Returns
    (name -> object, the file read)."""
    if os.path.isdir(path):
        path = os.path.join(path, "Rdata.rdx")
    if path.endswith(".rdb"):
        path = path[:-4] + ".rdx"
    if path.endswith(".rdx"):
        return read_lazyload(path, names), path
    if path.endswith(".rds"):
        return {os.path.basename(path)[:-4]: read_rds(path)}, path
    objects = read_rda(path)
    return ({k: v for k, v in objects.items() if names is None or k in names}), path
