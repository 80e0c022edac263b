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


def main() -> None:
    """Entry point: a MedsightError becomes one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except MedsightError as err:
        print(f"medsight: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("medsight: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
