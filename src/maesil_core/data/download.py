"""Small public CT volumes, downloaded once with a checksum into a cache folder (pooch).

``fetch("totalseg_example_ct")`` returns the local path; a file already in the cache
with the right SHA-256 is used without touching the network.
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
    },
}


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
    return Path(path)


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__
