"""Distributed checkpoints: every rank writes its own shards; any layout loads any checkpoint.

A checkpoint directory (`step_00000100/` under a save root whose `latest` names the newest):

    config.json                     the resolved RunConfig
    trainer_state.json              step, consumed samples (the data position), skipped steps, loss
                                    scaler, learning-rate schedule, sha256 of the tokenizer file
    model[-rankNNNNN].safetensors   weight pieces written by that rank
    optimizer[-rankNNNNN].safetensors   Adam moments (and fp32 masters) pieces
    rng[-rankNNNNN].json            every random state of that rank
    metadata.json                   layout, and for every tensor its global shape, dtype and pieces
                                    (file, key, offsets, shape: a box of the global tensor)
    manifest.json                   size and sha256 of every file above; written last

One process writes `model.safetensors`, `optimizer.safetensors`, `rng.json`. Tensors are stored
with safetensors and everything else as JSON, so loading never unpickles anything. Why not
torch.distributed.checkpoint: its metadata file is a pickle, and its placements (DTensor shards)
cannot express our tensor-parallel layouts (a rank's fused qkv is three separate row ranges, and
multi-query KV heads are replicated on some ranks only); global boxes express both.

A checkpoint is untrusted input. Every name read from one (`latest`, manifest and metadata
entries) must be relative and, symlinks resolved, stay inside its directory and name a regular file
(storage.resolve_inside, the one place this rule lives; a symlink to another file of the same
checkpoint is followed, one leading out is refused). Files are hashed and read only up to the size
the manifest gives; safetensors headers are checked against the file (a pickle or a truncated file
is named as such); the pieces of every tensor must tile it exactly once (slices.check_tiling). All
of it is checked before any weight is used; failures are CheckpointError naming file and entry.

What is saved is the model's named parameters (and the optimizer's state of them), whatever
kernels the run used: Transformer Engine modules hold the same parameters under the same names
(te_layers.py), so checkpoints move between TE and plain runs at any layout. TE's FP8 metadata
(`_extra_state`: delayed scaling's amax histories and scales) is deliberately not saved: it is a
pickle (loading it would unpickle untrusted bytes), it belongs to one rank's shards of one layout,
and it is rebuilt by the run itself. After a resume with `backend.fp8=delayed` the first micro-batch
quantizes with TE's initial scales, as the first step of a fresh run does, and the history fills
again over `amax_history_len` (16) steps; current scaling keeps no such state.

Modules: storage (files, atomic commit, `latest`, verification), slices (shard specs, global boxes),
state (who writes what, RNG), saver (Checkpointer, sync and async), loader (any layout into any
model and optimizer), reshard (offline layout changes, weights-only checkpoints).
"""

from megatron_andromeda.checkpoint.loader import (
    CheckpointReader,
    load_checkpoint,
    load_model_weights,
    open_checkpoint,
    read_model_state,
)
from megatron_andromeda.checkpoint.reshard import reshard_checkpoint, write_model_checkpoint
from megatron_andromeda.checkpoint.saver import Checkpointer, save_checkpoint
from megatron_andromeda.checkpoint.state import Placement
from megatron_andromeda.checkpoint.storage import (
    LATEST,
    MANIFEST,
    METADATA,
    CheckpointError,
    resolve_checkpoint,
    step_dir_name,
    verify_checkpoint,
)

__all__ = [
    "LATEST",
    "MANIFEST",
    "METADATA",
    "CheckpointError",
    "CheckpointReader",
    "Checkpointer",
    "Placement",
    "load_checkpoint",
    "load_model_weights",
    "open_checkpoint",
    "read_model_state",
    "reshard_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_dir_name",
    "verify_checkpoint",
    "write_model_checkpoint",
]
