"""An lm-evaluation-harness model over an Andromeda checkpoint (the `[eval]` extra).

    import lm_eval
    from megatron_andromeda.evaluation.harness import AndromedaLM
    lm = AndromedaLM(checkpoint="runs/x/checkpoints", batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"])  # the harness fetches its own task data

or, once this module is imported, `--model andromeda --model_args checkpoint=DIR` on the harness
command line. lm_eval is optional: without it the class still works on anything with an `args`
tuple (as the harness's `Instance` has), which is how the tests can exercise it either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from megatron_andromeda.evaluation.scoring import (
    EvalModel,
    continuation_logprobs,
    encode_pair,
    greedy_until,
    load_eval_model,
)

try:
    from lm_eval.api.model import LM as _HarnessLM
    from lm_eval.api.registry import register_model as _register_model

    HAVE_LM_EVAL = True
except ImportError:  # the [eval] extra is not installed
    _HarnessLM, _register_model, HAVE_LM_EVAL = object, None, False


class AndromedaLM(_HarnessLM):
    """The three request types of the harness's `LM` interface on top of `scoring.py`."""

    def __init__(
        self,
        checkpoint: str | None = None,
        tokenizer: str | None = None,
        device: str = "auto",
        batch_size: int | str = 8,
        max_gen_toks: int | str = 256,
        eval_model: EvalModel | None = None,
    ) -> None:
        super().__init__()
        if eval_model is None:
            if checkpoint is None:
                raise ValueError("AndromedaLM needs checkpoint=DIR (or an EvalModel)")
            eval_model = load_eval_model(checkpoint, tokenizer, device, int(batch_size))
        self.em = eval_model
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.em.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self.em.max_length

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is greedy) per `(context, continuation)` request; an
        empty context conditions on the end-of-document token, as for the harness's own models."""
        pairs = [
            encode_pair(self.em.tokenizer, context, continuation) for context, continuation in _args(requests)
        ]
        return continuation_logprobs(self.em, pairs)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Log-likelihood of each `(text,)`, every token predicted once with as much context as fits.

        The text is preceded by the end-of-document token and cut into windows of `max_length`
        predictions; each window after the first keeps the full window of earlier tokens as context.
        """
        L, eod, pairs, owners = self.em.max_length, self.eot_token_id, [], []
        for i, (text,) in enumerate(_args(requests)):
            stream = [eod, *self.em.tokenizer.encode(text)]
            for a in range(1, len(stream), L):  # predict stream[a:b] from what precedes it
                b = min(a + L, len(stream))
                pairs.append((stream[max(0, b - 1 - L) : a], stream[a:b]))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, continuation_logprobs(self.em, pairs)):
            totals[owner] += logp
        return totals

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy text per `(context, gen_kwargs)`, cut before the first `until` string."""
        outputs = []
        for context, kwargs in _args(requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            outputs.append(greedy_until(self.em, context, until, max_new))
        return outputs


def _args(requests: Sequence[Any]) -> list[tuple]:
    """The argument tuples of harness `Instance`s (or of plain tuples)."""
    return [r.args if hasattr(r, "args") else tuple(r) for r in requests]


if _register_model is not None:
    _register_model("andromeda")(AndromedaLM)
