"""Configuration dataclasses shared by the Python API, the CLI and the napari widgets.

One dataclass per concern:

- :class:`DataConfig`   how CT volumes are read and preprocessed (spacing, HU window, crops).
- :class:`ModelConfig`  the architecture (method, superpatch and patch size, widths, masking).
- :class:`TrainConfig`  the optimisation (steps, batch, lr schedule, precision, checkpoints).
- :class:`RunConfig`    the three together; a *preset* is just a named ``RunConfig``.
- :class:`ProbeConfig`  an optional linear probe scored while pretraining (not part of a run's
  model: it is recorded beside the run's data, so ``resume`` keeps probing).

Spatial sizes are voxel counts along the array axes (D, H, W) of the RAS-oriented volume
(MONAI's channel-first layout ``(C, D, H, W)`` after ``Orientation("RAS")``).

Longer than 500 lines: the four configs and the presets built from them are read together
(a preset is only meaningful beside the fields it sets), so they stay in one file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

Int3 = tuple[int, int, int]
Float3 = tuple[float, float, float]

#: Named HU windows (low, high). ``abdomen`` follows MIM-Med3D (-175..250 HU).
HU_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-175.0, 250.0),
    "soft-tissue": (-160.0, 240.0),
    "lung": (-1000.0, 400.0),
    "bone": (-500.0, 1300.0),
    "brain": (0.0, 80.0),
    "wide": (-1024.0, 1500.0),
}


def as_int3(value: int | tuple[int, ...] | list[int], name: str = "size") -> Int3:
    """``8`` -> ``(8, 8, 8)``; a 3-sequence is kept. Anything else is a ConfigError."""
    if isinstance(value, int):
        return (value, value, value)
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return (values[0],) * 3
    if len(values) != 3:
        raise ConfigError(f"{name} must be one number or three (D H W), got {list(value)}.")
    return values  # type: ignore[return-value]


@dataclass
class DataConfig:
    """How volumes become training crops.

    ``intensity`` chooses how voxel values map to [0, 1]:
    ``"hu"`` clips ``hu_window`` (HU) to [0, 1]; ``"percentile"`` rescales the 0.5..99.5
    percentiles (for scans not in HU); ``"auto"`` uses ``"hu"`` when the values look like HU
    and ``"percentile"`` otherwise, with a warning.
    """

    spacing: Float3 | None = (1.5, 1.5, 1.5)  #: target voxel spacing in mm; None keeps native
    hu_window: tuple[float, float] | str = "abdomen"  #: (low, high) HU or a HU_WINDOWS name
    intensity: str = "auto"  #: "auto" | "hu" | "percentile"
    crops_per_volume: int = 4  #: random superpatch crops drawn from each loaded volume
    foreground_crop: bool = True  #: crop away air around the body before sampling
    #: random flips, axial 90-degree turns and contrast jitter of each pretraining crop
    #: (on three scans: +3 dB masked PSNR on a held-out CT, RESULTS.md)
    augment: bool = True
    #: where the augmentation runs: "loader" (MONAI transforms in the loader's processes),
    #: "device" (torch on the batch on the training device, data.batch_augment) or "auto"
    #: (the device when it is a GPU, else the loader)
    augment_on: str = "auto"
    #: "memory" (CacheDataset) | "disk" (PersistentDataset, read with torch.load(weights_only=True):
    #: a .pt planted in the cache folder is refused and recomputed, never run) | "none"
    cache: str = "memory"
    cache_dir: str | None = None  #: for cache="disk"; default <run_dir>/cache
    #: DataLoader worker processes (0 = in the main process); None: from the CPU cores this
    #: process may use (data.datasets.default_workers: none when training on the CPU)
    num_workers: int | None = None

    def window(self) -> tuple[float, float]:
        """The HU window as numbers."""
        if isinstance(self.hu_window, str):
            if self.hu_window not in HU_WINDOWS:
                raise ConfigError(
                    f"unknown HU window {self.hu_window!r}; use one of {sorted(HU_WINDOWS)} "
                    "or two numbers LOW HIGH.",
                    option="hu_window",
                )
            return HU_WINDOWS[self.hu_window]
        low, high = (float(v) for v in self.hu_window)
        if not high > low:
            raise ConfigError(
                f"HU window must have high > low, got {low}..{high}.", option="hu_window"
            )
        return low, high

    def validate(self) -> None:
        self.window()
        if self.intensity not in ("auto", "hu", "percentile"):
            raise ConfigError(
                f"intensity must be auto, hu or percentile, got {self.intensity!r}.",
                option="intensity",
            )
        if self.spacing is not None and any(float(s) <= 0 for s in self.spacing):
            raise ConfigError(
                f"spacing must be positive millimetres, got {self.spacing}.", option="spacing"
            )
        if self.crops_per_volume < 1:
            raise ConfigError("crops_per_volume must be at least 1.", option="crops_per_volume")
        if self.cache not in ("memory", "disk", "none"):
            raise ConfigError(
                f"cache must be memory, disk or none, got {self.cache!r}.", option="cache"
            )
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(
                "num_workers must be 0 or more (or None: from the CPU cores).",
                option="num_workers",
            )
        if self.augment_on not in ("auto", "loader", "device"):
            raise ConfigError(
                f"augment_on must be auto, loader or device, got {self.augment_on!r}.",
                option="augment_on",
            )


@dataclass
class ModelConfig:
    """The architecture. ``method`` picks the model class in ``models.registry``.

    For masked autoencoders a *superpatch* of ``superpatch`` voxels is cut into patches of
    ``patch`` voxels: ``grid = superpatch // patch`` tokens per axis.
    Masking (``mask_mode``): ``"dual"`` = coarse blocks of ``block`` patches (a share
    ``coarse_fraction`` of the masked tokens) united with fine random patches, total
    ``mask_ratio``; ``"random"`` = fine only; ``"block"`` = coarse only.
    """

    method: str = "maesil"
    superpatch: Int3 = (128, 128, 128)
    patch: Int3 = (8, 8, 8)
    in_channels: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    #: 8 heads of 64 (MAE's decoder has 16 of 32, flash attention's slowest head width;
    #: docs/method.md). A checkpoint keeps the head count it was trained with in its config.
    decoder_num_heads: int = 8
    mlp_ratio: float = 4.0
    #: LayerNorm epsilon of the encoder: 1e-6 as in MAE; 1e-5 is MONAI's ViT (set by
    #: ``maesil import --from monai-vit``, so imported weights give MONAI's features exactly)
    norm_eps: float = 1e-6
    #: encoder position embedding: "sincos" (fixed, computed for any grid, not saved) or
    #: "learned" (a parameter saved with the weights and resized trilinearly to other grids;
    #: what MONAI's ViT holds)
    pos_embed: str = "sincos"
    mask_mode: str = "dual"
    mask_ratio: float = 0.75
    block: Int3 = (2, 2, 2)
    coarse_fraction: float = 0.5
    norm_pix_loss: bool = False
    #: method options as written in configs and checkpoints (e.g. GL-MAE's global_scale,
    #: VQ-VAE's codebook_size); typed and checked as :attr:`options`
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.superpatch = as_int3(self.superpatch, "superpatch")
        self.patch = as_int3(self.patch, "patch")
        self.block = as_int3(self.block, "block")

    @property
    def grid(self) -> Int3:
        """Patches per axis, ``superpatch // patch``."""
        return tuple(s // p for s, p in zip(self.superpatch, self.patch))  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        d, h, w = self.grid
        return d * h * w

    @property
    def options(self) -> Any:
        """The method's options from :attr:`extra`, typed and checked
        (:mod:`maesil_core.model_options`); ConfigError on an unknown key or a bad value."""
        from .model_options import parse_options

        return parse_options(self.method, self.extra)

    def validate(self) -> None:
        for s, p in zip(self.superpatch, self.patch):
            if p <= 0 or s <= 0:
                raise ConfigError("superpatch and patch sizes must be positive.", option="patch")
            if s % p:
                raise ConfigError(
                    f"patch {list(self.patch)} does not divide superpatch {list(self.superpatch)}: "
                    "choose a superpatch that is a multiple of the patch on every axis.",
                    option="superpatch",
                )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.",
                option="num_heads",
            )
        if self.pos_embed not in ("sincos", "learned"):
            raise ConfigError(
                f"pos_embed must be sincos or learned, got {self.pos_embed!r}.", option="pos_embed"
            )
        if not float(self.norm_eps) > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}.", option="norm_eps")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError(
                f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                f"decoder_num_heads {self.decoder_num_heads}.",
                option="decoder_num_heads",
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(
                f"mask_ratio must be between 0 and 1 (exclusive), got {self.mask_ratio}.",
                option="mask_ratio",
            )
        if self.mask_mode not in ("dual", "random", "block"):
            raise ConfigError(
                f"mask_mode must be dual, random or block, got {self.mask_mode!r}.",
                option="mask_mode",
            )
        if not 0.0 <= self.coarse_fraction <= 1.0:
            raise ConfigError(
                f"coarse_fraction must be in [0, 1], got {self.coarse_fraction}.",
                option="coarse_fraction",
            )
        if self.mask_mode in ("dual", "block"):
            for g, b in zip(self.grid, self.block):
                if b <= 0 or g % b:
                    raise ConfigError(
                        f"mask block {list(self.block)} (in patches) does not divide the patch grid "
                        f"{list(self.grid)}: pick a block that divides superpatch/patch on every axis.",
                        option="block",
                    )
        if round(self.mask_ratio * self.num_patches) >= self.num_patches:
            raise ConfigError("mask_ratio leaves no visible patch; lower it.", option="mask_ratio")
        options = self.options  # parse and check the method options now, not mid-run
        if getattr(options, "decoder_prior", "none") != "none" and self.norm_pix_loss:
            raise ConfigError(
                "decoder_prior interpolation predicts voxels, not per-patch normalised values: "
                "turn norm_pix_loss off or set decoder_prior none.",
                option="norm_pix_loss",
            )
        if getattr(options, "decoder_refine", 0) and self.norm_pix_loss:
            raise ConfigError(
                "decoder_refine corrects voxels, not per-patch normalised values: turn "
                "norm_pix_loss off or set decoder_refine 0.",
                option="norm_pix_loss",
            )


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for one run (pretraining or fine-tuning)."""

    steps: int = 1000  #: optimiser steps
    batch_size: int = 2  #: superpatches per step and per GPU (before accumulation)
    accum_steps: int = 1  #: gradient accumulation: batch_size x accum_steps per GPU and step
    #: peak learning rate for the superpatches of one optimiser step in total (batch_size x
    #: accum_steps x GPUs); another total takes :func:`scaled_lr` (square-root rule)
    lr: float = 1.5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 50
    grad_clip: float = 1.0  #: max gradient norm; 0 disables
    seed: int = 0
    device: str = "auto"  #: "auto" | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  #: "auto" (bf16 on GPUs that support it) | "bf16" | "fp32"
    #: steps between checkpoints (one is also written at the end and on cancel)
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0  #: also checkpoint after this many minutes; 0 disables
    keep_checkpoints: int = 3  #: newest periodic checkpoints kept on disk
    log_every: int = 10  #: steps between log lines / CSV rows
    #: torch.compile the model. Off: on the CPU the compilation (100-130 s) earned itself back
    #: only after thousands of steps, if at all (BENCHMARKS.md); on a GPU not yet measured
    compile: bool = False
    #: torch intra-op CPU threads while training (torch.set_num_threads); 0: auto, one per
    #: core that other jobs leave free by the load average, at least 1 (maesil_core.threads)
    threads: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps must be at least 1.", option="steps")
        if self.batch_size < 1:
            raise ConfigError("batch size must be at least 1.", option="batch_size")
        if self.accum_steps < 1:
            raise ConfigError("accum_steps must be at least 1.", option="steps")
        if self.lr <= 0:
            raise ConfigError("learning rate must be positive.", option="lr")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps must be 0 or more.", option="steps")
        if self.checkpoint_every < 1:
            raise ConfigError(
                "checkpoint_every must be at least 1 step.", option="checkpoint_every"
            )
        if self.threads < 0:
            raise ConfigError("threads must be 0 (auto) or more.", option="threads")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(
                f"precision must be auto, bf16 or fp32, got {self.precision!r}.", option="precision"
            )
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
            raise ConfigError(
                f"device must be auto, cpu, cuda or cuda:N, got {dev!r}.", option="device"
            )


@dataclass
class RunConfig:
    """Everything a run needs; saved in every checkpoint."""

    preset: str = "base"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        self.data.validate()
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict):
            raise ConfigError(
                f"a run config must be a JSON object with data / model / train settings, got "
                f"{type(d).__name__} {d!r:.40}."
            )
        return cls(
            preset=d.get("preset", "custom"),
            data=_build(DataConfig, d.get("data", {})),
            model=_build(ModelConfig, d.get("model", {})),
            train=_build(TrainConfig, d.get("train", {})),
        )

    def override(self, section: str, **values: Any) -> RunConfig:
        """Return a copy with ``values`` set in ``section`` (None values are ignored).

        Another ``method`` without ``extra`` clears ``extra``: method options belong to their
        method (``tiny``'s are MAESIL's, which ``method="mae"`` does not take)."""
        new = copy.deepcopy(self)
        target = getattr(new, section)
        method = values.get("method")
        if section == "model" and method not in (None, target.method) and "extra" not in values:
            target.extra = {}
        names = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if value is None:
                continue
            if key not in names:
                raise ConfigError(f"unknown {section} setting {key!r}; known: {sorted(names)}.")
            setattr(target, key, value)
        if section == "model":
            target.__post_init__()
        return new


@dataclass
class ProbeConfig:
    """A linear probe scored while pretraining (:mod:`maesil_core.probe_monitor`): per-class
    Dice of a linear read-out of the encoder's frozen tokens every ``every`` steps and at the
    end, beside the same probe on the architecture at random initialisation and on raw patch
    statistics (scored once, at the start): whether the encoder still learns anatomy, not
    only whether the loss still falls.

    The probe trains on ``images`` / ``labels`` and is scored on ``test_images`` /
    ``test_labels``; without them, on the last of several labelled CTs, or with one labelled
    CT on its other half along the head-feet axis (the same patient: a weaker test). Paths as
    for ``finetune`` (files, folders, globs, lists). Errors name the settings as the
    ``maesil pretrain`` flags call them (``probe_images``, ``probe_every``, ...).
    """

    images: tuple[str, ...] = ()  #: labelled CTs the probe is trained on
    labels: tuple[str, ...] = ()  #: their label maps, same order
    classes: tuple[str, ...] = ()  #: class names or ids; () = every label present
    label_names: str | None = None  #: label_names.json; default: the one beside the labels
    test_images: tuple[str, ...] = ()  #: CTs it is scored on; () = held out from ``images``
    test_labels: tuple[str, ...] = ()
    resample_labels: bool = False  #: align label maps of another grid in world coordinates
    every: int = 100  #: steps between probe scores (one is also taken at the last step)
    max_voxels: int = 50_000  #: training voxels sampled for the classifier (as maesil probe)
    random_inits: int = 3  #: random initialisations averaged for that reference
    seed: int = 0  #: the training voxels and the random initialisations

    def __post_init__(self) -> None:
        for name in ("images", "labels", "classes", "test_images", "test_labels"):
            value = getattr(self, name)
            if isinstance(value, (str, Path, int)):
                value = (value,)
            setattr(self, name, tuple(str(v) for v in (value or ())))
        if self.label_names is not None:
            self.label_names = str(self.label_names)

    def validate(self) -> ProbeConfig:
        """A ConfigError naming the ``maesil pretrain`` setting when the probe cannot run."""
        if not self.images:
            raise ConfigError(
                "the probe needs labelled CTs: give `probe_images` with `probe_labels` (and "
                "`probe_classes`), or leave every probe setting out.",
                option="probe_images",
            )
        if not self.labels:
            raise ConfigError(
                "`probe_images` needs their label maps: give `probe_labels` in the same order.",
                option="probe_labels",
            )
        if bool(self.test_images) != bool(self.test_labels):
            have, lack = (
                ("probe_test_images", "probe_test_labels")
                if self.test_images
                else ("probe_test_labels", "probe_test_images")
            )
            raise ConfigError(
                f"`{have}` needs `{lack}` too (or leave both out: the probe then holds out part "
                "of `probe_images`).",
                option=lack,
            )
        if self.every < 1:
            raise ConfigError(
                f"`probe_every` must be at least 1 step, got {self.every}.", option="probe_every"
            )
        if self.max_voxels < 100:
            raise ConfigError(
                f"probe max_voxels must be at least 100, got {self.max_voxels}.",
                option="probe_max_voxels",
            )
        if self.random_inits < 1:
            raise ConfigError(
                f"probe random_inits must be at least 1, got {self.random_inits}.",
                option="probe_random_inits",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeConfig:
        return _build(cls, d)


def _build(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise ConfigError(
            f'the "{_SECTIONS.get(cls.__name__, cls.__name__)}" settings must be a JSON object '
            f'({{"name": value, ...}}), got {type(values).__name__} {values!r:.40}.'
        )
    unknown = sorted(set(values) - names)
    if unknown:
        import difflib

        hints = [difflib.get_close_matches(u, names, n=1) for u in unknown]
        named = ", ".join(
            f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in zip(unknown, hints)
        )
        raise ConfigError(
            f'unknown "{_SECTIONS.get(cls.__name__, cls.__name__)}" setting{"s" if len(unknown) > 1 else ""} '
            f"{named}; remove or rename {'them' if len(unknown) > 1 else 'it'} (known: "
            f"{sorted(names)})."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _typed(value, hints[key], f"{_SECTIONS.get(cls.__name__)}.{key}")
    return cls(**kwargs)


_SECTIONS = {
    "DataConfig": "data",
    "ModelConfig": "model",
    "TrainConfig": "train",
    "ProbeConfig": "probe",
}


def _typed(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the setting ``name`` of type ``hint`` takes it (JSON lists -> tuples, an
    integral float -> int), or a ConfigError naming the setting, its type and the value."""
    if _fits(value, hint):
        if isinstance(value, float) and value.is_integer() and not _fits(0.5, hint):
            value = int(value)  # 300.0 for a whole-number setting
        return tuple(value) if isinstance(value, list) else value
    want = _describe(hint)
    raise ConfigError(
        f"setting {name} must be {want}, got {value!r:.60} ({type(value).__name__}); "
        "fix the config file (or the checkpoint's config)."
    )


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as JSON gives it) is of the annotated type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        is_int = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        return is_int and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if args and all(a is int for a in args) and _fits(value, int):
            return True  # as_int3: one number for all three axes
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        if all(a is int for a in args) and len(value) == 1:
            return _fits(value[0], int)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True  # an annotation this check does not know: the dataclass judges


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers" if Ellipsis not in args else "a list"
    return {
        int: "a whole number",
        float: "a number",
        bool: "true or false",
        str: "a string",
        type(None): "null",
        dict: "an object",
    }.get(hint if origin is None else origin, str(hint))


