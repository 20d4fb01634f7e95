"""Binary streams over plain, gzip and zstandard files that never end early without saying so.

A truncated `.zst` is the dangerous case: zstandard's `stream_reader` simply stops at the end of the
input, so a cut file reads as a shorter corpus and its partial last line as one malformed record.
gzip raises (`EOFError`, `BadGzipFile`) but names no file and loses count of where it was.
`FrameReader` decompresses both formats frame by frame (zstd frames, gzip members), raises
`TruncatedStreamError` when the file ends inside one, and counts the newlines it produced, so
`InputStream.describe_error` can name the file, the last complete line and the compressed byte.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_READ_BYTES = 1 << 16  # compressed bytes fed per step: bounds what one step can produce


class TruncatedStreamError(EOFError):
    """A compressed file ended inside a frame (it was cut short, e.g. by an interrupted copy)."""


def compression_of(path: str | os.PathLike) -> str | None:
    """'gzip', 'zstd' or None, from the file name."""
    name = os.fspath(path).lower()
    return next((kind for suffix, kind in COMPRESSIONS.items() if name.endswith(suffix)), None)


def _gzip_member() -> Any:
    return zlib.decompressobj(zlib.MAX_WBITS | 16)  # gzip header and trailer (CRC, size) checked


def _zstd_frame_factory() -> Callable[[], Any]:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj


class FrameReader(io.RawIOBase):
    """Raw reader of every frame (zstd) or member (gzip) of `raw`; raises when the input stops
    inside one. `newlines` counts the newlines decompressed so far, all of them already read out
    when an error is raised (more input is only fed once the output is used up)."""

    def __init__(self, raw: BinaryIO, new_frame: Callable[[], Any], kind: str) -> None:
        self._raw, self._new_frame, self.kind = raw, new_frame, kind
        self._frame: Any = None  # decompressor of the frame being read; None between frames
        self._out, self._pos = b"", 0  # decompressed bytes not yet handed out: _out[_pos:]
        self.newlines = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            if not self._decompress_more():
                return 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos : self._pos + n]  # one copy, no slice object
        self._pos += n
        return n

    def _decompress_more(self) -> bool:
        """Feed the next block of the file; False at a clean end (between two frames)."""
        data = self._raw.read(_READ_BYTES)
        if not data:
            if self._frame is not None:
                raise TruncatedStreamError(f"the file ends inside a {self.kind} frame")
            return False
        out = []
        while data:
            if self._frame is None:
                if self.kind == "gzip":
                    data = data.lstrip(b"\x00")  # gzip tolerates zero padding after a member
                    if not data:
                        break
                self._frame = self._new_frame()
            out.append(self._frame.decompress(data))
            if self._frame.eof:  # a complete frame: whatever follows starts the next one
                data, self._frame = self._frame.unused_data, None
            else:
                data = b""
        self._out, self._pos = b"".join(out), 0
        self.newlines += self._out.count(b"\n")
        return True

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


@dataclass
class InputStream:
    """A file opened for reading: `stream` gives the decompressed bytes; `raw.tell()` is how far into
    the file reading got. Closing `stream` closes the file."""

    path: str
    stream: BinaryIO
    raw: BinaryIO
    frames: FrameReader | None  # None for an uncompressed file

    def describe_error(self, error: BaseException) -> str:
        """One message: the file, the last complete line, the compressed byte, and what to do."""
        line = f" after line {self.frames.newlines:,}" if self.frames is not None else ""
        try:
            position = f", at compressed byte {self.raw.tell():,} of {os.path.getsize(self.path):,}"
        except (OSError, ValueError):
            position = ""
        what = "ends early (truncated)" if isinstance(error, EOFError) else f"is damaged ({error})"
        return (
            f"{self.path}: the compressed data {what}{line}{position}; nothing was written from it. "
            "Re-download or recompress the file (or leave it out of --input)"
        )


def open_compressed(path: str | os.PathLike) -> InputStream:
    """A plain, .gz or .zst file opened for reading its decompressed bytes."""
    path = os.fspath(path)
    kind = compression_of(path)
    raw = open(path, "rb")  # noqa: SIM115 (closed through the returned stream)
    if kind is None:
        return InputStream(path, raw, raw, None)
    try:
        new_frame = _gzip_member if kind == "gzip" else _zstd_frame_factory()
    except BaseException:
        raw.close()
        raise
    frames = FrameReader(raw, new_frame, kind)
    return InputStream(path, io.BufferedReader(frames, buffer_size=1 << 20), raw, frames)


def stream_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the compressed data is cut short or damaged"."""
    errors: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)
