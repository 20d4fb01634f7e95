"""Issue 20, items 1 and 3: cleaning profiles (prose rules never judge source code), the drop-share
warning, and Megatron-LM's own preprocessing command line accepted as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hang_guard import HANG_GUARD_S
from tiny_tokenizer import train_tiny_tokenizer
from tool_loader import load_tool

from megatron_andromeda.config import ConfigError
from megatron_andromeda.data.recipe import CLEAN_PROFILES, load_recipe
from megatron_andromeda.preprocess.cleaning import PROFILES, cleaning_profile, quality_reason, reason_switch

ROOT = Path(__file__).resolve().parents[1]
# The corpus the issue tried: Python's own standard library, present wherever the tests run.
SOURCES = sorted(Path(os.__file__).parent.glob("*.py"))[:50]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("profiles")
    texts = [p.read_text() for p in SOURCES]
    with open(root / "code.jsonl", "w") as f:
        for path, text in zip(SOURCES, texts):
            f.write(json.dumps({"text": text, "path": path.name}) + "\n")
    train_tiny_tokenizer(root / "tokenizer.json", texts[:10])
    return root


def preprocess(ws: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/preprocess_data.py", "--input", str(ws / "code.jsonl"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


def kept(ws: Path, prefix: str) -> tuple[int, int]:
    docs = json.loads((ws / f"{prefix}.json").read_text())["documents"]
    return docs["read"], docs["kept"]


def test_prose_rules_drop_source_files_and_say_so(workspace):
    result = preprocess(workspace, "--output-prefix", str(workspace / "prose"), "--tokenizer",
                        str(workspace / "tokenizer.json"), "--no-split")  # fmt: skip
    assert result.returncode == 0, result.stderr
    read, kept_docs = kept(workspace, "prose")
    assert kept_docs < 0.8 * read  # prose rules judge code as low-quality text (31 of these 50 dropped)
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: dropped"))
    assert f"of {read} documents" in warning and "--clean-profile code" in warning
    assert "--clean-set " in warning  # each top reason comes with the flag that turns it off


def test_the_code_profile_keeps_ordinary_source_files_byte_for_byte(workspace):
    tok = str(workspace / "tokenizer.json")
    result = preprocess(workspace, "--output-prefix", str(workspace / "code"), "--tokenizer", tok,
                        "--no-split", "--clean-profile", "code")  # fmt: skip
    assert result.returncode == 0, result.stderr
    read, kept_docs = kept(workspace, "code")
    assert kept_docs == read == len(SOURCES) and "warning: dropped" not in result.stderr
    sidecar = json.loads((workspace / "code.json").read_text())
    assert sidecar["options"]["clean_profile"] == "code"
    assert sidecar["options"]["cleaning"]["unicode_form"] is None  # source kept as written


def test_the_code_profile_still_drops_generated_and_data_files():
    code = cleaning_profile("code")
    assert quality_reason("x = [" + "1, " * 600 + "]\n", code) == "line_too_long"  # minified / generated
    assert quality_reason("=" * 90 + "\n" + "-" * 90, code) == "alnum_ratio"
    assert quality_reason("def f(x):\n    return x\n", code) is None
    assert reason_switch("duplicate_5gram") == "--clean-set max_duplicate_ngram_chars_ratio=none"
    assert reason_switch("exact_duplicate") == "--no-exact-dedup" and reason_switch("invalid_json") is None
    assert CLEAN_PROFILES == PROFILES  # the recipes' profiles are the cleaning module's


def test_megatron_command_line_writes_megatron_names(workspace):
    tok = str(workspace / "tokenizer.json")
    out = workspace / "megatron" / "corpus"
    result = preprocess(workspace, "--output-prefix", str(out), "--tokenizer-type", "HuggingFaceTokenizer",
                        "--tokenizer-model", str(workspace), "--json-keys", "text", "--workers", "1",
                        "--append-eod", "--clean-profile", "none", "--no-dedup")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (workspace / "megatron" / "corpus_text_document.bin").is_file()  # Megatron's own naming
    assert not list((workspace / "megatron").glob("*_train_*"))
    split = preprocess(workspace, "--output-prefix", str(workspace / "msplit"), "--tokenizer-type",
                       "HuggingFaceTokenizer", "--tokenizer-model", tok, "--split", "90,5,5")  # fmt: skip
    assert split.returncode == 0 and (workspace / "msplit_train_text_document.idx").is_file(), split.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokenizer-type", "GPT2BPETokenizer", "--tokenizer-model", "v"], "GPT2BPETokenizer: not supp"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "org/model"], "not a local file"),
        (["--tokenizer-type", "HuggingFaceTokenizer"], "come as a pair"),
        ([], "--tokenizer is required"),
    ],
)  # fmt: skip
def test_megatron_flags_that_cannot_work_are_refused_by_name(workspace, args, message):
    result = preprocess(workspace, "--output-prefix", str(workspace / "refused"), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_recipe_profiles_are_checked_and_plan_data_warns_on_a_mismatch(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - {name: s, prefix: p, weight: 1, clean_profile: python}\n")
    with pytest.raises(ConfigError, match="clean_profile 'python' is not one of prose, code, none"):
        load_recipe(bad)
    recipe = tmp_path / "stage.yaml"
    source = f"{{name: src, prefix: {workspace / 'prose'}, weight: 1, clean_profile: code}}"
    recipe.write_text(f"tokens: 1.0e6\nsources:\n  - {source}\n")
    assert load_tool("plan_data").main([str(recipe)]) == 0
    assert "preprocessed with --clean-profile prose, the recipe asks for code" in capsys.readouterr().err


def test_train_tokenizer_spells_the_key_flag_like_preprocess_data(workspace, tmp_path):
    out = tmp_path / "tok.json"
    result = subprocess.run(
        [sys.executable, "tools/train_tokenizer.py", "--input", str(workspace / "code.jsonl"), "--output",
         str(out), "--vocab-size", "300", "--json-keys", "path"],
        cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.is_file()
