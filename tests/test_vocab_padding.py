"""Vocabulary padding stays inside the model: a checkpoint padded from 300 to 384 ids scores, samples
and exports exactly like the same weights unpadded.

The padded model's extra rows are large random vectors, so their logits dominate: any consumer that
forgets the mask gets different figures or emits padding ids at once (the `*_has_teeth` checks
show that the unmasked logits would). Issue 21, section 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hang_guard import HANG_GUARD_S
from tiny_tokenizer import train_tiny_tokenizer
from tool_loader import load_tool

from megatron_andromeda.checkpoint import read_model_state, write_model_checkpoint
from megatron_andromeda.config import DataConfig, ModelConfig, RunConfig
from megatron_andromeda.data.indexed_dataset import IndexedDatasetWriter
from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.evaluation.harness import AndromedaLM
from megatron_andromeda.evaluation.perplexity import prefix_perplexity
from megatron_andromeda.evaluation.scoring import EvalModel
from megatron_andromeda.generation import SamplingConfig, generate
from megatron_andromeda.models import GPTModel, language_model_loss, mask_padding_logits, resize_vocabulary

ROOT = Path(__file__).resolve().parents[1]
REAL, PADDED = 300, 384  # the tokenizer's ids; model.vocab_size padded to a multiple of 128
TEXT = "the quick brown fox jumps over a lazy dog while Emma and Mr Knightley talk of marriage and money"
SAMPLERS = {  # every way of choosing a token
    "greedy": SamplingConfig(max_new_tokens=150, temperature=0.0),
    "temperature": SamplingConfig(max_new_tokens=150, temperature=1.0),
    "top_k": SamplingConfig(max_new_tokens=150, temperature=1.0, top_k=40),
    "top_p": SamplingConfig(max_new_tokens=150, temperature=1.0, top_p=0.9),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tiny_tokenizer(path, [TEXT, "The house is kind. The lady is brown."] * 20, vocab_size=REAL)
    loaded = load_tokenizer(path)
    assert loaded.vocab_size == REAL
    return loaded


def model_pair(tie: bool = True) -> tuple[GPTModel, GPTModel]:
    """(unpadded, padded): the same weights on the 300 real rows; the padded one has 84 more, large."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=REAL, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_length=64, tie_embeddings=tie)  # fmt: skip
    cfg.validate()
    small = GPTModel(cfg).eval()
    with torch.no_grad():  # spread-out logits: no near-ties for greedy decoding
        for p in small.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.copy_(1 + 0.2 * torch.randn_like(p))
    padded_cfg, state = resize_vocabulary(cfg, small.state_dict(), PADDED)
    noise = torch.Generator().manual_seed(1)
    for name in ("embedding.weight", "lm_head.weight"):
        if name in state:
            state[name][REAL:] = 3.0 * torch.randn(PADDED - REAL, 64, generator=noise)
    big = GPTModel(padded_cfg).eval()
    big.load_state_dict(state)
    return small, big


def checkpoint(path: Path, model: GPTModel, tokenizer) -> Path:
    cfg = RunConfig(model=model.cfg, data=DataConfig(tokenizer=tokenizer.path, seq_length=64)).validate()
    return write_model_checkpoint(path, cfg, model.state_dict())


def prompt_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("the quick brown")[:3], tokenizer.encode("Emma and Mr K")[:3]])


def test_the_padding_rows_dominate_unmasked_logits_has_teeth(tokenizer):
    _, padded = model_pair()
    with torch.no_grad():
        best = padded(prompt_ids(tokenizer)).argmax(-1)
    assert (best >= REAL).float().mean() > 0.5  # without the mask most argmaxes would be padding


def test_mask_padding_logits_on_a_whole_vocabulary_and_on_a_shard():
    logits = torch.randn(2, 3, 8)
    assert mask_padding_logits(logits, None) is logits and mask_padding_logits(logits, 8) is logits
    masked = mask_padding_logits(logits, 6)
    assert torch.equal(masked[..., :6], logits[..., :6]) and (masked[..., 6:] == float("-inf")).all()
    shard = mask_padding_logits(logits[..., 4:], 6, first_id=4)  # the second of two tensor ranks
    assert torch.equal(shard, masked[..., 4:])
    with pytest.raises(ValueError, match="real_vocab_size=0"):
        mask_padding_logits(logits, 0)


