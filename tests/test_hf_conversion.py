"""Hugging Face conversion: exact to the logit in both directions, for every supported architecture.

Each architecture is exported from a tiny random Andromeda model, loaded by `transformers` and
compared on random token batches (max |logit difference| < 1e-4) and on 20-token greedy
continuations (ours with and without the KV cache against `transformers`' generate). Models that
start life in `transformers` go HF -> Andromeda -> HF and must come back bit-identical, also through
a tensor 2 x pipeline 2 checkpoint (written by convert_from_hf, merged again by convert_to_hf).
"""

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_tokenizer import FOX, train_tiny_tokenizer
from tool_loader import load_tool

from megatron_andromeda.checkpoint import read_model_state, write_model_checkpoint
from megatron_andromeda.config import ModelConfig, RunConfig
from megatron_andromeda.generation import SamplingConfig, generate
from megatron_andromeda.hf import ConversionError, load_hf_directory, save_hf_directory
from megatron_andromeda.models import GPTModel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BASE = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, max_seq_length=64)
SWIGLU_LN = dict(norm="layernorm", activation="swiglu")
ARCHS = {  # name -> (ModelConfig fields, the class transformers must load)
    "cohere": (
        dict(block="parallel", **SWIGLU_LN, rotary_interleaved=True, num_kv_heads=1, head_dim=32,
             logit_scale=0.5, rotary_base=5000.0),
        "CohereForCausalLM",
    ),
    "stablelm": (
        dict(block="parallel", **SWIGLU_LN, rotary_interleaved=False, num_kv_heads=2), "StableLmForCausalLM"
    ),
    "stablelm-sequential": (
        dict(block="sequential", **SWIGLU_LN, rotary_interleaved=True, num_kv_heads=2, tie_embeddings=False),
        "StableLmForCausalLM",
    ),
    "llama": (
        dict(block="sequential", norm="rmsnorm", rotary_interleaved=True, num_kv_heads=1,
             tie_embeddings=False, rotary_base=500000.0),
        "LlamaForCausalLM",
    ),
    "mpt": (
        dict(block="sequential", activation="gelu", position_embedding="alibi", num_kv_heads=4),
        "MptForCausalLM",
    ),
}  # fmt: skip


def tiny_model(**fields) -> GPTModel:
    cfg = ModelConfig(**{**BASE, **fields})
    cfg.validate()
    torch.manual_seed(0)
    model = GPTModel(cfg)
    with torch.no_grad():  # non-trivial norm weights, and logits spread enough that argmax has no near-ties
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.copy_(1 + 0.2 * torch.randn_like(p))
    return model.eval()


