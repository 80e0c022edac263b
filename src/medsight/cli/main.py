"""The `medsight` command. Heavy libraries (torch, MONAI, nibabel...) are imported inside the
commands, never at module level here, so that `medsight --help` answers at once.

Each group of commands lives in its own module with a ``register(app)`` function.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# Help that is piped or captured (`medsight train --help | less`) would get rich's fixed 80 columns,
# which cut long option names; 120 fits them. A terminal keeps its own width.
if not sys.stdout.isatty():
    os.environ.setdefault("TERMINAL_WIDTH", "120")

import typer  # noqa: E402  (reads TERMINAL_WIDTH)

from medsight.errors import MedsightError

app = typer.Typer(
    name="medsight",
    help="Medical image segmentation and enhancement when expert labels are scarce.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    from medsight.cli import data, evaluate, fewshot, phantom, scans, segment, textseg
    from medsight.tasks.registry import TASKS

    done = set()
    for module in (scans, data, evaluate, phantom, segment, fewshot, textseg):
        module.register(app)
        done.add(f"{module.__name__}:register")
    for task in TASKS.values():  # tasks registered elsewhere bring their commands with them
        if task.cli_register and task.cli_register not in done:
            done.add(task.cli_register)
            task.resolve("cli_register")(app)


_register_all()


INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
RESUME_HINT = "a training run continues from its last finished epoch with --resume"


def _one_line_warnings() -> None:
    """medsight's own warnings read like its errors, one line each, not file:line plus source."""
    package = str(Path(__file__).resolve().parents[1])
    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and str(filename).startswith(package):
            return f"medsight: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line


def main() -> None:
    """Entry point: a MedsightError becomes one line on stderr and exit code 2, no traceback."""
    _one_line_warnings()
    try:
        app()
    except MedsightError as err:
        print(f"medsight: error: {err}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as done:
        if done.code == INTERRUPTED:  # typer turns Ctrl-C into this exit code, silently
            print(f"medsight: interrupted; {RESUME_HINT}", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print(f"medsight: interrupted; {RESUME_HINT}", file=sys.stderr)
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    main()
