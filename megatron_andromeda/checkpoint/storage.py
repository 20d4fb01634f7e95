"""Files on disk: streamed safetensors, checksums, fsync, the commit protocol, `latest`, pruning.

A save root holds complete checkpoints `step_XXXXXXXX/` and a `latest` file naming the newest.
A checkpoint is built in `.step_XXXXXXXX.tmp/` (named from the step, so every rank agrees on it
without talking). Each rank writes its own files there, fsyncs them and then drops a marker
`.rank00003.json` listing its files (size, sha256) and the tensor pieces they hold. Rank 0 waits
for every marker, merges them into `metadata.json` and `manifest.json` (written last), renames the
directory into place and only then replaces `latest` with os.replace. The markers are the barrier
between the writers, so a background (async) save needs no process-group collective.

A directory without `manifest.json` is incomplete; loaders skip it and fall back to the newest
complete checkpoint.

Reading treats a checkpoint as untrusted input. Every name read from one (`latest`, the manifest's
file names, which metadata.json's pieces must come from) goes through `resolve_inside`: a relative
name that, symlinks resolved, stays inside the checkpoint's directory and names a regular file.
Files are read and hashed only up to the size their manifest entry states, and safetensors headers
are checked against the file's size before any tensor is read (`read_safetensors_header`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Any

import torch

from megatron_andromeda.errors import UserError

MANIFEST = "manifest.json"
METADATA = "metadata.json"
LATEST = "latest"
FORMAT = "andromeda-checkpoint-v2"
STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^\.step_(\d{8})\.tmp$")
_MARKER = re.compile(r"^\.rank(\d{5})\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_LATEST_BYTES = 4096  # `latest` holds one directory name
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on a header

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file or tensor."""

    label = "checkpoint error"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir_for(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def in_parallel(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """fn over items on a few threads: sha256 and file I/O release the GIL, so files hash concurrently."""
    items = list(items)
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(fn, items))


# -------------------------------------------------------------------------------------------- writing files
def write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Stream `tensors` (CPU) into a safetensors file, hashing as it goes; fsyncs; returns size and sha256.

    Written by hand rather than with safetensors.torch.save_file, which first copies every tensor
    into a Python bytes object: streaming needs no second copy of the state, hashes in the same
    pass, and releases the GIL in write() and sha256 so a background save barely slows training.
    The result is a standard safetensors file (tensors in name order, header padded to 8 bytes).
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, ordered = 0, []
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {key} has dtype {t.dtype}, which safetensors lacks")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
        ordered.append(t)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(head).to_bytes(8, "little"), head):
            f.write(chunk)
            digest.update(chunk)
        for t in ordered:
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(raw.data)
            digest.update(raw.data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(head) + 8 + offset, "sha256": digest.hexdigest()}


