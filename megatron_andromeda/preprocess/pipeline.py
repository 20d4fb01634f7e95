"""The streaming preprocessing run: inputs -> worker pool -> dedup decisions -> `.bin`/`.idx` + sidecar.

The main process reads bounded chunks, keeps at most `2 x workers + 2` of them in flight, and
consumes results strictly in input order, so the output is identical for any number of workers and
memory stays bounded whatever the input size (the dedup state grows with the number of kept
documents: 16 bytes plus one LSH key per band each). Outputs are written under temporary names and
renamed only after every dataset is complete; the sidecar, written last, marks a finished run.
A rerun into the same prefix leaves the earlier run's outputs alone until its own are complete, never
writes over an input (guards.py), and fails when it kept no document.
"""

from __future__ import annotations

import collections
import itertools
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_andromeda.data.indexed_dataset import IndexedDatasetWriter, data_file_path, index_file_path
from megatron_andromeda.data.tokenizer import TOKENIZER_BACKENDS, Tokenizer, load_tokenizer
from megatron_andromeda.preprocess.cleaning import CleaningConfig
from megatron_andromeda.preprocess.dedup import (
    LSHIndex,
    MinHasher,
    SeenDigests,
    digests_path,
    write_digests,
)
from megatron_andromeda.preprocess.guards import check_inputs_untouched, nothing_kept_message
from megatron_andromeda.preprocess.neardup.apply import NearDupDrops
from megatron_andromeda.preprocess.processor import (
    ChunkProcessor,
    ChunkResult,
    PreparedChunk,
    ProcessorSettings,
    init_worker,
    process_in_worker,
)
from megatron_andromeda.preprocess.readers import (
    InputError,
    InputFile,
    RawChunk,
    decode_chunk,
    expand_inputs,
    read_chunks,
)
from megatron_andromeda.preprocess.report import (
    SIDECAR_VERSION,
    DropLog,
    InputHasher,
    malformed_total,
    write_json_atomic,
)
from megatron_andromeda.preprocess.split import SPLIT_NAMES


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything a run needs; validated on construction."""

    inputs: tuple[str, ...]
    output_prefix: str
    tokenizer: str
    json_keys: tuple[str, ...] = ("text",)
    tokenizer_backend: str = "auto"  # see megatron_andromeda.data.tokenizer.TOKENIZER_BACKENDS
    workers: int | None = None  # worker processes; 0: the main process; None: see plan_execution
    threads_per_worker: int | None = None  # tokenizer threads per process; None: see plan_execution
    split: tuple[float, float, float] | None = (0.98, 0.01, 0.01)  # None: one dataset, no split name
    append_eod: bool = False
    cleaning: CleaningConfig | None = field(default_factory=CleaningConfig)
    clean_profile: str = "prose"  # the profile `cleaning` started from (recorded in the sidecar)
    exact_dedup: bool = True
    minhash: MinHasher | None = field(default_factory=MinHasher)
    chunk_bytes: int | None = None  # JSONL bytes per chunk; None: see plan_execution
    chunk_rows: int = 256
    max_samples: int = 10
    log_every_s: float = 30.0
    near_dup_dir: str | None = None  # apply the drop lists of this finished tools/neardup.py run

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("--input: give at least one file or glob")
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError(f"--json-keys {list(self.json_keys)}: need one or more distinct keys")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers {self.workers}: must be >= 0 (0 runs in the main process)")
        if self.tokenizer_backend not in TOKENIZER_BACKENDS:
            choices = ", ".join(TOKENIZER_BACKENDS)
            raise ValueError(f"--tokenizer-backend {self.tokenizer_backend!r}: choose one of {choices}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"--threads-per-worker {self.threads_per_worker}: must be >= 1")
        if (self.chunk_bytes is not None and self.chunk_bytes < 1) or self.chunk_rows < 1:
            raise ValueError("chunk_bytes and chunk_rows must be positive")
        if self.split is not None and (len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6):
            raise ValueError(
                f"split weights {self.split}: need three fractions summing to 1 (see parse_split)"
            )
        if self.near_dup_dir is not None and self.minhash is not None:
            raise ValueError(
                "--near-dup-dir removes near-duplicates across every input of the near-dup run; switch the "
                "in-process MinHash off (--no-near-dedup) rather than deduplicating twice"
            )
        if not os.path.basename(self.output_prefix):
            raise ValueError(
                f"--output-prefix {self.output_prefix!r}: needs a file name part, e.g. out/corpus"
            )

    @property
    def split_names(self) -> list[str | None]:
        """Names of the output splits; [None] when the run is not split (or only one split is non-empty)."""
        if self.split is None or sum(w > 0 for w in self.split) == 1:
            return [None]
        return [name for name, weight in zip(SPLIT_NAMES, self.split) if weight > 0]

    def dataset_prefix(self, split: str | None, key: str) -> str:
        """Megatron naming: PREFIX_[SPLIT_]KEY_document."""
        middle = f"{split}_{key}" if split else key
        return f"{self.output_prefix}_{middle}_document"

    def sidecar_path(self) -> str:
        return f"{self.output_prefix}.json"


class _Outputs:
    """One writer per (split, key); finalised together, or all removed on failure."""

    def __init__(self, config: PreprocessConfig, dtype: np.dtype) -> None:
        self.config = config
        self.splits = config.split_names
        self.writers: dict[tuple[int, int], IndexedDatasetWriter] = {}
        self.documents = collections.Counter()
        self.tokens = collections.Counter()
        self.max_ids: dict[tuple[int, int], int] = {}
        # Exact-dedup digests of the written documents, per dataset, for cross-run dedup at merge time.
        self.digests: dict[tuple[int, int], list[bytes]] | None = {} if config.exact_dedup else None
        self.digest_files: dict[tuple[int, int], str] = {}
        self._finalized: list[str] = []
        split_index = {name: SPLIT_NAMES.index(name) if name else 0 for name in self.splits}
        for name in self.splits:
            for k, key in enumerate(config.json_keys):
                prefix = config.dataset_prefix(name, key)
                self.writers[(split_index[name], k)] = IndexedDatasetWriter(prefix, dtype)

    def add(self, result: ChunkResult, keep: np.ndarray) -> None:
        """Append the kept candidates of a chunk to their split's datasets, in input order."""
        for (split, k), writer in self.writers.items():
            chosen = keep & (result.splits == split) if len(self.splits) > 1 else keep
            count = int(np.count_nonzero(chosen))
            if not count:
                continue
            tokens, lengths = result.tokens[k], result.lengths[k]
            if count < chosen.size:  # (K,) documents -> (N,) tokens
                tokens, lengths = tokens[np.repeat(chosen, lengths)], lengths[chosen]
            writer.add_flat_documents(tokens, lengths)
            self._note_max_id((split, k), tokens)
            self.documents[(split, k)] += count
            self.tokens[(split, k)] += int(lengths.sum())
            if self.digests is not None:
                chunk_digests = b"".join(result.digests[i] for i in np.flatnonzero(chosen))
                self.digests.setdefault((split, k), []).append(chunk_digests)

    def _note_max_id(self, where: tuple[int, int], flat: np.ndarray) -> None:
        """Largest token id per dataset, for the sidecar: training checks it against the tokenizer
        without scanning the .bin."""
        if flat.size:
            top = int(flat.max())
            self.max_ids[where] = max(self.max_ids.get(where, top), top)

    def finalize(self) -> None:
        for where, writer in self.writers.items():
            writer.finalize()
            self._finalized.append(writer.prefix)
            if self.digests is not None:
                self.digest_files[where] = write_digests(writer.prefix, self.digests.get(where, []))

    def abort(self) -> None:
        """Remove temporaries, and any dataset of this run already renamed into place."""
        for writer in self.writers.values():
            writer.abort()
        for prefix in self._finalized:
            for path in (data_file_path(prefix), index_file_path(prefix), digests_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)

    def summary(self) -> dict[str, dict]:
        out = {}
        for (split, k), writer in self.writers.items():
            name = f"{SPLIT_NAMES[split] if len(self.splits) > 1 else 'all'}/{self.config.json_keys[k]}"
            out[name] = {
                "prefix": writer.prefix,
                "documents": self.documents[(split, k)],
                "tokens": self.tokens[(split, k)],
                "max_token_id": self.max_ids.get((split, k)),
            }
            if (split, k) in self.digest_files:
                out[name]["digests"] = self.digest_files[(split, k)]
        return out


