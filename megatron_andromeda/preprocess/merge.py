"""Merge preprocessing runs (or plain datasets) into one: how a corpus preprocessed on many machines
becomes one dataset per split.

Each machine runs `tools/preprocess_data.py` on its own share of the input files; since the split
is decided per document by hash, every run puts a document where a single run over all the files
would have put it. `merge_runs` then concatenates, per split and key, the runs' datasets in the
order given and writes a sidecar whose counts are the sums. Runs made with exact dedup keep each
written document's digest (`PREFIX_..._document.digests`), so the merge also drops a document that
an earlier run already holds: merging the runs of files A and B then gives byte for byte what one
run over A then B writes. Near-duplicates (MinHash) are removed within each run only, unless the runs
applied the drop lists of one near-dup run (`tools/neardup.py`, `--near-dup-dir`), which span all of
its inputs; the merged sidecar's `dedup_scope` says which.

Everything is written atomically: the datasets through `IndexedDatasetWriter` (temporary names,
renamed at the end), the sidecar last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_andromeda.data.indexed_dataset import DatasetError, IndexedDataset, IndexedDatasetWriter
from megatron_andromeda.preprocess.dedup import read_digests, write_digests
from megatron_andromeda.preprocess.report import write_json_atomic

# Sidecar fields that must agree between runs for their datasets to be one dataset.
MUST_AGREE = ("version", "tokenizer.sha256", "tokenizer.vocab_size", "tokenizer.eod_id", "dtype")
# A near-dup run's drop lists span its inputs: runs that applied different ones (or none) are refused.
OPTIONS_MUST_AGREE = ("json_keys", "split", "append_eod", "near_dup.run_id")


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
    """Concatenate the runs' datasets per split and key; returns (and writes) the merged sidecar.

    When every run kept its exact-dedup digests, a document whose digest an earlier run (in the
    order given) already holds is dropped, as one run over all the files would have dropped it.
    """
    if not run_prefixes:
        raise ValueError("merge_runs: no runs given")
    run_prefixes = [os.fspath(p) for p in run_prefixes]
    sidecars = [read_sidecar(p) for p in run_prefixes]
    check_compatible(run_prefixes, sidecars)
    names = list(sidecars[0]["outputs"])
    for prefix, sidecar in zip(run_prefixes[1:], sidecars[1:]):
        if list(sidecar["outputs"]) != names:
            raise DatasetError(f"{prefix}.json: outputs {list(sidecar['outputs'])} differ from {names}")
    dedup = cross_run_dedup(sidecars, names)
    outputs = {}
    for name in names:
        out_prefix = output_prefix + _suffix(run_prefixes[0], sidecars[0]["outputs"][name]["prefix"])
        parts = [s["outputs"][name]["prefix"] for s in sidecars]
        split = _split_of(name)
        masks = None if dedup is None else [run[split] for run in dedup.keep]
        merged = merge_datasets(parts, out_prefix, masks)
        outputs[name] = {"prefix": out_prefix, "documents": merged.num_documents, "tokens": merged.num_tokens}
        if dedup is not None:
            outputs[name]["digests"] = write_digests(out_prefix, [dedup.digests[split].tobytes()])
    sidecar = _merged_sidecar(run_prefixes, sidecars, outputs, None if dedup is None else dedup.keep)
    write_json_atomic(f"{output_prefix}.json", sidecar)
    return sidecar


def _split_of(output_name: str) -> str:
    """'train/text' -> 'train': the keys of a split share their documents, and so dedup decisions."""
    return output_name.split("/")[0]


@dataclass
class CrossRunDedup:
    keep: list[dict[str, np.ndarray]]  # per run: split -> bool mask over that run's documents
    digests: dict[str, np.ndarray]  # split -> digests of the kept documents, runs in order


def cross_run_dedup(sidecars: Sequence[dict], names: Sequence[str]) -> CrossRunDedup | None:
    """Which documents survive exact dedup across runs; None unless every run kept its digests.

    Each run is free of exact duplicates already, so the first occurrence of a digest in run order
    (all of a run's splits before the next run) is the one a single run would have kept.
    """
    if not all("digests" in s["outputs"][n] for s in sidecars for n in names):
        return None
    deciding: dict[str, str] = {}  # split -> the output whose digests decide it
    for name in names:
        deciding.setdefault(_split_of(name), name)
    blocks = [
        {split: read_digests(s["outputs"][name]["digests"]) for split, name in deciding.items()}
        for s in sidecars
    ]
    flat = [block for run in blocks for block in run.values()]
    keep = np.zeros(sum(block.size for block in flat), dtype=bool)
    keep[np.unique(np.concatenate(flat), return_index=True)[1]] = True
    pieces = iter(np.split(keep, np.cumsum([block.size for block in flat])[:-1]))
    masks = [{split: next(pieces) for split in run} for run in blocks]
    digests = {
        split: np.concatenate([run[split][mask[split]] for run, mask in zip(blocks, masks)])
        for split in deciding
    }
    return CrossRunDedup(masks, digests)


def merge_datasets(
    prefixes: Sequence[str | os.PathLike], output_prefix: str, keeps: Sequence[np.ndarray] | None = None
) -> IndexedDataset:
    """One `.bin`/`.idx` holding the documents of `prefixes` in order (all of one dtype): every
    document, or those set in `keeps` (one bool mask per dataset)."""
    if not prefixes:
        raise ValueError("merge_datasets: no datasets given")
    first = IndexedDataset(prefixes[0])
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(os.fspath(p)) == out for p in prefixes):
        raise DatasetError(f"{output_prefix}: the output would overwrite one of the inputs")
    with IndexedDatasetWriter(output_prefix, dtype=first.dtype) as writer:
        for i, prefix in enumerate(prefixes):
            writer.add_dataset(prefix, None if keeps is None else keeps[i])
    return IndexedDataset(output_prefix)


def _merged_sidecar(
    run_prefixes: Sequence[str], sidecars: Sequence[dict], outputs: dict, keeps: list[dict] | None
) -> dict:
    first = sidecars[0]
    documents = {key: sum(s["documents"][key] for s in sidecars) for key in first["documents"]}
    dropped: dict[str, dict] = {}
    max_samples = int(first["options"].get("max_samples", 10))
    for sidecar in sidecars:
        for reason, item in sidecar["dropped"].items():
            entry = dropped.setdefault(reason, {"count": 0, "samples": []})
            entry["count"] += item["count"]
            entry["samples"] = (entry["samples"] + item["samples"])[:max_samples]
    if keeps is not None:
        _count_cross_run_duplicates(run_prefixes, keeps, documents, dropped, max_samples)
    options = {**first["options"], "inputs": [i for s in sidecars for i in s["options"]["inputs"]]}
    scope = _dedup_scope(first["options"], keeps is not None, len(sidecars))
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
        "dedup_scope": scope,
        "seconds": round(sum(s.get("seconds", 0.0) for s in sidecars), 3),
    }))  # fmt: skip


def _dedup_scope(options: dict, exact_across: bool, runs: int) -> str:
    near_dup = options.get("near_dup")
    near = f"near: across near-dup run {near_dup['run_id']}" if near_dup else None
    if not exact_across:
        exact = "per run" if runs > 1 else "run"
        return f"{exact}; {near}" if near else exact
    return "exact: across runs" + (
        f"; {near}" if near else "; near: per run" if options.get("minhash") else ""
    )


def _count_cross_run_duplicates(
    run_prefixes: Sequence[str], keeps: list[dict], documents: dict, dropped: dict, max_samples: int
) -> None:
    """Move the documents dropped as duplicates of an earlier run from `kept` to `dropped`."""
    entry = dropped.setdefault("exact_duplicate", {"count": 0, "samples": []})
    for prefix, masks in zip(run_prefixes, keeps):
        for split, mask in masks.items():
            duplicates = np.flatnonzero(~mask)
            entry["count"] += int(duplicates.size)
            documents["kept"] -= int(duplicates.size)
            documents["dropped"] += int(duplicates.size)
            room = max_samples - len(entry["samples"])
            entry["samples"] += [f"{prefix}: {split} document {i} (across runs)" for i in duplicates[:room]]
    if not entry["count"]:
        del dropped["exact_duplicate"]
