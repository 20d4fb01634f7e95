#!/usr/bin/env python3
"""Train a small tokenizer on JSONL or plain-text files.

Two kinds:

* ``bpe`` (default): a GPT-NeoX-style byte-level BPE saved as a Hugging Face ``tokenizer.json``
  (NFC normalizer, ByteLevel pre-tokenizer and decoder, ``<|endoftext|>`` = 0 and
  ``<|padding|>`` = 1). Byte-level means every string round-trips, whatever its characters.
* ``sentencepiece``: a SentencePiece BPE ``.model`` (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 = EOS,
  ``<pad>`` 3) with identity normalization and byte fallback, so it round-trips too.

Both are deterministic: the same input files and flags give a byte-identical output file.

    python tools/train_tokenizer.py --input examples/data/corpus/austen.jsonl.gz \\
        --output demo_out/tokenizer.json --vocab-size 8192
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from megatron_andromeda.data.jsonl import InputError, iter_jsonl, open_text
from megatron_andromeda.errors import UserError, print_error, report_user_errors

EOD_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|padding|>"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
MIN_VOCAB = {"bpe": 256 + 2, "sentencepiece": 256 + 4 + 1}


def check_inputs(paths: list[Path]) -> None:
    """Fail before training on a missing file or one whose format is unknown."""
    for path in paths:
        if not path.is_file():
            raise InputError(f"--input {path}: file not found")
        if not path.name.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
            raise InputError(
                f"--input {path}: unknown format; use one of {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)}"
            )


def iter_texts(paths: list[Path], json_key: str = "text") -> Iterator[str]:
    """Documents of JSONL files (the ``json_key`` field of each line) or lines of text files."""
    check_inputs(paths)
    for path in paths:
        if not path.name.endswith(JSONL_SUFFIXES):
            with open_text(path) as f:
                yield from f
            continue
        for lineno, record in iter_jsonl(path):
            text = record.get(json_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise InputError(
                    f"{path}:{lineno}: no string field {json_key!r}; pass --json-keys with the "
                    "name of the field that holds the text"
                )
            yield text


def train_bpe(texts: Iterator[str], vocab_size: int, min_frequency: int = 2):
    """A GPT-NeoX-style byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],  # ids 0 and 1, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _sentences(texts: Iterator[str]) -> Iterator[str]:
    """SentencePiece reads bounded 'sentences': feed it non-empty lines, not whole documents."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(texts: Iterator[str], vocab_size: int, output: Path) -> None:
    """Train a SentencePiece BPE model and write it atomically to ``output`` (a ``.model``)."""
    import sentencepiece as spm

    model = io.BytesIO()  # in memory: a model_prefix path would be recorded in the model file
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            max_sentence_length=1 << 16,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            pad_piece="<pad>",
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high" on a small input
        raise ValueError(f"--vocab-size {vocab_size}: SentencePiece training failed ({e})") from e
    _write_atomic(output, model.getvalue())


def _write_atomic(output: Path, data: bytes) -> None:
    tmp = output.with_name(f"{output.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def train(
    inputs: list[Path], output: Path, vocab_size: int, kind: str = "bpe", json_key: str = "text"
) -> int:
    """Train a tokenizer of ``kind`` on ``inputs`` and write it to ``output``; returns its vocab size."""
    if kind not in MIN_VOCAB:
        raise ValueError(f"--kind {kind!r}: expected one of {', '.join(MIN_VOCAB)}")
    if vocab_size < MIN_VOCAB[kind]:
        raise ValueError(f"--vocab-size {vocab_size}: {kind} needs at least {MIN_VOCAB[kind]}")
    if kind == "sentencepiece" and output.suffix != ".model":
        raise ValueError(
            f"--output {output}: a SentencePiece model must end in .model (the loader keys on it)"
        )
    check_inputs(inputs)
    output.parent.mkdir(parents=True, exist_ok=True)
    texts = iter_texts(inputs, json_key)
    if kind == "sentencepiece":
        import sentencepiece as spm

        train_sentencepiece(texts, vocab_size, output)
        return spm.SentencePieceProcessor(model_file=str(output)).get_piece_size()
    tok = train_bpe(texts, vocab_size)
    _write_atomic(output, tok.to_str(pretty=True).encode("utf-8"))
    return tok.get_vocab_size(with_added_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, nargs="+", required=True, help="JSONL(.gz/.zst) or .txt files")
    parser.add_argument("--output", type=Path, required=True, help="tokenizer.json (bpe) or NAME.model")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--json-keys", "--json-key", dest="json_key", default="text", metavar="KEY",
        help="JSONL field holding the text (spelled as in preprocess_data.py; --json-key also works)",
    )  # fmt: skip
    parser.add_argument("--kind", choices=sorted(MIN_VOCAB), default="bpe")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        vocab = train(args.input, args.output, args.vocab_size, args.kind, args.json_key)
    except (UserError, ValueError) as e:
        return print_error(e, "train_tokenizer")
    elapsed = time.perf_counter() - start
    if vocab < args.vocab_size:
        print(
            f"warning: the input only supports {vocab} tokens (asked for {args.vocab_size})", file=sys.stderr
        )
    print(f"trained {args.kind} tokenizer: vocab size {vocab} in {elapsed:.1f} s -> {args.output}")
    return 0


if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