# --------------------------------------------------------------------------- presets


def _smoke() -> RunConfig:
    """Seconds, and it does not learn: the 3 mm tiny model (dual masking, a plain 64-wide
    decoder, batch 4, 300 steps) of the tests and of smoke runs that try a command end to end.
    It was ``tiny`` until 2026-12-02. After 1,000 steps it reconstructs a CT of another patient
    worse than the visible-voxel mean (RESULTS.md): pretrain with ``tiny``."""
    return RunConfig(
        preset="smoke",
        data=DataConfig(spacing=(3.0, 3.0, 3.0), crops_per_volume=4, num_workers=0),
        model=ModelConfig(
            superpatch=(32, 32, 32),
            patch=(8, 8, 8),
            embed_dim=96,
            depth=4,
            num_heads=3,
            decoder_embed_dim=64,
            decoder_depth=2,
            decoder_num_heads=4,
            block=(2, 2, 2),
        ),
        train=TrainConfig(
            steps=300, batch_size=4, lr=1e-3, warmup_steps=20, checkpoint_every=100, log_every=10
        ),
    )


def _tiny() -> RunConfig:
    """The smallest model that pretrains, set up by measurement for a CPU
    (benchmarks/pretraining_ablation.py, RESULTS.md): the ``smoke`` model (encoder 96 x 4, 32^3
    superpatches of 8^3 patches) at 1.5 mm, random masking, a 96-wide decoder that corrects
    the interpolation of the hidden voxels, with neighbour mixing before each block, batch 32,
    1,000 steps (about 4 minutes on one core). Named ``tiny-pretrain`` until 2026-12-02."""
    cfg = _smoke()
    cfg.preset = "tiny"
    cfg.data.spacing = (1.5, 1.5, 1.5)
    cfg.model = dataclasses.replace(
        cfg.model,
        decoder_embed_dim=96,
        mask_mode="random",
        extra={"decoder_prior": "interpolation", "decoder_local": True},
    )
    cfg.train.batch_size = 32  # 4x the crops of batch 8 per step: 3x the time, RESULTS.md
    cfg.train.steps = 1000
    return cfg