def _available_cores() -> int:
    """Cores this process may run on (respects CPU affinity / container limits where visible)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ExecutionPlan:
    """How a run uses the machine: worker processes, tokenizer threads per process, chunk size."""

    processes: int  # 0: the main process, reading ahead on `prepare_threads` while the tokenizer encodes
    threads: int  # tokenizer threads per process (1: encode on the calling thread)
    reason: str
    chunk_bytes: int = 1 << 20  # JSONL bytes per chunk
    prepare_threads: int = 1  # processes == 0: threads reading and decoding ahead of the tokenizer

    def describe(self) -> str:
        where = f"{self.processes} worker processes" if self.processes else "the main process"
        threads = f"{self.threads} tokenizer thread{'s' * (self.threads > 1)} each"
        return f"{where}, {threads}, {self.chunk_bytes / 2**20:g} MB chunks ({self.reason})"


def plan_execution(config: PreprocessConfig, backend: str, cores: int) -> ExecutionPlan:
    """Worker processes and tokenizer threads; explicit --workers / --threads-per-worker win.

    The default follows where the time goes. Cleaning and dedup are Python per document and hold
    the GIL, so they need processes: one per core, each encoding on its own thread (a tokenizer
    pool per process would oversubscribe the cores). Without them, gigatoken is the work: it
    encodes in the main process on a pool of all cores with the GIL released, while threads read
    and decode the next chunks (C++, GIL released too); worker processes would only add pickling
    and a tokenizer load each. The `tokenizers`
    library hands back a Python list per document, which costs about as much as its encoding, so
    it keeps one process per core too.
    """
    per_document_python = config.cleaning is not None or config.exact_dedup or config.minhash is not None
    if config.workers is not None:
        processes, why = config.workers, "--workers"
        threads = config.threads_per_worker or max(1, cores // max(1, processes))
    elif backend == "gigatoken" and not per_document_python:
        processes, threads, why = 0, config.threads_per_worker or cores, "gigatoken, no cleaning or dedup"
    else:
        processes = cores if cores > 1 else 0
        threads = config.threads_per_worker or max(1, cores // max(1, processes))
        why = "cleaning or dedup" if per_document_python else f"{backend} returns Python lists"
    # One pool call per chunk: the in-process gigatoken path wants few, large calls (each ends in a
    # wait for the slowest thread); worker processes want chunks small enough to share out evenly.
    big = processes == 0 and backend == "gigatoken" and threads > 1
    chunk_bytes = config.chunk_bytes or (4 << 20 if big else 1 << 20)
    # gigatoken encodes ~100 MB/s per core, one thread decodes JSONL at ~1 GB/s: one decoding thread
    # per 8 cores keeps the pool fed (up to 4: the reads before them are one at a time anyway).
    prepare_threads = min(4, max(1, cores // 8)) if processes == 0 else 1
    return ExecutionPlan(processes, threads, why, chunk_bytes, prepare_threads)


def _results(
    config: PreprocessConfig, plan: ExecutionPlan, processor: ChunkProcessor, files: list[InputFile]
) -> Iterator[ChunkResult]:
    """Processed chunks in input order, from a bounded window of in-flight work."""
    chunks = read_chunks(files, config.json_keys, plan.chunk_bytes, config.chunk_rows)
    if plan.processes == 0:
        yield from _in_process_results(processor, chunks, plan.prepare_threads, 2 * plan.prepare_threads + 2)
        return
    ctx = multiprocessing.get_context("spawn")  # no forked tokenizer thread pools
    with ctx.Pool(plan.processes, initializer=init_worker, initargs=(processor.settings,)) as pool:
        pending: collections.deque = collections.deque()
        window = 2 * plan.processes + 2
        for chunk in chunks:
            pending.append(pool.apply_async(process_in_worker, (chunk,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _in_process_results(
    processor: ChunkProcessor, chunks: Iterator[RawChunk], threads: int, window: int
) -> Iterator[ChunkResult]:
    """Read and prepare (decode, clean, hash) up to `window` chunks ahead on `threads` threads while
    this thread tokenizes and the caller writes: the tokenizer and the C++ decoder release the GIL,
    so reading, decoding and encoding overlap and the tokenizer's pool never waits for a read.
    Reads are one at a time, in order; results come back in input order whatever thread made them."""
    lock, counter = threading.Lock(), itertools.count()

    def read_and_prepare() -> tuple[int, PreparedChunk | None]:
        with lock:
            seq, chunk = next(counter), next(chunks, None)
        return seq, None if chunk is None else processor.prepare(chunk)

    done: dict[int, PreparedChunk | None] = {}
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="preprocess-prepare") as pool:
            pending = collections.deque(pool.submit(read_and_prepare) for _ in range(window))
            try:
                for expected in itertools.count():
                    while expected not in done:
                        seq, prepared = pending.popleft().result()
                        done[seq] = prepared
                        pending.append(pool.submit(read_and_prepare))
                    prepared = done.pop(expected)
                    if prepared is None:
                        break
                    yield processor.tokenize(prepared)
            finally:
                for future in pending:
                    future.cancel()
    finally:
        chunks.close()  # once the pool's threads are done with it: closes the open input file


def identity_samples(
    files: list[InputFile], config: PreprocessConfig, limit: int = 256, max_chars: int = 1 << 18
) -> list[tuple[str, str]]:
    """(label, text) of the first records of the first input, for the tokenizer identity check."""
    chunks = read_chunks(files[:1], config.json_keys, config.chunk_bytes or 1 << 20, config.chunk_rows)
    try:
        chunk = next(chunks, None)
    finally:
        chunks.close()
    if chunk is None:
        return []
    decoded = decode_chunk(chunk, config.json_keys, json.loads)
    samples, chars = [], 0
    for texts, line in zip(decoded.texts, decoded.lines):
        for key, text in zip(config.json_keys, texts):
            samples.append((f"{files[0].path}:{line} ({key!r})", text))
            chars += len(text)
        if len(samples) >= limit or chars >= max_chars:
            break
    return samples


class _Deduplicator:
    """Input-order duplicate decisions over the whole run; a near-dup run's drop lists come first."""

    def __init__(self, config: PreprocessConfig, near_dup: NearDupDrops | None = None) -> None:
        self.exact = SeenDigests() if config.exact_dedup else None
        self.near = LSHIndex(config.minhash.bands[0]) if config.minhash is not None else None
        self.near_dup = near_dup

    def keep_mask(self, result: ChunkResult, drops: DropLog, path: str) -> np.ndarray:
        keep = np.ones(result.num_candidates, dtype=bool)
        if self.exact is None and self.near is None and self.near_dup is None:
            return keep
        listed = np.zeros_like(keep)  # on a near-dup run's drop list
        if self.near_dup is not None:
            listed = self.near_dup.mask(result.file_index, result.lines)
        for i in range(result.num_candidates):
            if listed[i]:
                keep[i] = False
                drops.add("near_duplicate", path, int(result.lines[i]))
            elif self.exact is not None and not self.exact.add_if_new(result.digests[i]):
                keep[i] = False
                drops.add("exact_duplicate", path, int(result.lines[i]))
            elif self.near is not None and not self.near.add_if_new(result.band_keys[i]):
                keep[i] = False
                drops.add("near_duplicate", path, int(result.lines[i]))
        return keep


