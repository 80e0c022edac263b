"""Start-up time of the commands that use MONAI."""

from __future__ import annotations

import sys


def import_monai() -> None:
    """Import MONAI without the ``transformers`` package it would otherwise pull in.

    On its first import MONAI imports every one of its networks, and TransChex imports
    ``transformers``' BERT whenever ``transformers`` is installed, as it is here for the MiniLM text
    model: about 1.5 s of the 3 s MONAI takes, for a network medsight never builds. While MONAI
    loads, ``transformers`` is marked as absent, so MONAI's optional import skips it; afterwards it
    imports normally (the text model still loads it when a command needs sentences).
    """
    if "monai" in sys.modules or "transformers" in sys.modules:
        return
    sys.modules["transformers"] = None  # type: ignore[assignment]  # import fails: "not installed"
    try:
        import monai  # noqa: F401
    finally:
        del sys.modules["transformers"]
