"""Hugging Face interoperability: exact conversion of Andromeda models to and from `transformers`.

`convert` holds the weight and config mappings and picks the architecture; `directory` reads and
writes Hugging Face model directories and Andromeda checkpoints around them.
"""

from megatron_andromeda.hf.convert import ConversionError, TokenIds, from_hf, hf_model_type, to_hf
from megatron_andromeda.hf.directory import (
    load_hf_directory,
    read_checkpoint,
    run_config_for,
    save_hf_directory,
)

__all__ = [
    "ConversionError",
    "TokenIds",
    "from_hf",
    "hf_model_type",
    "load_hf_directory",
    "read_checkpoint",
    "run_config_for",
    "save_hf_directory",
    "to_hf",
]
