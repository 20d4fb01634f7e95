"""What every evaluation needs from a model: loading it, scoring continuations, greedy generation.

`continuation_logprobs` is the one primitive behind multiple-choice scoring and the
lm-evaluation-harness adapter: the summed log-probability of a continuation given a context, and
whether greedy decoding would have produced it. Requests are batched longest first and right-padded;
padding on the right never changes a causal model's earlier positions.

Every evaluation reads logits through `EvalModel.logits`, which gives the vocabulary padding (ids
the model has rows for but the tokenizer does not, models/vocab.py) probability zero, as training
did: a checkpoint padded to 1,024 ids scores exactly like the same weights unpadded at 1,000.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_andromeda.checkpoint import read_model_state
from megatron_andromeda.config import RunConfig
from megatron_andromeda.data.tokenizer import Tokenizer, load_tokenizer
from megatron_andromeda.generation import SamplingConfig, generate
from megatron_andromeda.models import GPTModel, mask_padding_logits
from megatron_andromeda.models.vocab import check_real_vocab_size


@dataclass
class EvalModel:
    """A model ready for evaluation with its tokenizer and the longest sequence it can read.

    The tokenizer is required because it owns the real vocabulary size: call `logits` (never
    `model` directly) and pass `real_vocab_size` to `generate`, so padding ids stay out.
    """

    model: nn.Module
    tokenizer: Tokenizer
    device: torch.device
    max_length: int
    batch_size: int = 8
    config: RunConfig | None = None

    def __post_init__(self) -> None:
        model_cfg = getattr(self.model, "cfg", None)
        if model_cfg is not None:
            check_real_vocab_size(
                self.real_vocab_size, model_cfg.vocab_size, f"tokenizer {self.tokenizer.path}"
            )

    @property
    def real_vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def logits(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """The model's logits (B, T, V) with the padding ids at -inf (probability zero)."""
        return mask_padding_logits(self.model(tokens, **kwargs), self.real_vocab_size)

    @classmethod
    def from_model(cls, model: GPTModel, tokenizer: Tokenizer, batch_size: int = 8) -> EvalModel:
        device = next(model.parameters()).device
        return cls(model.eval(), tokenizer, device, model.cfg.max_seq_length, batch_size)


def resolve_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def load_eval_model(
    checkpoint: str, tokenizer: str | None = None, device: str = "auto", batch_size: int = 8
) -> EvalModel:
    """The checkpoint's model in eval mode, with `tokenizer` or the one its config names."""
    config, state = read_model_state(checkpoint)
    tokenizer_path = tokenizer or config.data.tokenizer
    if not tokenizer_path:
        raise ValueError(f"{checkpoint}: the checkpoint's config names no tokenizer; pass --tokenizer")
    model = GPTModel(config.model)
    model.load_state_dict(state)
    dev = resolve_device(device)
    return EvalModel(
        model.to(dev).eval(),
        load_tokenizer(tokenizer_path, config.data.tokenizer_backend, setting="data.tokenizer_backend"),
        dev,
        config.model.max_seq_length,
        batch_size,
        config,
    )


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, tokenized together so BPE merges across the seam are the
    ones the model saw in training. Trailing spaces of the context move to the continuation."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    if not stripped:  # nothing to condition on but the start of a document
        return [tokenizer.eod_id], tokenizer.encode(continuation)
    context_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    if len(whole) > len(context_ids) and whole[: len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids) :]
    return context_ids, tokenizer.encode(continuation)  # a merge crossed the seam: split it apart


@torch.no_grad()
def continuation_logprobs(
    em: EvalModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) per request.

    A context must hold at least one token. Inputs longer than the model's window keep their last
    `max_length` tokens of context (the continuation is always scored in full if it fits).
    """
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    windows = []
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {i}: context and continuation must each hold at least one token")
        full = list(context) + list(continuation)
        full = full[-(em.max_length + 1) :]
        windows.append((i, full, min(len(continuation), len(full) - 1)))
    windows.sort(key=lambda w: -len(w[1]))  # longest first: similar lengths share a batch
    for start in range(0, len(windows), em.batch_size):
        chunk = windows[start : start + em.batch_size]
        width = len(chunk[0][1]) - 1
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (_, full, _) in enumerate(chunk):
            inputs[row, : len(full) - 1] = torch.tensor(full[:-1])
        logits = em.logits(inputs.to(em.device))  # (B, width, V)
        for row, (i, full, n) in enumerate(chunk):
            end = len(full) - 1
            logp = F.log_softmax(logits[row, end - n : end].float(), dim=-1)  # (n, V)
            target = torch.tensor(full[-n:], device=logp.device)
            score = logp.gather(-1, target[:, None]).sum().item()
            results[i] = (score, bool((logp.argmax(-1) == target).all()))
    return results  # type: ignore[return-value]


@torch.no_grad()
def greedy_until(em: EvalModel, context: str | list[int], until: Sequence[str], max_new_tokens: int) -> str:
    """Greedy continuation of `context` (text or token ids), cut before the first of the `until`
    strings; generation also stops at the end-of-document token."""
    tok = em.tokenizer
    prompt = (tok.encode(context) if isinstance(context, str) else list(context)) or [tok.eod_id]
    max_new_tokens = min(max_new_tokens, em.max_length - 1)
    prompt = prompt[-(em.max_length - max_new_tokens) :]
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=tok.eod_id)
    prompt_ids = torch.tensor([prompt], device=em.device)
    out = generate(em.model, prompt_ids, cfg, real_vocab_size=em.real_vocab_size)[0, len(prompt) :].tolist()
    if tok.eod_id in out:
        out = out[: out.index(tok.eod_id)]
    text = tok.decode(out)
    cut = min((text.index(s) for s in until if s and s in text), default=len(text))
    return text[:cut]
