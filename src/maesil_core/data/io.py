"""Reading and writing CT volumes: NIfTI, NRRD and DICOM series.

Arrays are ``(X, Y, Z)`` in the file's own voxel order (as nibabel's ``get_fdata`` gives);
the ``affine`` maps voxel indices to world millimetres in RAS+ (nibabel convention).
Every problem a user can fix is raised as :class:`~maesil_core.errors.DataError` with
one line that names the file, the problem and the fix.

Longer than 500 lines: three formats in and out, each with the checks a user's file needs
(3D, finite, geometry, HU); one reader module keeps one set of rules for all of them.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import Cancelled, DataError
from ..files import atomic_write, atomic_write_text
from .slabs import Check, c_contiguous, value_range

#: file name endings read as NIfTI / NRRD
NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES

#: a scan whose minimum is below this is taken to be in Hounsfield units
HU_MIN_THRESHOLD = -500.0

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D scan: ``array`` (X, Y, Z) float32 (an integer type for label maps), ``affine``
    (4, 4) RAS mm."""

    array: np.ndarray
    affine: np.ndarray
    path: str
    is_hu: bool = True

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (column norms of the affine)."""
        sp = np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0)
        return (float(sp[0]), float(sp[1]), float(sp[2]))

    @property
    def name(self) -> str:
        """File or folder name without the image suffix (``ct.nii.gz`` -> ``ct``)."""
        return strip_suffix(Path(self.path).name)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Orientation codes of the array axes, e.g. ``('L', 'P', 'S')``."""
        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]


