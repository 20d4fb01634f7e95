"""Is a dataset fit for this tokenizer? Checks run before training, evaluation and validation use it.

Three things go wrong silently otherwise:

- a dataset tokenized with another tokenizer trains without complaint (its sidecar says which
  tokenizer made it: `check_tokenizer` compares its sha256 and vocabulary size with ours);
- token ids at or above the tokenizer's vocabulary (but below the padded `model.vocab_size`) hit
  the masked padding logits, so the loss is inf on every step (`check_token_ids`);
- an empty dataset fails deep in the index builder without naming itself (`check_not_empty`).

The largest token id comes, cheapest first, from the dataset's sidecar (when its counts match the
files), from a small cache file keyed by the files' size and modification time, or from a chunked
NumPy scan over the memory map whose result is then cached, so a restart never pays the scan again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_andromeda.data.indexed_dataset import (
    DatasetError,
    IndexedDataset,
    data_file_path,
    dataset_exists,
    index_file_path,
)
from megatron_andromeda.data.sidecar import DatasetSidecar, find_sidecar
from megatron_andromeda.data.tokenizer import Tokenizer

SCAN_CHUNK_TOKENS = 1 << 24  # 32 MiB of uint16 per NumPy reduction: bounded memory on any size
TOKEN_RANGE_VERSION = 1


@dataclass(frozen=True)
class TokenRange:
    min_id: int
    max_id: int
    source: str  # "sidecar", "cache" or "scan": where the figures came from


def default_cache_dir(prefix: str | os.PathLike) -> str:
    """Where index caches go when data.cache_dir is empty: `index-cache/` beside the dataset."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


def scan_token_range(dataset: IndexedDataset, chunk_tokens: int = SCAN_CHUNK_TOKENS) -> tuple[int, int]:
    """(smallest, largest) token id, by NumPy reductions over the memory map one chunk at a time."""
    tokens = dataset.tokens
    low, high = None, None
    for start in range(0, tokens.size, chunk_tokens):
        chunk = tokens[start : start + chunk_tokens]
        chunk_low, chunk_high = int(chunk.min()), int(chunk.max())
        low = chunk_low if low is None else min(low, chunk_low)
        high = chunk_high if high is None else max(high, chunk_high)
    if low is None:
        raise DatasetError(f"{data_file_path(dataset.prefix)}: no tokens to scan")
    return low, high


def _cache_path(dataset: IndexedDataset, cache_dir: str) -> str:
    """A name that changes whenever either file is replaced or rewritten."""
    identity = [TOKEN_RANGE_VERSION, os.path.abspath(dataset.prefix)]
    for path in (data_file_path(dataset.prefix), index_file_path(dataset.prefix)):
        st = os.stat(path)
        identity += [st.st_size, st.st_mtime_ns, st.st_ino]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"{os.path.basename(dataset.prefix)}-token-range-{digest}.json")


def _read_cached(path: str, num_tokens: int) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            cached = json.load(f)
        low, high, count = cached["min_token_id"], cached["max_token_id"], cached["num_tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if count != num_tokens or not all(isinstance(v, int) for v in (low, high)):
        return None
    return low, high


def _write_cached(path: str, dataset: IndexedDataset, low: int, high: int) -> None:
    """Best effort: a read-only dataset directory only means the next start scans again."""
    payload = {"prefix": os.path.abspath(dataset.prefix), "num_tokens": dataset.num_tokens,
               "min_token_id": low, "max_token_id": high}  # fmt: skip
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)


def token_range(
    dataset: IndexedDataset,
    cache_dir: str | None = None,
    sidecar: DatasetSidecar | None = None,
    scan: bool = True,
) -> TokenRange | None:
    """The dataset's smallest and largest token id; None when it is empty, or when `scan` is off
    and neither the sidecar nor the cache knows them."""
    if dataset.num_tokens == 0:
        return None
    if sidecar is not None and sidecar.max_token_id is not None and _sidecar_describes(sidecar, dataset):
        return TokenRange(0, sidecar.max_token_id, "sidecar")  # the writer never stores negative ids
    path = _cache_path(dataset, cache_dir or default_cache_dir(dataset.prefix))
    cached = _read_cached(path, dataset.num_tokens)
    if cached is not None:
        return TokenRange(*cached, "cache")
    if not scan:
        return None
    low, high = scan_token_range(dataset)
    _write_cached(path, dataset, low, high)
    return TokenRange(low, high, "scan")


def _sidecar_describes(sidecar: DatasetSidecar, dataset: IndexedDataset) -> bool:
    """Trust a recorded maximum only for the files the sidecar describes (same counts)."""
    return sidecar.output.get("tokens") == dataset.num_tokens and (
        sidecar.output.get("documents") == dataset.num_documents
    )