def _cpu() -> RunConfig:
    """An hour on a laptop CPU (8,000 steps, one thread). Random masking and ``tiny``'s
    decoder (the interpolation prior, neighbour mixing): on a CT of another patient after
    1,000 steps, 3 seeds, 0.50x the visible-mean fill against 1.90x with dual masking and a
    plain decoder (RESULTS.md, "Fourth pass"; the probe, 0.35 against 0.11, varies too much
    by seed to mean anything yet)."""
    return RunConfig(
        preset="cpu",
        data=DataConfig(spacing=(2.0, 2.0, 2.0), crops_per_volume=4, num_workers=0),
        model=ModelConfig(
            superpatch=(64, 64, 64),
            patch=(8, 8, 8),
            embed_dim=192,
            depth=6,
            num_heads=6,
            decoder_embed_dim=128,
            decoder_depth=2,
            decoder_num_heads=4,
            block=(2, 2, 2),
            mask_mode="random",
            extra={"decoder_prior": "interpolation", "decoder_local": True},
        ),
        train=TrainConfig(
            steps=8000, batch_size=4, lr=5e-4, warmup_steps=20, checkpoint_every=500, threads=1
        ),
    )


def _small() -> RunConfig:
    return RunConfig(
        preset="small",
        data=DataConfig(spacing=(2.0, 2.0, 2.0)),
        model=ModelConfig(
            superpatch=(64, 64, 64),
            patch=(8, 8, 8),
            embed_dim=384,
            depth=6,
            num_heads=6,
            decoder_embed_dim=256,
            decoder_depth=4,
            decoder_num_heads=4,  # heads of 64, as base
            block=(2, 2, 2),
        ),
        train=TrainConfig(steps=5000, batch_size=4, lr=5e-4, warmup_steps=200),
    )


