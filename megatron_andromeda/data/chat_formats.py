"""Public instruction / chat data formats, read into one conversation format.

A conversation is `[{"role": "system" | "user" | "assistant", "content": str}, ...]`. Recognised
records (one JSON object per line):

    oasst1    {"message_id", "parent_id", "role": "prompter" | "assistant", "text", "rank", ...}
              one row per message; a file's rows form trees, and each tree becomes the
              conversation along its best-ranked path (the rank-0 reply at every level)
    dolly     {"instruction", "context", "response", "category"}
    alpaca    {"instruction", "input", "output"}
    sharegpt  {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}
    hh        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}  (chosen is used)
    messages  {"messages": [{"role", "content"}, ...]}  (already in our format)

A record whose format cannot be told is an error naming the file and line: such a file is usually
not chat data at all. A record of a known format whose content is unusable (invalid JSON, no
assistant reply, an unknown speaker) is *malformed*: it is skipped, counted and listed in the
`ReadReport`, never dropped silently.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from megatron_andromeda.data.jsonl import iter_jsonl
from megatron_andromeda.errors import UserError

Message = dict[str, str]
Conversation = list[Message]

ROLES = ("system", "user", "assistant")
FORMATS = ("oasst1", "dolly", "alpaca", "sharegpt", "hh", "messages")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


class FormatError(UserError, ValueError):
    """A record that cannot be read; the message names the file and line where it is known."""

    label = "format error"


@dataclass
class ReadReport:
    """What one file held: records per format, conversations made, and every record skipped."""

    path: str
    records: int = 0
    conversations: int = 0
    formats: Counter = field(default_factory=Counter)
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    oasst1_unused: int = 0  # messages off the best-ranked paths (lower-ranked or unanswered)

    def summary(self, examples: int = 5) -> str:
        kinds = ", ".join(f"{name}: {n}" for name, n in sorted(self.formats.items())) or "none"
        lines = [
            f"{self.path}: {self.records} records ({kinds}) -> {self.conversations} conversations, "
            f"{len(self.malformed)} malformed records skipped"
        ]
        if self.oasst1_unused:
            lines.append(f"  oasst1: {self.oasst1_unused} messages are off the best-ranked paths (not used)")
        for line, reason in self.malformed[:examples]:
            lines.append(f"  {self.path}:{line}: {reason}")
        if len(self.malformed) > examples:
            lines.append(f"  ... and {len(self.malformed) - examples} more")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- detection
def detect_format(record: Any) -> str | None:
    """The format of one record from its keys, or None when it matches none of `FORMATS`."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("messages"), list):
        return "messages"
    if isinstance(record.get("conversations"), list):
        return "sharegpt"
    if isinstance(record.get("chosen"), str):
        return "hh"
    if {"message_id", "role", "text"} <= record.keys():
        return "oasst1"
    if {"instruction", "response"} <= record.keys():
        return "dolly"
    if {"instruction", "output"} <= record.keys():
        return "alpaca"
    return None


# ------------------------------------------------------------------------------------------- one record
def convert_record(record: dict[str, Any], fmt: str) -> Conversation:
    """One record of a single-record format as a conversation; raises FormatError when unusable."""
    if fmt == "dolly":
        return _prompt_reply(
            _join(_field(record, "instruction"), record.get("context")), _field(record, "response")
        )
    if fmt == "alpaca":
        return _prompt_reply(
            _join(_field(record, "instruction"), record.get("input")), _field(record, "output")
        )
    if fmt == "sharegpt":
        return _sharegpt(record)
    if fmt == "hh":
        return _hh(_field(record, "chosen"))
    if fmt == "messages":
        return _messages(record)
    raise FormatError(f"format {fmt!r} is not a single-record format (choose from {', '.join(FORMATS)})")


