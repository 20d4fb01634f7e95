"""Near-duplicate removal across machines: MinHash LSH as restartable stages over a shared directory.

    signatures (one task per input)  ->  buckets (one per LSH band)  ->  clusters (one)  ->  drop lists
    signatures.py                        buckets.py                      clusters.py         apply.py

Each task reads only the shared directory (`workdir.py`: plan, outputs, completion markers), so
tasks run anywhere: a local process pool or one task per process (`runner.py`, `tools/neardup.py`),
or Slurm job arrays chained by dependencies (`examples/launch/dedup.sbatch`). Documents are
numbered in global input order and each cluster keeps its earliest member, so one input or N give
the same drops; `tools/preprocess_data.py --near-dup-dir` applies them (`apply.py`). Quality is
measured on a labelled benchmark made from real documents (`benchmark.py`, `quality.py`).
"""
