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

# data.tokenizer_backend choices; the same tuple as megatron_andromeda.data.tokenizer.TOKENIZER_BACKENDS
# (a test holds them equal), repeated so reading a config never imports the data stack.
TOKENIZER_BACKEND_CHOICES = ("auto", "gigatoken", "tokenizers", "sentencepiece")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what to do."""


# --------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Architecture only: nothing here knows about devices or parallelism."""

    name: str = "custom"
    vocab_size: int = 50304
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 8
    head_dim: int | None = None  # default: hidden_size // num_heads
    num_kv_heads: int = 1  # 1 = multi-query, num_heads = multi-head, between = grouped-query
    ffn_hidden_size: int | None = None  # default: 4 * hidden_size (per SwiGLU branch)
    block: str = "parallel"  # "parallel" (PaLM: attn + MLP from one norm) or "sequential" (pre-norm)
    norm: str = "layernorm"  # "layernorm" (no bias) or "rmsnorm"
    activation: str = "swiglu"  # "swiglu" or "gelu"
    position_embedding: str = "rotary"  # "rotary" or "alibi"
    rotary_base: float = 10000.0
    rotary_interleaved: bool = True  # pairs (0,1),(2,3)... (GPT-J/Cohere); False: (i, i+d/2) (NeoX/Llama)
    max_seq_length: int = 2048
    tie_embeddings: bool = True
    z_loss: float = 1e-4  # PaLM's auxiliary loss z_loss * logsumexp(logits)^2; 0 disables
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dropout: float = 0.0
    logit_scale: float = 1.0  # logits are multiplied by this before the softmax

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else 4 * self.hidden_size

    def validate(self) -> None:
        _check_choice("model.block", self.block, ("parallel", "sequential"))
        _check_choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("model.activation", self.activation, ("swiglu", "gelu"))
        _check_choice("model.position_embedding", self.position_embedding, ("rotary", "alibi"))
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_seq_length",
        ):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                "change one of them or set model.head_dim explicitly"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads="
                f"{self.num_kv_heads} (each KV head serves the same number of query heads)"
            )
        if self.position_embedding == "rotary" and self.kv_channels % 2:
            raise ConfigError(f"rotary embeddings need an even head dimension, got {self.kv_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.z_loss < 0:
            raise ConfigError(f"model.z_loss={self.z_loss} must be >= 0")


@dataclass
class ParallelConfig:
    """How the world is split. The product of the degrees must equal the number of processes."""

    tensor: int = 1
    pipeline: int = 1
    data: int | None = None  # default: world_size // (tensor * pipeline)
    context: int = 1  # reserved: context parallelism is not implemented yet
    sequence_parallel: bool = False
    virtual_stages: int = 1  # > 1 selects the interleaved 1F1B schedule
    schedule: str = "1f1b"  # "gpipe", "1f1b" (interleaved when virtual_stages > 1)
    layers_per_stage: list[int] | None = None  # explicit split; default balanced
    distributed_optimizer: bool = False  # ZeRO-1: shard optimizer state over the data group
    recompute: str = "none"  # "none", "full" (whole layer), "selective" (attention core)
    comm_timeout_s: float = 600.0

    def validate(self) -> None:
        for name in ("tensor", "pipeline", "context", "virtual_stages"):
            _check_positive(f"parallel.{name}", getattr(self, name))
        if self.data is not None:
            _check_positive("parallel.data", self.data)
        if self.context != 1:
            raise ConfigError("parallel.context is reserved and must be 1 (context parallelism is not built)")
        _check_choice("parallel.schedule", self.schedule, ("gpipe", "1f1b"))
        _check_choice("parallel.recompute", self.recompute, ("none", "full", "selective"))
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5  # floor of the decay
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False  # False: no weight decay on norms and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_style: str = "cosine"  # "cosine", "linear" or "constant"
    decay_steps: int | None = None  # default: train.steps - warmup
    clip_grad: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        _check_choice("optim.decay_style", self.decay_style, ("cosine", "linear", "constant"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need 0 <= optim.min_lr <= optim.lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})"
            )
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")
        if self.clip_grad < 0:
            raise ConfigError("optim.clip_grad must be >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 4
    global_batch_size: int = 32  # = micro_batch_size * accumulation steps * data-parallel degree
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (dynamic loss scaling)
    seed: int = 1234
    device: str = "auto"  # "auto" (cuda when present), "cpu" or "cuda"
    eval_interval: int = 100  # 0 disables periodic validation
    eval_batches: int = 10
    threads: int | None = None  # torch intra-op threads on CPU; default: torch's own choice
    max_consecutive_skips: int = 10  # non-finite steps in a row before the run stops
    init_from: str = ""  # a checkpoint directory whose weights start the run (no optimizer state)
    exit_interval: int = 0  # save and exit when the step is a multiple of this (time-limited jobs); 0: never

    def validate(self) -> None:
        _check_positive("train.steps", self.steps)
        _check_positive("train.micro_batch_size", self.micro_batch_size)
        _check_positive("train.global_batch_size", self.global_batch_size)
        _check_choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        _check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


@dataclass
class DataConfig:
    tokenizer: str = ""  # a tokenizer.json (HF tokenizers) or a SentencePiece .model file
    # Library that encodes text in training and evaluation: auto, gigatoken, tokenizers or
    # sentencepiece (megatron_andromeda.data.tokenizer.TOKENIZER_BACKENDS; same ids whichever runs).
    tokenizer_backend: str = "auto"
    # Megatron-style blends: ["prefix"] or ["0.7", "prefixA", "0.3", "prefixB"] (weights then prefixes).
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    recipe: str = ""  # a stage recipe YAML (sources with weights or token budgets) instead of the lists
    seq_length: int = 1024
    seed: int = 1234
    reset_position_ids: bool = False  # restart positions after each end-of-document token
    reset_attention_mask: bool = False  # no attention across end-of-document tokens
    eod_mask_loss: bool = False  # no loss on predicting the token after an end-of-document
    cache_dir: str = ""  # where index caches go; default: beside the dataset
    num_workers: int = 0

    def validate(self) -> None:
        _check_positive("data.seq_length", self.seq_length)
        _check_choice("data.tokenizer_backend", self.tokenizer_backend, TOKENIZER_BACKEND_CHOICES)
        if self.recipe and self.train:
            raise ConfigError("set either data.recipe or data.train, not both")


@dataclass
class CheckpointConfig:
    save_dir: str = ""  # empty: no checkpoints
    save_interval: int = 0  # steps; 0 saves only at the end (when save_dir is set)
    keep_last: int = 3
    load_dir: str = ""  # resume from here (default: save_dir, when it holds a checkpoint)
    async_save: bool = False

    def validate(self) -> None:
        if self.save_interval < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.save_interval must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10
    tensorboard: bool = True  # used when tensorboard is installed
    wandb: bool = False
    wandb_project: str = "andromeda"
    progress_bar: bool = True
    peak_flops: float | None = None  # device peak FLOP/s for MFU where the built-in table lacks it

    def validate(self) -> None:
        _check_positive("logging.log_interval", self.log_interval)


@dataclass
class BackendConfig:
    """The `backend` section: which kernels to use; `auto` takes the fastest one installed."""

    attention: str = "auto"  # "auto", "sdpa" (torch's fused kernels), "flash" (flash-attn 2 or 3)
    linear: str = "auto"  # "auto", "torch" (nn.Linear), "te" (Transformer Engine)
    fp8: str = "none"  # "none", "delayed" or "current" scaling (needs TE and compute capability >= 8.9)
    rotary: str = "auto"  # "auto", "torch", "flash" (flash-attn's Triton kernel)
    cross_entropy: str = "auto"  # "auto", "torch", "flash" (flash-attn's Triton kernel, z-loss fused)
    compile: bool = False  # torch.compile each transformer block

    def validate(self) -> None:
        for name, choices in (
            ("attention", ("auto", "sdpa", "flash")),
            ("linear", ("auto", "torch", "te")),
            ("fp8", ("none", "delayed", "current")),
            ("rotary", ("auto", "torch", "flash")),
            ("cross_entropy", ("auto", "torch", "flash")),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"backend.{name}={value!r} is not one of {', '.join(choices)}")
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

    name: str = ""
    recipe: str = ""  # the stage's data recipe (examples/data/*.yaml) ...
    train: list[str] = field(default_factory=list)  # ... or a blend list
    valid: list[str] = field(default_factory=list)
    tokens: float | None = None  # token budget: steps = ceil(tokens / (global batch x seq length))
    steps: int | None = None  # or a step count
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    lr_schedule: str = "rewarm"  # "rewarm": warm up and decay within the stage; "continue": one schedule
    freeze: list[str] = field(default_factory=list)  # fnmatch patterns of parameter names not trained
    init_from: str = "previous"  # "previous" (the last stage's final weights; none for the first), "none",
    # or a checkpoint path
    reset_attention_mask: bool | None = None  # e.g. true for packed chat data
    reset_position_ids: bool | None = None

    def validate(self, index: int) -> None:
        where = f"stages[{index}] ({self.name or 'unnamed'})"
        if not self.name:
            raise ConfigError(f"{where}: every stage needs a name (it names its checkpoint and log folders)")
        if (self.tokens is None) == (self.steps is None):
            raise ConfigError(f"{where}: give exactly one of tokens and steps")
        if (self.tokens is not None and self.tokens <= 0) or (self.steps is not None and self.steps <= 0):
            raise ConfigError(f"{where}: tokens / steps must be positive")
        if bool(self.recipe) == bool(self.train):
            raise ConfigError(f"{where}: give exactly one of recipe and train")
        _check_choice(f"{where}.lr_schedule", self.lr_schedule, ("rewarm", "continue"))


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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
        from megatron_andromeda.presets import get_preset

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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name}={value} must be positive")


def save_resolved_config(config: RunConfig, run_dir: str | Path) -> Path:
    """Write the resolved configuration as JSON into the run directory (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(config.to_json())
    tmp.replace(target)
    return target
