#!/usr/bin/env python3
"""Build the embedded demo corpus from Debian's ``r-cran-janeaustenr`` package.

The package ships Jane Austen's six completed novels (public domain; the R packaging is MIT) as an
R lazy-load database, so this script carries a small reader for R's XDR serialization format
instead of depending on R. Usage::

    apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb /tmp/jane
    python tools/build_embedded_corpus.py /tmp/jane

The argument may be the unpacked package root or any folder containing ``data/Rdata.rdx``
(searched recursively). Output is deterministic: the same input gives byte-identical
``examples/data/corpus/austen.jsonl.gz`` (gzip mtime 0, fixed document order).

Stdlib only, so the corpus can be rebuilt on a machine without the project installed.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "examples" / "data" / "corpus" / "austen.jsonl.gz"

# R variable name -> (document source label, book title). Order fixes the output order.
NOVELS: dict[str, tuple[str, str]] = {
    "sensesensibility": ("austen/sense_and_sensibility", "Sense and Sensibility"),
    "prideprejudice": ("austen/pride_and_prejudice", "Pride and Prejudice"),
    "mansfieldpark": ("austen/mansfield_park", "Mansfield Park"),
    "emma": ("austen/emma", "Emma"),
    "northangerabbey": ("austen/northanger_abbey", "Northanger Abbey"),
    "persuasion": ("austen/persuasion", "Persuasion"),
}

# --------------------------------------------------------------------------------------------
# Reader for R's serialization format (XDR, versions 2 and 3) -- only the types data uses.
# --------------------------------------------------------------------------------------------

NILVALUE, REFSXP, GLOBALENV, EMPTYENV, BASEENV = 254, 255, 253, 242, 241
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10
NA_INTEGER = -(2**31)


class RFormatError(ValueError):
    """The input is not an R object this reader understands."""


class RVector(list):
    """An R vector: a Python list plus its R attributes (names, class, ...)."""

    def __init__(self, items: list[Any], attrs: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.attrs = attrs or {}


class _XdrReader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what, self.refs = data, 0, what, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RFormatError(f"{self.what}: truncated R serialization at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        return n if n != -1 else (self.int() << 32) + self.int()

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise RFormatError(f"{self.what}: not an XDR-format R serialization (expected 'X\\n')")
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader R version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise RFormatError(f"{self.what}: unsupported R serialization version {version}")

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE or kind in (GLOBALENV, EMPTYENV, BASEENV):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LISTSXP:
            return self._pairlist(flags)
        if kind == CHARSXP:
            n = self.int()
            return None if n == -1 else self._take(n).decode("utf-8")
        return self._vector(kind, flags)

    def _pairlist(self, flags: int) -> dict[str, Any]:
        """A pairlist as an ordered dict (attributes are the only pairlists data objects hold)."""
        out: dict[str, Any] = {}
        while True:
            if flags & HAS_ATTR:
                self.item()
            tag = self.item() if flags & HAS_TAG else str(len(out))
            out[tag] = self.item()
            flags = self.int()
            if flags & 0xFF == NILVALUE:
                return out
            if flags & 0xFF != LISTSXP:
                raise RFormatError(f"{self.what}: pairlist ends in R type {flags & 0xFF}, expected NULL")

    def _vector(self, kind: int, flags: int) -> RVector:
        if kind not in (LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP):
            raise RFormatError(f"{self.what}: R type {kind} is not supported by this reader")
        n = self.length()
        if kind in (LGLSXP, INTSXP):
            items: list[Any] = [
                None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self._take(4 * n))
            ]
        elif kind == REALSXP:
            items = list(struct.unpack(f">{n}d", self._take(8 * n)))
        else:
            items = [self.item() for _ in range(n)]
        attrs = self.item() if flags & HAS_ATTR else None
        return RVector(items, attrs)


def unserialize(data: bytes, what: str) -> Any:
    """Decode one R object serialized with ``serialize(x, NULL, xdr = TRUE)``."""
    reader = _XdrReader(data, what)
    reader.header()
    return reader.item()


def _decompress_rdb_blob(blob: bytes, compression: int, what: str) -> bytes:
    """Undo R's ``lazyLoadDBinsert`` compression: 4-byte length, then zlib or typed bzip2/xz."""
    if compression == 1:
        return zlib.decompress(blob[4:])
    kind, payload = blob[4:5], blob[5:]
    if kind == b"Z":
        return lzma.decompress(payload)
    if kind == b"2":
        return bz2.decompress(payload)
    if kind == b"0":
        return payload
    raise RFormatError(f"{what}: unknown lazy-load compression {compression}/{kind!r}")


def read_lazyload_db(rdx_path: Path) -> dict[str, Any]:
    """Every variable stored in an R lazy-load database (``X.rdx`` index + ``X.rdb`` data)."""
    raw_index = rdx_path.read_bytes()
    # R >= 3.5 gzips the index; older versions store it like an .rdb entry (length + zlib).
    raw_index = gzip.decompress(raw_index) if raw_index[:2] == b"\x1f\x8b" else zlib.decompress(raw_index[4:])
    index = unserialize(raw_index, str(rdx_path))
    if not isinstance(index, RVector) or "names" not in index.attrs:
        raise RFormatError(f"{rdx_path}: not an R lazy-load index (expected a named list)")
    fields = dict(zip(index.attrs["names"], index))
    if "variables" not in fields:
        raise RFormatError(f"{rdx_path}: R lazy-load index has no 'variables' entry")
    compression = int(fields["compressed"][0]) if "compressed" in fields else 1
    variables = fields["variables"]
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, size) in zip(variables.attrs["names"], variables):
        offset, size = int(offset), int(size)
        raw = _decompress_rdb_blob(rdb[offset : offset + size], compression, f"{rdx_path}:{name}")
        out[name] = unserialize(raw, f"{rdx_path}:{name}")
    return out