def scaled_lr(lr: float, batch: int, new_batch: int) -> float:
    """The peak learning rate for ``new_batch`` superpatches per optimiser step (batch x
    accumulation x GPUs) given ``lr`` for ``batch``: the square-root rule for Adam-type
    optimisers (Malladi et al., NeurIPS 2022), ``lr * sqrt(new_batch / batch)``."""
    if batch < 1 or new_batch < 1:
        raise ConfigError("batch sizes must be at least 1.")
    return lr * (new_batch / batch) ** 0.5


#: the base preset's learning rate as first set, for 2 superpatches per step (100,000 steps)
BASE_LR, BASE_LR_BATCH = 1.5e-4, 2


def _base() -> RunConfig:
    """ViT-B on 128^3 superpatches for one H100/H200-class GPU: 16 superpatches per step (18 GiB
    in bf16; BENCHMARKS.md), the learning rate scaled from the first setting's 1.5e-4 for 2 by
    :func:`scaled_lr` (4.2e-4), and the same 200,000 superpatches and warm-up share."""
    batch = 16
    return RunConfig(
        preset="base",
        data=DataConfig(spacing=(1.5, 1.5, 1.5)),
        model=ModelConfig(
            superpatch=(128, 128, 128),
            patch=(8, 8, 8),
            embed_dim=768,
            depth=12,
            num_heads=12,
            decoder_embed_dim=512,
            decoder_depth=8,
            decoder_num_heads=8,  # 8 x 64, not MAE's 16 x 32 (docs/method.md)
            block=(4, 4, 4),
        ),
        train=TrainConfig(
            steps=100_000 * BASE_LR_BATCH // batch,
            batch_size=batch,
            lr=round(scaled_lr(BASE_LR, BASE_LR_BATCH, batch), 6),
            warmup_steps=2000 * BASE_LR_BATCH // batch,
            checkpoint_every=1000,
        ),
    )


