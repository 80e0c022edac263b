"""`medsight --help` and every command's help: complete, and without the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [
    [], ["info"], ["convert"], ["evaluate"], ["overlay"], ["phantom"], ["train"], ["predict"], ["export"],
    ["demo"], ["fewshot"], ["data", "inspect"], ["model", "summary"], ["textseg", "train"],
    ["textseg", "predict"],
]  # fmt: skip

# Runs the CLI in-process, then reports which heavy modules the help made Python import.
PROBE = """
import sys
from medsight.cli.main import main
sys.argv = ["medsight", *sys.argv[1:], "--help"]
try:
    main()
except SystemExit as stop:
    assert stop.code == 0, stop.code
heavy = sorted(m for m in ("torch", "monai", "nibabel", "pydicom", "onnxruntime") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "medsight")
def test_help_imports_no_heavy_library_and_shows_whole_option_names(command):
    result = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("HEAVY:"), result.stdout[-200:]
    # Piped help used to be cut at 80 columns: "--iters-per-ep…".
    assert "…" not in result.stdout
    if command == ["train"]:
        assert "--iters-per-epoch" in result.stdout and "--max-val-cases" in result.stdout
