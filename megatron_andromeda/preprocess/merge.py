"""Merge preprocessing runs (or plain datasets) into one: how a corpus preprocessed on many machines
becomes one dataset per split.

Each machine runs `tools/preprocess_data.py` on its own share of the input files; since the split
is decided per document by hash, every run puts a document where a single run over all the files
would have put it. `merge_runs` then concatenates, per split and key, the runs' datasets in the
order given and writes a sidecar whose counts are the sums, so that merging the runs of files A and
B gives byte for byte what one run over A then B writes (deduplication aside: each run removes
duplicates within its own inputs only, which the merged sidecar states).

Everything is written atomically: the datasets through `IndexedDatasetWriter` (temporary names,
renamed at the end), the sidecar last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from megatron_andromeda.data.indexed_dataset import DatasetError, IndexedDataset, IndexedDatasetWriter
from megatron_andromeda.preprocess.report import write_json_atomic

# Sidecar fields that must agree between runs for their datasets to be one dataset.
MUST_AGREE = ("version", "tokenizer.sha256", "tokenizer.vocab_size", "tokenizer.eod_id", "dtype")
OPTIONS_MUST_AGREE = ("json_keys", "split", "append_eod")


def read_sidecar(run_prefix: str) -> dict:
    path = f"{run_prefix}.json"
    if not os.path.isfile(path):
        raise DatasetError(
            f"{path}: no preprocessing sidecar; give the --output-prefix of each "
            "tools/preprocess_data.py run (or use --datasets to merge plain .bin/.idx datasets)"
        )
    with open(path) as f:
        return json.load(f)


def _field(sidecar: dict, dotted: str):
    value = sidecar
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def check_compatible(run_prefixes: Sequence[str], sidecars: Sequence[dict]) -> None:
    """Every run must use the same tokenizer, dtype, keys, split and EOD setting as the first."""
    first = sidecars[0]
    fields = [*MUST_AGREE, *(f"options.{name}" for name in OPTIONS_MUST_AGREE)]
    for prefix, sidecar in zip(run_prefixes[1:], sidecars[1:]):
        for name in fields:
            if _field(sidecar, name) != _field(first, name):
                raise DatasetError(
                    f"{prefix}.json: {name} is {_field(sidecar, name)!r} but {run_prefixes[0]}.json has "
                    f"{_field(first, name)!r}; only runs made with the same settings can be merged"
                )


def _suffix(run_prefix: str, dataset_prefix: str) -> str:
    """'/a/web_train_text_document' of run '/a/web' -> '_train_text_document'."""
    if not dataset_prefix.startswith(run_prefix):
        raise DatasetError(f"{run_prefix}.json: output {dataset_prefix} is not under the run's prefix")
    return dataset_prefix[len(run_prefix) :]


def merge_runs(run_prefixes: Sequence[str], output_prefix: str) -> dict:
    """Concatenate the runs' datasets per split and key; returns (and writes) the merged sidecar."""
    if not run_prefixes:
        raise ValueError("merge_runs: no runs given")
    run_prefixes = [os.fspath(p) for p in run_prefixes]
    sidecars = [read_sidecar(p) for p in run_prefixes]
    check_compatible(run_prefixes, sidecars)
    names = list(sidecars[0]["outputs"])
    for prefix, sidecar in zip(run_prefixes[1:], sidecars[1:]):
        if list(sidecar["outputs"]) != names:
            raise DatasetError(f"{prefix}.json: outputs {list(sidecar['outputs'])} differ from {names}")
    outputs = {}
    for name in names:
        suffix = _suffix(run_prefixes[0], sidecars[0]["outputs"][name]["prefix"])
        parts = [s["outputs"][name]["prefix"] for s in sidecars]
        merged = merge_datasets(parts, output_prefix + suffix)
        outputs[name] = {"prefix": output_prefix + suffix, "documents": merged.num_documents,
                         "tokens": merged.num_tokens}  # fmt: skip
    sidecar = _merged_sidecar(run_prefixes, sidecars, outputs)
    write_json_atomic(f"{output_prefix}.json", sidecar)
    return sidecar


def merge_datasets(prefixes: Sequence[str | os.PathLike], output_prefix: str) -> IndexedDataset:
    """One `.bin`/`.idx` holding every document of `prefixes`, in order (all of one dtype)."""
    if not prefixes:
        raise ValueError("merge_datasets: no datasets given")
    first = IndexedDataset(prefixes[0])
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(os.fspath(p)) == out for p in prefixes):
        raise DatasetError(f"{output_prefix}: the output would overwrite one of the inputs")
    with IndexedDatasetWriter(output_prefix, dtype=first.dtype) as writer:
        for prefix in prefixes:
            writer.add_dataset(prefix)
    return IndexedDataset(output_prefix)


def _merged_sidecar(run_prefixes: Sequence[str], sidecars: Sequence[dict], outputs: dict) -> dict:
    first = sidecars[0]
    documents = {key: sum(s["documents"][key] for s in sidecars) for key in first["documents"]}
    dropped: dict[str, dict] = {}
    max_samples = int(first["options"].get("max_samples", 10))
    for sidecar in sidecars:
        for reason, item in sidecar["dropped"].items():
            entry = dropped.setdefault(reason, {"count": 0, "samples": []})
            entry["count"] += item["count"]
            entry["samples"] = (entry["samples"] + item["samples"])[:max_samples]
    options = {**first["options"], "inputs": [i for s in sidecars for i in s["options"]["inputs"]]}
    return json.loads(json.dumps({
        "version": first["version"],
        "tokenizer": first["tokenizer"],
        "dtype": first["dtype"],
        "documents": documents,
        "dropped": dropped,
        "outputs": outputs,
        "tokens": sum(o["tokens"] for o in outputs.values()),
        "inputs": [i for s in sidecars for i in s["inputs"]],
        "options": options,
        "merged_from": [
            {"prefix": os.path.abspath(p), "documents": s["documents"], "tokens": s["tokens"]}
            for p, s in zip(run_prefixes, sidecars)
        ],
        # Each run removed duplicates among its own inputs; none were looked for across runs.
        "dedup_scope": "per run" if len(sidecars) > 1 else "run",
        "seconds": round(sum(s.get("seconds", 0.0) for s in sidecars), 3),
    }))  # fmt: skip
