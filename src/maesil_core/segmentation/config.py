"""Fine-tuning and inference settings of a segmenter, saved in its checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import Int3, RunConfig, as_int3
from ..errors import ConfigError

#: the ``kind`` of a segmentation checkpoint (a pretraining one is ``"pretrain"``)
KIND = "segmentation"


@dataclass
class SegmentationConfig:
    """Fine-tuning and inference settings beyond the RunConfig (saved in the checkpoint)."""

    roi: Int3 | None = None  #: training crop / inference window (voxels); None: the superpatch
    feature_size: int = 16  #: decoder width at full resolution (UNETR's feature_size)
    layers: list[int] | None = None  #: encoder blocks feeding the decoder; None: evenly spaced
    norm: str = "instance"  #: decoder normalisation (MONAI norm name)
    freeze_encoder: bool = False  #: train the decoder only
    layer_decay: float = 1.0  #: layer-wise lr decay (< 1 lowers the lr of early blocks)
    pos_weight: float = 2.0  #: crops centred on a labelled voxel : crops centred anywhere
    neg_weight: float = 1.0
    #: air added around each training volume in-plane, as a share of the ROI on each side
    #: (:func:`.data.pad_with_air`): crops at the body's edge see the air whole scans hold;
    #: 0: none
    air_margin: float = 0.5
    #: keep labels inside the body at inference (:func:`maesil_core.data.body.body_mask`:
    #: above -500 HU, holes filled slice by slice); a model asked about windows of pure air
    #: may call them an organ
    body_mask: bool = True
    eval_every: int | None = None  #: steps between validations (None: ~10 per run)
    overlap: float = 0.25  #: sliding-window overlap at inference and validation
    blend: str = "gaussian"  #: "gaussian" or "constant" window blending
    sw_batch_size: int = 4  #: windows per forward pass at inference
    #: keep only each class's largest connected component at inference and validation
    #: (MONAI KeepLargestConnectedComponent): removes stray voxels, but also the second part of
    #: a class that has two (e.g. "kidneys" = left + right), hence off by default
    largest_component: bool = False

    def __post_init__(self) -> None:
        if self.roi is not None:
            self.roi = as_int3(self.roi, "roi")

    def validate(self, cfg: RunConfig) -> SegmentationConfig:
        roi = self.roi_for(cfg)
        if any(r % p for r, p in zip(roi, cfg.model.patch)):
            raise ConfigError(
                f"ROI {list(roi)} is not a multiple of the patch {list(cfg.model.patch)}.",
                option="roi",
            )
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"overlap must be in [0, 1), got {self.overlap}.", option="overlap")
        if self.blend not in ("gaussian", "constant"):
            raise ConfigError(
                f"blend must be gaussian or constant, got {self.blend!r}.", option="blend"
            )
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(
                f"layer decay must be in (0, 1], got {self.layer_decay}.", option="layer_decay"
            )
        if self.feature_size < 1 or self.sw_batch_size < 1:
            raise ConfigError(
                "feature_size and sw_batch_size must be positive.", option="feature_size"
            )
        if not 0 <= self.air_margin <= 4:
            raise ConfigError(
                f"air margin must be between 0 and 4 ROIs, got {self.air_margin}.",
                option="air_margin",
            )
        return self

    def roi_for(self, cfg: RunConfig) -> Int3:
        return tuple(self.roi) if self.roi else tuple(cfg.model.superpatch)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["roi"] = list(self.roi) if self.roi else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentationConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
