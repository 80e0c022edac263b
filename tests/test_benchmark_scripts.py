"""Every benchmark script starts as the README runs it: `python benchmarks/<name>.py`.

Run as a script, Python puts benchmarks/ first on sys.path, so a script named like a standard-library
module (ssl.py, once) shadows it and breaks `import torch` for every benchmark; importing the scripts
in-process, as the other benchmark tests do, cannot see that.
"""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_starts(script):
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
