"""Hugging Face model directories and Andromeda checkpoints on disk, around the mappings in `convert`.

An exported directory holds what `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` expect:
`config.json` and `generation_config.json` (transformers' own writers), `model.safetensors` (or
shards plus `model.safetensors.index.json`: huggingface_hub's shard plan, written by our streaming
checkpoint writer, so the files get the user's umask like every other file instead of the 0600 of
safetensors' writer), and the tokenizer: `tokenizer.json` as given plus a `tokenizer_config.json`
naming `PreTrainedTokenizerFast` with its special tokens spelled out, which transformers 4.x and
5.x both load (5.x's own writer names `TokenizersBackend`, a class 4.x does not have).

With a tokenizer, the export holds exactly the tokenizer's vocabulary: rows the model has beyond it
(padding for tensor parallelism, see models/vocab.py) are dropped, so `config.json`'s vocab_size is
the tokenizer's, transformers can never produce a padding id, and its softmax (perplexity,
sampling) is the one training computed. Reading a directory back gives that unpadded model;
tools/convert_from_hf.py pads it again to what a layout needs (`resize_vocabulary`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from megatron_andromeda.config import ModelConfig, RunConfig
from megatron_andromeda.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from megatron_andromeda.hf.convert import ConversionError, StateDict, TokenIds, from_hf, to_hf
from megatron_andromeda.models.vocab import resize_vocabulary

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- directories
def save_hf_directory(
    output: str | os.PathLike,
    cfg: ModelConfig,
    state_dict: StateDict,
    *,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a directory that `AutoModelForCausalLM.from_pretrained` loads (see the module docstring).

    With a `tokenizer`, the vocabulary is cut to the tokenizer's ids (the padding rows are dropped);
    without one it is exported as it is, padding included. Everything is written under a temporary
    name and renamed into place at the end, so an interrupted export never leaves a directory that
    looks complete.
    """
    from transformers import GenerationConfig

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConversionError(
            f"--output {output} exists and is not empty; choose a new directory or pass --overwrite"
        )
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokens = TokenIds()
        if tokenizer:
            ours = load_tokenizer(tokenizer)
            tokens = save_tokenizer(ours, tmp, cfg)
            cfg, state_dict = resize_vocabulary(cfg, state_dict, ours.vocab_size)  # drop the padding
        hf_config, hf_sd = to_hf(cfg, state_dict, tokens)
        if dtype is not None:
            hf_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in hf_sd.items()}
        hf_config.dtype = next(iter(hf_sd.values())).dtype
        hf_config.save_pretrained(tmp)
        save_weights(hf_sd, tmp, max_shard_size)
        GenerationConfig(**tokens.as_config()).save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def save_weights(state_dict: StateDict, directory: Path, max_shard_size: int | str) -> None:
    """`model.safetensors`, or shards and their index past `max_shard_size`, streamed and fsynced."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from megatron_andromeda.checkpoint.storage import write_safetensors

    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        # "format": "pt" is what transformers checks before it reads a safetensors file as torch weights
        write_safetensors(directory / filename, {n: state_dict[n] for n in names}, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_tokenizer(ours: Tokenizer, directory: Path, cfg: ModelConfig) -> TokenIds:
    """Write `tokenizer.json` and a `tokenizer_config.json` for transformers 4.x and 5.x; returns the
    eos / pad ids. The special tokens are named explicitly (eos: our end-of-document token; pad: the
    padding token, else eos; unk: the model's, if it has one). No bos: the data pipeline never
    prepends one, so neither may a Hugging Face user's encode."""
    from tokenizers import Tokenizer as _HFTokenizer

    if not isinstance(ours, HFTokenizer):
        raise ConversionError(f"tokenizer {ours.path} is SentencePiece; only tokenizer.json files export")
    if ours.vocab_size > cfg.vocab_size:
        raise ConversionError(
            f"tokenizer {ours.path} has {ours.vocab_size} ids but model.vocab_size={cfg.vocab_size}: "
            "is it the tokenizer this model was trained with?"
        )
    try:
        eos = ours.eod_id
    except ValueError as e:
        log.warning("%s; the export has no eos token", e)
        eos = None
    pad = ours.pad_id if ours.pad_id is not None else eos
    raw = _HFTokenizer.from_file(ours.path)
    specials = {
        "eos_token": raw.id_to_token(eos) if eos is not None else None,
        "pad_token": raw.id_to_token(pad) if pad is not None else None,
        "unk_token": _unk_token(raw),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # both majors; 4.x lacks 5.x's TokenizersBackend
        **specials,
        "bos_token": None,
        "model_max_length": cfg.max_seq_length,
        "clean_up_tokenization_spaces": False,  # decode gives back the text, as tools/generate.py does
    }
    shutil.copyfile(ours.path, directory / "tokenizer.json")  # the very file training used
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    _write_json(directory / "special_tokens_map.json", specials)
    return TokenIds(eos=eos, pad=pad)


def _unk_token(raw: object) -> str | None:
    """The model's unknown token (BPE / WordPiece / WordLevel name it, Unigram gives its id); None
    for byte-level BPE, which can spell every string."""
    model = json.loads(raw.to_str())["model"]
    if model.get("unk_token") is not None:
        return model["unk_token"]
    return raw.id_to_token(model["unk_id"]) if model.get("unk_id") is not None else None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def load_hf_directory(path: str | os.PathLike) -> tuple[ModelConfig, StateDict]:
    """Read a Hugging Face model directory (safetensors, single or sharded) into fp32 Andromeda state."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConversionError(f"--hf {path} has no config.json; point it at a Hugging Face model directory")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:  # unknown model_type, unreadable JSON
        raise ConversionError(f"--hf {path}: transformers cannot read its config.json ({e})") from e
    weights = {k: v.float() if v.is_floating_point() else v for k, v in _read_safetensors(path).items()}
    return from_hf(hf_config, weights)


def _read_safetensors(path: Path) -> StateDict:
    """The directory's weights. Its files are untrusted like a checkpoint's: the index may name only
    regular files inside the directory, and each file must be a whole safetensors file (a pickle
    renamed .safetensors, or a truncated download, is named as such)."""
    from safetensors.torch import load_file

    from megatron_andromeda.checkpoint.storage import (
        CheckpointError,
        read_safetensors_header,
        resolve_inside,
    )

    index = path / "model.safetensors.index.json"
    if not (path / "model.safetensors").exists() and not index.is_file():
        raise ConversionError(
            f"{path} has neither model.safetensors nor model.safetensors.index.json (pickled "
            "pytorch_model.bin is not read: re-save with save_pretrained(..., safe_serialization=True))"
        )
    try:
        if (path / "model.safetensors").exists():
            files = [resolve_inside(path, "model.safetensors", source=path)]
        else:
            files = [resolve_inside(path, name, source=index) for name in _shard_names(index)]
        weights: StateDict = {}
        for file in files:
            read_safetensors_header(file)
            weights.update(load_file(file))
    except CheckpointError as e:
        raise ConversionError(str(e)) from e
    return weights


def _shard_names(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index} is not a valid safetensors index ({e!r})") from e


# ----------------------------------------------------------------------------------- Andromeda checkpoints
def read_checkpoint(path: str | os.PathLike) -> tuple[RunConfig, StateDict]:
    """The run config and FULL model state of a checkpoint, whatever its layout.

    Sharded checkpoints (any tensor x pipeline x data layout) are merged from the global boxes
    their metadata gives, so replicated values (norms, KV heads shared by tensor ranks) are read
    once (megatron_andromeda.checkpoint).
    """
    from megatron_andromeda.checkpoint import read_model_state

    return read_model_state(path)


def run_config_for(
    cfg: ModelConfig, tokenizer: str | os.PathLike | None, base: RunConfig | None = None
) -> RunConfig:
    """A run config around an imported model: `base`'s other sections, a sequence length the model allows."""
    base = base or RunConfig()
    data = dataclasses.replace(
        base.data,
        tokenizer=str(Path(tokenizer).resolve()) if tokenizer else base.data.tokenizer,
        seq_length=min(base.data.seq_length, cfg.max_seq_length),
    )
    return dataclasses.replace(base, model=cfg, data=data).validate()
