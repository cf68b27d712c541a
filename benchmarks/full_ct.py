"""The shared real CT for benchmarks, and the CT size users bring, made at run time: 512 x 512 x
400 voxels from the shared chest CT.

``../shared/data/chest_ct`` (512 x 512 x 61, 0.63 x 0.63 x 5 mm) resampled in z to 400 slices
of 0.76 mm (linear for the CT, nearest for its tumour label), slice by slice, with the
affine's z column scaled to match: the same patient, the same in-plane grid, a full-size
volume (117 MB as .nii.gz). Written once into a work folder and reused; never committed.

    from full_ct import make_full_ct
    ct, labels = make_full_ct(Path("/tmp/full_ct"))
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: the shared real CT: ``$MAESIL_DATA`` when set (a machine without ``../shared``, e.g. a
#: copy carried to a GPU machine), else ``../shared/data`` beside the repository
SHARED = Path(
    os.environ.get("MAESIL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
#: the four scans pretraining benchmarks train on (DICOM series and a scan not in HU included)
PRETRAIN_DATA = [
    SHARED / "abdomen_ct" / "ct.nii.gz",
    SHARED / "chest_ct" / "ct.nii.gz",
    SHARED / "dicom_ct",
    SHARED / "head_ct" / "ct_not_hu.nii.gz",
]
SHAPE = (512, 512, 400)
Z_SPACING = 0.76  #: mm between the made slices (5 mm x 61 slices = 305 mm of patient)


def make_full_ct(
    work: Path, source: Path | None = None, slices: int = SHAPE[2]
) -> tuple[Path, Path]:
    """``(ct, labels)``: ``work/full_ct/ct.nii.gz`` and ``labels.nii.gz``, made once.

    ``slices`` other than 400 (a smoke test) spreads the same 305 mm over that many slices.
    """
    import nibabel as nib

    src = source or SHARED / "chest_ct"
    shape = (SHAPE[0], SHAPE[1], int(slices))
    z_spacing = Z_SPACING * SHAPE[2] / shape[2]
    folder = work / ("full_ct" if shape == SHAPE else f"full_ct_{shape[2]}")
    ct_out, lab_out = folder / "ct.nii.gz", folder / "labels.nii.gz"
    if ct_out.is_file() and lab_out.is_file() and nib.load(str(ct_out)).shape == shape:
        return ct_out, lab_out
    ct_out.parent.mkdir(parents=True, exist_ok=True)
    for name, out, linear in (("ct.nii.gz", ct_out, True), ("labels.nii.gz", lab_out, False)):
        img = nib.load(str(src / name))
        arr = np.asanyarray(img.dataobj)
        old_z = float(np.linalg.norm(img.affine[:3, 2]))
        zs = np.minimum(np.arange(shape[2]) * z_spacing / old_z, arr.shape[2] - 1)
        made = np.empty(shape, dtype=arr.dtype)
        for k, z in enumerate(zs):  # slice by slice: bounded memory
            lo = int(np.floor(z))
            hi, w = min(lo + 1, arr.shape[2] - 1), z - lo
            if linear:
                mix = (1 - w) * arr[..., lo].astype(np.float32) + w * arr[..., hi]
                made[..., k] = np.rint(mix).astype(arr.dtype)
            else:
                made[..., k] = arr[..., lo if w < 0.5 else hi]
        affine = img.affine.copy()
        affine[:3, 2] *= z_spacing / old_z
        tmp = out.with_name("." + out.name)
        nib.save(nib.Nifti1Image(made, affine), str(tmp))
        tmp.replace(out)
    return ct_out, lab_out