# --------------------------------------------------------------------------------------------
# Cleaning: R character vector of wrapped lines -> chapters -> paragraphs -> documents.
# --------------------------------------------------------------------------------------------

CHAPTER_RE = re.compile(r"^(CHAPTER|Chapter) +([IVXLC]+|\d+)\.?$")
VOLUME_RE = re.compile(r"^VOLUME +[IVX]+$")
SCENE_BREAK_RE = re.compile(r"^[\s*]+$")
END_MARKS = {"THE END", "FINIS", "Finis"}
# Northanger Abbey ends with a modern publisher's note; everything from it on is dropped.
EDITORIAL_TAIL = "A NOTE ON THE TEXT"


def split_chapters(lines: list[str]) -> list[list[str]]:
    """Chapters as lists of raw lines; front matter (title page, preface) is dropped."""
    chapters: list[list[str]] = []
    for line in lines:
        stripped = line.strip()
        if stripped == EDITORIAL_TAIL:
            break
        if CHAPTER_RE.match(stripped):
            chapters.append([])
        elif chapters and not VOLUME_RE.match(stripped) and stripped not in END_MARKS:
            chapters[-1].append(line)
    return chapters


def _clean_paragraph(lines: list[str]) -> str:
    """Unwrap one paragraph. Indented blocks (verse, letter sign-offs) keep their line breaks."""
    keep_breaks = all(line.startswith(" ") for line in lines)
    text = ("\n" if keep_breaks else " ").join(" ".join(line.split()) for line in lines)
    return text.replace("_", "")  # Gutenberg marks italics as _word_


def paragraphs(chapter_lines: list[str]) -> list[str]:
    """Blank-line separated paragraphs, minus scene-break rules and editors' bracketed notes."""
    out, block = [], []
    for line in [*chapter_lines, ""]:
        if line.strip():
            block.append(line)
            continue
        if block and not SCENE_BREAK_RE.match("".join(block)):
            text = _clean_paragraph(block)
            if not (text.startswith("[") and "edition" in text):
                out.append(text)
        block = []
    return out


def chunk_paragraphs(paras: list[str], max_chars: int) -> list[str]:
    """Greedy packing of whole paragraphs into documents of at most ``max_chars`` (one long
    paragraph may exceed it: paragraphs are never cut, so every document reads naturally)."""
    docs, current, size = [], [], 0
    for para in paras:
        if current and size + 2 + len(para) > max_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + (2 if size else 0)
    if current:
        docs.append("\n\n".join(current))
    return docs


def build_documents(novels: dict[str, list[str]], max_chars: int) -> list[dict[str, str]]:
    """``{"text", "source"}`` records in book, chapter, chunk order."""
    records = []
    for var, (source, title) in NOVELS.items():
        if var not in novels:
            raise SystemExit(f"error: the R database has no variable {var!r} ({title}); is it janeaustenr?")
        chapters = split_chapters(novels[var])
        if not chapters:
            raise SystemExit(f"error: found no chapter headings in {title}; the source text changed")
        for ch, lines in enumerate(chapters, start=1):
            for part, text in enumerate(chunk_paragraphs(paragraphs(lines), max_chars), start=1):
                records.append({"text": text, "source": f"{source}/ch{ch:02d}/part{part}"})
    return records


def find_rdx(source_dir: Path) -> Path:
    if not source_dir.is_dir():
        raise SystemExit(
            f"error: source dir {source_dir} does not exist; unpack r-cran-janeaustenr there first"
        )
    hits = sorted(p for p in source_dir.rglob("Rdata.rdx") if p.parent.name == "data")
    if not hits:
        raise SystemExit(
            f"error: no data/Rdata.rdx under {source_dir}; pass the folder where "
            "`dpkg-deb -x r-cran-janeaustenr_*.deb DIR` unpacked the package"
        )
    return hits[0]


def write_jsonl_gz(records: list[dict[str, str]], path: Path) -> bytes:
    """Write reproducibly (gzip mtime 0, no file name in the header) and atomically."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source_dir", type=Path, help="unpacked r-cran-janeaustenr package (dpkg-deb -x)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output .jsonl.gz")
    parser.add_argument("--max-chars", type=int, default=5000, help="max characters per document")
    args = parser.parse_args(argv)
    if args.max_chars < 200:
        parser.error(f"--max-chars must be >= 200, got {args.max_chars}")

    rdx = find_rdx(args.source_dir)
    try:
        novels = read_lazyload_db(rdx)
    except (RFormatError, OSError, zlib.error, EOFError) as e:
        raise SystemExit(f"error: cannot read the R data in {rdx}: {e}") from e
    records = build_documents(novels, args.max_chars)
    payload = write_jsonl_gz(records, args.output)
    text_bytes = sum(len(r["text"].encode("utf-8")) for r in records)
    print(f"read {rdx}")
    print(f"wrote {args.output}: {len(records)} documents, {text_bytes:,} bytes of text")
    print(f"  jsonl {len(payload):,} bytes, sha256 {hashlib.sha256(payload).hexdigest()}")
    gz_sha = hashlib.sha256(args.output.read_bytes()).hexdigest()
    print(f"  gzip  {args.output.stat().st_size:,} bytes, sha256 {gz_sha}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
