"""Reading a CT for inference: the stored voxel values and their scaling, nothing converted.

`read_image` keeps the file's data type (int16 for most CT), so a large scan is not doubled into
float32 before it is cropped; the predictor applies the slope/intercept (`StoredImage.scale`)
only to the cropped voxels it normalises. Arrays are in nibabel's voxel order (i, j, k).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from flare_utils.data.io import read_nifti
from flare_utils.errors import FlareInputError

__all__ = ["StoredImage", "read_image", "long_axis_of_affine"]


@dataclass
class StoredImage:
    array: np.ndarray                # stored values, file voxel order (i, j, k)
    header: Any                      # nibabel header (None for in-memory arrays)
    affine: np.ndarray
    zooms: tuple[float, float, float]
    scale: tuple[float, float]       # (slope, intercept): HU = stored * slope + intercept


def read_image(path: str | Path) -> StoredImage:
    """Read a 3D NIfTI without converting its values (memory: the stored dtype, e.g. int16)."""
    path = Path(path)
    if not path.exists():
        raise FlareInputError(path, "image file is missing")
    try:
        img, arr = read_nifti(path, unscaled=True)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise FlareInputError(path, f"not a NIfTI image ({type(img).__name__})")
        dataobj = img.dataobj
        slope = getattr(dataobj, "slope", 1.0)
        inter = getattr(dataobj, "inter", 0.0)
    except FlareInputError:
        raise
    except Exception as e:  # nibabel raises many kinds on corrupt/truncated files
        raise FlareInputError(path, f"unreadable or truncated NIfTI image ({type(e).__name__}: {e})") from e
    if arr.ndim > 3 and all(s == 1 for s in arr.shape[3:]):
        arr = arr.reshape(arr.shape[:3])
    if arr.ndim != 3:
        raise FlareInputError(path, f"expected a 3D image, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):
        # min/max propagate NaN and show +-inf without a temporary array as large as the image
        what = "NaN" if np.isnan(arr.min()) else "infinite"
        raise FlareInputError(path, f"image holds {what} voxel values; a CT must hold finite intensities")
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return StoredImage(arr, img.header, np.asarray(img.affine, float), zooms, (slope, inter))


def long_axis_of_affine(affine: np.ndarray) -> int:
    """Voxel axis whose direction is most aligned with world z (head-foot)."""
    m = np.asarray(affine, float)[:3, :3]
    m = m / np.maximum(np.linalg.norm(m, axis=0, keepdims=True), 1e-12)
    return int(np.argmax(np.abs(m[2])))