def test_training_loss_masks_padding_on_one_process():
    small, padded = model_pair()
    tokens = torch.randint(0, REAL, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, ref_parts = language_model_loss(small(tokens[:, :-1]), tokens[:, 1:], z_loss=1e-3)
        got, parts = language_model_loss(
            padded(tokens[:, :-1]), tokens[:, 1:], z_loss=1e-3, real_vocab_size=REAL
        )
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(parts["z_loss"], ref_parts["z_loss"])


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_sampling_never_emits_a_padding_id(sampler, use_cache, tokenizer):
    small, padded = model_pair()
    prompt, cfg = prompt_ids(tokenizer), SAMPLERS[sampler]
    out = generate(padded, prompt, cfg, real_vocab_size=REAL, use_cache=use_cache,
                   generator=torch.Generator().manual_seed(3))  # fmt: skip
    new = out[:, prompt.shape[1] :]
    assert new.numel() == 2 * cfg.max_new_tokens and int(new.max()) < REAL
    # The same tokens as the unpadded weights, with the same seed for every sampler.
    same = generate(small, prompt, cfg, real_vocab_size=REAL, use_cache=use_cache,
                    generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(out, same)


def test_sampling_without_the_mask_would_emit_padding_has_teeth(tokenizer):
    _, padded = model_pair()
    out = generate(padded, prompt_ids(tokenizer), SAMPLERS["temperature"], real_vocab_size=None,
                   generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert (out >= REAL).sum() > 100


def test_generate_refuses_a_prompt_outside_the_tokenizer():
    _, padded = model_pair()
    with pytest.raises(ValueError, match="prompt id 310 is not in the tokenizer's 300 ids"):
        generate(padded, torch.tensor([[5, 310]]), SamplingConfig(max_new_tokens=1), real_vocab_size=REAL)


def test_generate_tool_samples_only_tokenizer_ids(tmp_path, tokenizer, monkeypatch, capsys):
    small, padded = model_pair()
    checkpoint(tmp_path / "small", small, tokenizer)
    checkpoint(tmp_path / "padded", padded, tokenizer)
    tool = load_tool("generate")
    outputs = []
    real_generate = tool.generate
    monkeypatch.setattr(tool, "generate", lambda *a, **k: outputs.append(real_generate(*a, **k)))
    base = ["--prompt", "the quick", "--max-new-tokens", "200", "--ignore-eos", "--device", "cpu"]
    for flags in ([], ["--top-k", "40"], ["--top-p", "0.9"]):
        assert tool.main(["--checkpoint", str(tmp_path / "padded"), *base, *flags]) == 0
    sampled = torch.cat([o[0, len(tokenizer.encode("the quick")) :] for o in outputs])
    assert len(sampled) == 600 and int(sampled.max()) < REAL
    capsys.readouterr()
    greedy = [*base, "--temperature", "0"]
    texts = []
    for name in ("small", "padded"):
        assert tool.main(["--checkpoint", str(tmp_path / name), *greedy]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > 50


# ------------------------------------------------------------------------------------------- evaluation
def task_files(tmp_path: Path, tokenizer) -> list[str]:
    mc = tmp_path / "mc.jsonl"
    choices = [" quick", " lazy", " brown"]
    mc.write_text("".join(
        json.dumps({"context": f"The {s} is", "choices": choices, "label": i % 3}) + "\n"
        for i, s in enumerate(["fox", "dog", "Emma", "lady"])
    ))  # fmt: skip
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"context": f"The {s}", "answers": ["is kind"]}) + "\n" for s in ("fox", "house"))
    )
    valid = tmp_path / "austen_valid_text_document"
    with IndexedDatasetWriter(valid, np.uint16) as writer:
        writer.add_documents([tokenizer.encode(TEXT[i:]) + [tokenizer.eod_id] for i in (0, 11, 40)])
    return [
        "--tasks",
        str(mc),
        f"qa={qa}",
        "--valid-data",
        str(valid),
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
    ]


def figures(results: dict) -> tuple[list[float], list[str]]:
    """Every number of an evaluate.py result, and the generation task's answers."""
    mc, qa = results["tasks"]
    ppl = results["perplexity"][0]
    numbers = [ppl["tokens"], ppl["loss"], mc["acc"], mc["acc_norm"], qa["exact_match"], qa["f1"], qa["bleu"]]
    return numbers + [x for p in mc["predictions"] for x in p["logprobs"]], qa["predictions"]


def test_evaluate_cli_gives_the_same_figures_padded_or_not(tmp_path, tokenizer, capsys):
    small, padded = model_pair()
    checkpoint(tmp_path / "small", small, tokenizer)
    checkpoint(tmp_path / "padded", padded, tokenizer)
    tasks = task_files(tmp_path, tokenizer)
    assert (
        load_tool("evaluate").main(
            ["--checkpoint", str(tmp_path / "small"), *tasks, "--output", str(tmp_path / "a")]
        )
        == 0
    )
    cli = [
        sys.executable,
        str(ROOT / "tools" / "evaluate.py"),
        "--checkpoint",
        str(tmp_path / "padded"),
        *tasks,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cli, "--output", str(tmp_path / "b")], capture_output=True, text=True, timeout=HANG_GUARD_S, env=env
    )
    assert done.returncode == 0, done.stderr
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    (a_numbers, a_answers), (b_numbers, b_answers) = figures(a), figures(b)
    assert b_numbers == pytest.approx(a_numbers, rel=1e-5, abs=1e-5)
    assert b_answers == a_answers and all(a_answers)  # greedy answers, compared as text


