#!/usr/bin/env python3
"""Build the demo's instruction set and evaluation tasks from the embedded Austen corpus.

Every question and answer is made by this script from the public-domain text of
examples/data/corpus/austen.jsonl.gz; nothing is written by a model or copied from elsewhere.
The output is deterministic (seeded) and written atomically:

    austen_instructions.jsonl  240 conversations ({"messages": [...]}) for supervised fine-tuning:
                               which novel a passage is from, continue a passage, which characters a
                               passage names, and two-turn follow-ups with a system prompt
    austen_novel_mc.jsonl      60 multiple-choice questions (which novel?) on held-out chapters parts
    austen_novel_qa.jsonl      40 generation questions (name the novel) on held-out parts

Documents whose index is a multiple of 10 are held out for the two evaluation files; the
instruction set is drawn from the rest.

    python examples/data/instructions/make_instructions.py
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parents[1] / "data" / "corpus" / "austen.jsonl.gz"
NOVELS = {  # slug: (title, year, names as they appear in the text)
    "sense_and_sensibility": (
        "Sense and Sensibility",
        1811,
        [
            "Elinor",
            "Marianne",
            "Margaret",
            "Edward",
            "Brandon",
            "Willoughby",
            "Lucy",
            "Jennings",
            "Sir John",
            "Fanny",
            "Palmer",
        ],
    ),
    "pride_and_prejudice": (
        "Pride and Prejudice",
        1813,
        [
            "Elizabeth",
            "Jane",
            "Darcy",
            "Bingley",
            "Wickham",
            "Lydia",
            "Collins",
            "Charlotte",
            "Lady Catherine",
            "Kitty",
            "Georgiana",
            "Gardiner",
        ],
    ),
    "mansfield_park": (
        "Mansfield Park",
        1814,
        [
            "Fanny",
            "Edmund",
            "Sir Thomas",
            "Lady Bertram",
            "Norris",
            "Maria",
            "Julia",
            "Crawford",
            "Rushworth",
            "Tom",
            "William",
            "Yates",
        ],
    ),
    "emma": (
        "Emma",
        1815,
        [
            "Emma",
            "Knightley",
            "Harriet",
            "Woodhouse",
            "Elton",
            "Churchill",
            "Fairfax",
            "Bates",
            "Weston",
            "Martin",
            "Isabella",
        ],
    ),
    "northanger_abbey": (
        "Northanger Abbey",
        1817,
        ["Catherine", "Tilney", "Eleanor", "Isabella", "Thorpe", "James", "Allen", "Morland", "Frederick"],
    ),
    "persuasion": (
        "Persuasion",
        1817,
        [
            "Anne",
            "Wentworth",
            "Sir Walter",
            "Elizabeth",
            "Mary",
            "Lady Russell",
            "Louisa",
            "Henrietta",
            "Elliot",
            "Benwick",
            "Musgrove",
            "Harville",
            "Mrs Smith",
            "Mrs. Smith",
            "Clay",
        ],
    ),
}
SYSTEM = "You are a helpful assistant who knows the novels of Jane Austen well."
# A sentence ends at . ! ? (and a closing quote) before a capital, but not after Mr. Mrs. Dr. St.
_SENTENCE_END = re.compile(r'(?<=[.!?])(?<!Mr\.)(?<!Mrs\.)(?<!Dr\.)(?<!St\.)["\']?\s+(?=["\'A-Z])')


def sentences(text: str) -> list[str]:
    """Sentences of one paragraph (a simple splitter: good enough for Austen's punctuation)."""
    return [s.strip() for s in _SENTENCE_END.split(text.replace("\n", " ")) if s.strip()]


def passage(rng: random.Random, text: str, max_chars: int = 450) -> tuple[str, list[str]]:
    """A run of whole sentences (at least 120 characters where the document allows) from one
    paragraph, and the sentences that follow it."""
    paragraphs = [p for p in text.split("\n\n") if len(p) >= 200] or [text]
    for _ in range(20):
        sents = sentences(rng.choice(paragraphs))
        start = rng.randrange(len(sents))
        end = start + 1
        while end < len(sents) and len(" ".join(sents[start : end + 1])) <= max_chars:
            end += 1
        chosen = " ".join(sents[start:end])
        if len(chosen) >= 120:
            break
    return chosen, sents[end:]


def names_in(text: str, slug: str) -> list[str]:
    found = [(m.start(), n) for n in NOVELS[slug][2] if (m := re.search(rf"\b{re.escape(n)}\b", text))]
    return [n for _, n in sorted(found)]


def listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def msgs(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def which_novel(rng: random.Random, doc: dict) -> dict:
    slug = doc["source"].split("/")[1]
    title, year, _ = NOVELS[slug]
    text, _ = passage(rng, doc["text"])
    return msgs(
        ("user", f"Which Jane Austen novel is this passage from?\n\n{text}"),
        ("assistant", f"This passage is from {title}, published in {year}."),
    )


def continue_passage(rng: random.Random, doc: dict) -> dict | None:
    title = NOVELS[doc["source"].split("/")[1]][0]
    text, rest = passage(rng, doc["text"], max_chars=350)
    if not rest:
        return None
    follow = rest[0] if len(rest) == 1 or len(rest[0]) > 150 else f"{rest[0]} {rest[1]}"
    return msgs(("user", f"Continue this passage from {title}:\n\n{text}"), ("assistant", follow))


def characters(rng: random.Random, doc: dict) -> dict | None:
    slug = doc["source"].split("/")[1]
    text, _ = passage(rng, doc["text"])
    names = names_in(text, slug)
    if not names:
        return None
    answer = (
        f"The passage names {listing(names)}." if len(names) > 1 else f"The passage names only {names[0]}."
    )
    return msgs(("user", f"Which characters are named in this passage?\n\n{text}"), ("assistant", answer))


def two_turns(rng: random.Random, doc: dict) -> dict:
    first = which_novel(rng, doc)["messages"]
    title = NOVELS[doc["source"].split("/")[1]][0]
    return msgs(
        ("system", SYSTEM),
        *((m["role"], m["content"]) for m in first),
        ("user", "Who wrote it?"),
        ("assistant", f"{title} was written by Jane Austen."),
    )


def instruction_set(rng: random.Random, docs: list[dict]) -> list[dict]:
    plan = [(which_novel, 80), (continue_passage, 80), (characters, 60), (two_turns, 20)]
    out = []
    for make, count in plan:
        made = 0
        while made < count:
            record = make(rng, rng.choice(docs))
            if record is not None:
                out.append(record)
                made += 1
    rng.shuffle(out)
    return out


def novel_tasks(rng: random.Random, docs: list[dict], n_mc: int, n_qa: int) -> tuple[list[dict], list[dict]]:
    titles = [NOVELS[slug][0] for slug in NOVELS]
    mc, qa = [], []
    for i in range(n_mc + n_qa):
        doc = docs[i % len(docs)]
        text, _ = passage(rng, doc["text"])
        title = NOVELS[doc["source"].split("/")[1]][0]
        question = f"Passage: {text}\nQuestion: Which Jane Austen novel is this passage from?\nAnswer:"
        if i < n_mc:
            mc.append(
                {"context": question, "choices": [" " + t for t in titles], "label": titles.index(title)}
            )
        else:
            qa.append({"context": question, "answers": [title]})
    return mc, qa


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    held_out = [d for i, d in enumerate(docs) if i % 10 == 0]
    train = [d for i, d in enumerate(docs) if i % 10]
    rng = random.Random(1817)
    write_jsonl(HERE / "austen_instructions.jsonl", instruction_set(rng, train))
    rng.shuffle(held_out)
    mc, qa = novel_tasks(rng, held_out, 60, 40)
    write_jsonl(HERE / "austen_novel_mc.jsonl", mc)
    write_jsonl(HERE / "austen_novel_qa.jsonl", qa)
    for name in ("austen_instructions.jsonl", "austen_novel_mc.jsonl", "austen_novel_qa.jsonl"):
        path = HERE / name
        records = path.read_text(encoding="utf-8").count("\n")
        print(f"{path.relative_to(HERE.parents[2])}: {records} records, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