def _mim_med3d() -> RunConfig:
    """MIM-Med3D's MAE configuration: ViT-B, 96^3 input, 16^3 patches, decoder 512 x 8."""
    return RunConfig(
        preset="mim-med3d",
        data=DataConfig(spacing=(1.5, 1.5, 2.0)),
        model=ModelConfig(
            method="mae",
            superpatch=(96, 96, 96),
            patch=(16, 16, 16),
            embed_dim=768,
            depth=12,
            num_heads=12,
            decoder_embed_dim=512,
            decoder_depth=8,
            decoder_num_heads=8,
            mask_mode="random",
            block=(1, 1, 1),
        ),
        train=TrainConfig(
            steps=100_000, batch_size=4, lr=3e-4, warmup_steps=2000, checkpoint_every=1000
        ),
    )


PRESETS = {
    "smoke": _smoke,
    "tiny": _tiny,
    "cpu": _cpu,
    "small": _small,
    "base": _base,
    "mim-med3d": _mim_med3d,
}


#: presets that were renamed: old name -> the name of the same settings now
RENAMED_PRESETS = {"tiny-pretrain": "tiny"}


def unknown_preset(name: str, setting: str = "`preset`") -> str:
    """Why ``name`` is no preset, and the fix (a renamed one: its new name); ``setting``
    names where it was given."""
    if name in RENAMED_PRESETS:
        new = RENAMED_PRESETS[name]
        return (
            f"{setting} {name!r} is called {new!r} since 2026-12-02 (the same settings); "
            f"use {new!r}."
        )
    return f"{setting}: unknown preset {name!r}; choose one of {list(PRESETS)}."


