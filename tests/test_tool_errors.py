"""Expected errors in the tools print one line and exit non-zero; ANDROMEDA_TRACEBACK=1 shows more.

Through the documented commands (`tools/*.py`, `python -m megatron_andromeda.train`), as a user runs
them (issue 20 item 6): a missing dataset, a tokenizer from another model, a file that is not a
tokenizer. Each must print its message alone, not a traceback followed by the message.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_preprocess_pipeline import prose
from tiny_tokenizer import train_tiny_tokenizer
from tool_loader import load_tool

from megatron_andromeda.checkpoint import write_model_checkpoint
from megatron_andromeda.config import DataConfig, ModelConfig, RunConfig
from megatron_andromeda.errors import TRACEBACK_ENV
from megatron_andromeda.models import GPTModel
from megatron_andromeda.preprocess.pipeline import PreprocessConfig, run

ROOT = Path(__file__).resolve().parents[1]
STDLIB_ONLY = {"build_embedded_corpus.py"}  # rebuilt on machines without the package installed


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tokenizer A (300 ids) and a larger B (400 ids); a dataset made with A; a checkpoint of a
    model with 320 rows trained with A, and its Hugging Face export."""
    root = tmp_path_factory.mktemp("tool_errors")
    texts = [prose(i) for i in range(40)]
    train_tiny_tokenizer(root / "a.json", texts, vocab_size=300)
    train_tiny_tokenizer(root / "b.json", texts, vocab_size=400)
    corpus = root / "ours.jsonl"
    corpus.write_text("".join(json.dumps({"text": prose(i, words=30)}) + "\n" for i in range(40)))
    run(PreprocessConfig(
        inputs=(str(corpus),), output_prefix=str(root / "ours"), tokenizer=str(root / "a.json"),
        workers=0, split=(0.8, 0.2, 0.0), append_eod=True, cleaning=None, exact_dedup=False, minhash=None,
    ))  # fmt: skip
    model_cfg = ModelConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, max_seq_length=16)
    data = DataConfig(tokenizer=str(root / "a.json"), seq_length=16)
    cfg = RunConfig(model=model_cfg, data=data).validate()
    torch.manual_seed(0)
    write_model_checkpoint(root / "ckpt", cfg, GPTModel(model_cfg).state_dict())
    convert = load_tool("convert_to_hf")
    assert convert.main(["--checkpoint", str(root / "ckpt"), "--output", str(root / "hf")]) == 0
    return root


def tool(*args, traceback: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (TRACEBACK_ENV, "RANK")}
    if traceback:
        env[TRACEBACK_ENV] = "1"
    cmd = [sys.executable, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, code: int, *expected: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def test_every_tool_runs_under_report_user_errors():
    """Each tool's `__main__` block runs main() inside `with report_user_errors():`, so a UserError
    the tool does not catch itself still prints as one line."""
    missing = []
    for path in sorted((ROOT / "tools").glob("*.py")):
        if path.name in STDLIB_ONLY:
            continue
        tree = ast.parse(path.read_text())
        main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        wrapped = any(
            isinstance(stmt, ast.With)
            and ast.unparse(stmt.items[0].context_expr) == "report_user_errors()"
            and "main(" in ast.unparse(stmt)
            for block in main_blocks
            for stmt in block.body
        )
        if not wrapped:
            missing.append(path.name)
    assert not missing, f"tools without report_user_errors around main(): {missing}"


def test_a_missing_dataset(ws):
    evaluate = tool("tools/evaluate.py", "--checkpoint", ws / "ckpt", "--device", "cpu",
                    "--valid-data", ws / "nope_text_document")  # fmt: skip
    assert_one_line(evaluate, 2, "evaluate: error: --valid-data", "nope_text_document", "not found")
    validate = tool("tools/validate_dataset.py", ws / "nope_text_document")
    assert_one_line(validate, 1, "FAIL", "nope_text_document.idx: file not found", "tools/preprocess_data.py")


def test_a_tokenizer_with_more_ids_than_the_model(ws):
    b = ws / "b.json"
    generate = tool("tools/generate.py", "--checkpoint", ws / "ckpt", "--tokenizer", b, "--prompt", "a")
    assert_one_line(generate, 2, "generate: error:", "has 400 ids but model.vocab_size=320")
    from_hf = tool("tools/convert_from_hf.py", "--hf", ws / "hf", "--output", ws / "back", "--tokenizer", b)
    assert_one_line(from_hf, 2, "convert_from_hf: error: --tokenizer", "has 400 ids but model.vocab_size=300")
    assert not (ws / "back").exists()


def test_a_file_that_is_not_a_tokenizer(ws, tmp_path):
    not_a_tokenizer = ws / "ours.json"  # the preprocessing sidecar: JSON, but not a tokenizer.json
    export = tool("tools/convert_to_hf.py", "--checkpoint", ws / "ckpt", "--output", tmp_path / "hf",
                  "--tokenizer", not_a_tokenizer)  # fmt: skip
    assert_one_line(export, 2, f"convert_to_hf: error: {not_a_tokenizer}: not a Hugging Face tokenizer.json")
    train = tool("-m", "megatron_andromeda.train", f"data.tokenizer={not_a_tokenizer}",
                 f"data.train=[{ws / 'ours_train_text_document'}]", "model.vocab_size=320",
                 "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4", "model.max_seq_length=16",
                 "data.seq_length=16", "train.steps=2", "optim.warmup_steps=1",
                 f"logging.run_dir={tmp_path / 'run'}")  # fmt: skip
    assert_one_line(train, 2, f"tokenizer error: {not_a_tokenizer}: not a Hugging Face tokenizer.json")


def test_the_traceback_on_request(ws, tmp_path):
    args = ("tools/convert_to_hf.py", "--checkpoint", ws / "ckpt", "--output", tmp_path / "hf",
            "--tokenizer", ws / "ours.json")  # fmt: skip
    shown = tool(*args, traceback=True)
    assert shown.returncode != 0
    assert "Traceback" in shown.stderr and "TokenizerError: " in shown.stderr
    assert "tokenizer.py" in shown.stderr  # where it was raised, which the one-line form leaves out


def test_a_failed_step_stops_the_demo_in_one_line(ws):
    demo = load_tool("demo")
    with pytest.raises(SystemExit, match="demo: tools/validate_dataset.py failed \\(exit 1\\); its message"):
        demo.tool("tools/validate_dataset.py", str(ws / "nope_text_document"))


def test_under_torchrun_the_message_is_printed_once(ws, tmp_path):
    """Every rank fails alike on a missing dataset; the job says so once (rank 0), not once per rank."""
    missing = ws / "nope_text_document"
    result = tool("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "-m", "megatron_andromeda.train", f"data.tokenizer={ws / 'a.json'}",
                  f"data.train=[{missing}]", "model.vocab_size=320", "model.hidden_size=32",
                  "model.num_layers=2", "model.num_heads=4", "model.max_seq_length=16", "data.seq_length=16",
                  "train.steps=2", "optim.warmup_steps=1", f"logging.run_dir={tmp_path / 'run'}")  # fmt: skip
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if str(missing) in line and "error" in line]
    assert len(ours) == 1, result.stderr
    assert "Traceback" not in ours[0]
