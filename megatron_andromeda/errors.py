"""The errors a user can cause and fix, and how command lines report them (a leaf module).

Every package raises a subclass of `UserError` for what the input got wrong (a config field, a
file, a flag): `ConfigError` here, `CheckpointError`, `DatasetError`, `InputError`, ... in their
packages. Command lines run under `report_user_errors()`, which prints such an error as its message
alone (once per job under torchrun, not once per rank) and exits non-zero; set
`ANDROMEDA_TRACEBACK=1` to see the traceback as well. Anything else is a bug and keeps its traceback.

Tools whose `main(argv)` returns an exit code (so tests can call it in process) catch their expected
errors themselves and return `print_error(err, prog)`, which honours the same variable; their
`__main__` block runs under `report_user_errors()` for whatever else the package raises.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

TRACEBACK_ENV = "ANDROMEDA_TRACEBACK"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """An expected failure caused by the input; its message names the file / flag / field and the fix."""

    label = "error"  # how a command line prefixes the message


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the field and what to do."""

    label = "config error"


def traceback_requested() -> bool:
    """Whether the user asked for tracebacks of expected errors (`ANDROMEDA_TRACEBACK=1`)."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


@contextlib.contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn a UserError raised inside into `<its label>: message` on stderr and exit code 2."""
    try:
        yield
    except UserError as err:
        if traceback_requested():
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails alike: say it once
            print(f"{err.label}: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def print_error(err: BaseException, prog: str, code: int = EXIT_USER_ERROR) -> int:
    """Print `prog: error: message` for an error a tool caught and return its exit code; with
    `ANDROMEDA_TRACEBACK=1`, re-raise it instead so the traceback shows where it came from."""
    if traceback_requested():
        raise err
    print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
    return code