#: training settings a preset takes for fine-tuning where they differ from its pretraining
#: ones. ``tiny`` pretrains at batch 32 for 1,000 steps (RESULTS.md); a fine-tuning step
#: computes at every voxel of its crops (100x a pretraining step, BENCHMARKS.md), so it keeps
#: the batch and length the 3 mm model's fine-tuning figures were measured at (README)
FINETUNE_TRAIN: dict[str, dict[str, Any]] = {"tiny": {"batch_size": 4, "steps": 300}}


def preset(name: str, stage: str = "pretrain") -> RunConfig:
    """A fresh copy of a named preset (``smoke``, ``tiny``, ``cpu``, ``small``, ``base``,
    ``mim-med3d``); ``stage="finetune"``: with its fine-tuning training settings
    (:data:`FINETUNE_TRAIN`)."""
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be 'pretrain' or 'finetune', got {stage!r}")
    if name not in PRESETS:
        raise ConfigError(unknown_preset(name), option="preset")
    cfg = PRESETS[name]()
    if stage == "finetune":
        cfg = cfg.override("train", **FINETUNE_TRAIN.get(name, {}))
    return cfg


#: the sections of a JSON config file; "probe" is read by ``maesil pretrain`` only
CONFIG_SECTIONS = ("preset", "data", "model", "train", "probe")


