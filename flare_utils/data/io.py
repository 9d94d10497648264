"""NIfTI reading/writing with geometry checks and atomic writes.

Convention used across flare_utils: arrays are in the file's voxel order (i, j, k), as nibabel
returns them, and `spacing` is the matching header zooms (mm). Writers never leave a
half-written file: they write a temporary sibling and rename it into place. Compressed files go
through ISA-L's gzip (`isal`) when it is installed, else nibabel's own (same format, slower).
Also the small file helpers every stage shares (atomic text/JSON writes, clean-up of stale
temporaries, the NIfTI files of a folder).

Details: docs/reference/nifti_io.md
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
from nibabel.wrapstruct import WrapStructError

from flare_utils.errors import FlareInputError

try:                                   # ISA-L gzip: same format, several times faster than zlib
    from isal import igzip as _igzip
    from isal.igzip_lib import IsalError as _igzip_error
except ImportError:                    # pragma: no cover - optional speed-up
    _igzip, _igzip_error = None, ()

# Two geometries are "the same" when they agree to these tolerances (mm / unitless).
SPACING_ATOL = 1e-3
ORIGIN_ATOL = 1e-2
DIRECTION_ATOL = 1e-3


@dataclass(frozen=True)
class Geometry:
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3]

    @property
    def direction(self) -> np.ndarray:
        """Unit column directions of the voxel axes (3x3)."""
        m = self.affine[:3, :3]
        return m / np.linalg.norm(m, axis=0, keepdims=True)

    @classmethod
    def of(cls, img: nib.spatialimages.SpatialImage) -> "Geometry":
        return cls(tuple(int(s) for s in img.shape[:3]),
                   tuple(float(z) for z in img.header.get_zooms()[:3]),
                   np.asarray(img.affine, dtype=np.float64))

    def mismatch(self, other: "Geometry") -> str | None:
        """A sentence saying how `other` differs from self, or None when they match."""
        if self.shape != other.shape:
            return f"shape {other.shape} does not match {self.shape}"
        if not np.allclose(self.spacing, other.spacing, atol=SPACING_ATOL):
            return f"spacing {_fmt(other.spacing)} does not match {_fmt(self.spacing)}"
        if not np.allclose(self.origin, other.origin, atol=ORIGIN_ATOL):
            return f"origin {_fmt(other.origin)} does not match {_fmt(self.origin)}"
        if not np.allclose(self.direction, other.direction, atol=DIRECTION_ATOL):
            return "direction (orientation) does not match"
        return None


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _gz(path: str | Path) -> bool:
    return str(path).endswith(".gz")


def read_nifti(path: str | Path, *, unscaled: bool = False) -> tuple[nib.Nifti1Image, np.ndarray]:
    """(image, voxel array) of a NIfTI file, the array read eagerly; `unscaled`: the stored values
    (no slope/intercept applied; the image's `dataobj.slope`/`.inter` say how to scale them).
    nibabel errors propagate (callers turn them into FlareInputError); an empty (0-byte) file is a
    FlareInputError here."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise FlareInputError(path, "empty file (0 bytes), not a NIfTI image")
    if _igzip is not None and _gz(path):
        with _igzip.open(str(path), "rb") as f:
            head = f.read(4)
            f.seek(0)
            cls = nib.Nifti2Image if int.from_bytes(head, "little") == 540 or \
                int.from_bytes(head, "big") == 540 else nib.Nifti1Image
            img = cls.from_stream(f)
            proxy = img.dataobj
            try:
                data = np.asanyarray(proxy.get_unscaled() if unscaled else proxy)
            except _igzip_error as e:            # not an OSError: say what it is, as zlib would
                raise OSError(f"corrupt gzip data ({e})") from e
        return img, data
    img = nib.load(str(path))
    proxy = img.dataobj
    data = np.asanyarray(proxy.get_unscaled() if unscaled and hasattr(proxy, "get_unscaled") else proxy)
    return img, data


def check_nifti_name(path: str | Path) -> Path:
    """`path`, or a FlareInputError naming it when its name does not end in .nii.gz or .nii (the
    writers here choose the format by the name)."""
    path = Path(path)
    if not path.name.endswith(NIFTI_SUFFIXES) or path.name in NIFTI_SUFFIXES:
        raise FlareInputError(path, "output must be a NIfTI file name ending in .nii.gz or .nii")
    return path


def check_output_outside(out: str | Path, source: str | Path, what: str) -> None:
    """FlareInputError naming `out` when it is `source` or lies inside it (symbolic links resolved):
    sources are never written to. `what` names the source in the message, e.g. "the mask folder"."""
    out, source = Path(out), Path(source)
    o, s = out.resolve(), source.resolve()
    same = o.exists() and s.exists() and os.path.samefile(o, s)
    if same or o == s or s in o.parents:
        raise FlareInputError(out, f"lies inside {what} {source}, or is it: sources are never "
                                   "modified; write the output elsewhere")


def check_overwrite(out: str | Path, overwrite: bool) -> None:
    """FlareInputError naming `out` when it exists and `overwrite` is false."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FlareInputError(out, "already exists; pass overwrite=True (command line: --overwrite) to "
                                   "replace it")


def write_nifti(img: nib.Nifti1Image, path: str | Path) -> None:
    """nib.save, with ISA-L gzip for .nii.gz."""
    if _igzip is not None and _gz(path):
        # no name and mtime 0 in the gzip header, as nibabel writes it: same data, same bytes
        with open(path, "wb") as raw, _open_for_write(raw) as f:
            img.to_stream(f)
    else:
        nib.save(img, str(path))


def _open_for_write(raw):
    """The stream `write_nifti` writes through: ISA-L gzip (level 1, no name, mtime 0) for .nii.gz."""
    if _igzip is not None and _gz(raw.name):
        return _igzip.IGzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0)
    if _gz(raw.name):
        import gzip
        return gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0)
    return contextlib.nullcontext(raw)


def save_nifti_planes_like(planes: Iterator[np.ndarray], shape: tuple[int, int, int], dtype,
                           reference: nib.Nifti1Image, path: str | Path) -> Path:
    """Write a 3D NIfTI plane by plane, with exactly the geometry of `reference` (as
    `save_nifti_like` does), without ever holding the whole array.

    planes: one array per index of the last voxel axis k, in order, each of shape (shape[1], shape[0])
    (j, i) in C order, i.e. the bytes of that plane in NIfTI's order (i fastest). The same file as
    `save_nifti_like(full_array, ...)` (same header, same data); atomic like every writer here.
    """
    check_nifti_name(path)
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    img = nib.Nifti1Image(np.broadcast_to(np.zeros((), dtype), shape), None, header=header)   # no memory
    img.update_header()                    # shape, magic: what nib.save would set
    hdr = img.header
    hdr.set_slope_inter(1.0, 0.0)          # labels are stored values
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as raw, _open_for_write(raw) as f:
            hdr.write_to(f)
            f.write(b"\x00" * (int(hdr.get_data_offset()) - f.tell()))
            n = 0
            for plane in planes:
                plane = np.ascontiguousarray(plane, dtype=dtype)
                if plane.shape != (shape[1], shape[0]):
                    raise ValueError(f"plane {n} has shape {plane.shape}, expected {(shape[1], shape[0])}")
                f.write(memoryview(plane).cast("B"))
                n += 1
            if n != shape[2]:
                raise ValueError(f"{n} planes written, the image has {shape[2]}")
    return path


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file, turning every read failure into a FlareInputError naming the file.

    The voxel data is read eagerly so that truncated files fail here and not later.
    """
    path = Path(path)
    if not path.exists():
        raise FlareInputError(path, "file is missing")
    try:
        img, data = read_nifti(path)
    except FlareInputError:
        raise
    except (EOFError, OSError, zlib.error, ValueError, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError, WrapStructError) as e:
        raise FlareInputError(path, f"unreadable or truncated NIfTI ({type(e).__name__}: {e})") from e
    if len(img.shape) < 3:
        raise FlareInputError(path, f"expected a 3D image, got shape {img.shape}")
    if len(img.shape) > 3 and any(s != 1 for s in img.shape[3:]):
        raise FlareInputError(path, f"expected a 3D image, got shape {img.shape}")
    # Keep the voxels in memory so later accesses do not read the file a second time.
    return nib.Nifti1Image(data, img.affine, img.header)


def read_array(path: str | Path, dtype=None) -> tuple[np.ndarray, Geometry]:
    """Voxel array (i, j, k) and geometry of a 3D NIfTI file."""
    img = load_nifti(path)
    data = np.asanyarray(img.dataobj)
    if data.ndim > 3:
        data = data.reshape(data.shape[:3])
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, Geometry.of(img)


def read_label_map(path: str | Path, valid_labels: set[int] | None = None) -> tuple[np.ndarray, Geometry]:
    """Integer label map; rejects non-integer values and (optionally) labels outside a set."""
    data, geom = read_array(path)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise FlareInputError(path, "label map holds non-integer values")
        data = data.astype(np.int64)
    data = np.asarray(data)
    if valid_labels is not None:
        present = set(np.unique(data).tolist())
        bad = sorted(present - set(valid_labels))
        if bad:
            raise FlareInputError(path, f"label values {bad} are not in the label table "
                                        f"(valid: {sorted(valid_labels)})")
    return data.astype(np.uint8 if data.max(initial=0) < 256 and data.min(initial=0) >= 0 else np.int32,
                       copy=False), geom


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | Path,
               like: nib.Nifti1Image | None = None) -> Path:
    """Write a NIfTI atomically (temp file in the same folder, then rename); the name must end in
    .nii.gz or .nii (FlareInputError otherwise)."""
    check_nifti_name(path)
    header = like.header.copy() if like is not None else None
    img = nib.Nifti1Image(data, affine, header=header)
    img.set_data_dtype(data.dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path) as tmp:
        write_nifti(img, tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write to; it replaces `path` only if the block succeeds.

    The temporary name keeps the file's suffix (writers such as nibabel choose the format by it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically (temporary sibling, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_default(o: Any) -> Any:
    """`json.dumps(..., default=json_default)`: numpy scalars and arrays as numbers and lists,
    paths and torch devices as strings; anything else is a TypeError, as without it."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    torch = sys.modules.get("torch")          # a torch.device exists only once torch is imported
    if torch is not None and isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Write `obj` as JSON atomically (numpy values and paths converted by `json_default`)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default))


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; FlareInputError naming the file otherwise (`what`: what
    the file is, for the messages)."""
    path = Path(path)
    if not path.is_file():
        raise FlareInputError(path, f"{what} not found")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise FlareInputError(path, f"not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise FlareInputError(path, f"a {what} must be a JSON object")
    return data


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files interrupted atomic writes left in `folder` (`.<name>.<hex>.tmp...`);
    returns how many. A missing folder has none."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    n += 1
    return n


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def list_nifti(folder: str | Path, suffixes: tuple[str, ...] = NIFTI_SUFFIXES, *,
               ignore_case: bool = False) -> list[Path]:
    """The NIfTI files directly in `folder`, sorted by name. Hidden files (unfinished atomic writes)
    are left out; `suffixes` narrows the names, e.g. ("_0000.nii.gz", "_0000.nii") for nnU-Net's
    first channel; `ignore_case` also takes e.g. `LIVER.NII.GZ`. A dangling symbolic link with such
    a name is a FlareInputError naming it (a case must not silently disappear)."""
    suffixes = tuple(s.lower() for s in suffixes) if ignore_case else tuple(suffixes)
    files = []
    for p in sorted(Path(folder).iterdir()):
        name = p.name.lower() if ignore_case else p.name
        if p.name.startswith(".") or not name.endswith(suffixes):
            continue
        if p.is_symlink() and not p.exists():
            raise FlareInputError(p, f"dangling symbolic link (its target {os.readlink(p)} is missing)")
        if p.is_file():
            files.append(p)
    return files


def nifti_by_case(folder: str | Path, channel_suffix: bool = False) -> dict[str, Path]:
    """{case id: file} of the NIfTI files of `folder` (`list_nifti`, ids by `case_id_from_path`); a
    case present twice (e.g. as .nii and .nii.gz) is a FlareInputError."""
    found: dict[str, Path] = {}
    for p in list_nifti(folder):
        cid = case_id_from_path(p, channel_suffix=channel_suffix)
        if cid in found:
            raise FlareInputError(folder, f"case {cid!r} appears twice ({found[cid].name}, {p.name})")
        found[cid] = p
    return found


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling and move it to `target` only if the block succeeds.

    On any exception the temporary folder is removed and `target` is left as it was.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True, on the command line --overwrite, to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def case_id_from_path(path: str | Path, channel_suffix: bool = False) -> str:
    """Case id of a NIfTI file name: strips .nii.gz/.nii and, with `channel_suffix`, nnU-Net's channel
    suffix _0000 (only that one: `patient_0001.nii.gz` is case `patient_0001`; `ct_0000.nii.gz` is `ct`)."""
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    if channel_suffix and len(name) > 5 and name.endswith("_0000"):
        name = name[:-5]
    return name


def save_nifti_like(data: np.ndarray, reference: nib.Nifti1Image, path: str | Path) -> Path:
    """Write `data` atomically with exactly the geometry of `reference`.

    The reference header is copied, so its qform and sform (with their codes), zooms and units
    are kept bit for bit; only the data type (that of `data`) and the scaling (reset to none)
    change. Used for label maps that must sit on their image's grid.
    """
    check_nifti_name(path)
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(1.0, 0.0)
    img = nib.Nifti1Image(data, None, header=header)
    with atomic_path(path) as tmp:
        write_nifti(img, tmp)
    return Path(path)
