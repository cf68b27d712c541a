"""CT data: readers/writers, MONAI transforms, datasets and loaders, phantom, downloads."""

from .datasets import (
    EndlessSampler,
    check_inputs,
    infinite,
    make_pretrain_loader,
    resolve_inputs,
    resolve_pairs,
)
from .download import PUBLIC_CT, cache_dir, fetch
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
