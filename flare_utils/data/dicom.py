"""A DICOM CT series (one file per slice) -> a NIfTI volume, with pydicom.

`dicom_series_to_nifti(folder, out_path)` reads one folder (not recursive), skips hidden and
non-image DICOM files, and builds the volume by the same geometry rules as dcm2niix/ITK: slices
ordered by position along the slice normal (never by InstanceNumber or file name), spacing from
the positions, and missing, duplicate or unevenly spaced slices reported as errors naming the
files. Several series in one folder are an error unless `series_uid=` picks one. Intensities are
HU (rescale slope and intercept applied); arrays are in NIfTI's (i, j, k) order with a RAS affine.

Details: docs/reference/data_conversion.md
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from flare_utils.errors import FlareInputError
from flare_utils.data.io import check_nifti_name, check_output_outside, check_overwrite, save_nifti

__all__ = ["read_dicom_series", "dicom_series_to_nifti", "list_dicom_series", "DicomSeries",
           "SLICE_GAP_ATOL_MM", "SLICE_GAP_RTOL", "ORIENTATION_ATOL"]

SLICE_GAP_ATOL_MM = 0.05
SLICE_GAP_RTOL = 0.01
ORIENTATION_ATOL = 1e-4
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class DicomSeries:
    uid: str
    description: str
    files: list[Path]
    headers: list = field(default_factory=list, repr=False)  # pydicom datasets, without pixels


def _read_header(path: Path):
    """The dataset of an image file, None for a non-image DICOM file; raises for non-DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        has_preamble = True
    except InvalidDicomError:
        has_preamble = False
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        except Exception as e:  # noqa: BLE001
            raise FlareInputError(path, f"not a DICOM file ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - truncated headers, bad values, I/O errors
        raise FlareInputError(path, f"unreadable DICOM file ({type(e).__name__}: {e})") from e
    try:
        is_image = "Rows" in ds and "Columns" in ds
    except Exception as e:  # noqa: BLE001
        raise FlareInputError(path, f"unreadable DICOM file ({type(e).__name__}: {e})") from e
    if is_image:
        return ds
    if not has_preamble:
        raise FlareInputError(path, "not a DICOM file (no DICOM preamble and no image attributes)")
    # pydicom stops quietly at the end of a truncated file: only skip files that say they are not
    # images (DICOMDIR, reports, structure sets...); an image class without Rows is truncated.
    sop = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    sop_name = getattr(pydicom.uid.UID(sop), "name", sop) if sop else ""
    if path.name.upper() == "DICOMDIR" or (sop and "Image Storage" not in sop_name and sop_name != sop):
        return None
    raise FlareInputError(path, f"incomplete DICOM image header (truncated file?): no Rows/Columns"
                                f"{' in a ' + sop_name + ' file' if sop_name else ''}")


def list_dicom_series(folder: str | Path) -> dict[str, DicomSeries]:
    """The image series in `folder`, by SeriesInstanceUID ('' when the tag is empty or absent)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FlareInputError(folder, "DICOM folder is missing or not a folder")
    series: dict[str, DicomSeries] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        ds = _read_header(path)
        if ds is None:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        s = series.setdefault(uid, DicomSeries(uid, str(ds.get("SeriesDescription", "") or ""), []))
        s.files.append(path)
        s.headers.append(ds)
    if not series:
        raise FlareInputError(folder, "holds no DICOM image files")
    return series


def _floats(ds, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise FlareInputError(path, f"lacks {keyword}, needed for the slice geometry")
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise FlareInputError(path, f"{keyword} is not numeric: {value!r}") from e
    if arr.shape != (n,):
        raise FlareInputError(path, f"{keyword} has {arr.size} values, expected {n}")
    return arr


def _slice_geometry(headers: list[tuple[Path, object]]):
    """Sorted (path, header) list, affine (LPS) and spacing; raises on any inconsistency."""
    p0, ds0 = headers[0]
    iop0 = _floats(ds0, "ImageOrientationPatient", 6, p0)
    ps0 = _floats(ds0, "PixelSpacing", 2, p0)
    rows0, cols0 = int(ds0.Rows), int(ds0.Columns)
    positions = []
    for path, ds in headers:
        iop = _floats(ds, "ImageOrientationPatient", 6, path)
        if not np.allclose(iop, iop0, atol=ORIENTATION_ATOL):
            raise FlareInputError(path, f"ImageOrientationPatient {iop.tolist()} differs from {p0.name} "
                                        f"({iop0.tolist()})")
        if (int(ds.Rows), int(ds.Columns)) != (rows0, cols0):
            raise FlareInputError(path, f"slice size {int(ds.Rows)}x{int(ds.Columns)} differs from {p0.name} "
                                        f"({rows0}x{cols0})")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, path), ps0, atol=1e-4):
            raise FlareInputError(path, f"PixelSpacing differs from {p0.name}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise FlareInputError(path, "multi-frame DICOM images are not supported")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise FlareInputError(path, "colour DICOM images are not supported")
        positions.append(_floats(ds, "ImagePositionPatient", 3, path))

    row_dir, col_dir = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 \
            or abs(row_dir @ col_dir) > 1e-3:
        raise FlareInputError(p0, f"ImageOrientationPatient {iop0.tolist()} is not two orthonormal vectors")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)

    if len(headers) < 2:
        raise FlareInputError(p0, "the series has a single slice; at least two are needed for a volume")
    pos = np.stack(positions)
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    headers = [headers[i] for i in order]
    pos, d = pos[order], d[order]
    names = [p.name for p, _ in headers]
    gaps = np.diff(d)
    for i, g in enumerate(gaps):
        if g <= SLICE_GAP_ATOL_MM:
            raise FlareInputError(headers[i + 1][0], f"duplicate slice: same position along the slice normal as "
                                                     f"{names[i]} (d = {d[i]:.3f} mm)")
    nominal = float(np.median(gaps))
    tol = SLICE_GAP_ATOL_MM + SLICE_GAP_RTOL * nominal
    for i, g in enumerate(gaps):
        if abs(g - nominal) <= tol:
            continue
        k = int(round(g / nominal))
        where = f"between {names[i]} (d = {d[i]:.3f} mm) and {names[i + 1]} (d = {d[i + 1]:.3f} mm)"
        if k >= 2 and abs(g - k * nominal) <= k * tol:
            raise FlareInputError(headers[i + 1][0], f"{k - 1} slice(s) missing {where}: gap {g:.3f} mm, "
                                                     f"slice spacing {nominal:.3f} mm")
        raise FlareInputError(headers[i + 1][0], f"non-uniform slice spacing {where}: gap {g:.3f} mm, expected "
                                                 f"{nominal:.3f} mm (tolerance {tol:.3f} mm)")
    # every slice must lie on the line through the first one along the normal (no tilt/shear)
    sideways = (pos - pos[0]) - np.outer(d - d[0], normal)
    drift = np.linalg.norm(sideways, axis=1)
    worst = int(np.argmax(drift))
    if drift[worst] > tol:
        raise FlareInputError(headers[worst][0], f"slice position is offset {drift[worst]:.3f} mm sideways from "
                                                 f"{names[0]}'s slice normal (gantry tilt or sheared stack "
                                                 "is not supported)")
    spacing = float((d[-1] - d[0]) / (len(d) - 1))
    affine = np.eye(4)
    affine[:3, 0] = row_dir * ps0[1]   # i: along a row, i.e. increasing column index
    affine[:3, 1] = col_dir * ps0[0]   # j: down a column, i.e. increasing row index
    affine[:3, 2] = normal * spacing
    affine[:3, 3] = pos[0]
    return headers, affine, spacing


def _pixels(path: Path, rows: int, cols: int) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), force=True)
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - decoder errors, truncated files, missing plugins
        raise FlareInputError(path, f"pixel data unreadable ({type(e).__name__}: {e})") from e
    if arr.shape != (rows, cols):
        raise FlareInputError(path, f"pixel data shape {arr.shape} does not match Rows x Columns ({rows}x{cols})")
    return arr


def _rescale(ds, path: Path) -> tuple[float, float]:
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        v = ds.get(keyword)
        try:
            values.append(default if v is None or str(v).strip() == "" else float(v))
        except (TypeError, ValueError) as e:
            raise FlareInputError(path, f"{keyword} {v!r} is not numeric") from e
    return values[0], values[1]


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Volume (i, j, k) in HU and its RAS affine, from the DICOM series in `folder`.

    See the module docstring for the ordering, spacing, tolerance and intensity rules.
    """
    folder = Path(folder)
    series = list_dicom_series(folder)
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{s.uid or '<empty>'} ({len(s.files)} files{', ' + s.description if s.description else ''})"
                                for s in series.values())
            raise FlareInputError(folder, f"holds {len(series)} DICOM series: {listing}; choose one with series_uid= "
                                          "(on the command line --series-uid)")
        chosen = next(iter(series.values()))
    else:
        if series_uid not in series:
            raise FlareInputError(folder, f"no series with SeriesInstanceUID {series_uid!r} "
                                          f"(found: {', '.join(repr(u) for u in series)})")
        chosen = series[series_uid]

    headers, affine_lps, _ = _slice_geometry(list(zip(chosen.files, chosen.headers)))
    rows, cols = int(headers[0][1].Rows), int(headers[0][1].Columns)
    scales = [_rescale(ds, p) for p, ds in headers]
    exact = all(float(s).is_integer() and float(i).is_integer() for s, i in scales)
    out = np.empty((cols, rows, len(headers)), dtype=np.int32 if exact else np.float32)
    for k, ((path, _), (slope, inter)) in enumerate(zip(headers, scales)):
        raw = _pixels(path, rows, cols)
        if exact:
            out[:, :, k] = (raw.astype(np.int32) * int(slope) + int(inter)).T
        else:
            out[:, :, k] = (raw.astype(np.float64) * slope + inter).T
    if exact:
        lo, hi = (int(out.min()), int(out.max())) if out.size else (0, 0)
        info = np.iinfo(np.int16)
        out = out.astype(np.int16) if info.min <= lo and hi <= info.max else out.astype(np.float32)
    return out, LPS_TO_RAS @ affine_lps


def dicom_series_to_nifti(folder: str | Path, out_path: str | Path, series_uid: str | None = None, *,
                          overwrite: bool = False) -> Path:
    """read_dicom_series, then write the volume atomically as NIfTI (qform = sform, units mm).

    `out_path` must be a NIfTI name outside the series folder (the series is never written to); an
    existing `out_path` is replaced only with `overwrite`. Checked before any slice is read.
    """
    check_nifti_name(out_path)
    check_output_outside(out_path, folder, "the DICOM series folder")
    check_overwrite(out_path, overwrite)
    data, affine = read_dicom_series(folder, series_uid=series_uid)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    like = nib.Nifti1Image(np.zeros((1, 1, 1), data.dtype), affine, header)
    return save_nifti(data, affine, out_path, like=like)