def _remove_previous_outputs(config: PreprocessConfig) -> None:
    """A rerun into the same prefix removes that prefix's sidecar and datasets once its own are
    complete, just before renaming them into place: otherwise a rerun interrupted between two
    renames would leave a mix of old and new files. The sidecar goes first, so that from then on
    the prefix is marked incomplete until the new sidecar is written. None of these paths is an
    input (`check_inputs_untouched`)."""
    paths = [config.sidecar_path()]
    for split in config.split_names:
        for key in config.json_keys:
            prefix = config.dataset_prefix(split, key)
            paths += [data_file_path(prefix), index_file_path(prefix), digests_path(prefix)]
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def run(config: PreprocessConfig) -> dict:
    """Run the whole pipeline; returns the sidecar contents (also written to `PREFIX.json`)."""
    start = time.perf_counter()
    files = expand_inputs(config.inputs)
    check_inputs_untouched(config, files)  # before anything is written or removed
    near_dup = None
    if config.near_dup_dir is not None:
        near_dup = NearDupDrops.open(config.near_dup_dir, files, config.json_keys, config.cleaning)
    tokenizer, plan = _choose_tokenizer(config, files)
    dtype = IndexedDatasetWriter.best_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod_id if config.append_eod else None  # fails now, naming the tokenizer, if it has none
    hasher = InputHasher(files)
    settings = ProcessorSettings(
        tokenizer_path=tokenizer.path, json_keys=config.json_keys, dtype=dtype.name,
        append_eod=config.append_eod, cleaning=config.cleaning, exact_dedup=config.exact_dedup,
        minhash=config.minhash, split_weights=config.split if len(config.split_names) > 1 else None,
        tokenizer_backend=tokenizer.backend, tokenizer_threads=plan.threads,
    )  # fmt: skip
    processor = ChunkProcessor(settings, tokenizer)
    drops, dedup = DropLog(max_samples=config.max_samples), _Deduplicator(config, near_dup)
    outputs = _Outputs(config, dtype)
    read = 0
    try:
        last_log = start
        for result in _results(config, plan, processor, files):
            path = files[result.file_index].path
            read += result.num_records
            for reason, line in result.dropped:
                drops.add(reason, path, line)
            outputs.add(result, dedup.keep_mask(result, drops, path))
            if time.perf_counter() - last_log > config.log_every_s:
                last_log = time.perf_counter()
                print(f"[preprocess] {read:,} documents, {sum(outputs.tokens.values()):,} tokens, "
                      f"{last_log - start:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        if read == drops.total:
            raise InputError(nothing_kept_message(config, files, read, drops))
        _remove_previous_outputs(config)  # only now that the new outputs are complete
        outputs.finalize()
        inputs = hasher.result()
        if near_dup is not None:
            near_dup.verify_inputs(inputs)  # the drop lists are for exactly these files' contents
        report = _report(config, tokenizer, eod, dtype, inputs, read, drops, outputs, start)
        if near_dup is not None:
            report["options"]["near_dup"] = near_dup.summary()
        report["execution"] = {"backend": tokenizer.backend, "tokenizer": tokenizer.selection,
                               "processes": plan.processes, "threads": plan.threads}  # fmt: skip
        write_json_atomic(config.sidecar_path(), report)
    except BaseException:
        outputs.abort()
        raise
    return report


def _choose_tokenizer(config: PreprocessConfig, files: list[InputFile]) -> tuple[Tokenizer, ExecutionPlan]:
    """Load the tokenizer with the configured backend (checked on the first documents when it is
    gigatoken) and plan processes and threads; says both on stderr."""
    cores = _available_cores()
    # The plan for gigatoken decides whether the identity check encodes as the run will (on the pool
    # in the main process, or on the calling thread in workers).
    plan = plan_execution(config, "gigatoken", cores)
    if plan.processes == 0 and config.threads_per_worker:
        # The Rust pools size themselves from the environment when they start: set it first.
        os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = str(config.threads_per_worker)
    samples = identity_samples(files, config) if config.tokenizer_backend in ("auto", "gigatoken") else []
    tokenizer = load_tokenizer(
        config.tokenizer, config.tokenizer_backend, samples=samples, parallel=plan.threads > 1
    )
    if tokenizer.backend != "gigatoken":
        plan = plan_execution(config, tokenizer.backend, cores)
    print(f"[preprocess] tokenizer backend: {tokenizer.selection}", file=sys.stderr, flush=True)
    print(f"[preprocess] execution: {plan.describe()}", file=sys.stderr, flush=True)
    return tokenizer, plan


def _report(
    config: PreprocessConfig,
    tokenizer: Tokenizer,
    eod: int | None,
    dtype: np.dtype,
    inputs: list[dict],
    read: int,
    drops: DropLog,
    outputs: _Outputs,
    start: float,
) -> dict:
    seconds = time.perf_counter() - start
    tokens = sum(outputs.tokens.values())
    options = asdict(config)
    options["minhash"] = (
        None if config.minhash is None else {**asdict(config.minhash), "bands": config.minhash.bands}
    )
    report = {
        "version": SIDECAR_VERSION,
        "tokenizer": {"path": os.path.abspath(tokenizer.path), "sha256": tokenizer.sha256,
                      "vocab_size": tokenizer.vocab_size,
                      "eod_id": eod},
        "dtype": dtype.name,
        "documents": {"read": read, "kept": read - drops.total, "dropped": drops.total,
                      "malformed": malformed_total(drops)},
        "dropped": drops.as_dict(),
        "outputs": outputs.summary(),
        "tokens": tokens,
        "inputs": inputs,
        "options": options,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else 0.0,
    }  # fmt: skip
    return json.loads(json.dumps(report))  # exactly what the sidecar holds (lists, string keys)
