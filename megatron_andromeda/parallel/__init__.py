"""Everything that talks to torch.distributed: the parallel context and tensor/sequence parallelism.

Start with `context.py` (rank layout, groups, `init_parallel`), then `parallelize.py` (the one place
that shards a model). README.md in this folder documents the rank layout.
"""

from megatron_andromeda.parallel.context import (
    ParallelContext,
    RankLayout,
    check_tensor_parallel,
    init_parallel,
    padded_vocab_size,
    validate_layout,
)
from megatron_andromeda.parallel.parallelize import (
    finalize_tp_grads,
    make_grad_norm_fn,
    make_loss_fn,
    parallelize_model,
)

__all__ = [
    "ParallelContext",
    "RankLayout",
    "check_tensor_parallel",
    "finalize_tp_grads",
    "init_parallel",
    "make_grad_norm_fn",
    "make_loss_fn",
    "padded_vocab_size",
    "parallelize_model",
    "validate_layout",
]
