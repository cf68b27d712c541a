"""A label map as a DICOM Segmentation object (DICOM-SEG) that references its CT series.

    from maesil_core.interop.dicom_seg import save_dicom_seg

    save_dicom_seg("seg.dcm", labels, affine, {1: "liver", 2: "spleen"}, "ct_series/")

A PACS, OHIF, 3D Slicer and MONAI Deploy read DICOM-SEG: one *segment* per class (its
number, its label = the class name, a SNOMED CT code where the name is a known organ, else
a private code carrying the name), each frame pointing at the CT slice it was drawn on
(Derivation / Source Image Sequence), in a new series of the CT's study. Written with
highdicom (the reference implementation of the DICOM-SEG information object in Python), as
a BINARY segmentation (the type every SEG reader supports), empty frames left out.

``labels`` must lie on the series' own voxel grid, as ``maesil segment`` writes it for a DICOM
input: ``(columns, rows, slices)`` with slices ordered along the slice normal, and the
series' RAS affine. Anything else is refused with what differs (no silent resampling).
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..files import atomic_write

#: words that make a class a lesion rather than an anatomical structure
_LESION_WORDS = ("tumor", "tumour", "lesion", "nodule", "neoplasm", "cancer", "metastas")
#: a DICOM private coding scheme for class names with no SNOMED CT code here
PRIVATE_SCHEME = "99MAESIL"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_datasets(folder: str | Path) -> tuple[list[Any], np.ndarray]:
    """The CT series in ``folder`` as pydicom datasets (no pixel data) in slice order along
    the normal, as :func:`maesil_core.data.io.load_volume` stacks them, and its RAS affine."""
    import pydicom

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"{folder} is not a DICOM series folder; DICOM-SEG references a DICOM series: "
            "give the folder the CT was read from."
        )
    series: dict[str, list] = defaultdict(list)
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            series[str(ds.get("SeriesInstanceUID", ""))].append(ds)
    if not series:
        raise DataError(f"{folder} holds no DICOM image slices to reference.")
    slices = _repair_uids(max(series.values(), key=len), folder)
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ normal))
    first = np.asarray(slices[0].ImagePositionPatient, float)
    last = np.asarray(slices[-1].ImagePositionPatient, float)
    row_sp, col_sp = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_sp
    lps[:3, 1] = iop[3:] * row_sp
    lps[:3, 2] = (last - first) / max(1, len(slices) - 1)
    lps[:3, 3] = first
    return slices, _LPS_TO_RAS @ lps


def _repair_uids(slices: list[Any], folder: Path) -> list[Any]:
    """Fill UIDs that anonymisation emptied, on the in-memory datasets only: SOP Class /
    Instance UID from each file's meta header (where DICOM keeps the same values), and a
    Study / Series / Frame of Reference UID derived from the slices' SOP Instance UIDs (the
    same ones on every call, with a warning), so the SEG can reference the slices."""
    from pydicom.uid import generate_uid

    for ds in slices:
        meta = getattr(ds, "file_meta", None)
        if not str(ds.get("SOPClassUID", "")) and meta is not None:
            ds.SOPClassUID = meta.get("MediaStorageSOPClassUID", "")
        if not str(ds.get("SOPInstanceUID", "")) and meta is not None:
            ds.SOPInstanceUID = meta.get("MediaStorageSOPInstanceUID", "")
    if any(not str(ds.get("SOPInstanceUID", "")) for ds in slices):
        raise DataError(
            f"{folder}: slices without a SOP Instance UID (not even in the file meta header); "
            "a DICOM-SEG cannot reference them: save the segmentation as NIfTI instead."
        )
    seed = sorted(str(ds.SOPInstanceUID) for ds in slices)
    made = []
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if not str(slices[0].get(key, "")):
            uid = generate_uid(entropy_srcs=[key, *seed])
            for ds in slices:
                setattr(ds, key, uid)
            made.append(key)
    if made:
        warnings.warn(
            f"{folder} has no {', '.join(made)} (anonymised?); the DICOM-SEG uses ones derived "
            "from the slices' SOP Instance UIDs, and references the slices by those.",
            UserWarning,
            stacklevel=3,
        )
    return slices


def _codes(name: str) -> tuple[Any, Any]:
    """(segmented property category, type) for a class name: SNOMED CT where known."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w]
    lesion = any(w.lower().startswith(_LESION_WORDS) for w in words)
    category = (
        codes.SCT.MorphologicallyAbnormalStructure if lesion else codes.SCT.AnatomicalStructure
    )
    for candidate in (
        "".join(w.capitalize() for w in words),
        words[0].capitalize() if words else "",
    ):
        try:
            code = getattr(codes.SCT, candidate) if candidate else None
        except AttributeError:
            code = None
        if code is not None:
            return category, code
    if lesion:
        return category, codes.SCT.Neoplasm
    value = re.sub(r"[^A-Za-z0-9]", "", name)[:16] or "class"
    return category, CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=name[:64])


