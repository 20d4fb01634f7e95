"""Typed run configuration: one dataclass per concern, loaded from YAML with dotted overrides.

A run is described by `RunConfig`, whose sections (`model`, `parallel`, `optim`, `train`, `data`,
`checkpoint`, `logging`) are independent dataclasses. Loading goes YAML -> nested dict -> dotted
overrides -> dataclasses, and every unknown key or impossible value is reported before any process
group or tensor is created. `model=NAME` (in YAML or on the command line) starts the model section
from a named preset; later `model.x=...` keys refine it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_andromeda.errors import ConfigError
from megatron_andromeda.fields import check_fields, describe_section, option
from megatron_andromeda.models.config import ModelConfig
from megatron_andromeda.models.presets import get_preset

# data.tokenizer_backend choices; the same tuple as megatron_andromeda.data.tokenizer.TOKENIZER_BACKENDS
# (a test holds them equal), repeated so reading a config never imports the data stack.
TOKENIZER_BACKEND_CHOICES = ("auto", "gigatoken", "tokenizers", "sentencepiece")


# --------------------------------------------------------------------------------------------- sections
@dataclass
class ParallelConfig:
    """How the world is split. The product of the degrees must equal the number of processes."""

    tensor: int = option(1, "tensor-parallel degree (heads, FFN and vocabulary split)", min=1)
    pipeline: int = option(1, "pipeline stages", min=1)
    data: int | None = option(None, "data-parallel degree; default world_size // (tensor x pipeline)", min=1)
    context: int = option(1, "reserved: context parallelism is not built, must be 1")
    sequence_parallel: bool = option(False, "split norms/dropout activations along the sequence (tensor > 1)")
    virtual_stages: int = option(1, "model chunks per pipeline rank; > 1 selects interleaved 1F1B", min=1)
    schedule: str = option("1f1b", "pipeline schedule (interleaved when virtual_stages > 1)",
                           choices=("gpipe", "1f1b"))  # fmt: skip
    layers_per_stage: list[int] | None = option(
        None, "explicit layer counts, one per (virtual) stage in stage order; default balanced"
    )
    data_sharding: str = option(
        "none", "what the data group shards: none (replicated), optimizer (ZeRO-1: AdamW states and fp32 "
        "masters), full (FSDP2: parameters, gradients and optimizer states)",
        choices=("none", "optimizer", "full"),
    )  # fmt: skip
    distributed_optimizer: bool = option(False, "the old name of data_sharding=optimizer (ZeRO-1)")
    data_replicas: int = option(
        1, "data_sharding=full: replicate over this many groups of data ranks and shard within each "
        "(HSDP); 1 shards over the whole data group", min=1,
    )  # fmt: skip
    reshard_after_forward: bool = option(
        True, "data_sharding=full: free each block's gathered weights after its forward and gather them "
        "again in the backward (false: keep them, more memory, one all-gather less per micro-batch)",
    )  # fmt: skip
    recompute: str = option("none", "activation recomputation: none, full (whole block), selective "
                            "(attention core)", choices=("none", "full", "selective"))  # fmt: skip
    comm_timeout_s: float = option(600.0, "seconds a collective may wait before the run fails", above=0.0)

    def validate(self) -> None:
        if self.context != 1:
            raise ConfigError("parallel.context is reserved and must be 1 (context parallelism is not built)")
        check_fields(self, "parallel")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
        if self.distributed_optimizer and self.data_sharding == "full":
            raise ConfigError(
                "parallel.distributed_optimizer=true (the old name of parallel.data_sharding=optimizer) "
                "contradicts parallel.data_sharding=full: remove parallel.distributed_optimizer"
            )

    @property
    def sharding(self) -> str:
        """The data sharding asked for: `data_sharding`, with the old `distributed_optimizer` as an alias."""
        return "optimizer" if self.distributed_optimizer else self.data_sharding


@dataclass
class OptimConfig:
    lr: float = option(3e-4, "peak learning rate", above=0.0)
    min_lr: float = option(3e-5, "floor of the decay", min=0.0)
    weight_decay: float = option(0.1, "AdamW's decoupled weight decay", min=0.0)
    decay_norms_and_embeddings: bool = option(False, "also decay norms and embeddings")
    beta1: float = option(0.9, "Adam's first-moment decay", min=0.0, below=1.0)
    beta2: float = option(0.95, "Adam's second-moment decay", min=0.0, below=1.0)
    eps: float = option(1e-8, "Adam's epsilon", above=0.0)
    warmup_steps: int = option(100, "linear warmup steps", min=0)
    decay_style: str = option("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    decay_steps: int | None = option(None, "steps of the decay; default train.steps - warmup_steps", min=1)
    clip_grad: float = option(1.0, "global gradient-norm clip; 0 disables", min=0.0)

    def validate(self) -> None:
        check_fields(self, "optim")
        if self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must not exceed optim.lr={self.lr}")


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps", min=1)
    micro_batch_size: int = option(4, "samples per forward/backward on one rank", min=1)
    global_batch_size: int = option(
        32, "samples per step: micro_batch_size x accumulation x data degree", min=1
    )
    precision: str = option("fp32", "fp32, bf16 or fp16 (half-precision weights, fp32 master copies)",
                            choices=("fp32", "bf16", "fp16"))  # fmt: skip
    seed: int = option(1234, "seed of the weights and of dropout", min=0)
    device: str = option("auto", "auto (cuda when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    eval_interval: int = option(100, "steps between validations; 0 disables", min=0)
    eval_batches: int = option(10, "global batches per validation", min=0)
    threads: int | None = option(None, "torch intra-op threads on CPU; default torch's own choice", min=1)
    max_consecutive_skips: int = option(10, "non-finite steps in a row before the run stops", min=1)
    init_from: str = option("", "a checkpoint whose weights start the run (no optimizer state)")
    exit_interval: int = option(
        0, "save and exit at multiples of this step (time-limited jobs); 0 never", min=0
    )

    def validate(self) -> None:
        check_fields(self, "train")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.eval_interval and not self.eval_batches:
            raise ConfigError(
                f"train.eval_interval={self.eval_interval} asks for validation but train.eval_batches=0; "
                "set train.eval_batches >= 1 or train.eval_interval=0"
            )


@dataclass
class DataConfig:
    tokenizer: str = option("", "a tokenizer.json (HF tokenizers) or a SentencePiece .model file")
    tokenizer_backend: str = option(
        "auto", "library that encodes text (same ids whichever runs; auto: gigatoken when installed "
        "and verified, else tokenizers / sentencepiece)", choices=TOKENIZER_BACKEND_CHOICES,
    )  # fmt: skip
    train: list[str] = option(
        help="Megatron-style blend: [prefix] or [weight, prefix, weight, prefix, ...]", factory=list
    )
    valid: list[str] = option(help="validation blend, as data.train", factory=list)
    test: list[str] = option(help="test blend, as data.train", factory=list)
    recipe: str = option("", "a stage recipe YAML (sources with weights or token budgets) instead of train")
    seq_length: int = option(1024, "tokens per sample", min=1)
    seed: int = option(1234, "seed of the sample shuffle", min=0)
    reset_position_ids: bool = option(False, "restart positions after each end-of-document token")
    reset_attention_mask: bool = option(False, "no attention across end-of-document tokens")
    eod_mask_loss: bool = option(False, "no loss on predicting the token after an end-of-document")
    cache_dir: str = option("", "where index caches go; default beside the dataset")
    allow_tokenizer_mismatch: bool = option(
        False, "train on datasets whose sidecar records another tokenizer (sha256 or vocabulary size)"
    )

    def validate(self) -> None:
        check_fields(self, "data")
        if self.recipe and self.train:
            raise ConfigError("set either data.recipe or data.train, not both")


@dataclass
class CheckpointConfig:
    save_dir: str = option("", "where checkpoints go; empty: none")
    save_interval: int = option(0, "steps between saves; 0 saves only at the end", min=0)
    keep_last: int = option(3, "complete checkpoints kept", min=1)
    load_dir: str = option(
        "", "resume from here; it must hold a checkpoint (default: save_dir, when that holds one)"
    )
    async_save: bool = option(False, "write checkpoints in the background")

    def validate(self) -> None:
        check_fields(self, "checkpoint")


@dataclass
class LoggingConfig:
    run_dir: str = option("runs/default", "metrics, the resolved config and reports go here")
    log_interval: int = option(10, "steps between metric lines", min=1)
    tensorboard: bool = option(True, "write TensorBoard events (when tensorboard is installed)")
    wandb: bool = option(False, "log to Weights & Biases")
    wandb_project: str = option("andromeda", "the W&B project")
    progress_bar: bool = option(True, "a progress bar on the console")
    peak_flops: float | None = option(None, "device peak FLOP/s for MFU where the built-in table lacks it",
                                      above=0.0)  # fmt: skip

    def validate(self) -> None:
        check_fields(self, "logging")


@dataclass
class BackendConfig:
    """The `backend` section: which kernels to use; `auto` takes the fastest one installed."""

    attention: str = option("auto", "sdpa (torch's fused kernels) or flash (flash-attn 2 or 3)",
                            choices=("auto", "sdpa", "flash"))  # fmt: skip
    linear: str = option(
        "auto", "torch (nn.Linear) or te (Transformer Engine)", choices=("auto", "torch", "te")
    )
    fp8: str = option("none", "FP8 scaling through Transformer Engine (compute capability >= 8.9)",
                      choices=("none", "delayed", "current"))  # fmt: skip
    fuse_norm: bool = option(
        True, "with Transformer Engine: fold each block norm into the projections it feeds (LayerNormLinear)"
    )
    rotary: str = option(
        "auto", "torch or flash (flash-attn's Triton kernel)", choices=("auto", "torch", "flash")
    )
    cross_entropy: str = option("auto", "torch or flash (flash-attn's Triton kernel, z-loss fused)",
                                choices=("auto", "torch", "flash"))  # fmt: skip
    compile: bool = option(False, "torch.compile each transformer block")

    def validate(self) -> None:
        check_fields(self, "backend")
        if self.fp8 != "none" and self.linear == "torch":
            raise ConfigError(
                f"backend.fp8={self.fp8} runs through Transformer Engine: set backend.linear=te or auto"
            )


@dataclass
class StageConfig:
    """One stage of a multi-stage run (pretrain, then fine-tune on other data, ...).

    Everything not set here comes from the run's own sections; the stage's data replaces
    `data.recipe` / `data.train` / `data.valid`.
    """

    name: str = option("", "names the stage's checkpoint and log folders")
    recipe: str = option("", "the stage's data recipe (examples/data/*.yaml) ...")
    train: list[str] = option(help="... or a blend list", factory=list)
    valid: list[str] = option(help="validation blend of the stage", factory=list)
    tokens: float | None = option(
        None,
        "token budget: steps = ceil(tokens / (global batch x seq length)); default the recipe's",
        above=0.0,
    )
    steps: int | None = option(None, "or a step count", min=1)
    lr: float | None = option(None, "the stage's peak learning rate", above=0.0)
    min_lr: float | None = option(None, "the stage's learning-rate floor", min=0.0)
    warmup_steps: int | None = option(None, "the stage's warmup", min=0)
    lr_schedule: str = option("rewarm", "rewarm: warm up and decay within the stage; continue: one schedule",
                              choices=("rewarm", "continue"))  # fmt: skip
    freeze: list[str] = option(
        help="fnmatch patterns of parameters not trained, named as in checkpoints on every layout "
        "(e.g. 'embedding.*', 'layers.0.*')",
        factory=list,
    )
    init_from: str = option("previous", "previous (the last stage's weights), none, or a checkpoint path")
    reset_attention_mask: bool | None = option(None, "e.g. true for packed chat data")
    reset_position_ids: bool | None = option(None, "restart positions at document ends")

    def validate(self, index: int) -> None:
        where = f"stages[{index}] ({self.name or 'unnamed'})"
        if not self.name:
            raise ConfigError(f"{where}: every stage needs a name (it names its checkpoint and log folders)")
        check_fields(self, where)
        if self.tokens is not None and self.steps is not None:
            raise ConfigError(f"{where}: give exactly one of tokens and steps")
        if self.tokens is None and self.steps is None and not self.recipe:
            raise ConfigError(f"{where}: give exactly one of tokens and steps (or a recipe with `tokens:`)")
        if bool(self.recipe) == bool(self.train):
            raise ConfigError(f"{where}: give exactly one of recipe and train")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage from `data` and `train`

    def validate(self) -> RunConfig:
        for f in dataclasses.fields(self):
            if f.name != "stages":
                getattr(self, f.name).validate()
        for i, stage in enumerate(self.stages):
            stage.validate(i)
        if self.stages and not self.checkpoint.save_dir:
            raise ConfigError(
                "a multi-stage run needs checkpoint.save_dir: each stage starts from the last one"
            )
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")
        tp = self.parallel.tensor
        if self.parallel.sequence_parallel and self.data.seq_length % tp:
            raise ConfigError(
                f"parallel.sequence_parallel splits the sequence over parallel.tensor={tp} ranks but "
                f"data.seq_length={self.data.seq_length} is not a multiple of it"
            )
        if self.data.seq_length > self.model.max_seq_length and self.model.position_embedding == "rotary":
            raise ConfigError(
                f"data.seq_length={self.data.seq_length} exceeds "
                f"model.max_seq_length={self.model.max_seq_length}"
            )
        return self

    def warnings(self) -> list[str]:
        """Settings that can run but are probably not what was meant (printed at start-up)."""
        found = []
        if self.optim.warmup_steps > self.train.steps and not self.stages:
            found.append(
                f"optim.warmup_steps={self.optim.warmup_steps} exceeds train.steps={self.train.steps}: "
                "the learning rate never reaches optim.lr"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def describe_config(section: str | None = None) -> str:
    """Every config key with its type, default and meaning (`--help [SECTION]` of the train entry point)."""
    hints = typing.get_type_hints(RunConfig)
    names = list(hints) if section is None else [section]
    lines = []
    for name in names:
        if name not in hints:
            raise ConfigError(f"unknown config section {name!r} (sections: {', '.join(hints)})")
        cls = hints[name]
        if name == "stages":
            cls, name = StageConfig, "stages[i]"
        lines.append(f"{name}:")
        lines.extend(describe_section(cls, name))
        if name == "model":
            lines.append(
                "  model=NAME starts from a preset (tools/model_info.py lists them); model.x=... refines it"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (optional), apply `key=value` overrides, build and validate a RunConfig."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    raw = dict(raw)
    model_raw = raw.get("model", {})
    if isinstance(model_raw, str):  # `model: andromeda-1b`
        model_raw = {"preset": model_raw}
    if isinstance(model_raw, dict) and "preset" in model_raw:
        model_raw = dict(model_raw)
        base = dataclasses.asdict(get_preset(model_raw.pop("preset")))
        base.update(model_raw)
        model_raw = base
    raw["model"] = model_raw
    return _build_dataclass(RunConfig, raw, "").validate()


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text != "" else ""
    if key == "model" and isinstance(value, str):
        key = "model.preset"
    return key.strip(), value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "model":  # `model: NAME` then `model.x=...`
            child = {"preset": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + n for n in near)}?" if near else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint} (valid: {', '.join(sorted(fields))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build_dataclass(hint, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, dotted: str) -> Any:
    """Check a YAML value against its annotated type, converting only the lossless cases."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], dotted)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        if dataclasses.is_dataclass(args[0]):
            return [_build_dataclass(args[0], v, f"{dotted}[{i}].") for i, v in enumerate(value)]
        return [_coerce(v, args[0], f"{dotted}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{dotted} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{dotted} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{dotted} must be a string, got {value!r}")
    return value


def save_resolved_config(config: RunConfig, run_dir: str | Path) -> Path:
    """Write the resolved configuration as JSON into the run directory (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(config.to_json())
    tmp.replace(target)
    return target