def _read_config(path: str | Path) -> dict[str, Any]:
    """The JSON object of a config file, its sections checked; ConfigError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; give the path of a JSON file.", option="config"
        )
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"config file {path} is not valid JSON ({exc}); fix or remove it.", option="config"
        ) from exc
    if not isinstance(d, dict):
        raise ConfigError(f"config file {path} must hold a JSON object.", option="config")
    unknown = sorted(set(d) - set(CONFIG_SECTIONS))
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], CONFIG_SECTIONS, n=1)
        maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(
            f"config file {path}: unknown section {unknown[0]!r}{maybe}; a config holds "
            f'"preset", "data", "model", "train" and "probe" only.',
            option="config",
        )
    for section in CONFIG_SECTIONS[1:]:
        if not isinstance(d.get(section, {}), dict):
            raise ConfigError(
                f'config file {path}: "{section}" must be a JSON object ({{"name": value, ...}}), '
                f"got {type(d[section]).__name__}."
            )
    return d


def _file_preset(d: dict[str, Any], path: str | Path) -> str | None:
    """The known preset a config file's ``"preset"`` names, None without one."""
    name = d.get("preset")
    if name is not None and name not in PRESETS:
        raise ConfigError(unknown_preset(name, f'config file {path}: "preset"'), option="config")
    return name


