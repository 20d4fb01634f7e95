"""Command line of `tools/preprocess_data.py`: flags -> `PreprocessConfig` -> `pipeline.run`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_andromeda.data.tokenizer import TOKENIZER_BACKENDS
from megatron_andromeda.preprocess.cleaning import PROFILES, CleaningConfig, cleaning_profile, reason_switch
from megatron_andromeda.preprocess.dedup import MinHasher
from megatron_andromeda.preprocess.guards import empty_split_warnings
from megatron_andromeda.preprocess.pipeline import PreprocessConfig, run
from megatron_andromeda.preprocess.readers import InputError
from megatron_andromeda.preprocess.report import summary_lines
from megatron_andromeda.preprocess.split import parse_split

# Megatron-LM's --tokenizer-type values we read, and the file each needs (others are refused by name).
MEGATRON_TOKENIZER_FILES = {
    "HuggingFaceTokenizer": "tokenizer.json",
    "SentencePieceTokenizer": "SentencePiece .model",
    "GPTSentencePieceTokenizer": "SentencePiece .model",
    "Llama2Tokenizer": "SentencePiece .model",
}
MEGATRON_TOKENIZER_TYPES = (
    *MEGATRON_TOKENIZER_FILES, "GPT2BPETokenizer", "BertWordPieceLowerCase", "BertWordPieceCase",
    "TikTokenizer", "NullTokenizer", "MultimodalTokenizer",
)  # fmt: skip

EPILOG = """\
outputs: PREFIX_{train,valid,test}_KEY_document.{bin,idx} (one dataset per split and --json-keys key;
PREFIX_KEY_document with --no-split or a single non-zero split), with exact dedup a .digests file
beside each (16 bytes per document: tools/merge_datasets.py deduplicates runs against each other
with them), and the sidecar PREFIX.json, written last: a run is complete when its sidecar exists.
A rerun into the same prefix replaces the earlier run's outputs only once its own are complete. An
output that would overwrite an input is refused; globs skip sidecars and dataset files of runs. A
truncated or damaged .gz/.zst input, or a run that keeps no document, fails (exit 2) and writes
nothing; an empty split is written with a warning.

