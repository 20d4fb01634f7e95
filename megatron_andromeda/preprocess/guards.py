"""Guards that keep a preprocessing run from destroying data or passing off an empty result.

- `planned_outputs`: every path a run may create, replace or remove (datasets, digests, sidecar and
  their temporaries). `check_inputs_untouched` refuses a run where one of them is an input, before
  anything is written or removed. (`readers.expand_inputs` leaves the sidecars and dataset files of
  runs out of glob matches, so a rerun's glob does not pick up what the last run wrote.)
- `nothing_kept_message`: a run that keeps no document fails, naming the keys its records do have
  (the usual cause is a `--json-keys` that no record carries).
- `empty_split_warnings`: a split that received no document is written, but said aloud.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_andromeda.data.indexed_dataset import data_file_path, index_file_path
from megatron_andromeda.preprocess.dedup import digests_path
from megatron_andromeda.preprocess.readers import InputError, InputFile, open_records

if TYPE_CHECKING:
    from megatron_andromeda.preprocess.pipeline import PreprocessConfig
    from megatron_andromeda.preprocess.report import DropLog

KEY_SAMPLE_RECORDS = 200  # records read (per file, at most 3 files) to list the keys they carry


def planned_outputs(config: PreprocessConfig) -> dict[str, str]:
    """Every path the run may write or remove -> what it is."""
    sidecar = config.sidecar_path()
    paths = {sidecar: "its sidecar", f"{sidecar}.tmp": "its sidecar's temporary file"}
    for split in config.split_names:
        for key in config.json_keys:
            prefix = config.dataset_prefix(split, key)
            for path in (data_file_path(prefix), index_file_path(prefix), digests_path(prefix)):
                paths[path] = f"dataset file of {prefix}"
                paths[f"{path}.tmp"] = f"temporary file of {prefix}"
    return paths


def check_inputs_untouched(config: PreprocessConfig, files: Sequence[InputFile]) -> None:
    """Refuse an --output-prefix whose outputs would overwrite or delete an input (or land inside a
    saved-dataset directory that is one), naming both; nothing has been written or removed yet."""
    outputs = {os.path.realpath(path): (path, what) for path, what in planned_outputs(config).items()}
    for spec in files:
        real = os.path.realpath(spec.path)
        clash = outputs.get(real)
        if clash is None and os.path.isdir(real):
            clash = next((v for k, v in outputs.items() if k.startswith(real + os.sep)), None)
        if clash is not None:
            path, what = clash
            raise InputError(
                f"--output-prefix {config.output_prefix}: the run would write {path} ({what}), which "
                f"would overwrite or delete --input {spec.path}; choose another --output-prefix "
                "(nothing was written or removed)"
            )


def _jsonl_keys(spec: InputFile, limit: int) -> Counter:
    keys: Counter = Counter()
    lines = open_records(spec)
    try:
        for line in itertools.islice(lines, limit):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                keys.update(record.keys())
    except Exception:  # an unreadable file only loses the hint; the run reports it itself
        pass
    finally:
        lines.close()
    return keys


def _column_keys(spec: InputFile) -> Counter:
    try:
        if spec.kind == "parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(spec.path).schema_arrow.names
        else:
            import datasets

            names = datasets.load_from_disk(spec.path).column_names
    except Exception:  # any failure here only loses the hint, never the run's own error
        return Counter()
    return Counter(names if isinstance(names, list) else [])


def record_keys(files: Sequence[InputFile], limit: int = KEY_SAMPLE_RECORDS) -> list[str]:
    """The keys the first records of the first few inputs carry, most common first."""
    keys: Counter = Counter()
    for spec in files[:3]:
        keys += _jsonl_keys(spec, limit) if spec.kind == "jsonl" else _column_keys(spec)
    return [key for key, _ in keys.most_common()]


def nothing_kept_message(
    config: PreprocessConfig, files: Sequence[InputFile], read: int, drops: DropLog
) -> str:
    """Why a run that kept no document fails: what was dropped, and the keys the records have."""
    names = ", ".join(spec.path for spec in files[:3]) + (", ..." if len(files) > 3 else "")
    if read == 0:
        return f"the inputs ({names}) hold no records; nothing was written"
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in drops.counts.most_common())
    message = f"kept none of the {read:,} records of {names} (dropped: {reasons}); nothing was written"
    if drops.counts.get("missing_key"):
        found = record_keys(files)
        have = f"the records have the keys {found}" if found else "no readable record has any key"
        message += f". --json-keys {' '.join(config.json_keys)}: {have}; pass the key that holds the text"
    else:
        message += "; see the drop reasons and the cleaning / dedup options in --help"
    return message


def empty_split_warnings(report: dict, split_spec: str | None = None) -> list[str]:
    """One warning per output dataset that received no document (e.g. a small test split)."""
    kept = report["documents"]["kept"]
    spec = f" (--split {split_spec})" if split_spec else ""
    return [
        f"warning: {out['prefix']} is empty: the {name.split('/')[0]} split received none of the "
        f"{kept:,} kept documents{spec}; training and evaluation refuse an empty dataset"
        for name, out in report["outputs"].items()
        if out["documents"] == 0
    ]
