"""Autoregressive sampling from a GPTModel: greedy, temperature, top-k and top-p, with a KV cache.

With the cache the prompt is run once and every later step feeds a single token, the model
continuing positions from `cache.length`; without it every step recomputes the whole sequence,
which is slower but is the reference the cached path is tested against. Prompts in a batch share
one length (no padding), which is all the command-line tool and the tests need.

`generate` needs the tokenizer's vocabulary size (`real_vocab_size`): the model may have more output
rows than the tokenizer has ids (vocabulary padding, models/vocab.py), and those ids are cut off
before any filter or sampling, so greedy, top-k, top-p and temperature sampling never produce one.
Cut, not masked to -inf: the sampler then draws from exactly the distribution (and, with the same
seed, the same tokens) as the same weights without padding, which a -inf mask would not give
(`torch.multinomial` consumes its random stream per column).
It is a required argument so that no caller can forget it; None says the model has no padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_andromeda.config import ConfigError
from megatron_andromeda.models import KVCache


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 = all
    eos_id: int | None = None  # a row stops after producing it; later positions repeat it

    def validate(self) -> SamplingConfig:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) with every token outside the top-k / top-p set at -inf (the best one always kept)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row (B,) from the last-position logits (B, V)."""
    logits = logits.float()
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    cfg: SamplingConfig,
    *,
    real_vocab_size: int | None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Prompt (B, T) -> prompt plus up to `cfg.max_new_tokens` new tokens, (B, T + n).

    `real_vocab_size` is the tokenizer's vocabulary size: only ids below it are ever produced.
    `on_token` is called with each step's tokens (B,) as soon as they exist (streaming). Stops
    early once every row has produced `cfg.eos_id`.
    """
    cfg.validate()
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt must be a non-empty (batch, length) tensor of ids, got {tuple(prompt.shape)}"
        )
    if real_vocab_size is not None and int(prompt.max()) >= real_vocab_size:
        raise ValueError(f"prompt id {int(prompt.max())} is not in the tokenizer's {real_vocab_size} ids")
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompt, cfg, real_vocab_size, generator, use_cache, on_token)
    finally:
        model.train(was_training)


def _decode(model, prompt, cfg, real_vocab_size, generator, use_cache, on_token) -> torch.Tensor:
    tokens = prompt
    cache = KVCache() if use_cache else None
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    step_input = prompt
    for _ in range(cfg.max_new_tokens):
        logits = model(step_input if use_cache else tokens, cache=cache)[:, -1]  # (B, V)
        new = next_token(logits[:, :real_vocab_size], cfg, generator)  # padding ids absent
        if cfg.eos_id is not None:
            new = new.masked_fill(finished, cfg.eos_id)
            finished |= new == cfg.eos_id
        tokens = torch.cat((tokens, new[:, None]), dim=1)
        step_input = new[:, None]
        if on_token is not None:
            on_token(new)
        if finished.all():
            break
    return tokens