def _apply_config(d: dict[str, Any], start: RunConfig, path: str | Path) -> RunConfig:
    """``start`` with a config file's sections on top. A file that names another preset than
    ``start``'s is a ConfigError: which one was meant cannot be guessed (before, the file's
    name was copied onto ``start``'s settings)."""
    named = _file_preset(d, path)
    if named is not None and named != start.preset:
        raise ConfigError(
            f'`preset` {start.preset} and config file {path} ({{"preset": "{named}"}}) '
            "name different presets; give one of them.",
            option="preset",
        )
    merged = start.to_dict()
    for section in ("data", "model", "train"):
        merged[section].update(d.get(section, {}))
    return RunConfig.from_dict(merged)


def load_config(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a JSON config file (``{"preset": ..., "data": {...}, "model": {...}, ...}``).

    Keys not in the file keep the values of ``base`` (or of the file's ``preset``; ``base``
    when it has none); a file naming another preset than ``base``'s is a ConfigError. A
    ``"probe"`` section is :func:`load_probe_config`'s.
    """
    d = _read_config(path)
    start = base if base is not None else preset(_file_preset(d, path) or "base")
    return _apply_config(d, start, path)


def config_preset(path: str | Path) -> str | None:
    """The ``"preset"`` a JSON config file names, None without one (ConfigError when the file
    cannot be read or names no known preset)."""
    return _file_preset(_read_config(path), path)


def start_config(
    preset_name: str | None, config: str | Path | None, stage: str = "pretrain"
) -> RunConfig:
    """The config a command starts from: ``preset_name`` (``--preset``), else the config
    file's ``"preset"``, else ``tiny``, for ``stage`` (:func:`preset`); then the file on top
    (a ``--preset`` that differs from the file's ``"preset"`` is a ConfigError)."""
    if not config:
        return preset(preset_name or "tiny", stage)
    d = _read_config(config)
    name = preset_name or _file_preset(d, config) or "tiny"
    return _apply_config(d, preset(name, stage), config)


def load_probe_config(path: str | Path) -> ProbeConfig | None:
    """The ``"probe"`` section of a JSON config file as a ProbeConfig (not yet validated:
    ``maesil pretrain``'s ``--probe-*`` flags may still complete it), None without one.

    ``{"probe": {"images": ["ct.nii.gz"], "labels": ["labels.nii.gz"], "classes": ["liver"],
    "every": 100}}``: the fields of :class:`ProbeConfig`, paths as on the command line."""
    d = _read_config(path)
    return ProbeConfig.from_dict(d["probe"]) if "probe" in d else None