def same_architecture(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal up to the name and to defaults spelled out (head_dim None vs hidden // heads)."""
    resolved = lambda c: dataclasses.replace(c, name="", head_dim=c.kv_channels, ffn_hidden_size=c.ffn_size)
    return resolved(a) == resolved(b)


def load_hf(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def max_logit_diff(ours: GPTModel, hf, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(tokens) - hf(tokens).logits).abs().max().item()


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def run_tool(name: str, argv: list[str]) -> int:
    return load_tool(name).main(argv)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A 300-id byte-level BPE trained here, with the end-of-document and padding tokens."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return Path(train_tiny_tokenizer(path, [FOX, "a stitch in time saves nine"] * 50))


# ------------------------------------------------------------------------------- Andromeda -> HF
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_export_matches_transformers_logits_and_greedy_generation(arch, tmp_path):
    fields, hf_class = ARCHS[arch]
    ours = tiny_model(**fields)
    save_hf_directory(tmp_path / "hf", ours.cfg, ours.state_dict())
    hf = load_hf(tmp_path / "hf")
    assert type(hf).__name__ == hf_class
    assert max_logit_diff(ours, hf, random_tokens(3, 24)) < 1e-4

    prompt = random_tokens(1, 6, seed=1)
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    cached = generate(ours, prompt, greedy, use_cache=True, real_vocab_size=None)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(cached, theirs)
    assert torch.equal(cached, generate(ours, prompt, greedy, use_cache=False, real_vocab_size=None))


def test_rotary_row_permutation_is_exact_and_invertible():
    from megatron_andromeda.hf.convert import _rotary_rows
    from megatron_andromeda.models.rotary import RotaryEmbedding, apply_rotary

    heads, hd, T = 2, 8, 5
    w, x = torch.randn(heads * hd, 16), torch.randn(1, T, 16)
    cos, sin = RotaryEmbedding(hd, T)(None, T)
    w_half = _rotary_rows(w, heads, hd, src_interleaved=True, dst_interleaved=False)
    q_int = apply_rotary((x @ w.T).view(1, T, heads, hd), cos, sin, interleaved=True).transpose(1, 2)
    q_half = apply_rotary((x @ w_half.T).view(1, T, heads, hd), cos, sin, interleaved=False).transpose(1, 2)
    # (1, heads, T, hd): the same vectors up to coordinate order, so the dot products across positions
    # (all that attention sees) agree.
    assert torch.allclose(q_int @ q_int.transpose(-1, -2), q_half @ q_half.transpose(-1, -2), atol=1e-5)
    assert not torch.allclose(q_int, q_half)
    assert torch.equal(_rotary_rows(w_half, heads, hd, src_interleaved=False, dst_interleaved=True), w)


def test_export_without_the_rotary_permutation_fails_the_logit_check(tmp_path):
    """Negative control: Llama pairs rotary coordinates differently, and skipping the per-head q/k
    row permutation (by pretending the model is already half-split) must break the logits."""
    ours = tiny_model(**ARCHS["llama"][0])
    unpermuted = dataclasses.replace(ours.cfg, rotary_interleaved=False)
    save_hf_directory(tmp_path / "hf", unpermuted, ours.state_dict())
    assert max_logit_diff(ours, load_hf(tmp_path / "hf"), random_tokens(3, 24)) > 1e-2


def test_sharded_export_with_tokenizer_files(tmp_path, tokenizer_file):
    ours = tiny_model(**ARCHS["cohere"][0])
    out = save_hf_directory(tmp_path / "hf", ours.cfg, ours.state_dict(), tokenizer=tokenizer_file,
                            max_shard_size="40KB")  # fmt: skip
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert max_logit_diff(ours, load_hf(out), random_tokens(2, 16)) < 1e-4

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox saves time"
    from tokenizers import Tokenizer

    assert (
        hf_tok(text, add_special_tokens=False)["input_ids"]
        == Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    )
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|endoftext|>", "<|padding|>")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 5000.0  # both fields written
    assert (config["logit_scale"], config["num_key_value_heads"], config["head_dim"]) == (0.5, 1, 32)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (0, 1)

    cfg, state = load_hf_directory(out)  # reads the shards back
    assert same_architecture(cfg, ours.cfg)
    assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


def test_export_tokenizer_loads_in_transformers_4_and_5_and_files_follow_the_umask(tmp_path, tokenizer_file):
    """transformers 5's own tokenizer writer names `TokenizersBackend`, which 4.x cannot load; the
    export names `PreTrainedTokenizerFast` (both majors have it) with its special tokens spelled out.
    The installed transformers must load it and round-trip text; the config content is what 4.57
    was checked by hand to load (see README, "Hugging Face output"). The weights are written like
    every other file, with the user's umask (safetensors' own writer leaves them 0600)."""
    ours = tiny_model(**ARCHS["llama"][0])
    old_umask = os.umask(0o022)
    try:
        out = save_hf_directory(tmp_path / "hf", ours.cfg, ours.state_dict(), tokenizer=tokenizer_file,
                                max_shard_size="60KB")  # fmt: skip
    finally:
        os.umask(old_umask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert any(name.startswith("model-0") for name in modes) and "model.safetensors.index.json" in modes
    assert set(modes.values()) == {0o644}, modes

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == (
        "<|endoftext|>",
        "<|padding|>",
        None,
    )
    assert config["model_max_length"] == 64 and config["clean_up_tokenization_spaces"] is False
    assert "unk_token" not in config  # byte-level BPE has no unknown token
    assert not any("TokenizersBackend" in f.read_text() for f in out.glob("*.json"))
    assert (out / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()  # the file training used

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    from megatron_andromeda.data.tokenizer import load_tokenizer

    text = "the quick  brown fox, saves nine!"
    ids = hf_tok(text)["input_ids"]  # special tokens on: none may be added
    assert ids == load_tokenizer(tokenizer_file).encode(text)
    assert hf_tok.decode(ids) == text
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token) == (0, 1, None)
    assert max_logit_diff(ours, load_hf(out), torch.tensor([ids])) < 1e-4


def test_unknown_token_of_a_wordlevel_tokenizer_is_exported(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(["the", "quick", "brown", "fox"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = tiny_model(**ARCHS["llama"][0])
    out = save_hf_directory(
        tmp_path / "hf", ours.cfg, ours.state_dict(), tokenizer=tmp_path / "tokenizer.json"
    )
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["unk_token"], config["eos_token"], config["pad_token"]) == ("<unk>", "</s>", "</s>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("the slow fox")["input_ids"] == [2, 0, 5] and hf_tok.unk_token_id == 0


# ------------------------------------------------------------------------------- HF -> Andromeda -> HF
def native_hf_models():
    c = transformers
    common = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4
    )
    rope = {"rope_type": "default", "rope_theta": 20000.0}
    full_rope = {**rope, "partial_rotary_factor": 1.0}
    return {
        "cohere": c.CohereConfig(**common, num_key_value_heads=2, logit_scale=0.25, rope_parameters=rope),
        "stablelm": c.StableLmConfig(**common, num_key_value_heads=4, use_parallel_residual=True,
                                     tie_word_embeddings=True, rope_parameters=full_rope),
        "llama": c.LlamaConfig(**common, num_key_value_heads=1, rope_parameters=rope),
        "mpt": c.MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=300),
    }  # fmt: skip


@pytest.mark.parametrize("arch", ["cohere", "stablelm", "llama", "mpt"])
def test_hf_to_andromeda_to_hf_is_identical(arch, tmp_path):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(native_hf_models()[arch]).eval()
    with torch.no_grad():  # random norm weights too, so a swapped norm would show
        for name, p in hf.named_parameters():
            if p.dim() == 1 and not name.endswith("bias"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "a")
    cfg, state = load_hf_directory(tmp_path / "a")
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(state)
    assert max_logit_diff(ours, hf, random_tokens(2, 20)) < 1e-4

    save_hf_directory(tmp_path / "b", cfg, state)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_hf_directory(tmp_path / "b")[0] == cfg


# ------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(block="parallel", position_embedding="alibi"), "no Hugging Face architecture"),
        (dict(block="parallel", norm="rmsnorm"), "no Hugging Face architecture"),
        (dict(block="sequential", norm="rmsnorm", logit_scale=2.0), "Llama has no logit scale"),
        (
            dict(block="sequential", activation="gelu", position_embedding="alibi", num_kv_heads=2),
            "grouped-query",
        ),
        (dict(block="parallel", rotary_interleaved=False, head_dim=32), "StableLM needs head_dim"),
    ],
)
def test_unsupported_models_fail_clearly(fields, message, tmp_path):
    model = tiny_model(**fields)
    with pytest.raises(ConversionError, match=message):
        save_hf_directory(tmp_path / "hf", model.cfg, model.state_dict())
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_a_shape_transformers_refuses_is_a_conversion_error(tmp_path):
    """Llama with heads x head_dim != hidden_size: transformers 5 refuses the config (its own
    validation); that must reach the user as a ConversionError naming the shape, not a traceback of
    transformers' internals. A transformers that accepts it must load an export with equal logits."""
    model = tiny_model(block="sequential", norm="rmsnorm", tie_embeddings=False, hidden_size=48,
                       num_heads=5, head_dim=8, num_kv_heads=5)  # fmt: skip
    try:
        save_hf_directory(tmp_path / "hf", model.cfg, model.state_dict())
    except ConversionError as e:
        assert "LlamaForCausalLM config rejects this model" in str(e) and "model.hidden_size=48" in str(e)
        assert not (tmp_path / "hf").exists()
        return
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


def test_import_refuses_what_it_would_lose(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(native_hf_models()["stablelm"])
    with torch.no_grad():
        hf.model.layers[1].input_layernorm.bias.fill_(0.1)
    hf.save_pretrained(tmp_path / "biased")
    with pytest.raises(ConversionError, match="input_layernorm.bias is not zero"):
        load_hf_directory(tmp_path / "biased")
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    transformers.AutoModelForCausalLM.from_config(gpt2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConversionError, match="model_type='gpt2' does not convert"):
        load_hf_directory(tmp_path / "gpt2")


# ------------------------------------------------------------------------------- the command-line tools
def test_tools_checkpoint_to_hf_to_checkpoint_and_generate(tmp_path, tokenizer_file, capsys):
    ours = tiny_model(**ARCHS["cohere"][0])
    run_cfg = RunConfig(model=ours.cfg)
    run_cfg.data.tokenizer, run_cfg.data.seq_length = str(tokenizer_file), 64
    write_model_checkpoint(tmp_path / "ckpt", run_cfg.validate(), ours.state_dict())

    assert (
        run_tool("convert_to_hf", ["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
        == 0
    )
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert (
        run_tool("convert_from_hf", ["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    )
    back_cfg, back_state = read_model_state(tmp_path / "back")
    assert same_architecture(back_cfg.model, ours.cfg)
    assert all(torch.equal(back_state[k], v) for k, v in ours.state_dict().items())

    rc = run_tool("convert_from_hf", ["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "x"),
                                      "--tensor", "2", "--pipeline", "2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    sharded_cfg, sharded_state = read_model_state(tmp_path / "x")  # assembled from 4 ranks' pieces
    assert (sharded_cfg.parallel.tensor, sharded_cfg.parallel.pipeline) == (2, 2)
    assert len(list((tmp_path / "x").glob("model-rank*.safetensors"))) == 4
    assert all(torch.equal(sharded_state[k], v) for k, v in ours.state_dict().items())
    rc = run_tool("convert_to_hf", ["--checkpoint", str(tmp_path / "x"), "--output", str(tmp_path / "hf2")])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    first = load_file(tmp_path / "hf" / "model.safetensors")
    second = load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    from megatron_andromeda.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    prompt = "the quick"
    expected = generate(
        ours,
        torch.tensor([tok.encode(prompt)]),
        SamplingConfig(max_new_tokens=12, temperature=0),
        real_vocab_size=tok.vocab_size,
    )
    expected_text = prompt + tok.decode(expected[0, len(tok.encode(prompt)) :].tolist())
    for source in (["--hf", str(tmp_path / "hf")], ["--checkpoint", str(tmp_path / "back")]):
        argv = [*source, "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0", "--ignore-eos"]
        assert run_tool("generate", argv) == 0
        assert capsys.readouterr().out == expected_text + "\n"


def test_convert_to_hf_without_a_tokenizer_says_so(tmp_path, capsys):
    ours = tiny_model(**ARCHS["mpt"][0])
    write_model_checkpoint(tmp_path / "ckpt", RunConfig(model=ours.cfg), ours.state_dict())
    assert (
        run_tool("convert_to_hf", ["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
        == 0
    )
    assert "names no tokenizer" in capsys.readouterr().out
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert max_logit_diff(ours, load_hf(tmp_path / "hf"), random_tokens(2, 16)) < 1e-4
