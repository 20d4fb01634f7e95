#!/usr/bin/env python3
"""Near-duplicate removal across machines: restartable MinHash stages over a shared directory.

    # one machine, a local process pool
    python tools/neardup.py run --input 'raw/*.jsonl.zst' --work-dir shared/nd --workers 16
    # or stage by stage, one task per process (what each Slurm array task runs)
    python tools/neardup.py init --input 'raw/*.jsonl.zst' --work-dir shared/nd
    python tools/neardup.py signatures --work-dir shared/nd --task 7     # one per input file
    python tools/neardup.py buckets --work-dir shared/nd --task 3        # one per LSH band
    python tools/neardup.py cluster --work-dir shared/nd                 # one
    # Slurm: job arrays chained with --dependency
    WORK_DIR=shared/nd INPUT='raw/*.jsonl.zst' bash examples/launch/dedup.sbatch
    # then each machine preprocesses its share with the drop lists, and the runs are merged
    python tools/preprocess_data.py --input raw/part-00*.jsonl.zst --near-dup-dir shared/nd ...

The report (documents in, clusters, dropped, sample clusters with file:line of kept and dropped
members) is shared/nd/clusters/report.json. `--help` lists the settings and how the defaults were
chosen; the work is done by megatron_andromeda.preprocess.neardup.
"""

from __future__ import annotations

import sys

from megatron_andromeda.errors import report_user_errors
from megatron_andromeda.preprocess.neardup.cli import main

if __name__ == "__main__":
    with report_user_errors():
        sys.exit(main())
