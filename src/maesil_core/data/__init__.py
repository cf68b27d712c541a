"""CT data: readers/writers, input files and pairing, MONAI transforms, datasets and loaders, phantom, downloads."""

from .datasets import EndlessSampler, infinite, make_pretrain_loader
from .download import PUBLIC_CT, cache_dir, fetch
from .inputs import check_inputs, describe_scans, resolve_inputs, resolve_pairs
from .io import (
    Volume,
    load_labels,
    load_volume,
    read_label_names,
    resample_labels_to,
    save_volume,
)
from .phantom import ORGANS, Phantom, make_phantom, write_phantom
from .transforms import (
    CheckFinited,
    IntensityToUnitd,
    LoadVolumed,
    SplitPaddingd,
    inference_transforms,
    invert_to_input,
    load_transforms,
    pretrain_transforms,
)

__all__ = [
    "ORGANS",
    "PUBLIC_CT",
    "Phantom",
    "cache_dir",
    "fetch",
    "make_phantom",
    "write_phantom",
    "CheckFinited",
    "EndlessSampler",
    "IntensityToUnitd",
    "LoadVolumed",
    "SplitPaddingd",
    "Volume",
    "check_inputs",
    "describe_scans",
    "inference_transforms",
    "infinite",
    "invert_to_input",
    "load_labels",
    "load_transforms",
    "load_volume",
    "make_pretrain_loader",
    "pretrain_transforms",
    "read_label_names",
    "resample_labels_to",
    "resolve_inputs",
    "resolve_pairs",
    "save_volume",
]
