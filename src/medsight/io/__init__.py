"""Reading and writing scans: the only package that touches file formats.

``read(path)`` picks a reader by suffix (a folder is a DICOM series) and returns a :class:`Scan`;
``write(scan, path)`` picks a writer the same way and writes atomically. A broken or unsupported
file raises :class:`MedsightError` naming it.
"""

from medsight.io.atomic import (
    atomic_path,
    check_folder_writable,
    check_run_folder,
    check_writable,
    remove_stale_temporaries,
    write_text,
)
from medsight.io.registry import FORMATS, case_name, read, suffix_of, write

__all__ = [
    "FORMATS",
    "atomic_path",
    "check_folder_writable",
    "check_run_folder",
    "case_name",
    "check_writable",
    "read",
    "remove_stale_temporaries",
    "suffix_of",
    "write",
    "write_text",
]