compared with Megatron-LM's tools/preprocess_data.py: the same .bin/.idx format, the same --input
(JSONL), --json-keys, --output-prefix, --append-eod and --workers flags, and its --tokenizer-type /
--tokenizer-model pair. By default this tool also cleans (--clean-profile prose; use code for source
files, none for Megatron's behaviour), deduplicates (--no-dedup for none) and splits 98/1/1 into
PREFIX_train_text_document, PREFIX_valid_... and PREFIX_test_..., where Megatron writes one
PREFIX_text_document: --no-split gives that name, as does Megatron's tokenizer pair without --split.
A run that drops more than --warn-drop-share of its documents ends with a one-line warning naming
the top reasons and the flag that turns each off.

near-duplicates across machines: run tools/neardup.py over every input first, then give each run
--near-dup-dir WORK_DIR (with the same --json-keys and cleaning flags as the near-dup run).

speed: with gigatoken installed (pip install 'megatron_andromeda[fast]') --tokenizer-backend auto encodes
with it once it gives the same ids as the tokenizer's own library on probe texts and the first
documents (a difference on a document stops the run, naming it). Defaults: without cleaning and dedup,
gigatoken runs in the main process on all cores with one reading thread per 8 cores (2 cores: 1; 64
cores: 4) and 4 MB chunks; with cleaning or dedup (Python per document), one single-threaded worker
process per core (2 or 64). megatron_andromeda/preprocess/README.md explains why.

cleaning options (--clean-set NAME=VALUE, 'none' switches a rule off): see CleaningConfig in
megatron_andromeda/preprocess/cleaning.py, e.g. --clean-set min_alpha_words_ratio=none
--clean-set max_duplicate_ngram_chars_ratio=5:0.2,10:0.1
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Clean, deduplicate, split and tokenize text corpora into Megatron .bin/.idx datasets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("input / output")
    io.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE_OR_GLOB",
        help="JSONL (.jsonl/.json, optionally .gz/.zst), Parquet, or a datasets.save_to_disk dir",
    )
    io.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY", help="text field(s)")
    io.add_argument("--output-prefix", required=True)
    io.add_argument("--tokenizer", help="tokenizer.json (HF fast) or SentencePiece .model")
    io.add_argument(
        "--tokenizer-type", choices=MEGATRON_TOKENIZER_TYPES, metavar="TYPE",
        help="Megatron-LM's spelling, with --tokenizer-model: HuggingFaceTokenizer (a tokenizer.json or a "
        "local folder holding one) or SentencePieceTokenizer / GPTSentencePieceTokenizer / "
        "Llama2Tokenizer (a .model); other Megatron types are refused by name. With these flags and no "
        "--split, the output is one dataset named as Megatron names it: PREFIX_text_document",
    )  # fmt: skip
    io.add_argument("--tokenizer-model", metavar="PATH", help="Megatron-LM's spelling of --tokenizer")
    io.add_argument(
        "--tokenizer-backend",
        default="auto",
        choices=TOKENIZER_BACKENDS,
        help="library that encodes: auto (default) takes gigatoken when it is installed, loads the "
        "tokenizer and gives the same ids as the file's own library on probe texts and the first "
        "documents, else tokenizers (tokenizer.json) or sentencepiece (.model)",
    )
    io.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    run_group = p.add_argument_group("execution")
    run_group.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (0: the main process). Default: with cleaning or dedup, one per core; "
        "without, 0 for gigatoken (it encodes on all cores with the GIL released) and one per core "
        "for the other backends",
    )
    run_group.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        help="tokenizer threads per process (default: 1 in worker processes, all cores in the main process)",
    )
    run_group.add_argument(
        "--chunk-mb",
        type=float,
        default=None,
        help="JSONL chunk size handed to a worker (default 1; 4 when gigatoken encodes in the main process)",
    )
    split = p.add_argument_group("split")
    split.add_argument(
        "--split", default=None,
        help="train,valid,test weights (default 98,1,1; with Megatron's --tokenizer-type flags: no split)",
    )  # fmt: skip
    split.add_argument("--no-split", action="store_true", help="one dataset, Megatron naming")
    add_cleaning_flags(p.add_argument_group("cleaning"))
    p.add_argument(
        "--warn-drop-share",
        type=float,
        default=0.2,
        metavar="FRACTION",
        help="warn at the end when more than this share of the documents was dropped (default 0.2)",
    )
    dedup = p.add_argument_group("deduplication")
    dedup.add_argument("--no-dedup", action="store_true", help="neither exact nor near-duplicate removal")
    dedup.add_argument("--no-exact-dedup", action="store_true")
    dedup.add_argument("--no-near-dedup", action="store_true")
    dedup.add_argument("--minhash-threshold", type=float, default=0.8, help="Jaccard similarity of near-dups")
    dedup.add_argument("--minhash-perm", type=int, default=128, help="MinHash signature length")
    dedup.add_argument("--minhash-ngram", type=int, default=5, help="words per shingle")
    dedup.add_argument(
        "--near-dup-dir",
        default=None,
        metavar="WORK_DIR",
        help="drop the near-duplicates a finished tools/neardup.py run found across all of its inputs "
        "(this run's inputs must be among them; replaces the in-process MinHash)",
    )
    p.add_argument("--max-samples", type=int, default=10, help="file:line samples kept per drop reason")
    return p  # fmt: skip


def add_cleaning_flags(group) -> None:
    """The cleaning flags, shared with tools/neardup.py (its signatures must keep the same records)."""
    group.add_argument(
        "--clean-profile", choices=PROFILES, default="prose",
        help="prose (default: Gopher/C4 quality rules for natural language), code (file-level filters "
        "of code corpora: generated/minified/data files; source kept byte for byte), none",
    )  # fmt: skip
    group.add_argument("--no-clean", action="store_true", help="the same as --clean-profile none")
    group.add_argument("--min-chars", type=int, default=None)
    group.add_argument("--max-chars", type=int, default=None)
    group.add_argument("--min-words", type=int, default=None)
    group.add_argument("--max-words", type=int, default=None)
    group.add_argument(
        "--unicode-form", default=None, help="NFC (the prose default), NFKC, NFD, NFKD or none"
    )
    group.add_argument(
        "--clean-set", action="append", default=[], metavar="NAME=VALUE",
        help="set any CleaningConfig field on top of the profile (repeatable)",
    )  # fmt: skip


def _cleaning(args: argparse.Namespace) -> CleaningConfig | None:
    base = cleaning_profile("none" if args.no_clean else args.clean_profile)
    if base is None:
        return None
    overrides = {}
    for item in args.clean_set:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--clean-set {item!r}: expected NAME=VALUE")
        overrides[name.strip()] = value.strip()
    for flag in ("min_chars", "max_chars", "min_words", "max_words", "unicode_form"):
        if getattr(args, flag) is not None:
            overrides[flag] = str(getattr(args, flag))
    return base.with_overrides(overrides)


