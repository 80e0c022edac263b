"""Datasets in their own layouts, read in place (never converted).

``open_dataset(path)`` detects the layout (MSD, nnU-Net raw v2, LViT folders, CSV manifest, BIDS,
parallel image/label folders such as DRIVE, ``*_image``/``*_label`` pairs, DICOM studies, case folders) and returns a :class:`Dataset` of :class:`Case` paths; ``Dataset.load_case``
reads one case as channel-first Scans. ``fingerprint`` summarises a dataset and lists its
integrity problems; ``train_val_split`` makes deterministic splits.
"""

from medsight.datasets.base import Case, Dataset
from medsight.datasets.inspect import fingerprint
from medsight.datasets.layouts import LAYOUTS, detect_layout, open_dataset
from medsight.datasets.splits import split_dataset, train_val_split

__all__ = [
    "LAYOUTS",
    "Case",
    "Dataset",
    "detect_layout",
    "fingerprint",
    "open_dataset",
    "split_dataset",
    "train_val_split",
]
