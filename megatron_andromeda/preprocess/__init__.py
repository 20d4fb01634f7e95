"""Corpus preprocessing: read, clean, deduplicate, split and tokenize into Megatron `.bin`/`.idx`.

Entry point: `tools/preprocess_data.py` (CLI) or `megatron_andromeda.preprocess.pipeline.run`.
"""
