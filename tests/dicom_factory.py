"""Writes small but real DICOM series with pydicom, so the DICOM reader is tested on files, not mocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_series(
    folder: Path,
    volume: np.ndarray,
    row_dir=(1.0, 0.0, 0.0),
    col_dir=(0.0, 1.0, 0.0),
    pixel_spacing=(0.5, 0.8),
    slice_step=2.0,
    origin=(10.0, -20.0, 30.0),
    slope=1.0,
    intercept=0.0,
    series_uid: str | None = None,
    description: str = "test series",
    prefix: str = "",
    shuffle_seed: int | None = 0,
    frame_of_reference_uid: str | None = None,
) -> dict:
    """volume is (slices, rows, cols) of stored integers. Returns the LPS geometry used."""
    folder.mkdir(parents=True, exist_ok=True)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal = np.cross(row_dir, col_dir)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    n = volume.shape[0]
    order = np.random.default_rng(shuffle_seed).permutation(n) if shuffle_seed is not None else np.arange(n)
    for file_index, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.PatientID = "PHANTOM"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.InstanceNumber = int(k) + 1
        if frame_of_reference_uid is not None:
            ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin) + k * slice_step * normal]
        ds.PixelSpacing = [f"{pixel_spacing[0]}", f"{pixel_spacing[1]}"]
        ds.SliceThickness = f"{slice_step}"
        ds.RescaleSlope = f"{slope}"
        ds.RescaleIntercept = f"{intercept}"
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(volume[k].astype(np.uint16)).tobytes()
        ds.save_as(str(folder / f"{prefix}{file_index:04d}.dcm"), enforce_file_format=True)
    return {"row_dir": row_dir, "col_dir": col_dir, "normal": normal, "uid": series_uid}
