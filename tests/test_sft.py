"""Chat data: the five public formats, the loss-masked template, the packed dataset, preprocess_chat."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_tokenizer import train_tiny_tokenizer
from tool_loader import load_tool

from megatron_andromeda.config import ModelConfig
from megatron_andromeda.data.chat_formats import FormatError, ReadReport, read_conversations
from megatron_andromeda.data.chat_template import ChatTemplate
from megatron_andromeda.data.indexed_dataset import IndexedDataset
from megatron_andromeda.data.sft_dataset import SFTDataset, SFTDatasetWriter, pack_next_fit
from megatron_andromeda.data.tokenizer import load_tokenizer
from megatron_andromeda.models import GPTModel, language_model_loss

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while Emma and Mr Knightley talk of marriage and money"


def chat_tokenizer(path: Path) -> str:
    return train_tiny_tokenizer(path, [WORDS, "<|user|>\n<|assistant|>\n<|system|>\n"] * 20)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(chat_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------------- formats
OASST1 = [  # two trees; rows in the dataset's own schema
    {"message_id": "p1", "parent_id": None, "role": "prompter", "text": "Hi?", "rank": None, "lang": "en"},
    {"message_id": "a1", "parent_id": "p1", "role": "assistant", "text": "Worse reply", "rank": 1},
    {"message_id": "a2", "parent_id": "p1", "role": "assistant", "text": "Best reply", "rank": 0},
    {"message_id": "p2", "parent_id": "a2", "role": "prompter", "text": "More?", "rank": 0},
    {"message_id": "p3", "parent_id": "a2", "role": "prompter", "text": "Other?", "rank": 1},
    {"message_id": "a3", "parent_id": "p2", "role": "assistant", "text": "Sure.", "rank": None},
    {
        "message_id": "a4",
        "parent_id": "p2",
        "role": "assistant",
        "text": "Deleted best",
        "rank": 0,
        "deleted": True,
    },
    {"message_id": "q1", "parent_id": None, "role": "prompter", "text": "Unanswered", "rank": None},
]
CASES = {
    "oasst1": (OASST1, [[user("Hi?"), bot("Best reply"), user("More?"), bot("Sure.")]]),
    "dolly": (
        [
            {"instruction": "Name a fox.", "context": "", "response": "Reynard.", "category": "open_qa"},
            {
                "instruction": "Summarize.",
                "context": "Foxes are quick.",
                "response": "Quick foxes.",
                "category": "s",
            },
        ],
        [
            [user("Name a fox."), bot("Reynard.")],
            [user("Summarize.\n\nFoxes are quick."), bot("Quick foxes.")],
        ],
    ),
    "alpaca": (
        [
            {"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet.", "input": "", "output": "Hello!"},
        ],
        [[user("Add.\n\n2 and 3"), bot("5")], [user("Greet."), bot("Hello!")]],
    ),
    "sharegpt": (
        [
            {
                "id": "x",
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                    {"from": "human", "value": "Bye"},
                    {"from": "gpt", "value": "Bye!"},
                    {"from": "human", "value": "unanswered"},
                ],
            },
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        ],
        [
            [{"role": "system", "content": "Be brief."}, user("Hi"), bot("Hello"), user("Bye"), bot("Bye!")],
            [user("Q"), bot("A")],
        ],
    ),
    "hh": (
        [
            {
                "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
                "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5",
            },
            {
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Name?\n\nAssistant: Claude",
                "rejected": "",
            },
        ],
        [[user("What is 2+2?"), bot("4.")], [user("Hi"), bot("Hello"), user("Name?"), bot("Claude")]],
    ),
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_each_format_converts(tmp_path, fmt):
    records, expected = CASES[fmt]
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", records)
    report = ReadReport(str(path))
    assert list(read_conversations(path, report=report)) == expected
    assert list(read_conversations(path, fmt=fmt)) == expected  # forcing the format reads the same
    assert report.formats == {fmt: len(records)} and not report.malformed
    if fmt == "oasst1":  # a1, p3, the deleted a4 and the unanswered q1 are off the best path
        assert report.oasst1_unused == 4


def test_formats_mix_in_one_file(tmp_path):
    records = CASES["alpaca"][0][:1] + CASES["hh"][0][:1] + CASES["dolly"][0][:1]
    got = list(read_conversations(write_jsonl(tmp_path / "mix.jsonl", records)))
    assert got == [CASES["alpaca"][1][0], CASES["hh"][1][0], CASES["dolly"][1][0]]


def test_undetectable_record_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [*CASES["alpaca"][0], {"title": "not chat"}])
    with pytest.raises(FormatError, match=r"bad\.jsonl:3: cannot tell the format.*title"):
        list(read_conversations(path))


def test_malformed_records_are_counted_not_dropped_silently(tmp_path):
    records = [
        CASES["alpaca"][0][0],
        "{not json",
        {"instruction": "x", "input": "", "output": "   "},  # empty reply
        {"conversations": [{"from": "robot", "value": "?"}]},  # unknown speaker
        {"message_id": "o1", "parent_id": "missing", "role": "assistant", "text": "orphan"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    report = ReadReport(str(path))
    assert len(list(read_conversations(path, report=report))) == 1
    assert [line for line, _ in report.malformed] == [2, 3, 4, 5]
    assert "robot" in report.malformed[2][1] and "m.jsonl:4" in report.summary()


# ------------------------------------------------------------------------------------------- template
def test_template_masks_everything_but_replies(tokenizer):
    conversation = [
        {"role": "system", "content": "Be kind."},
        user("Who is Emma?"),
        bot("A lady."),
        user("And?"),
    ]
    conversation += [bot("Mr Knightley.")]
    template = ChatTemplate()
    ids, mask = template.encode(conversation, tokenizer)
    assert tokenizer.decode(ids.tolist()) == template.render(conversation)
    trained = tokenizer.decode(ids[mask == 1].tolist())
    assert trained == "A lady.<|endoftext|>Mr Knightley.<|endoftext|>"
    assert ids[-1] == tokenizer.eod_id and mask[-1] == 1
    prompt = template.encode_prompt(conversation[:4], tokenizer)
    assert ids[: len(prompt)].tolist() == prompt  # generation sees exactly the training prefix


# ------------------------------------------------------------------------------------------- dataset
def tiny_model(vocab: int) -> GPTModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_length=96
    )
    return GPTModel(cfg)


def write_sft(prefix: Path, conversations: list, tokenizer) -> None:
    with SFTDatasetWriter(prefix, tokenizer.vocab_size) as writer:
        for ids, mask in ChatTemplate().encode_many(conversations, tokenizer):
            writer.add(ids, mask)


CONVERSATIONS = [
    [user("Who talks of marriage?"), bot("Emma and Mr Knightley.")],
    [user("What jumps?"), bot("The quick brown fox jumps over a lazy dog.")],
    [user("money"), bot("and marriage")],
]


def test_loss_mask_trains_only_reply_tokens(tmp_path, tokenizer):
    write_sft(tmp_path / "chat", CONVERSATIONS, tokenizer)
    dataset = SFTDataset(tmp_path / "chat_text_document", seq_length=96, pad_id=1, shuffle=False)
    sample, packed = dataset[0], len(dataset.conversations_of(0))
    model = tiny_model(tokenizer.vocab_size)
    logits = model(sample["tokens"][None], sample["position_ids"][None], sample["segment_ids"][None])
    logits.retain_grad()
    loss, _ = language_model_loss(logits, sample["labels"][None], sample["loss_mask"][None], z_loss=1e-4)
    loss.backward()
    grad_norm = logits.grad[0].abs().sum(-1)  # (T,)
    trained = sample["loss_mask"] > 0
    assert trained.any() and (~trained).any()
    assert torch.all(grad_norm[~trained] == 0)
    assert torch.all(grad_norm[trained] > 0)
    # The trained labels are exactly the replies and their end tokens.
    labels = sample["labels"][trained].tolist()
    assert packed >= 2 and tokenizer.decode(labels).count("<|endoftext|>") == packed
    assert "Emma and Mr Knightley." in tokenizer.decode(labels) and "What jumps" not in tokenizer.decode(
        labels
    )


def test_packed_conversations_do_not_attend_across(tmp_path, tokenizer):
    write_sft(tmp_path / "chat", CONVERSATIONS[:2], tokenizer)
    dataset = SFTDataset(tmp_path / "chat", seq_length=96, pad_id=1, shuffle=False)
    assert len(dataset) == 1 and dataset.conversations_of(0).tolist() == [0, 1]
    sample = dataset[0]
    second = sample["segment_ids"] == 1
    model = tiny_model(tokenizer.vocab_size).eval()
    with torch.no_grad():
        packed = model(sample["tokens"][None], sample["position_ids"][None], sample["segment_ids"][None])[0]
        alone_ids = torch.from_numpy(dataset.store.get(1)[0][:-1].astype(np.int64))
        alone = model(alone_ids[None])[0]
    assert sample["position_ids"][second][0] == 0
    torch.testing.assert_close(packed[second], alone, rtol=1e-5, atol=1e-5)
    # Without segment ids the second conversation would see the first one: the test can fail.
    with torch.no_grad():
        leaky = model(sample["tokens"][None], sample["position_ids"][None])[0]
    assert not torch.allclose(leaky[second], alone, atol=1e-3)


def test_packing_covers_every_conversation_once_per_epoch(tmp_path, tokenizer):
    conversations = [[user(w), bot(WORDS[: 5 * (i + 1)])] for i, w in enumerate(WORDS.split()[:12])]
    write_sft(tmp_path / "many", conversations, tokenizer)
    dataset = SFTDataset(tmp_path / "many", seq_length=40, pad_id=1, seed=3)
    seen = np.concatenate([dataset.conversations_of(i) for i in range(len(dataset))])
    assert sorted(seen.tolist()) == list(range(12))
    for i in range(len(dataset)):
        sample = dataset[i]
        assert {k: v.shape for k, v in sample.items()} == {k: (40,) for k in sample}
        k = len(dataset.conversations_of(i))
        segments = sample["segment_ids"].unique().tolist()  # conversations 0..k-1, then padding
        assert segments[:k] == list(range(k)) and len(segments) <= k + 1
    longer = SFTDataset(tmp_path / "many", seq_length=40, pad_id=1, seed=3, num_samples=3 * len(dataset))
    assert len(longer) == 3 * len(dataset) and 0 < longer.packing_efficiency <= 1
    assert dataset.num_truncated == int(np.sum(dataset.store.lengths - 1 > 40))


def test_pack_next_fit():
    assert pack_next_fit(np.array([3, 4, 2, 5, 1]), 6).tolist() == [0, 1, 3, 5]
    assert pack_next_fit(np.array([], dtype=np.int64), 6).tolist() == [0]


# ------------------------------------------------------------------------------------------- tool


def test_preprocess_chat_writes_aligned_datasets(tmp_path, tokenizer, capsys):
    tool = load_tool("preprocess_chat")
    files = [write_jsonl(tmp_path / f"{f}.jsonl", CASES[f][0]) for f in ("oasst1", "dolly", "hh")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [CASES["alpaca"][0][0], "{oops"])
    prefix = tmp_path / "out" / "chat"
    argv = [
        "--input",
        *map(str, files),
        str(bad),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        tokenizer.path,
    ]
    assert tool.main(argv + ["--split", "50,50,0"]) == 0
    out = capsys.readouterr().out
    assert "bad.jsonl:2: invalid JSON" in out and "1 malformed records skipped" in out
    total = 0
    for split in ("train", "valid", "test"):
        text = IndexedDataset(f"{prefix}_{split}_text_document")
        mask = IndexedDataset(f"{prefix}_{split}_lossmask_document")
        assert np.array_equal(text.sizes, mask.sizes) and mask.dtype == np.uint8
        total += len(text)
    assert total == 1 + 2 + 2 + 1  # oasst1, dolly, hh, the good alpaca record
    # --strict refuses malformed input and writes nothing.
    assert tool.main(argv + ["--output-prefix", str(tmp_path / "strict"), "--strict"]) == 2
    assert not list(tmp_path.glob("strict*"))
    assert tool.main(["--input", str(write_jsonl(tmp_path / "x.jsonl", [{"a": 1}]))] + argv[-4:]) == 2
    assert "x.jsonl:1" in capsys.readouterr().err


def test_shipped_instruction_set_reads_cleanly():
    files = sorted((ROOT / "examples" / "data" / "instructions").glob("*instructions*.jsonl"))
    assert files, "examples/data/instructions holds the demo's instruction set"
    report = ReadReport(str(files[0]))
    conversations = list(read_conversations(files[0], report=report))
    assert len(conversations) >= 200 and not report.malformed
    assert all(c[-1]["role"] == "assistant" for c in conversations)
