# Sourced by the launch scripts: which Python and which torchrun to start. They must work as written
# on a fresh machine, where `make install` put everything in the checkout's .venv and nothing on
# PATH (a bare `torchrun` there is "command not found" unless the venv is activated).
#
# torchrun, in order: TORCHRUN if set (a command line, e.g. "srun-wrapper torchrun"); with
# ANDROMEDA_PYTHON set, that Python's `-m torch.distributed.run` (which is torchrun); the active
# virtual environment's ($VIRTUAL_ENV); this checkout's .venv (what `make install` creates); the one
# on PATH; else `python3 -m torch.distributed.run`. Python (for tools/*.py), in the same order.
#
# Sets ANDROMEDA_PYTHON (a program) and TORCHRUN_CMD (an array: the program and its arguments).

unset TORCHRUN_CMD
_launch_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

_venv_program() {  # NAME -> the active venv's or this checkout's .venv's NAME, else PATH's, else ""
    local dir
    for dir in ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin"} "$_launch_repo/.venv/bin"; do
        if [[ -x "$dir/$1" ]]; then
            echo "$dir/$1"
            return 0
        fi
    done
    command -v "$1" 2>/dev/null || true
}

if [[ -n "${TORCHRUN:-}" ]]; then
    read -r -a TORCHRUN_CMD <<<"$TORCHRUN"
elif [[ -n "${ANDROMEDA_PYTHON:-}" ]]; then
    TORCHRUN_CMD=("$ANDROMEDA_PYTHON" -m torch.distributed.run)
elif [[ -n "$(_venv_program torchrun)" ]]; then
    TORCHRUN_CMD=("$(_venv_program torchrun)")
fi
if [[ -z "${ANDROMEDA_PYTHON:-}" ]]; then
    ANDROMEDA_PYTHON=$(_venv_program python)
    ANDROMEDA_PYTHON=${ANDROMEDA_PYTHON:-python3}
fi
if [[ -z "${TORCHRUN_CMD+x}" ]]; then
    TORCHRUN_CMD=("$ANDROMEDA_PYTHON" -m torch.distributed.run)
fi
