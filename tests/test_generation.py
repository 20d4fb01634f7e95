"""Sampling: the filters, the sampled distribution, and cached decoding against full recomputation."""

import pytest
import torch

from megatron_andromeda.config import ConfigError, ModelConfig
from megatron_andromeda.generation import SamplingConfig, filter_logits, generate, next_token
from megatron_andromeda.models import GPTModel

SHAPES = {
    "palm-mqa": dict(num_kv_heads=1),
    "parallel-gqa-halfsplit": dict(num_kv_heads=2, rotary_interleaved=False),
    "llama": dict(block="sequential", norm="rmsnorm", num_kv_heads=2, tie_embeddings=False),
    "mpt-alibi": dict(block="sequential", activation="gelu", position_embedding="alibi", num_kv_heads=4),
}


def tiny_model(**overrides) -> GPTModel:
    cfg = ModelConfig(
        vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, max_seq_length=64, **overrides
    )
    cfg.validate()
    torch.manual_seed(0)
    model = GPTModel(cfg)
    with torch.no_grad():  # larger weights than the init: clear argmax gaps, no near-ties
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.eval()


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    kept = filter_logits(logits, top_k=5).isfinite()
    assert kept.sum(dim=-1).tolist() == [5, 5, 5]
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(5).indices, True))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()  # ranks: 1, 3, 2, 0
    assert filter_logits(logits, top_p=0.8).isfinite().tolist() == [[False, True, False, True]]
    assert filter_logits(logits, top_p=0.81).isfinite().tolist() == [[False, True, True, True]]
    assert filter_logits(logits, top_p=1e-6).isfinite().tolist() == [[False, True, False, False]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()


def test_sampled_frequencies_follow_temperature_and_top_k():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40000
    gen = torch.Generator().manual_seed(0)
    draws = next_token(logits.expand(n, -1), SamplingConfig(temperature=0.7), gen)
    freq = torch.bincount(draws, minlength=5).float() / n
    assert torch.allclose(freq, (logits / 0.7).softmax(-1), atol=0.01)
    draws = next_token(logits.expand(n, -1), SamplingConfig(temperature=1.0, top_k=2), gen)
    freq = torch.bincount(draws, minlength=5).float() / n
    assert torch.allclose(freq, torch.cat((logits[:2].softmax(-1), torch.zeros(3))), atol=0.01)


def test_greedy_top_k_1_and_tiny_top_p_all_pick_the_argmax():
    logits = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    best = logits.argmax(-1)
    assert torch.equal(next_token(logits, SamplingConfig(temperature=0.0)), best)
    assert torch.equal(next_token(logits, SamplingConfig(top_k=1)), best)
    assert torch.equal(next_token(logits, SamplingConfig(top_p=1e-6)), best)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cached_decoding_equals_full_recomputation(shape):
    model = tiny_model(**SHAPES[shape])
    prompt = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(2))
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    cached = generate(model, prompt, greedy, use_cache=True, real_vocab_size=None)
    full = generate(model, prompt, greedy, use_cache=False, real_vocab_size=None)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, full)
    assert torch.equal(cached[:, :7], prompt)
    # Sampled decoding with the same seed walks the same path too (the logits agree to ~1e-6).
    sampled = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, prompt, sampled, generator=torch.Generator().manual_seed(3), real_vocab_size=None)
    b = generate(
        model,
        prompt,
        sampled,
        generator=torch.Generator().manual_seed(3),
        use_cache=False,
        real_vocab_size=None,
    )
    assert torch.equal(a, b)


def test_seed_reproducibility_and_streaming_callback():
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]])
    cfg = SamplingConfig(max_new_tokens=15, temperature=1.5)
    streamed = []
    a = generate(
        model,
        prompt,
        cfg,
        generator=torch.Generator().manual_seed(7),
        on_token=streamed.append,
        real_vocab_size=None,
    )
    b = generate(model, prompt, cfg, generator=torch.Generator().manual_seed(7), real_vocab_size=None)
    c = generate(model, prompt, cfg, generator=torch.Generator().manual_seed(8), real_vocab_size=None)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.cat(streamed).tolist() == a[0, 3:].tolist()


def test_eos_stops_a_row_and_pads_it():
    model = tiny_model()
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    free = generate(model, prompt, SamplingConfig(max_new_tokens=12, temperature=0.0), real_vocab_size=None)
    eos = int(free[0, 5 + 3])  # the 4th token row 0 produces
    out = generate(
        model, prompt, SamplingConfig(max_new_tokens=12, temperature=0.0, eos_id=eos), real_vocab_size=None
    )
    stops = []
    for row in range(2):  # a row matches the free run up to its first eos, then repeats eos
        hits = (free[row, 5:] == eos).nonzero()
        stop = 5 + int(hits[0]) + 1 if len(hits) else free.shape[1]
        assert torch.equal(out[row, :stop], free[row, :stop])
        assert (out[row, stop:] == eos).all()
        stops.append(stop)
    assert stops[0] == 5 + 4 or free[0, 5:8].eq(eos).any()
    assert out.shape[1] == max(stops)  # decoding ends once every row is done


def test_bad_settings_fail_clearly_and_training_mode_is_restored():
    model = tiny_model().train()
    with pytest.raises(ConfigError, match="temperature"):
        generate(model, torch.tensor([[1]]), SamplingConfig(temperature=-1.0), real_vocab_size=None)
    with pytest.raises(ConfigError, match="top_p"):
        generate(model, torch.tensor([[1]]), SamplingConfig(top_p=0.0), real_vocab_size=None)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), SamplingConfig(), real_vocab_size=None)
    generate(model, torch.tensor([[1, 2]]), SamplingConfig(max_new_tokens=2), real_vocab_size=None)
    assert model.training
