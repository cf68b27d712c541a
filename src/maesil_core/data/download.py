"""Small public CT volumes, downloaded once with a checksum into a cache folder (pooch).

``fetch("totalseg_example_ct")`` returns the local path; a file already in the cache
with the right SHA-256 is used without touching the network. A label map arrives with its
class names in a ``<stem>.json`` beside it (:func:`~.io.read_label_names` finds them).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError

_TS = "https://github.com/wasserth/TotalSegmentator/raw/master/tests/reference_files"

#: name -> {url, sha256, filename, description, licence}
#: The two TotalSegmentator hashes were computed from the copies in the project's shared
#: test data (``shared/data/abdomen_ct/ct.nii.gz`` and ``labels.nii.gz``), whose README
#: names these upstream files with no conversion; they were not re-checked against GitHub
#: (no network when written). If upstream changes the files, ``fetch`` refuses them.
PUBLIC_CT: dict[str, dict[str, str]] = {
    "totalseg_example_ct": {
        "url": f"{_TS}/example_ct_sm.nii.gz",
        "sha256": "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb",
        "filename": "totalseg_example_ct_sm.nii.gz",
        "description": "abdomen / lower thorax CT, 122x101x30 voxels at 3 mm, int16 HU, RAS",
        "licence": "Apache-2.0 (wasserth/TotalSegmentator)",
    },
    "totalseg_example_seg": {
        "url": f"{_TS}/example_seg.nii.gz",
        "sha256": "8be652475a4aaae83103a66bfb3345314b1fc06742807a06cf5005f7a7913a2d",
        "filename": "totalseg_example_seg.nii.gz",
        "description": "TotalSegmentator 117-class organ labels for totalseg_example_ct",
        "licence": "Apache-2.0 (wasserth/TotalSegmentator)",
        "classes": "totalsegmentator",
    },
}

#: TotalSegmentator's 117 classes ("total" task, v2), ids 1..117 in this order
_TOTALSEG_NAMES = """
    spleen kidney_right kidney_left gallbladder liver stomach pancreas adrenal_gland_right
    adrenal_gland_left lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right
    lung_middle_lobe_right lung_lower_lobe_right esophagus trachea thyroid_gland small_bowel
    duodenum colon urinary_bladder prostate kidney_cyst_left kidney_cyst_right sacrum
    vertebrae_S1 vertebrae_L5 vertebrae_L4 vertebrae_L3 vertebrae_L2 vertebrae_L1
    vertebrae_T12 vertebrae_T11 vertebrae_T10 vertebrae_T9 vertebrae_T8 vertebrae_T7
    vertebrae_T6 vertebrae_T5 vertebrae_T4 vertebrae_T3 vertebrae_T2 vertebrae_T1
    vertebrae_C7 vertebrae_C6 vertebrae_C5 vertebrae_C4 vertebrae_C3 vertebrae_C2
    vertebrae_C1 heart aorta pulmonary_vein brachiocephalic_trunk subclavian_artery_right
    subclavian_artery_left common_carotid_artery_right common_carotid_artery_left
    brachiocephalic_vein_left brachiocephalic_vein_right atrial_appendage_left
    superior_vena_cava inferior_vena_cava portal_vein_and_splenic_vein iliac_artery_left
    iliac_artery_right iliac_vena_left iliac_vena_right humerus_left humerus_right
    scapula_left scapula_right clavicula_left clavicula_right femur_left femur_right
    hip_left hip_right spinal_cord gluteus_maximus_left gluteus_maximus_right
    gluteus_medius_left gluteus_medius_right gluteus_minimus_left gluteus_minimus_right
    autochthon_left autochthon_right iliopsoas_left iliopsoas_right brain skull rib_left_1
    rib_left_2 rib_left_3 rib_left_4 rib_left_5 rib_left_6 rib_left_7 rib_left_8 rib_left_9
    rib_left_10 rib_left_11 rib_left_12 rib_right_1 rib_right_2 rib_right_3 rib_right_4
    rib_right_5 rib_right_6 rib_right_7 rib_right_8 rib_right_9 rib_right_10 rib_right_11
    rib_right_12 sternum costal_cartilages
"""
TOTALSEGMENTATOR_CLASSES = dict(enumerate(_TOTALSEG_NAMES.split(), start=1))
_CLASSES = {"totalsegmentator": TOTALSEGMENTATOR_CLASSES}


def cache_dir() -> Path:
    """Download folder: ``$MAESIL_CACHEDIR`` or pooch's per-user cache for napari-maesil."""
    env = os.environ.get("MAESIL_CACHEDIR")
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("napari-maesil"))


def _known_hash(sha: str) -> str:
    return sha if ":" in sha else f"sha256:{sha}"


def fetch(name: str) -> Path:
    """Local path of the public volume ``name`` (downloaded and checked on first use)."""
    if name not in PUBLIC_CT:
        raise DataError(f"unknown public CT {name!r}; choose one of {sorted(PUBLIC_CT)}.")
    import pooch

    entry = PUBLIC_CT[name]
    folder = cache_dir()
    sha = entry["sha256"].split(":", 1)[-1]
    hint = f"put the file {entry['filename']} (sha256 {sha}) in {folder} or set MAESIL_CACHEDIR"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = pooch.retrieve(
            url=entry["url"],
            known_hash=_known_hash(entry["sha256"]),
            fname=entry["filename"],
            path=folder,
            progressbar=False,
        )
    except ValueError as exc:  # pooch: hash mismatch (the bad download is deleted)
        if "hash" in str(exc).lower():
            raise DataError(
                f"downloaded {name} but its SHA-256 does not match the expected {sha}; "
                f"the file at {entry['url']} changed or is corrupt: {hint}."
            ) from exc
        raise DataError(f"could not download {name} ({_short(exc)}); {hint}.") from exc
    except Exception as exc:  # offline, HTTP errors, permissions, ...
        raise DataError(f"could not download {name} ({_short(exc)}); {hint}.") from exc
    path = Path(path)
    classes = _CLASSES.get(entry.get("classes", ""))
    if classes:
        from .io import label_names_path, strip_suffix, write_label_names

        if label_names_path(path) != path.with_name(strip_suffix(path.name) + ".json"):
            write_label_names(path, classes)  # not there yet (or not names)
    return path


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