def write_json(path: Path, obj: Any) -> dict[str, Any]:
    """Write JSON (sorted keys, so identical state gives identical bytes), fsync; size and sha256."""
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, size: int) -> str:
    """sha256 of a file of `size` bytes, reading no further (so a device file cannot be read forever)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left > 0 and (block := f.read(min(left, 1 << 22))):
            digest.update(block)
            left -= len(block)
        if left or f.read(1):
            raise CheckpointError(f"checkpoint file {path} changed size while read (expected {size} bytes)")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ commit protocol
def prepare_tmp_dir(final: Path) -> Path:
    """Rank 0, before any rank writes: a fresh temporary directory (a crashed attempt's is removed)."""
    tmp = tmp_dir_for(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_marker(tmp: Path, rank: int, report: dict[str, Any]) -> None:
    """This rank's files are durable: publish its report (atomically) for rank 0 to merge."""
    write_text_atomic(tmp / f".rank{rank:05d}.json", json.dumps(report, sort_keys=True))


def wait_for_markers(tmp: Path, world: int, timeout_s: float) -> list[dict[str, Any]]:
    """Every rank's report, in rank order; raises if a rank failed or did not finish in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = sorted(p for p in tmp.iterdir() if _MARKER.match(p.name))
        if len(found) == world:
            break
        if time.monotonic() > deadline:
            done = [int(_MARKER.match(p.name).group(1)) for p in found]
            missing = sorted(set(range(world)) - set(done))
            raise CheckpointError(
                f"{tmp}: ranks {missing[:8]} did not finish writing within {timeout_s:.0f} s"
            )
        time.sleep(0.02)
    reports = [json.loads(p.read_text()) for p in found]
    for report in reports:
        if "error" in report:
            raise CheckpointError(f"{tmp}: rank {report['rank']} failed to write: {report['error']}")
    for p in found:
        p.unlink()
    return reports


def finish_checkpoint(tmp: Path, final: Path, metadata: dict[str, Any], files: dict[str, Any]) -> None:
    """Write metadata and manifest (last), then rename the directory into place."""
    files = {**files, METADATA: write_json(tmp / METADATA, metadata)}
    write_json(tmp / MANIFEST, {"format": FORMAT, "files": dict(sorted(files.items()))})
    fsync_dir(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists():  # a re-save of the same step: move the old one aside, then drop it
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def publish_latest(root: Path, final: Path, keep_last: int | None) -> None:
    """Point `latest` at `final`, then keep only the newest `keep_last` complete checkpoints (None: all)."""
    write_text_atomic(root / LATEST, final.name)
    complete = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p))
    for old in complete[: -keep_last if keep_last else 0]:
        shutil.rmtree(old, ignore_errors=True)
    step = int(STEP_DIR.match(final.name).group(1))
    for stale in root.iterdir():  # temporary directories of older, abandoned saves
        match = _TMP_DIR.match(stale.name)
        if match and int(match.group(1)) < step:
            shutil.rmtree(stale, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- reading
def resolve_inside(directory: Path, name: Any, *, source: Path | str, kind: str | None = "file") -> Path:
    """The path that `name`, read from the file `source`, names inside `directory`; CheckpointError if none.

    The one rule for every name a checkpoint (or a Hugging Face index) holds: a relative name that,
    with symlinks resolved, stays inside `directory` (a symlink to another file of the same
    checkpoint is fine, one leading out is not). With kind "file" it must name an existing regular
    file; with None it need not exist yet (`latest`: the caller checks the directory is complete).
    Without this a checkpoint could make a reader load, hash or block on any file of the machine:
    `../other/...`, an absolute path, `/dev/zero`, a FIFO.
    """
    entry = f"{source}: entry {name!r}"
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{entry} is not a file name")
    if PurePath(name).is_absolute():
        raise CheckpointError(f"{entry} is an absolute path; a checkpoint names files inside {directory}")
    try:
        root = Path(directory).resolve()
        target = (root / name).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise CheckpointError(f"{entry} cannot be resolved ({e})") from e
    if target == root or not target.is_relative_to(root):
        raise CheckpointError(
            f"{entry} resolves to {target}, outside {root}; a checkpoint may only name files inside "
            "its own directory"
        )
    if kind is None:
        return target
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {root / name} is missing ({entry})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{entry} names {target}, which is not a regular file (a device or FIFO?)")
    return target


def read_bounded(path: Path, limit: int) -> bytes:
    """A (resolved, regular) file's bytes; CheckpointError when it holds more than `limit`."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path} is larger than the {limit} bytes such a file can hold")
    return data


def is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and (ckpt / MANIFEST).exists()


def resolve_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint directory from a directory or a save root (through `latest`, with fallback).

    `path` itself is the user's choice; what `latest` names must lie inside it (resolve_inside).
    """
    path = Path(path)
    if (path / MANIFEST).exists():
        return path
    if not path.is_dir():
        return None
    latest = path / LATEST
    if latest.exists():
        file = resolve_inside(path, LATEST, source=path)
        text = read_bounded(file, MAX_LATEST_BYTES).decode("utf-8", errors="replace").strip()
        named = resolve_inside(path, text, source=latest, kind=None)
        if is_complete(named):
            return named
        warnings.warn(
            f"{latest} names {text}, which is missing or incomplete; "
            "falling back to the newest complete checkpoint",
            stacklevel=2,
        )
    candidates = sorted((p for p in path.iterdir() if STEP_DIR.match(p.name)), reverse=True)
    for candidate in candidates:
        resolve_inside(path, candidate.name, source=path, kind=None)  # no symlink out of the root
        if is_complete(candidate):
            return candidate
    return None


def read_manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file entries, every name checked to stay inside `ckpt` and every entry well formed."""
    path = ckpt / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        manifest = json.loads(resolve_inside(ckpt, MANIFEST, source=ckpt).read_bytes())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid manifest ({e})") from e
    if not isinstance(files, dict):
        raise CheckpointError(f"{path} is not a valid manifest (files is not a mapping)")
    for name, entry in files.items():
        resolve_inside(ckpt, name, source=path, kind=None)
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not _SHA256.match(digest):
            raise CheckpointError(f"{path}: entry {name!r} needs a size (bytes) and a sha256, has {entry!r}")
    return files


def check_file(ckpt: Path, name: str, entry: Mapping[str, Any]) -> Path:
    """One file against its manifest entry (read no further than its size); returns its resolved path."""
    file = resolve_inside(ckpt, name, source=ckpt / MANIFEST)
    size = file.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(
            f"checkpoint file {ckpt / name} has {size} bytes, the manifest says {entry['size']}"
        )
    if sha256_file(file, size) != entry["sha256"]:
        raise CheckpointError(f"checkpoint file {ckpt / name} fails its sha256 check (corrupted)")
    return file


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file against the manifest; raises CheckpointError naming the bad file."""
    for name, entry in read_manifest(Path(ckpt)).items():
        check_file(Path(ckpt), name, entry)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size; CheckpointError naming it.

    safetensors' own message for a pickle or a truncated file ("header too large", "incomplete
    metadata") names neither the file nor the problem; this says which file, and what it is.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path} is not a safetensors file (it does not start with a header length; a pickled "
                ".bin/.pt file or another format?)"
            )
        raw = f.read(length)
    if len(raw) < length:
        prefix = "truncated" if raw[:1] == b"{" else "not a safetensors file (no JSON header)"
        raise CheckpointError(f"{path} is {prefix}: it announces a {length}-byte header, has {size} bytes")
    try:
        header = json.loads(raw)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if not all(type(end) is int for end in ends):
            raise TypeError("data offsets are not integers")
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path} is not a safetensors file (its header is not valid: {e})") from e
    data = size - 8 - length
    if max(ends, default=0) > data:
        raise CheckpointError(
            f"{path} is truncated: its header places tensors up to byte {max(ends)} of the data, "
            f"which holds {data} bytes"
        )
    return header