def resolve_tokenizer(args: argparse.Namespace) -> tuple[str, bool]:
    """(tokenizer path, whether Megatron's flags named it) from --tokenizer or Megatron's pair."""
    megatron = args.tokenizer_type is not None or args.tokenizer_model is not None
    if args.tokenizer and megatron:
        raise ValueError("give --tokenizer, or Megatron's --tokenizer-type with --tokenizer-model, not both")
    if not megatron:
        if not args.tokenizer:
            raise ValueError(
                "--tokenizer is required (a tokenizer.json or SentencePiece .model; Megatron's "
                "--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH works too)"
            )
        return args.tokenizer, False
    if not (args.tokenizer_type and args.tokenizer_model):
        raise ValueError(
            "Megatron's tokenizer flags come as a pair: --tokenizer-type TYPE --tokenizer-model PATH"
        )
    if args.tokenizer_type not in MEGATRON_TOKENIZER_FILES:
        raise ValueError(
            f"--tokenizer-type {args.tokenizer_type}: not supported here (it needs Megatron's own vocabulary "
            "files); convert the tokenizer to a tokenizer.json (HuggingFaceTokenizer) or a SentencePiece "
            ".model, or use Megatron-LM's tools/preprocess_data.py for it"
        )
    path = Path(args.tokenizer_model)
    if args.tokenizer_type == "HuggingFaceTokenizer" and path.is_dir():
        path = path / "tokenizer.json"  # Megatron loads a folder through transformers: its fast file
    if not path.is_file():
        raise ValueError(
            f"--tokenizer-model {args.tokenizer_model}: not a local file (nothing is downloaded; give the "
            f"{MEGATRON_TOKENIZER_FILES[args.tokenizer_type]} or a folder holding tokenizer.json)"
        )
    return str(path), True


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    tokenizer, megatron_style = resolve_tokenizer(args)
    # Megatron's command line (its tokenizer flags, no --split) writes Megatron's names: one dataset.
    no_split = args.no_split or (megatron_style and args.split is None)
    args.no_split = no_split
    minhash = None
    if not (args.no_dedup or args.no_near_dedup or args.near_dup_dir):
        minhash = MinHasher(
            num_perm=args.minhash_perm, ngram=args.minhash_ngram, threshold=args.minhash_threshold
        )
    if args.chunk_mb is not None and args.chunk_mb <= 0:
        raise ValueError(f"--chunk-mb {args.chunk_mb}: must be positive")
    return PreprocessConfig(
        inputs=tuple(args.input),
        output_prefix=args.output_prefix,
        tokenizer=tokenizer,
        tokenizer_backend=args.tokenizer_backend,
        json_keys=tuple(args.json_keys),
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        split=None if no_split else parse_split(args.split or "98,1,1"),
        append_eod=args.append_eod,
        cleaning=_cleaning(args),
        clean_profile="none" if args.no_clean else args.clean_profile,
        exact_dedup=not (args.no_dedup or args.no_exact_dedup),
        minhash=minhash,
        chunk_bytes=int(args.chunk_mb * (1 << 20)) if args.chunk_mb is not None else None,
        max_samples=args.max_samples,
        near_dup_dir=args.near_dup_dir,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        report = run(config)
    except (ValueError, InputError, FileNotFoundError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(report):
        print(line)
    print(f"sidecar: {config.sidecar_path()}")
    for warning in empty_split_warnings(report, None if args.no_split else args.split or "98,1,1"):
        print(warning, file=sys.stderr)
    warning = drop_share_warning(
        report, args.warn_drop_share, args.clean_profile if not args.no_clean else "none"
    )
    if warning:
        print(warning, file=sys.stderr)
    return 0


def drop_share_warning(report: dict, threshold: float, profile: str) -> str | None:
    """One line when a run dropped more than `threshold` of its documents: the top reasons and the
    flag that stops each (nothing is dropped silently, but a share this large is worth a look)."""
    docs = report["documents"]
    if not docs["read"] or docs["dropped"] / docs["read"] <= threshold:
        return None
    top = sorted(report["dropped"].items(), key=lambda item: -item[1]["count"])[:3]
    reasons = []
    for reason, item in top:
        switch = reason_switch(reason)
        reasons.append(f"{reason} {item['count']:,}" + (f" ({switch})" if switch else " (fix the input)"))
    hint = " For source code use --clean-profile code." if profile == "prose" else ""
    return (
        f"warning: dropped {docs['dropped']:,} of {docs['read']:,} documents "
        f"({100 * docs['dropped'] / docs['read']:.0f}%): {'; '.join(reasons)}.{hint}"
    )


# tools/neardup.py takes the same cleaning flags: its signature stage must keep the same records.
cleaning_from_args = _cleaning
