"""Finding and reading the JSON sidecar that `tools/preprocess_data.py` writes beside its datasets.

A run with `--output-prefix out/web` writes `out/web.json` and datasets named
`out/web_[SPLIT_]KEY_document`. The sidecar records the tokenizer (sha256, vocabulary size, EOD id)
and, per dataset, its documents and tokens: what training, evaluation and validation compare against
before using the data. Sidecars are read as untrusted input: only a regular file of bounded size
holding a JSON object with the expected fields counts, and a dataset's sidecar must list it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

MAX_SIDECAR_BYTES = 64 << 20  # sidecars are kilobytes; a bigger file is some other JSON
DATASET_SUFFIX = "_document"


def read_sidecar_file(path: str | os.PathLike) -> dict | None:
    """The sidecar at `path`, or None when it is not one (missing, too big, not our JSON).

    Cheap on corpus files: a sidecar is indented JSON, so its first line is a lone "{" (a JSONL
    record never is) and nothing else is parsed.
    """
    path = os.fspath(path)
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_SIDECAR_BYTES:
            return None
        with open(path, "rb") as f:
            if f.readline(8).strip() != b"{":
                return None
            f.seek(0)
            payload = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(payload, dict) or "version" not in payload:
        return None
    if not isinstance(payload.get("tokenizer"), dict) or not isinstance(payload.get("outputs"), dict):
        return None
    return payload


@dataclass(frozen=True)
class DatasetSidecar:
    """A dataset's sidecar and the dataset's own entry in it."""

    path: str
    payload: dict
    output: dict  # {"prefix", "documents", "tokens", ...} of this dataset

    @property
    def tokenizer_sha256(self) -> str | None:
        return _str_or_none(self.payload["tokenizer"].get("sha256"))

    @property
    def tokenizer_vocab_size(self) -> int | None:
        return _int_or_none(self.payload["tokenizer"].get("vocab_size"))

    @property
    def tokenizer_path(self) -> str:
        return str(self.payload["tokenizer"].get("path", "?"))

    @property
    def max_token_id(self) -> int | None:
        """The largest token id of the dataset, when the run recorded it."""
        return _int_or_none(self.output.get("max_token_id"))

    def describe_documents(self) -> str:
        """'read 440 documents, kept 0 (dropped: missing_key 440)', from the run's counts."""
        docs = self.payload.get("documents")
        if not isinstance(docs, dict):
            return "no document counts"
        dropped = self.payload.get("dropped")
        reasons = ""
        if isinstance(dropped, dict) and dropped:
            items = [f"{r} {v.get('count', '?')}" for r, v in dropped.items() if isinstance(v, dict)]
            reasons = f" (dropped: {', '.join(items)})"
        return f"read {docs.get('read', '?')} documents, kept {docs.get('kept', '?')}{reasons}"


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def sidecar_candidates(prefix: str | os.PathLike) -> list[str]:
    """Where the sidecar of dataset `prefix` may be: 'out/web_train_text_document' ->
    out/web_train_text.json, out/web_train.json, out/web.json (longest run prefix first)."""
    directory, name = os.path.split(os.fspath(prefix))
    parts = name.split("_")
    return [os.path.join(directory, "_".join(parts[:i]) + ".json") for i in range(len(parts) - 1, 0, -1)]


def find_sidecar(prefix: str | os.PathLike) -> DatasetSidecar | None:
    """The sidecar that lists dataset `prefix` among its outputs, or None (a dataset made another way)."""
    name = os.path.basename(os.fspath(prefix))
    if not name.endswith(DATASET_SUFFIX):
        return None
    for path in sidecar_candidates(prefix):
        payload = read_sidecar_file(path)
        if payload is None:
            continue
        for output in payload["outputs"].values():
            if isinstance(output, dict) and os.path.basename(str(output.get("prefix", ""))) == name:
                return DatasetSidecar(path, payload, output)
    return None