def test_harness_adapter_gives_the_same_results_padded_or_not(tokenizer):
    small, padded = model_pair()
    lms = [AndromedaLM(eval_model=EvalModel.from_model(m, tokenizer, batch_size=2)) for m in (small, padded)]
    pairs = [("The fox is", " quick"), ("", "The house"), ("Emma and", " Mr Knightley")]
    texts = [(TEXT,), ("The lady is brown.",)]
    gen = [("The fox", {"until": ["\n\n"], "max_gen_toks": 20})]
    got = [(lm.loglikelihood(pairs), lm.loglikelihood_rolling(texts), lm.generate_until(gen)) for lm in lms]
    for x, y in zip(got[0][0], got[1][0]):
        assert x[0] == pytest.approx(y[0], rel=1e-5) and x[1] == y[1]
    assert got[1][1] == pytest.approx(got[0][1], rel=1e-5)
    assert got[1][2] == got[0][2] and got[0][2][0]


def test_a_tokenizer_larger_than_the_model_is_refused(tokenizer):
    cfg = ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, max_seq_length=16)
    with pytest.raises(ValueError, match=r"has 300 ids but model.vocab_size=256"):
        EvalModel.from_model(GPTModel(cfg), tokenizer)


def test_perplexity_names_a_dataset_with_ids_outside_the_tokenizer(tmp_path, tokenizer):
    _, padded = model_pair()
    prefix = tmp_path / "odd_valid_text_document"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 350, 3])  # fits the padded model, not the tokenizer
    with pytest.raises(
        ValueError, match=r"odd_valid_text_document: token id 350 is not one of the tokenizer's 300"
    ):
        prefix_perplexity(EvalModel.from_model(padded, tokenizer), str(prefix))


# ------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_export_holds_the_tokenizer_vocabulary_and_round_trips(tie, tmp_path, tokenizer, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    small, padded = model_pair(tie)
    checkpoint(tmp_path / "padded", padded, tokenizer)
    assert (
        load_tool("convert_to_hf").main(
            ["--checkpoint", str(tmp_path / "padded"), "--output", str(tmp_path / "hf")]
        )
        == 0
    )
    assert "dropped 84 padding rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == REAL
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()

    tokens = torch.randint(0, REAL, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs, ours = hf(tokens).logits, padded(tokens)
        ours_small = small(tokens)
    assert theirs.shape[-1] == REAL
    torch.testing.assert_close(theirs, ours[..., :REAL], atol=1e-4, rtol=0)
    # Perplexity through transformers is the one training and evaluation compute.
    hf_loss = F.cross_entropy(theirs[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    our_loss, _ = language_model_loss(ours[:, :-1], tokens[:, 1:], real_vocab_size=REAL)
    assert hf_loss.item() == pytest.approx(our_loss.item(), rel=1e-5)
    assert hf_loss.item() == pytest.approx(
        F.cross_entropy(ours_small[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item(), rel=1e-5
    )
    with torch.no_grad():
        sampled = hf.generate(prompt_ids(tokenizer), do_sample=True, temperature=1.0, top_k=0,
                              max_new_tokens=150, min_new_tokens=150)  # fmt: skip
    assert int(sampled.max()) < REAL

    # Back to a checkpoint padded as the training config wants: the real rows are exact, padding is zeros.
    argv = ["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back"), "--vocab-size", str(PADDED)]
    assert load_tool("convert_from_hf").main(argv) == 0
    assert f"padded the vocabulary from {REAL} to {PADDED}" in capsys.readouterr().out
    back_cfg, back = read_model_state(tmp_path / "back")
    assert back_cfg.model.vocab_size == PADDED
    for name, value in padded.state_dict().items():
        if name in ("embedding.weight", "lm_head.weight"):
            assert torch.equal(back[name][:REAL], value[:REAL]) and not back[name][REAL:].any()
        else:
            assert torch.equal(back[name], value), name
    argv = ["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "x"), "--vocab-size", "200"]
    assert load_tool("convert_from_hf").main(argv) == 2
    assert "--vocab-size 200 is below the Hugging Face model's vocab_size=300" in capsys.readouterr().err


def test_hf_import_pads_to_what_the_tensor_split_needs(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    argv = ["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"), "--tensor", "2"]
    assert load_tool("convert_from_hf").main(argv) == 0, capsys.readouterr().err
    cfg, state = read_model_state(tmp_path / "ckpt")
    assert (cfg.model.vocab_size, cfg.parallel.tensor) == (302, 2)
    ours = GPTModel(cfg.model).eval()
    ours.load_state_dict(state)
    tokens = torch.randint(0, 301, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[..., :301], hf(tokens).logits, atol=1e-4, rtol=0)