def strip_suffix(name: str) -> str:
    """``ct.nii.gz`` -> ``ct``; ``scan.nrrd`` -> ``scan``; other names unchanged."""
    low = name.lower()
    for suffix in IMAGE_SUFFIXES + (".json", ".txt"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def has_image_suffix(path: str | Path) -> bool:
    """True for ``.nii``, ``.nii.gz``, ``.nrrd`` and ``.nhdr`` names."""
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def looks_like_hu(array: np.ndarray) -> bool:
    """The HU heuristic: values reach below about -500 (air is -1000 HU)."""
    return bool(array.size) and float(np.min(array)) < HU_MIN_THRESHOLD


# --------------------------------------------------------------------------- reading


def is_dicom_file(path: str | Path) -> bool:
    """Cheap check: the ``DICM`` preamble marker, or a ``.dcm`` name."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_dir(path: str | Path) -> bool:
    """True if the folder directly holds DICOM files (looks at up to 5 files)."""
    path = Path(path)
    if not path.is_dir():
        return False
    checked = 0
    for child in sorted(path.iterdir()):
        if child.is_file() and not child.name.startswith("."):
            if is_dicom_file(child):
                return True
            checked += 1
            if checked >= 5:
                break
    return False


@dataclass(frozen=True)
class ScanHeader:
    """What a scan's header says, without reading its voxels: ``shape`` (X, Y, Z) and
    ``spacing`` (mm along those axes), ``kind`` ``NIfTI`` / ``NRRD`` / ``DICOM``."""

    path: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    kind: str


def read_header(path: str | Path) -> ScanHeader:
    """Shape and spacing of a NIfTI / NRRD file or a DICOM series folder from its header(s)
    only (a DICOM series: every slice's header, for the number of slices and their spacing).
    DataError for what cannot be read."""
    path = Path(path)
    try:
        if path.is_dir():
            return _dicom_header(path)
        low = path.name.lower()
        if low.endswith(NIFTI_SUFFIXES):
            img = nib.load(str(path))
            zooms = img.header.get_zooms()[:3]
            return ScanHeader(str(path), tuple(img.shape[:3]), tuple(map(float, zooms)), "NIfTI")
        if low.endswith(NRRD_SUFFIXES):
            import nrrd

            h = nrrd.read_header(str(path))
            sizes = tuple(int(v) for v in h["sizes"])[:3]
            if "space directions" in h:
                dirs = np.asarray([d for d in h["space directions"] if d is not None], dtype=float)
                spacing = tuple(float(v) for v in np.linalg.norm(dirs, axis=1))[:3]
            else:
                spacing = tuple(float(v) for v in h.get("spacings", (1.0,) * len(sizes)))[:3]
            return ScanHeader(str(path), sizes, spacing, "NRRD")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{path}: cannot read its header ({type(exc).__name__}: {_first_line(exc)}); "
            "re-copy or re-export it, or leave it out."
        ) from exc
    raise DataError(f"{path} is not a .nii/.nii.gz/.nrrd file or a DICOM series folder.")


def _dicom_header(folder: Path) -> ScanHeader:
    import pydicom

    tags = ["ImagePositionPatient", "ImageOrientationPatient", "Rows", "Columns", "PixelSpacing"]
    slices = []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=tags)
        except Exception:
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            slices.append(ds)
    if not slices:
        raise DataError(f"{folder} holds no DICOM image slices; give a DICOM series folder.")
    first = slices[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    dist = np.sort([float(np.asarray(ds.ImagePositionPatient, float) @ normal) for ds in slices])
    dz = float(np.median(np.diff(dist))) if len(dist) > 1 else 0.0
    row_sp, col_sp = (float(v) for v in first.PixelSpacing)
    shape = (int(first.Columns), int(first.Rows), len(slices))
    return ScanHeader(str(folder), shape, (col_sp, row_sp, dz), "DICOM")


def read_raw(path: str | Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Raw ``(array, affine RAS, path)`` of any supported input, decoded once; the array keeps
    the file's dtype (float32 for DICOM after rescaling). :func:`volume_from_raw` /
    :func:`labels_from_raw` turn it into a CT or a label map."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; check the path (and that the drive is mounted).")
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    else:
        low = path.name.lower()
        if low.endswith(NIFTI_SUFFIXES):
            array, affine = _read_nifti(path)
        elif low.endswith(NRRD_SUFFIXES):
            array, affine = _read_nrrd(path)
        elif is_dicom_file(path):
            raise DataError(
                f"{path} is a single DICOM file; give the folder that holds the whole series."
            )
        else:
            raise DataError(
                f"{path} is not a supported image file; give a .nii/.nii.gz or .nrrd file "
                "or a DICOM series folder."
            )
    array = _check_3d(array, path)
    check_affine(affine, path)
    return array, affine, str(path)


#: voxel sizes (mm) outside this range are a header error (metres for mm, a broken field)
PLAUSIBLE_SPACING_MM = (0.01, 50.0)


def check_affine(affine: np.ndarray, path: str | Path) -> None:
    """DataError naming ``path`` unless ``affine`` (4, 4) maps voxels to world mm sensibly:
    finite, three independent axes (no zero column, no two parallel ones) and voxel sizes
    within :data:`PLAUSIBLE_SPACING_MM`. A sheared affine (axes not perpendicular, e.g. a
    gantry-tilted CT) is fine: MONAI resamples it by world coordinates."""
    affine = np.asarray(affine, dtype=np.float64)
    fix = "fix the header (qform/sform or pixdim) or re-export the scan"
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise DataError(f"{path}: its voxel-to-world affine holds NaN or infinite values; {fix}.")
    cols = affine[:3, :3]
    sizes = np.linalg.norm(cols, axis=0)
    if np.any(sizes == 0):
        axis = int(np.argmin(sizes))
        raise DataError(f"{path}: its affine gives array axis {axis} a voxel size of 0 mm; {fix}.")
    unit = cols / sizes
    if abs(np.linalg.det(unit)) < 1e-3:
        raise DataError(
            f"{path}: its affine has two parallel axes (the voxel grid is flat in the world); "
            f"{fix}."
        )
    low, high = PLAUSIBLE_SPACING_MM
    if sizes.min() < low or sizes.max() > high:
        shown = ", ".join(f"{v:.3g}" for v in sizes)
        raise DataError(
            f"{path}: voxel size ({shown}) mm is not plausible for a CT (expected {low}..{high} "
            f"mm; metres or micrometres in the header?); {fix}."
        )


def _nifti_pixdim_problem(path: Path) -> str:
    """'' or why the raw header's voxel size cannot be trusted: nibabel silently replaces a
    pixdim of 0 by 1 and a negative one by its absolute value, but without an sform the
    affine is built from it (and with a qform only, its magnitudes)."""
    try:
        with nib.openers.ImageOpener(str(path)) as f:
            header = nib.Nifti1Header.from_fileobj(f, check=False)
        if int(header["sizeof_hdr"]) != 348:
            return ""  # NIfTI-2 or not NIfTI: nib.load says what it is
        pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    except Exception:
        return ""  # unreadable: nib.load below names the problem
    if scode > 0:
        return ""  # the sform gives the affine; pixdim is not used
    bad = [f"{v:g}" for v in pixdim if not v > 0]
    if not bad:
        return ""
    used = "the qform" if qcode > 0 else "pixdim (no qform/sform)"
    return (
        f"its header gives voxel size ({', '.join(f'{v:g}' for v in pixdim)}) mm, and the "
        f"affine comes from {used}; set the true voxel size (e.g. nibabel "
        "img.header.set_zooms(...)) or re-export the scan"
    )


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    problem = _nifti_pixdim_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}.")
    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises EOFError, zlib.error, OSError, ValueError, ...
        raise DataError(_unreadable(path, exc)) from exc
    return array, affine


def _unreadable(path: Path, exc: BaseException) -> str:
    """The one line for a NIfTI file nibabel cannot read."""
    short = re.search(r"Expected (\d+) bytes, got (\d+) bytes", str(exc))
    if short:
        want, got = int(short.group(1)), int(short.group(2))
        return (
            f"{path} is truncated: its header promises {want:,} bytes of voxels, the file "
            f"holds {got:,}; re-copy or re-export the file."
        )
    plain_nifti = path.name.lower().endswith(NIFTI_SUFFIXES) and not _is_gzip(path)
    kind = "not a valid NIfTI file" if plain_nifti else "truncated or corrupt"
    return (
        f"{path} is {kind} ({type(exc).__name__}: {_first_line(exc)}); "
        "re-copy or re-export the file."
    )


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no details"


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import nrrd  # noqa: F401  (MONAI's NrrdReader needs pynrrd)
        from monai.data import NrrdReader
    except ImportError as exc:
        raise DataError(
            f"{path} is NRRD, which needs pynrrd: `pip install pynrrd` (or convert it to NIfTI)."
        ) from exc
    try:
        reader = NrrdReader()
        array, meta = reader.get_data(reader.read(str(path)))
        affine = np.asarray(meta["affine"], dtype=np.float64)  # MONAI gives RAS by default
    except Exception as exc:
        raise DataError(
            f"{path} is not a readable NRRD file ({type(exc).__name__}: {_first_line(exc)}); "
            "re-export it or convert it to NIfTI."
        ) from exc
    return np.asarray(array), affine


#: a DICOM series of fewer slices is a localiser / scout, left out beside a real series
MIN_SERIES_SLICES = 3


def _series_label(ds) -> str:
    """``series 3 'Thorax 1.0 B31f'`` or the end of the SeriesInstanceUID."""
    number = ds.get("SeriesNumber", None)
    desc = str(ds.get("SeriesDescription", "") or "").strip()
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    parts = [f"series {number}" if number not in (None, "") else "series"]
    parts += [repr(desc)] if desc else []
    parts += [f"UID ...{uid[-8:]}"] if uid and number in (None, "") else []
    return " ".join(parts)


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one DICOM series: slices sorted along the slice normal, HU via rescale tags.

    Returns ``array`` (columns, rows, slices) float32 and its RAS affine.
    """
    import pydicom

    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not files and not any(folder.iterdir()):
        raise DataError(f"{folder} is an empty folder; give a folder that holds a DICOM series.")
    series: dict[str, list] = defaultdict(list)
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            continue
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        series[str(ds.get("SeriesInstanceUID", ""))].append((f, ds))
    if not series:
        raise DataError(
            f"{folder} holds no DICOM image slices; give a DICOM series folder or "
            ".nii/.nii.gz files (folders of several scans: use resolve_inputs)."
        )
    uid, slices = max(series.items(), key=lambda kv: len(kv[1]))
    volumes = {k: v for k, v in series.items() if len(v) >= MIN_SERIES_SLICES}
    if len(volumes) > 1:
        counts = ", ".join(
            f"{_series_label(v[0][1])} ({len(v)} slices)"
            for v in sorted(volumes.values(), key=len, reverse=True)
        )
        raise DataError(
            f"{folder} holds {len(volumes)} DICOM series ({counts}); put each series in a "
            "folder of its own and give the one to use."
        )
    if len(series) > 1:  # the others are localisers / scouts of one or two slices
        warnings.warn(
            f"{folder}: left out {len(series) - 1} DICOM series of fewer than "
            f"{MIN_SERIES_SLICES} slices (localisers); using the {len(slices)}-slice series.",
            stacklevel=3,
        )
    iop = np.asarray(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for _, ds in slices])
    order = np.argsort(positions @ normal)
    slices = [slices[i] for i in order]
    positions = positions[order]
    if len(slices) < 2:
        raise DataError(
            f"{folder} holds a single DICOM slice (2D); give a series with several slices."
        )
    dist = positions @ normal
    gaps = np.diff(dist)
    if np.any(np.abs(gaps) < 1e-4):
        raise DataError(
            f"{folder} has DICOM slices at the same position (duplicates or several "
            "acquisitions); keep one series per folder."
        )
    step = float(np.median(gaps))
    if gaps.max() > 1.5 * step:
        where = int(np.argmax(gaps))
        missing = int(round(gaps[where] / step)) - 1
        raise DataError(
            f"{folder}: {max(missing, 1)} DICOM slice(s) missing between "
            f"{slices[where][0].name} and {slices[where + 1][0].name} (a {gaps[where]:.3g} mm "
            f"gap where the others are {step:.3g} mm); copy the complete series."
        )
    if gaps.max() - gaps.min() > 0.1 * step + 1e-3:
        warnings.warn(
            f"{folder}: uneven DICOM slice spacing ({gaps.min():.3g}..{gaps.max():.3g} mm); "
            "using the mean.",
            stacklevel=3,
        )
    planes = []
    for f, _ in slices:
        try:
            ds = pydicom.dcmread(str(f))
            pix = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise DataError(
                f"cannot decode DICOM pixels of {f} ({type(exc).__name__}: {_first_line(exc)}); "
                "install pylibjpeg / gdcm for compressed DICOM, or convert the series to NIfTI."
            ) from exc
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        if pix.ndim != 2:
            raise DataError(f"{f} is not a single-frame 2D DICOM slice; convert it to NIfTI.")
        planes.append(pix.T * slope + intercept)  # (columns, rows)
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise DataError(f"{folder} mixes DICOM slices of sizes {sorted(shapes)}; one series only.")
    array = np.stack(planes, axis=-1)
    row_sp, col_sp = (float(v) for v in slices[0][1].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_sp  # i walks along a row: spacing between columns
    lps[:3, 1] = col_dir * row_sp  # j walks down a column: spacing between rows
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps[:3, 3] = positions[0]
    return array, _LPS_TO_RAS @ lps


def _check_3d(array: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze trailing singleton dimensions; refuse 2D images and multi-channel 4D."""
    shape = tuple(array.shape)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 3:
        raise DataError(
            f"{path} is {len(shape)}D with shape {shape} (several channels or time points); "
            "give a single 3D volume (split it first)."
        )
    if array.ndim < 3 or min(array.shape) < 2:
        raise DataError(
            f"{path} is a 2D image (shape {shape}); give a 3D CT volume (several slices)."
        )
    return array


def _check_finite(array: np.ndarray, path: str, check: Check = None) -> None:
    if np.issubdtype(array.dtype, np.integer):
        return

    def finite(z: int) -> bool:
        if check is not None:
            check()
        return bool(np.isfinite(array[..., z : z + 16]).all())

    # slab by slab: a full-size bool copy of a 512 x 512 x 400 CT is 0.1 GB
    if all(finite(z) for z in range(0, array.shape[-1], 16)):
        return
    finite = np.isfinite(array)
    if not finite.all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int((~finite).sum()) - n_nan
        what = f"{n_nan} NaN voxels" if n_nan else f"{n_inf} infinite voxels"
        if n_nan and n_inf:
            what += f" and {n_inf} infinite voxels"
        raise DataError(
            f"{path} contains {what}; replace them (e.g. with -1024) or leave the file out."
        )


def load_volume(path: str | Path, check: Check = None) -> Volume:
    """Read a CT volume (NIfTI, NRRD or DICOM series folder) as ``array`` (X, Y, Z) float32.

    ``check()`` (a cancel flag's check that raises) is called between the slabs of the
    conversion and of the checks (a ``.nii`` is read as it is converted; a ``.nii.gz`` is
    decompressed whole first)."""
    raw, affine, spath = read_raw(path)
    volume = volume_from_raw(raw, affine, spath, check=check)
    check_ct_content(volume.array, spath, raw.dtype, check)  # a viewer opens these; a command not
    return volume


def volume_from_raw(
    raw: np.ndarray,
    affine: np.ndarray,
    path: str,
    *,
    keep_integers: bool = False,
    check: Check = None,
) -> Volume:
    """A CT ``Volume`` from :func:`read_raw`'s output: float32, or with ``keep_integers``
    an integer file's own dtype (an int16 CT stays half the size of float32); ``check()``
    between slabs (:func:`load_volume`)."""
    try:
        if keep_integers and np.issubdtype(raw.dtype, np.integer):
            array = np.asarray(raw)
        else:
            array = c_contiguous(raw, np.float32, check)  # C order: no copy for torch
    except Cancelled:
        raise
    except Exception as exc:
        raise DataError(_unreadable(Path(path), exc)) from exc
    if not np.issubdtype(array.dtype, np.integer):
        _check_finite(array, path, check)
    is_hu = not np.issubdtype(raw.dtype, np.unsignedinteger) and looks_like_hu(array)
    return Volume(array=array, affine=affine, path=path, is_hu=is_hu)


def check_ct_content(
    array: np.ndarray, path: str, dtype: np.dtype | None = None, check: Check = None
) -> None:
    """DataError unless ``array`` can be a CT: not one value in every voxel (an all-zero or
    all -1024 volume: nothing to learn or segment), not a mask (bool, or integers 0 / 1)."""
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    low, high = value_range(array, check)
    if low == high:
        raise DataError(
            f"{path} holds the same value ({low:g}) in every voxel: nothing to learn or "
            "segment; give the CT scan itself (an export that lost the image?)."
        )
    if dtype == np.bool_ or (np.issubdtype(dtype, np.integer) and low >= 0 and high <= 1):
        raise DataError(
            f"{path} is a mask (only the values 0 and 1), not a CT; give the CT scan "
            "(a label map is not an image to learn from)."
        )


def load_labels(
    path: str | Path, reference: Volume | None = None, *, resample: bool = False
) -> Volume:
    """Read an integer label map (X, Y, Z): the file's integer type (int32 for others).

    With ``reference``, shape and affine must match it (else DataError saying what
    differs), or with ``resample=True`` the labels are resampled onto its grid.
    """
    labels = labels_from_raw(*read_raw(path), dtype=None)
    if labels.array.dtype not in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
        labels.array = labels.array.astype(np.int32)  # small types kept: uint8 is 0.1 GB, not 0.4
    if reference is not None:
        problem = geometry_mismatch(labels, reference)
        if problem:
            if not resample:
                raise DataError(
                    f"labels {labels.path} do not match image {reference.path}: {problem}; "
                    "use labels made on that image, or resample_labels_to() / resample=True."
                )
            labels = Volume(
                resample_labels_to(labels, reference), reference.affine.copy(), labels.path, False
            )
    return labels


def labels_from_raw(
    raw: np.ndarray, affine: np.ndarray, path: str, *, dtype: type | None = np.int32
) -> Volume:
    """A label-map ``Volume`` from :func:`read_raw`'s output: ``dtype`` (None: an integer
    file keeps its own dtype); DataError if the values are not integers."""
    try:
        array = np.asarray(raw)
    except Exception as exc:
        raise DataError(_unreadable(Path(path), exc)) from exc
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        _check_finite(array, path)
        rounded = np.rint(array)
        if np.abs(array - rounded).max(initial=0) > 1e-3:
            raise DataError(
                f"{path} holds non-integer values, so it is not a label map; give the "
                "segmentation file (integer ids per voxel)."
            )
        array = rounded.astype(np.int32)
    if array.size and array.min() < 0:
        negative = np.unique(array[array < 0])[:5]
        raise DataError(
            f"{path} holds negative label ids ({', '.join(str(int(v)) for v in negative)}); "
            "label ids are 0 (background) and 1, 2, ...: renumber the label map."
        )
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return Volume(array=array, affine=affine, path=path, is_hu=False)


def geometry_mismatch(a: Volume, b: Volume, atol_mm: float = 0.01) -> str:
    """'' if ``a`` and ``b`` share the voxel grid, else what differs (shape, orientation, ...)."""
    if a.array.shape != b.array.shape:
        return f"shape {a.array.shape} vs {b.array.shape}"
    if a.axcodes != b.axcodes:
        return f"orientation {''.join(a.axcodes)} vs {''.join(b.axcodes)}"
    if not np.allclose(a.spacing, b.spacing, rtol=1e-4, atol=1e-4):
        sa = tuple(round(s, 4) for s in a.spacing)
        sb = tuple(round(s, 4) for s in b.spacing)
        return f"spacing {sa} vs {sb} mm"
    if not np.allclose(a.affine[:3, :3], b.affine[:3, :3], atol=1e-4):
        return "direction cosines differ"
    if not np.allclose(a.affine[:3, 3], b.affine[:3, 3], atol=atol_mm):
        oa = np.round(a.affine[:3, 3], 2).tolist()
        ob = np.round(b.affine[:3, 3], 2).tolist()
        return f"origin {oa} vs {ob} mm"
    return ""


def resample_labels_to(labels: Volume, reference: Volume) -> np.ndarray:
    """Labels resampled onto ``reference``'s grid by world coordinates (nearest neighbour).

    Returns an int32 array with ``reference.array.shape``; voxels outside the labels are 0.
    """
    from scipy.ndimage import affine_transform

    # reference voxel -> world -> label voxel
    matrix = np.linalg.inv(np.asarray(labels.affine, float)) @ np.asarray(reference.affine, float)
    out = affine_transform(
        np.asarray(labels.array, dtype=np.int32),
        matrix[:3, :3],
        offset=matrix[:3, 3],
        output_shape=reference.array.shape,
        order=0,
        mode="constant",
        cval=0,
    )
    return out.astype(np.int32)


def label_names_path(label_path: str | Path) -> Path:
    """Where the names of label map ``label_path`` are: its own ``<stem>.json`` beside it
    (what :func:`write_label_names` writes, so two label maps in one folder keep their own
    names), else a ``label_names.json`` in its folder (the shared-folder convention)."""
    p = Path(label_path)
    own = p.with_name(strip_suffix(p.name) + ".json")
    if own != p and own.is_file():
        try:
            _parse_label_names(own)
            return own
        except DataError:
            pass  # e.g. a sidecar JSON of another kind: not label names
    return p.parent / "label_names.json"


def _parse_label_names(p: Path) -> dict[int, str]:
    try:
        raw = json.loads(p.read_text())
        if isinstance(raw, dict) and isinstance(raw.get("labels"), dict):  # a dataset.json
            return dataset_label_names(p) or {}
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise DataError(
            f"{p} is not a label-names JSON object ({_first_line(exc)}); "
            'write it as {"1": "liver", "2": "spleen"}.'
        ) from exc


def read_label_names(path_or_dir: str | Path) -> dict[int, str]:
    """``{id: name}`` from a label-names JSON (``{"1": "spleen", ...}``).

    Accepts the JSON itself, the folder holding a ``label_names.json``, or a label file
    (its ``<stem>.json`` or the ``label_names.json`` beside it: :func:`label_names_path`).
    """
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / "label_names.json"
    elif not p.name.lower().endswith(".json"):
        p = label_names_path(p)
    if not p.is_file():
        raise DataError(
            f'{p} does not exist; put the names ({{"1": "liver", ...}}) in a JSON file beside '
            "the label file: <label file name>.json, or label_names.json for the folder."
        )
    return _parse_label_names(p)


def write_label_names(label_path: str | Path, names: dict[int, str]) -> Path:
    """Write ``names`` to ``<stem>.json`` beside label map ``label_path`` (atomically);
    returns its path. The reader finds it with :func:`read_label_names`."""
    p = Path(label_path)
    out = p.with_name(strip_suffix(p.name) + ".json")
    text = json.dumps({str(k): v for k, v in sorted(names.items()) if int(k) != 0}, indent=2)
    atomic_write_text(out, text)
    return out


def dataset_label_names(path: str | Path) -> dict[int, str] | None:
    """``{id: name}`` (background left out) from the ``labels`` map of an MSD
    (``{"0": "background", "1": "liver"}``) or nnU-Net v2 (``{"background": 0, "liver": 1}``)
    ``dataset.json``, read with MONAI's ``load_decathlon_properties``; None without one."""
    from monai.data import load_decathlon_properties

    path = Path(path)
    try:
        labels = load_decathlon_properties(path, property_keys="labels")["labels"]
    except KeyError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable dataset.json ({exc}).") from exc
    if not isinstance(labels, dict):
        raise DataError(f'{path}: \'labels\' must be an object such as {{"1": "liver"}}.')
    names: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).strip().lstrip("-").isdigit() and isinstance(value, str):  # MSD: id -> name
            cid, name = int(key), str(value)
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: name -> id
            cid, name = value, str(key)
        else:
            raise DataError(
                f"{path}: label {key!r}: {value!r} is neither MSD ('1': 'liver') nor nnU-Net "
                "('liver': 1) style (nnU-Net region labels, lists of ids, are not supported)."
            )
        if cid > 0:
            names[cid] = name
    return names


# --------------------------------------------------------------------------- writing


def save_volume(
    array: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    *,
    overwrite: bool = False,
    dtype: np.dtype | type | str | None = None,
    quantize: np.dtype | type | str | None = None,
) -> Path:
    """Write ``array`` (X, Y, Z) with its RAS ``affine`` as NIfTI, atomically.

    The file is written to a temporary name in the same folder and then renamed, so a
    crash never leaves half a file. Refuses to replace an existing file unless ``overwrite``.
    ``dtype``: the values rounded and clipped into that type. ``quantize`` (an integer type):
    float values stored as that type with the NIfTI slope / intercept nibabel fits to their
    range (readers get floats back, to 1/255 of the range for uint8).
    """
    path = Path(path)
    low = path.name.lower()
    if not low.endswith(NIFTI_SUFFIXES):
        raise DataError(f"{path}: output must end in .nii.gz or .nii.")
    if path.exists() and not overwrite:
        raise DataError(
            f"{path} exists; pass `force` / overwrite=True to replace it.", option="force"
        )
    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if dtype is not None:
        dtype = np.dtype(dtype)
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
            info = np.iinfo(dtype)
            array = np.clip(np.rint(array), info.min, info.max)
        array = array.astype(dtype)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    elif array.dtype == bool:
        array = array.astype(np.uint8)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    if quantize is not None:
        img.set_data_dtype(np.dtype(quantize))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    suffix = ".nii.gz" if low.endswith(".nii.gz") else ".nii"
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=suffix)
    return path
