"""Start-up: `medsight --help` and every command's help (complete, without the heavy libraries), and
the MONAI import of the commands that need it."""

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
    # Piped help used to be cut at 80 columns: "--iters-per-ep…" (now --steps-per-epoch).
    assert "…" not in result.stdout
    if command == ["train"]:
        assert "--steps-per-epoch" in result.stdout and "--max-val-cases" in result.stdout


# MONAI imported the way the commands import it, then the libraries it was kept from.
MONAI_PROBE = """
import sys
from medsight.cli.startup import import_monai
import_monai()
assert "monai" in sys.modules, "MONAI not imported"
assert "transformers" not in sys.modules, "MONAI pulled in transformers"
from monai.networks.nets import UNet
UNet(2, 1, 2, (4, 8), (2,))
import sentence_transformers, transformers
print("OK", transformers.__version__)
"""


def test_monai_loads_without_transformers_which_still_imports_afterwards():
    """MONAI's TransChex network imports transformers' BERT (about 1.5 s) whenever it is installed;
    the commands skip that, and the text model can still import transformers afterwards."""
    result = subprocess.run([sys.executable, "-c", MONAI_PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("OK"), result.stdout
