"""Evaluation: multiple choice, perplexity, generation metrics, the harness adapter and tools/evaluate.py."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from tiny_tokenizer import train_tiny_tokenizer

from megatron_andromeda.checkpoint import write_model_checkpoint
from megatron_andromeda.config import DataConfig, ModelConfig, RunConfig
from megatron_andromeda.data.chat_template import ChatTemplate
from megatron_andromeda.data.indexed_dataset import IndexedDatasetWriter
from megatron_andromeda.data.sft_dataset import SFTDatasetWriter
from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.evaluation.generation_tasks import corpus_bleu, exact_match, f1_score
from megatron_andromeda.evaluation.harness import AndromedaLM
from megatron_andromeda.evaluation.multiple_choice import (
    MCExample,
    TaskError,
    load_mc_task,
    score_multiple_choice,
)
from megatron_andromeda.evaluation.perplexity import prefix_perplexity, source_and_split
from megatron_andromeda.evaluation.scoring import EvalModel, encode_pair, greedy_until
from megatron_andromeda.models import GPTModel, language_model_loss

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ["fox", "dog", "Emma", "Knightley", "marriage", "money", "lady", "house"]
ANSWERS = [" quick", " lazy", " brown", " kind"]
TEXT = "the quick brown fox jumps over a lazy dog while Emma and Mr Knightley talk of marriage and money"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return load_tokenizer(train_tiny_tokenizer(path, [TEXT, "The house is kind. The lady is brown."] * 20))


def mc_examples() -> list[MCExample]:
    return [MCExample(f"The {s} is", list(ANSWERS), i % len(ANSWERS)) for i, s in enumerate(SUBJECTS)]


def tiny_model(vocab: int, max_seq_length: int = 64) -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_length=max_seq_length,
    )
    return GPTModel(cfg)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model trained for a few dozen steps on each example's correct continuation."""
    model = tiny_model(tokenizer.vocab_size)
    seqs = [[tokenizer.eod_id, *tokenizer.encode(ex.context + ex.choices[ex.label])] for ex in mc_examples()]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width - 1)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq) - 1] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, foreach=False)
    for _ in range(40):
        loss, _ = language_model_loss(model(ids[:, :-1]), ids[:, 1:], mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return EvalModel.from_model(model.eval(), tokenizer, batch_size=3)


# ------------------------------------------------------------------------------------------- multiple choice
def test_multiple_choice_picks_the_trained_answers(trained):
    result = score_multiple_choice(trained, mc_examples())
    assert result["n"] == len(SUBJECTS)
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0
    assert [p["pred"] for p in result["predictions"]] == [ex.label for ex in mc_examples()]


def test_untrained_model_does_not_know_the_answers(tokenizer):
    em = EvalModel.from_model(tiny_model(tokenizer.vocab_size).eval(), tokenizer)
    assert score_multiple_choice(em, mc_examples())["acc"] < 1.0  # the training above is what teaches it


def test_acc_norm_divides_by_characters(tokenizer, trained, monkeypatch):
    import megatron_andromeda.evaluation.multiple_choice as mc

    fake = iter([(-10.0, False), (-12.0, False)])  # long choice: lower sum, higher per character
    monkeypatch.setattr(mc, "continuation_logprobs", lambda em, requests: [next(fake) for _ in requests])
    result = mc.score_multiple_choice(trained, [MCExample("Q:", [" a", " abcdefghijkl"], 1)])
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_chance_level_is_reported_beside_accuracy(trained, monkeypatch):
    """Guessing scores the mean of 1 / choices (2 and 6 choices here: (1/2 + 1/6) / 2 = 1/3); the
    table shows it so that an accuracy is read against it (issue 20 item 9)."""
    import megatron_andromeda.evaluation.multiple_choice as mc
    from megatron_andromeda.evaluation.runner import markdown_report

    examples = [MCExample("Q:", [" a", " b"], 0), MCExample("Q:", [" a", " b", " c", " d", " e", " f"], 5)]
    scores = iter([(-1.0, False), (-2.0, False)] + [(-1.0, False)] * 6)  # first: right; second: wrong
    monkeypatch.setattr(mc, "continuation_logprobs", lambda em, requests: [next(scores) for _ in requests])
    result = mc.score_multiple_choice(trained, examples)
    assert result["chance"] == pytest.approx(1 / 3) and result["acc"] == 0.5
    table = markdown_report({"tasks": [{"name": "t", "kind": "multiple_choice", **result}]})
    assert "| task | n | acc | acc_norm | chance |" in table and "| 33.3 |" in table


def test_task_loaders_convert_public_layouts(tmp_path):
    records = [
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        {
            "ctx_a": "A man sits.",
            "ctx_b": "he",
            "endings": ["stands [title] up", "flies"],
            "label": "0",
            "activity_label": "Sitting",
        },
        {
            "question": {
                "stem": "2+2?",
                "choices": [{"text": "3", "label": "A"}, {"text": "4", "label": "B"}],
            },
            "answerKey": "B",
        },
        {"question": "Sky?", "choices": {"text": ["blue", "red"], "label": ["1", "2"]}, "answerKey": "1"},
        {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
        {"context": "x", "choices": [" a", " b"], "label": 1},
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    piqa, hella, arc1, arc2, boolq, native = load_mc_task(str(path))
    assert piqa == MCExample("Question: Open a jar\nAnswer:", [" twist the lid", " eat the lid"], 0)
    assert hella.context == "Sitting: A man sits. He" and hella.choices == [" stands. up", " flies"]
    assert (arc1.choices, arc1.label, arc2.label) == ([" 3", " 4"], 1, 0)
    assert boolq == MCExample("The sky is blue.\nQuestion: is the sky blue?\nAnswer:", [" no", " yes"], 1)
    assert native == MCExample("x", [" a", " b"], 1)
    path.write_text(
        json.dumps(records[0]) + "\n" + json.dumps({"context": "x", "choices": ["a"], "label": 3})
    )
    with pytest.raises(TaskError, match=r"tasks\.jsonl:2"):
        load_mc_task(str(path))


# ------------------------------------------------------------------------------------------- metrics
def squad_reference_f1(prediction: str, truth: str) -> float:
    """SQuAD v1.1's official F1, written out here independently of the library."""

    def normalize(s: str) -> str:
        s = s.lower()
        s = "".join(c for c in s if c not in set(string.punctuation))
        s = re.sub(r"\b(a|an|the)\b", " ", s)
        return " ".join(s.split())

    p, t = normalize(prediction).split(), normalize(truth).split()
    same = sum((Counter(p) & Counter(t)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def test_f1_and_exact_match_match_the_squad_reference():
    cases = [
        ("The Eiffel Tower!", ["eiffel tower"]),
        ("in Paris, France", ["Paris", "the city of Paris"]),
        ("a quick brown fox", ["The quick, brown dog"]),
        ("nothing alike", ["entirely different"]),
    ]
    for prediction, truths in cases:
        assert f1_score(prediction, truths) == pytest.approx(
            max(squad_reference_f1(prediction, t) for t in truths)
        )
    assert [exact_match(p, t) for p, t in cases] == [1.0, 0.0, 0.0, 0.0]
    assert f1_score("", [""]) == 1.0 and f1_score("x", [""]) == 0.0


def test_bleu_equals_sacrebleu():
    predictions = ["the cat sat on the mat", "a quick brown fox", "hello there world"]
    references = [["the cat sat on a mat", "a cat sat on the mat"], ["the quick brown fox"], ["hello world"]]
    expected = sacrebleu.corpus_bleu(
        predictions, [[r[0] for r in references], ["a cat sat on the mat", None, None]]
    ).score
    assert corpus_bleu(predictions, references) == pytest.approx(expected)
    single = sacrebleu.corpus_bleu(predictions, [[r[0] for r in references]]).score
    assert corpus_bleu(predictions, [[r[0]] for r in references]) == pytest.approx(single)
    assert 0 < single < 100


# ------------------------------------------------------------------------------------------- perplexity
def test_perplexity_is_exp_of_mean_token_loss(tmp_path, tokenizer, trained):
    docs = [tokenizer.encode(TEXT[i:]) + [tokenizer.eod_id] for i in (0, 10, 37)]
    with IndexedDatasetWriter(tmp_path / "austen_valid_text_document", np.uint16) as writer:
        writer.add_documents(docs)
    result = prefix_perplexity(trained, str(tmp_path / "austen_valid_text_document"), seq_length=16)
    stream = torch.tensor([t for d in docs for t in d])
    losses = []
    with torch.no_grad():
        for start in range(0, len(stream) - 1, 16):
            window = stream[start : start + 17]
            logits = trained.model(window[None, :-1])[0]
            losses.append(F.cross_entropy(logits, window[1:], reduction="none"))
    by_hand = torch.cat(losses)
    assert result.tokens == len(stream) - 1 == len(by_hand)
    assert result.ppl == pytest.approx(math.exp(by_hand.mean().item()), rel=1e-5)
    assert (result.source, result.split) == ("austen", "valid")


def test_chat_perplexity_scores_only_replies(tmp_path, tokenizer, trained):
    conversations = [
        [{"role": "user", "content": f"The {s} is"}, {"role": "assistant", "content": ANSWERS[i % 4]}]
        for i, s in enumerate(SUBJECTS)
    ]
    encoded = ChatTemplate().encode_many(conversations, tokenizer)
    with SFTDatasetWriter(tmp_path / "chat_test", tokenizer.vocab_size) as writer:
        for ids, mask in encoded:
            writer.add(ids, mask)
    result = prefix_perplexity(trained, str(tmp_path / "chat_test_text_document"))
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in encoded:
            ids = torch.from_numpy(ids.astype(np.int64))
            ce = F.cross_entropy(trained.model(ids[None, :-1])[0], ids[1:], reduction="none")
            total += float((ce * torch.from_numpy(mask[1:]).float()).sum())
            count += int(mask[1:].sum())
    assert result.tokens == count
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert source_and_split("x/chat_test_text_document") == ("chat", "test")


# ------------------------------------------------------------------------------------------- harness
def request(*args):
    try:
        from lm_eval.api.instance import Instance
    except ImportError:  # without the [eval] extra the adapter takes plain tuples
        return args
    kind = "generate_until" if isinstance(args[-1], dict) else "loglikelihood"
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def by_hand_logprob(em: EvalModel, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor(context + continuation)
    with torch.no_grad():
        logp = F.log_softmax(em.model(ids[None, :-1])[0], dim=-1)[len(context) - 1 :]
    target = ids[len(context) :]
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def test_harness_loglikelihood_matches_hand_computation(trained, tokenizer):
    lm = AndromedaLM(eval_model=trained)
    pairs = [("The fox is", " quick"), ("The dog is", " quick brown"), ("", "The house")]
    got = lm.loglikelihood([request(c, x) for c, x in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        ctx_ids, cont_ids = encode_pair(tokenizer, context, continuation)
        expected, expected_greedy = by_hand_logprob(trained, ctx_ids, cont_ids)
        assert logp == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    assert got[0][1] is True  # the trained answer is the greedy one
    assert encode_pair(tokenizer, "", "x")[0] == [tokenizer.eod_id]


def test_harness_rolling_loglikelihood_scores_each_token_once(trained, tokenizer):
    text = "the quick brown fox jumps over a lazy dog"
    stream = [tokenizer.eod_id, *tokenizer.encode(text)]
    lm = AndromedaLM(eval_model=trained)
    whole = by_hand_logprob(trained, stream[:1], stream[1:])[0]  # fits in one window
    assert lm.loglikelihood_rolling([request(text)])[0] == pytest.approx(whole, abs=1e-4)
    short = EvalModel(trained.model, tokenizer, trained.device, max_length=4, batch_size=2)
    L, expected = 4, 0.0
    for j in range(1, len(stream)):  # token j: its window holds the L tokens before its chunk's end
        chunk_end = min(1 + L * ((j - 1) // L) + L, len(stream))
        start = max(0, chunk_end - 1 - L)
        expected += by_hand_logprob(trained, stream[start:j], [stream[j]])[0]
    assert len(stream) - 1 > 2 * L
    assert AndromedaLM(eval_model=short).loglikelihood_rolling([request(text)])[0] == pytest.approx(
        expected, abs=1e-4
    )


def test_harness_generate_until_is_greedy_and_stops(trained, tokenizer):
    lm = AndromedaLM(eval_model=trained)
    prompt = tokenizer.encode("The fox is")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # greedy by hand, no cache
            ids.append(int(trained.model(torch.tensor([ids]))[0, -1].argmax()))
    new = ids[len(prompt) :]
    new = new[: new.index(tokenizer.eod_id)] if tokenizer.eod_id in new else new
    full = lm.generate_until([request("The fox is", {"until": ["\n\n"], "max_gen_toks": 6})])[0]
    assert full == tokenizer.decode(new).split("\n\n")[0]
    assert full.startswith(" quick")
    stop = full[2:4]
    assert greedy_until(trained, "The fox is", [stop], 6) == full[: full.index(stop)]


def test_real_lm_eval_harness_runs_the_adapter(tmp_path, trained):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra")
    from lm_eval.tasks import TaskManager

    examples = mc_examples()
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(ex.__dict__) + "\n" for ex in examples))
    (tmp_path / "task.yaml").write_text(
        "task: andromeda_test_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf_cache'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    lm = AndromedaLM(eval_model=trained)
    assert isinstance(lm, lm_eval.api.model.LM)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=["andromeda_test_mc"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
    )
    harness = out["results"]["andromeda_test_mc"]
    ours = score_multiple_choice(trained, examples)
    assert harness["acc,none"] == ours["acc"] == 1.0 and harness["acc_norm,none"] == ours["acc_norm"]


# ------------------------------------------------------------------------------------------- the tool
def test_evaluate_tool_writes_json_and_markdown(tmp_path, trained, tokenizer, capsys):
    cfg = RunConfig(
        model=trained.model.cfg, data=DataConfig(tokenizer=tokenizer.path, seq_length=32)
    ).validate()
    write_model_checkpoint(tmp_path / "ckpt", cfg, trained.model.state_dict())
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(ex.__dict__) + "\n" for ex in mc_examples()))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(json.dumps({"context": ex.context, "answers": ["quick"]}) + "\n" for ex in mc_examples())
    )
    with IndexedDatasetWriter(tmp_path / "austen_valid_text_document", np.uint16) as writer:
        writer.add_document(tokenizer.encode(TEXT) + [tokenizer.eod_id])
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--tasks", str(mc), f"qa={qa}", "--device", "cpu"]
    argv += ["--valid-data", str(tmp_path / "austen_valid_text_document"), "--output", str(tmp_path / "eval")]
    assert tool.main(argv) == 0
    results = json.loads((tmp_path / "eval.json").read_text())
    mc_row, qa_row = results["tasks"]
    assert (mc_row["name"], mc_row["acc"], qa_row["name"], qa_row["n"]) == ("mc", 1.0, "qa", len(SUBJECTS))
    assert 0.0 <= qa_row["f1"] <= 1.0 and results["perplexity"][0]["split"] == "valid"
    markdown = (tmp_path / "eval.md").read_text()
    assert "| mc | 8 | 100.0" in markdown and "| austen_valid_text_document | austen | valid |" in markdown
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": 1}\n')
    assert tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--tasks", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_chat_generation_asks_through_the_template(trained, tokenizer, monkeypatch):
    import megatron_andromeda.evaluation.generation_tasks as gen

    seen = []
    monkeypatch.setattr(
        gen, "greedy_until", lambda em, prompt, until, n: seen.append((prompt, tuple(until))) or "x"
    )
    result = gen.score_generation(trained, [gen.GenExample("Who wrote Emma?", ["Jane Austen"])], chat=True)
    user = [{"role": "user", "content": "Who wrote Emma?"}]
    assert seen == [(ChatTemplate().encode_prompt(user, tokenizer), ())]  # the reply ends at the end token
    assert result["predictions"] == ["x"] and result["exact_match"] == 0.0
