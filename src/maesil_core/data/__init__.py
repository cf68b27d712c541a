"""CT data: readers/writers, input files and pairing, MONAI transforms, datasets and loaders, phantom, downloads.

The names below are imported on first use (PEP 562), so ``maesil_core.data.io`` (nibabel
and NumPy only) loads without MONAI and torch: napari's reader runs on the Qt thread and
must not pay for them.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_EXPORTS = {
    "EndlessSampler": "datasets",
    "infinite": "datasets",
    "make_pretrain_loader": "datasets",
    "check_inputs": "inputs",
    "describe_scans": "inputs",
    "resolve_inputs": "inputs",
    "resolve_pairs": "inputs",
    "PUBLIC_CT": "download",
    "cache_dir": "download",
    "fetch": "download",
    "Volume": "io",
    "load_labels": "io",
    "load_volume": "io",
    "read_label_names": "io",
    "resample_labels_to": "io",
    "save_volume": "io",
    "ORGANS": "phantom",
    "Phantom": "phantom",
    "make_phantom": "phantom",
    "write_phantom": "phantom",
    "CheckFinited": "transforms",
    "IntensityToUnitd": "transforms",
    "LoadVolumed": "transforms",
    "SplitPaddingd": "transforms",
    "inference_transforms": "transforms",
    "invert_to_input": "inverse",
    "load_transforms": "transforms",
    "pretrain_transforms": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