def save_dicom_seg(
    path: str | Path,
    labels: np.ndarray,
    affine: np.ndarray,
    classes: dict[int, str],
    series_folder: str | Path,
    *,
    overwrite: bool = False,
    series_description: str = "napari-maesil segmentation",
) -> Path:
    """Write ``labels`` (X, Y, Z ids on the series' grid) as DICOM-SEG at ``path``.

    Args:
        labels: integer label map on the CT series' voxel grid (columns, rows, slices).
        affine: its RAS affine (checked against the series' own geometry).
        classes: ``{id: name}``; one segment per class, numbered 1..K in id order.
        series_folder: the DICOM series the labels were computed on (referenced by the SEG).
        overwrite: replace an existing ``path``.

    Returns the path. DataError when the labels are not on the series' grid, when no class
    has a voxel, or when ``path`` exists and ``overwrite`` is False.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a file name for the DICOM-SEG (e.g. seg.dcm).")
    if path.exists() and not overwrite:
        raise DataError(
            f"{path} exists; pass `force` / overwrite=True to replace it.", option="force"
        )
    slices, series_affine = series_datasets(series_folder)
    labels = np.asarray(labels)
    shape = (int(slices[0].Columns), int(slices[0].Rows), len(slices))
    if labels.shape != shape:
        raise DataError(
            f"the labels have shape {labels.shape} but the series {series_folder} is {shape} "
            "(columns, rows, slices): save the segmentation of this series."
        )
    if not np.allclose(np.asarray(affine, float), series_affine, atol=1e-3):
        raise DataError(
            f"the labels are not on the voxel grid of {series_folder} (affines differ): save "
            "the segmentation that was computed on this series."
        )
    ids = sorted(int(i) for i in classes)
    present = {int(v) for v in np.unique(labels) if v != 0}
    unknown = sorted(present - set(ids))
    if unknown:
        raise DataError(f"label ids {unknown[:5]} have no class name; name every class.")
    if not present:
        raise DataError("the segmentation is empty (no voxel of any class); nothing to write.")
    keep = [i for i in ids if i in present]  # a SEG segment needs at least one voxel
    lut = np.zeros(max(ids) + 1, dtype=np.uint8)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name="napari-maesil",
        version=str(__version__),
        family=codes.cid7162.ArtificialIntelligence,
    )
    for number, cid in enumerate(keep, start=1):
        lut[cid] = number
        category, prop = _codes(classes[cid])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(classes[cid])[:64],
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=f"{classes[cid]} ({cid})"[:64],
            )
        )
    # (columns, rows, slices) -> (frames, rows, columns), one frame per source slice
    frames = np.ascontiguousarray(lut[labels.astype(np.int64)].transpose(2, 1, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom's notes on optional attributes
        seg = hd.seg.Segmentation(
            source_images=slices,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(getattr(slices[0], "SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="napari-maesil",
            manufacturer_model_name="napari-maesil",
            software_versions=str(__version__),
            device_serial_number="0",
            series_description=series_description[:64],
        )
    atomic_write(path, lambda tmp: seg.save_as(str(tmp)))
    return path


def read_dicom_seg(
    path: str | Path, series_folder: str | Path
) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM-SEG back as a label map on its series' grid (X, Y, Z) and ``{number: label}``,
    with pydicom only (frames placed by the SOP Instance UID each one references)."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    slices, _ = series_datasets(series_folder)
    index = {str(s.SOPInstanceUID): k for k, s in enumerate(slices)}
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    out = np.zeros((int(ds.Columns), int(ds.Rows), len(slices)), dtype=np.uint16)
    for frame, fg in zip(pixels, ds.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        src = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        z = index[str(src)]
        out[:, :, z][frame.T > 0] = number
    return out, names
