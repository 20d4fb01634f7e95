"""The one text opener and the one JSONL reader of everything that reads small JSONL/text files.

Chat data, evaluation tasks, tokenizer training and the tools read plain, `.gz` or `.zst` files
through `open_text`, which decompresses with `compressed.open_compressed`: a file cut short is an
error naming the file and the last complete line, never a shorter corpus. `iter_jsonl` yields
`(line_no, record)` for every non-blank line; invalid JSON is either counted (`malformed=`) or an
error naming `path:line`, raised as the caller's own error type (a task error, a format error...).
The preprocessing pipeline reads its inputs as bytes through its own fast reader (preprocess/readers.py).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from typing import IO, Any

from megatron_andromeda.data.compressed import open_compressed, stream_errors
from megatron_andromeda.errors import UserError


class InputError(UserError, ValueError):
    """A file that cannot be read as asked; the message names it and what to do."""

    label = "input error"


def open_text(path: str | os.PathLike, error: type[UserError] = InputError) -> IO[str]:
    """A UTF-8 text stream over a plain, .gz or .zst file; damage while reading raises `error`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{path}: file not found")
    stream = open_compressed(path)
    return _CheckedText(io.TextIOWrapper(stream.stream, encoding="utf-8"), stream, error)


def iter_jsonl(
    path: str | os.PathLike,
    error: type[UserError] = InputError,
    malformed: list[tuple[int, str]] | None = None,
) -> Iterator[tuple[int, Any]]:
    """(line number, decoded record) of every non-blank line of a JSONL file.

    Invalid JSON raises `error` naming `path:line`, or, with a `malformed` list, is recorded there
    as (line number, reason) and skipped.
    """
    with open_text(path, error) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if malformed is None:
                    raise error(f"{os.fspath(path)}:{line_no}: invalid JSON ({e.msg})") from e
                malformed.append((line_no, f"invalid JSON ({e.msg})"))
                continue
            yield line_no, record


class _CheckedText(io.TextIOBase):
    """A text stream whose decompression errors become `error`, naming the file and where it ended."""

    def __init__(self, text: io.TextIOWrapper, stream, error: type[UserError]):
        self._text, self._stream, self._error = text, stream, error

    def _guarded(self, read, *args):
        try:
            return read(*args)
        except stream_errors() as e:
            raise self._error(self._stream.describe_error(e)) from e
        except UnicodeDecodeError as e:
            raise self._error(f"{self._stream.path}: not UTF-8 text ({e})") from e

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> str:
        return self._guarded(self._text.read, size)

    def readline(self, size: int = -1) -> str:
        return self._guarded(self._text.readline, size)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def close(self) -> None:
        self._text.close()
        super().close()
