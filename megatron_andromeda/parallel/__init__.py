"""Everything that talks to torch.distributed: layout, process groups, tensor / sequence / pipeline /
data parallelism, the parallel optimizers and the loop's hooks.

Start with `layout.py` (the validated run layout), `context.py` (process groups, `init_parallel`),
then `parallelize.py` (the one place that shards a model). README.md in this folder documents the
rank layout.
"""

from megatron_andromeda.parallel.context import ParallelContext, init_parallel
from megatron_andromeda.parallel.layout import (
    RankLayout,
    RunLayout,
    check_tensor_parallel,
    padded_vocab_size,
    plan_layout,
    validate_layout,
)
from megatron_andromeda.parallel.loss import make_loss_fn
from megatron_andromeda.parallel.parallelize import (
    finalize_tp_grads,
    make_grad_norm_fn,
    parallelize_model,
)

__all__ = [
    "ParallelContext",
    "RankLayout",
    "RunLayout",
    "check_tensor_parallel",
    "finalize_tp_grads",
    "init_parallel",
    "make_grad_norm_fn",
    "make_loss_fn",
    "padded_vocab_size",
    "parallelize_model",
    "plan_layout",
    "validate_layout",
]
