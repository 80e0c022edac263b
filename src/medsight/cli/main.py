"""The `medsight` command. Heavy libraries (torch, MONAI, nibabel...) are imported inside the
commands, never at module level here, so that `medsight --help` answers at once.

Each group of commands lives in its own module with a ``register(app)`` function.
"""

from __future__ import annotations

import sys

import typer

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

    for module in (scans, data, evaluate, phantom, segment, fewshot, textseg):
        module.register(app)


_register_all()


INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT
RESUME_HINT = "a training run continues from its last finished epoch with --resume"


def main() -> None:
    """Entry point: a MedsightError becomes one line on stderr and exit code 2, no traceback."""
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
