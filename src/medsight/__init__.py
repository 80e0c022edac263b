"""medsight: medical image segmentation and enhancement when expert labels are scarce.

Axis convention, stated once for the whole package: every array is channel-first,
``(C, *spatial)``, and the spatial axes are voxel indices ``(i, j[, k])`` in the order the
affine reads them. The affine maps ``(i, j, k, 1)`` to world millimetres in RAS+
(nibabel's convention; DICOM's LPS is converted on reading). 2D images use the same 4x4
affine with ``k = 0``; for PNG/TIFF/JPEG ``i`` is the row and ``j`` the column.
"""

from medsight.errors import MedsightError
from medsight.scan import Plane, Scan

__version__ = "0.1.0"
__all__ = ["MedsightError", "Plane", "Scan", "__version__"]