# ------------------------------------------------------------------------------------------- checks
def _describe_tokenizer(path: str, sha256: str | None, vocab_size: int | None) -> str:
    return f"{path} (sha256 {sha256 or 'not recorded'}, vocabulary {vocab_size or 'not recorded'})"


def check_tokenizer(
    prefix: str, tokenizer: Tokenizer, *, what: str, override: str, allow_mismatch: bool = False
) -> DatasetSidecar | None:
    """Compare the tokenizer recorded in the dataset's sidecar with `tokenizer`.

    Raises `DatasetError` naming both on a different sha256 or vocabulary size, unless
    `allow_mismatch` (then it prints a warning). Returns the sidecar, or None when the dataset has
    none (made by another tool: nothing to compare).
    """
    sidecar = find_sidecar(prefix)
    if sidecar is None:
        return None
    sha, vocab = sidecar.tokenizer_sha256, sidecar.tokenizer_vocab_size
    differs = (sha is not None and sha != tokenizer.sha256) or (
        vocab is not None and vocab != tokenizer.vocab_size
    )
    if not differs:
        return sidecar
    message = (
        f"{what}: dataset {prefix} was tokenized with "
        f"{_describe_tokenizer(sidecar.tokenizer_path, sha, vocab)} according to its sidecar "
        f"{sidecar.path}, but this run uses "
        f"{_describe_tokenizer(tokenizer.path, tokenizer.sha256, tokenizer.vocab_size)}"
    )
    if allow_mismatch:
        print(f"warning: {message} (allowed by {override})", file=sys.stderr, flush=True)
        return sidecar
    raise DatasetError(
        f"{message}. Re-tokenize the data with this tokenizer, or, if both tokenizers give the "
        f"same ids, set {override}"
    )


def check_not_empty(dataset: IndexedDataset, sidecar: DatasetSidecar | None, *, what: str) -> None:
    """An empty dataset that is to provide samples: name it, its sidecar, and what the run kept."""
    if dataset.num_tokens:
        return
    origin = (
        f"its sidecar {sidecar.path} says the run {sidecar.describe_documents()}"
        if sidecar is not None
        else "no preprocessing sidecar lists it"
    )
    raise DatasetError(
        f"{what}: dataset {dataset.prefix} ({data_file_path(dataset.prefix)}, "
        f"{index_file_path(dataset.prefix)}) holds {dataset.num_documents} documents and no tokens; "
        f"{origin}. Rebuild it with tools/preprocess_data.py, or remove it from {what}"
    )


def check_token_ids(
    dataset: IndexedDataset,
    tokenizer: Tokenizer,
    *,
    what: str,
    cache_dir: str | None = None,
    sidecar: DatasetSidecar | None = None,
    scan: bool = True,
) -> TokenRange | None:
    """Every token id must be a real id of `tokenizer`: 0 <= id < tokenizer.vocab_size."""
    found = token_range(dataset, cache_dir, sidecar, scan)
    if found is None:
        return None
    bin_path = data_file_path(dataset.prefix)
    if found.min_id < 0:
        raise DatasetError(
            f"{what}: {bin_path} holds negative token id {found.min_id}; the dataset is corrupt"
        )
    if found.max_id >= tokenizer.vocab_size:
        raise DatasetError(
            f"{what}: {bin_path} holds token id {found.max_id}, but the tokenizer {tokenizer.path} has "
            f"only {tokenizer.vocab_size} ids (0..{tokenizer.vocab_size - 1}); the dataset was "
            "tokenized with another tokenizer: re-tokenize it with this one"
        )
    return found


@dataclass(frozen=True)
class DataUse:
    """One dataset a run will read: the config field naming it and whether it must give samples."""

    prefix: str
    field: str  # e.g. "data.train" or "--valid-data"
    needs_tokens: bool = True


def check_datasets(
    uses: Sequence[DataUse],
    tokenizer: Tokenizer,
    *,
    override: str,
    allow_tokenizer_mismatch: bool = False,
    cache_dir: str | None = None,
    scan: bool = True,
) -> None:
    """Every check above, on every dataset of `uses` (each prefix once), before anything starts."""
    seen: set[str] = set()
    for use in uses:
        if use.prefix in seen:
            continue
        seen.add(use.prefix)
        if not dataset_exists(use.prefix):
            raise DatasetError(
                f"{use.field}: dataset {use.prefix!r} not found ({use.prefix}.bin and {use.prefix}.idx); "
                "create it with tools/preprocess_data.py"
            )
        sidecar = check_tokenizer(
            use.prefix, tokenizer, what=use.field, override=override, allow_mismatch=allow_tokenizer_mismatch
        )
        dataset = IndexedDataset(use.prefix)
        if use.needs_tokens:
            check_not_empty(dataset, sidecar, what=use.field)
        check_token_ids(dataset, tokenizer, what=use.field, cache_dir=cache_dir, sidecar=sidecar, scan=scan)
