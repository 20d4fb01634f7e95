"""The commands the READMEs show work as written (issue 20 item 4).

Every command in a ```bash block of README.md and examples/launch/README.md is parsed: a program
under `.venv/bin/` must be one that `make install` creates, a `tools/X.py` flag must be one of that
tool's flags, a training command's config file and `section.key=value` keys must exist, a torchrun
command must parse with torchrun's own parser, a script or `make` target must exist. The cheap ones
are then run verbatim (with `.venv/bin/` meaning the venv running the tests): model_info,
plan_parallel and the launch scripts in dry-run mode. Commands that need the user's own corpus
(tokenizer training, preprocessing, a real training run) are checked but not run; `make demo`
(tests/test_demo.py) runs that path on the embedded corpus.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tool_loader import load_tool
from torch.distributed.run import get_args_parser

from megatron_andromeda.config import load_config
from megatron_andromeda.train import parse_args as train_parse_args

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "examples" / "launch" / "README.md"]
VENV_PROGRAMS = {"python", "torchrun", "ruff", "pytest"}  # venv, torch, and the [dev] extra
RUN_VERBATIM = ("tools/model_info.py", "tools/plan_parallel.py", "examples/launch/train_")


def bash_commands(readme: Path) -> list[str]:
    """Each command of the file's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


COMMANDS = [(readme, cmd) for readme in READMES for cmd in bash_commands(readme)]


def words(command: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, the command's words)."""
    argv = shlex.split(command, comments=True)
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    return env, argv


def tool_flags(script: str) -> set[str]:
    """The --flags a tools/*.py script's argparse accepts (read from its --help)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        load_tool(Path(script).stem).main(["--help"])
    assert exit_info.value.code == 0
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.getvalue()))


def check_training_args(args: list[str]) -> None:
    parsed = train_parse_args(args)
    assert parsed.config and (ROOT / parsed.config).is_file(), parsed.config
    load_config(ROOT / parsed.config, parsed.overrides)  # every key exists, every value validates


def check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "megatron_andromeda.train"]:
        return check_training_args(args[2:])
    script = args[0]
    assert (ROOT / script).is_file(), f"{script} does not exist"
    if script.startswith("tools/"):
        unknown = {a.split("=")[0] for a in args[1:] if a.startswith("--")} - tool_flags(script)
        assert not unknown, f"{script} has no {sorted(unknown)}"


def check_command(env: dict[str, str], argv: list[str]) -> None:
    program, args = argv[0], argv[1:]
    if program.startswith(".venv/bin/"):
        name = program.removeprefix(".venv/bin/")
        assert name in VENV_PROGRAMS, f"`make install` creates no .venv/bin/{name}"
        assert (Path(sys.prefix) / "bin" / name).is_file(), f"this venv has no bin/{name}"
        program = name
    if program == "python":
        check_python(args)
    elif program == "torchrun":
        parsed = get_args_parser().parse_args(args)
        assert parsed.module and parsed.training_script == "megatron_andromeda.train"
        check_training_args(parsed.training_script_args)
    elif program == "make":
        assert re.search(rf"^{re.escape(args[0])}:", (ROOT / "Makefile").read_text(), re.M), args[0]
    elif program == "sbatch":
        assert (ROOT / args[-1]).is_file(), args[-1]
    elif program == "bash":  # a batch script run on one machine without Slurm
        assert (ROOT / args[0]).is_file(), args[0]
    elif program.startswith("examples/launch/"):
        assert os.access(ROOT / program, os.X_OK), f"{program} is not executable"
    else:
        raise AssertionError(f"a README command this test does not know: {program} (teach it)")


@pytest.mark.parametrize(("readme", "command"), COMMANDS, ids=[c[:60] for _, c in COMMANDS])
def test_readme_command_refers_to_what_exists(readme, command):
    env, argv = words(command)
    check_command(env, argv)


def test_readmes_show_the_commands_this_test_relies_on():
    programs = {words(c)[1][0] for _, c in COMMANDS}
    assert {".venv/bin/python", ".venv/bin/torchrun", "make"} <= programs
    assert "torchrun" not in programs and "python" not in programs  # not on PATH after `make install`
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme.split("## Quickstart")[0]  # said once, early


CHEAP = [(r, c) for r, c in COMMANDS if any(part in c for part in RUN_VERBATIM)]


@pytest.mark.parametrize(("readme", "command"), CHEAP, ids=[c[:60] for _, c in CHEAP])
def test_cheap_readme_commands_run_verbatim(readme, command):
    env, argv = words(command)
    if argv[0].startswith(".venv/bin/"):
        argv[0] = str(Path(sys.prefix) / "bin" / argv[0].removeprefix(".venv/bin/"))
    run_env = {**os.environ, **env}
    if argv[0].startswith("examples/launch/"):
        run_env["ANDROMEDA_DRY_RUN"] = "1"  # print the torchrun command instead of starting GPUs
    result = subprocess.run(argv, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
    if argv[0].startswith("examples/launch/"):
        assert "-m\nmegatron_andromeda.train\n--config\n" in result.stdout


def test_make_install_says_what_it_installs():
    """The big pip steps print what they download (quiet, they looked like a hang of minutes), and an
    echo names each step first (issue 20 item 8)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    plan = subprocess.run(  # as a user's own `make` (not a sub-make of `make test`: no directory lines)
        ["make", "--no-print-directory", "-n", "-B", "install"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    big = [
        i for i, line in enumerate(lines) if "pip install" in line and ("torch==" in line or "-e " in line)
    ]
    assert len(big) == 2
    for i in big:
        assert " -q" not in lines[i], lines[i]
        assert any(line.startswith('echo "== make install') for line in lines[max(i - 3, 0) : i]), lines[i]
    assert "source .venv/bin/activate" in lines[-1]