def _field(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise FormatError(f"field {key!r} is missing or not a string")
    return value


def _join(instruction: str, extra: Any) -> str:
    """The instruction, then its optional context / input after a blank line."""
    if isinstance(extra, str) and extra.strip():
        return f"{instruction.strip()}\n\n{extra.strip()}"
    return instruction


def _prompt_reply(prompt: str, reply: str) -> Conversation:
    return _finish([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])


def _sharegpt(record: dict[str, Any]) -> Conversation:
    conversation = []
    for i, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise FormatError(f"conversations[{i}] needs a string 'value'")
        speaker = str(turn.get("from", "")).lower()
        if speaker not in SHAREGPT_ROLES:
            raise FormatError(f"conversations[{i}] has unknown speaker {turn.get('from')!r}")
        conversation.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return _finish(conversation)


def _hh(text: str) -> Conversation:
    parts = _HH_TURN.split(text)  # [preamble, speaker, content, speaker, content, ...]
    if parts[0].strip():
        raise FormatError("'chosen' must start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    conversation = [{"role": roles[s], "content": c.strip()} for s, c in zip(parts[1::2], parts[2::2])]
    return _finish(conversation)


def _messages(record: dict[str, Any]) -> Conversation:
    conversation = []
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise FormatError(f"messages[{i}] needs a role among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise FormatError(f"messages[{i}] needs a string 'content'")
        conversation.append({"role": message["role"], "content": message["content"]})
    return _finish(conversation)


def _finish(conversation: Conversation) -> Conversation:
    """Drop trailing turns nobody answered (they carry no training signal), then check the rest."""
    while conversation and conversation[-1]["role"] != "assistant":
        conversation.pop()
    if not conversation:
        raise FormatError("no assistant reply")
    for i, message in enumerate(conversation):
        if not message["content"].strip():
            raise FormatError(f"{message['role']} turn {i} is empty")
    return conversation


# ------------------------------------------------------------------------------------------- oasst1
def oasst1_conversations(rows: list[tuple[int, dict[str, Any]]], report: ReadReport) -> list[Conversation]:
    """The best-ranked path of every message tree in `rows` ((line, record) pairs of one file).

    From each root prompt, follow the best reply at every level: the lowest `rank` (rank 0 is the
    one people preferred; unranked replies come after ranked ones, then file order). Deleted
    messages are not followed. Rows with a missing id, an unknown role or a parent that is not in
    the file are malformed.
    """
    nodes: dict[str, tuple[int, dict[str, Any]]] = {}
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for line, row in rows:
        problem = _oasst1_problem(row, nodes)
        if problem:
            report.malformed.append((line, problem))
            continue
        nodes[row["message_id"]] = (line, row)
    orphans = 0
    for message_id, (line, row) in nodes.items():
        parent = row.get("parent_id")
        if parent is None:
            roots.append(message_id)
        elif parent in nodes:
            children.setdefault(parent, []).append(message_id)
        else:
            orphans += 1
            report.malformed.append((line, f"oasst1 parent_id {parent!r} is not in this file"))
    conversations, used = [], 0
    for root in roots:
        path = _best_path(root, nodes, children)
        try:
            conversation = _finish([_oasst1_message(nodes[m][1]) for m in path])
        except FormatError:
            continue  # an unanswered prompt: its messages are counted as unused below
        used += len(conversation)
        conversations.append(conversation)
    report.oasst1_unused += len(nodes) - used - orphans
    return conversations


def _oasst1_problem(row: Any, seen: dict) -> str | None:
    if not isinstance(row, dict):
        return "oasst1 row is not a JSON object"
    if not isinstance(row.get("message_id"), str):
        return "oasst1 message_id is missing"
    if row["message_id"] in seen:
        return f"oasst1 message_id {row['message_id']!r} appears twice"
    if row.get("role") not in ("prompter", "assistant"):
        return f"oasst1 role {row.get('role')!r} is not 'prompter' or 'assistant'"
    if not isinstance(row.get("text"), str):
        return "oasst1 text is missing or not a string"
    return None


def _best_path(root: str, nodes: dict, children: dict[str, list[str]]) -> list[str]:
    path, current = [root], root
    while True:
        alive = [c for c in children.get(current, []) if not nodes[c][1].get("deleted", False)]
        if not alive:
            return path
        current = min(alive, key=lambda c: (nodes[c][1].get("rank") is None, nodes[c][1].get("rank") or 0))
        path.append(current)


def _oasst1_message(row: dict[str, Any]) -> Message:
    return {"role": "user" if row["role"] == "prompter" else "assistant", "content": row["text"]}


# ------------------------------------------------------------------------------------------- files
def read_conversations(
    path: str | os.PathLike, fmt: str | None = None, report: ReadReport | None = None
) -> Iterator[Conversation]:
    """Conversations of a JSONL file, the format detected per record unless `fmt` forces one.

    Raises FormatError naming `path:line` for a record of no known format; counts malformed
    records in `report`. oasst1 rows are gathered and their trees resolved at the end of the file.
    """
    path = os.fspath(path)
    if fmt is not None and fmt not in FORMATS:
        raise FormatError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if path.endswith(".json"):
        raise FormatError(f"{path}: expected JSONL (one object per line); convert with: jq -c '.[]' {path}")
    report = report if report is not None else ReadReport(path)
    oasst_rows: list[tuple[int, dict[str, Any]]] = []
    invalid_json: list[tuple[int, str]] = []
    for line_no, record in iter_jsonl(path, FormatError, malformed=invalid_json):
        report.records += 1
        kind = fmt or detect_format(record)
        if kind is None:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise FormatError(
                f"{path}:{line_no}: cannot tell the format of this record (keys: {keys}); expected one "
                f"of {', '.join(FORMATS)} (see megatron_andromeda/data/chat_formats.py), or force one "
                "with --format"
            )
        report.formats[kind] += 1
        if kind == "oasst1":
            oasst_rows.append((line_no, record))
            continue
        try:
            conversation = convert_record(record, kind)
        except (FormatError, KeyError, TypeError, AttributeError) as e:
            report.malformed.append((line_no, f"{kind}: {e}"))
            continue
        report.conversations += 1
        yield conversation
    report.records += len(invalid_json)
    report.malformed += invalid_json
    for conversation in oasst1_conversations(oasst_rows, report) if oasst_rows else ():
        report.conversations += 1
        yield conversation
    report.malformed.sort()  # oasst1 problems are found at the end of the file
