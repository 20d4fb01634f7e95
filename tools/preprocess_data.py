#!/usr/bin/env python3
"""Clean, deduplicate, split and tokenize text corpora into Megatron `.bin`/`.idx` datasets.

    python tools/preprocess_data.py --input data/*.jsonl.zst --output-prefix out/corpus \\
        --tokenizer tokenizer.json --append-eod --workers 2 --split 98,1,1

Writes out/corpus_{train,valid,test}_text_document.{bin,idx} and the sidecar out/corpus.json (tokenizer
sha256, dtype, documents read/kept/dropped per reason with file:line samples, tokens per split,
input hashes, options, the tokenizer backend used). `--tokenizer-backend` (default auto) encodes with
gigatoken when it is installed and reproduces the tokenizer (megatron_andromeda/preprocess/README.md).
`--help` lists every option; the work is done by megatron_andromeda.preprocess.
"""

from __future__ import annotations

import sys

from megatron_andromeda.errors import report_user_errors
from megatron_andromeda.preprocess.cli import main

if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
