"""The linear probe while pretraining: is the encoder still learning anatomy?

    from maesil_core import api
    from maesil_core.config import ProbeConfig, preset

    probe = ProbeConfig(images=["ct.nii.gz"], labels=["labels.nii.gz"], classes=["liver"], every=50)
    api.pretrain(["scans/"], "runs/ct", preset("tiny"), probe=probe)
    # metrics.csv: step, loss, ..., probe_liver, probe_random_init_liver, probe_patch_stats_liver

:class:`ProbeMonitor` reads the labelled CTs once onto the run's grid (the probe data of
:mod:`maesil_core.probe`), scores the two references once (the architecture at random
initialisation, raw patch statistics), and is the training loop's ``evaluate`` hook: every
``every`` steps and at the last one the current encoder is probed (eval mode, no gradients,
back in train mode after: :func:`~maesil_core.probe.probe_model`) and the row gets one
``probe_<class>`` column per class plus the references as constant columns, so every row
with a probe score has its baseline beside it in ``metrics.csv``, TensorBoard and the
Pretrain widget's plot. The probe draws no random numbers from the training streams: a run
trains the same with or without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ProbeConfig, RunConfig
from .errors import Cancelled, ConfigError, MaesilError
from .probe import ProbeData, prepare_probe_data, probe_model, probe_patch_stats, probe_random_init
from .progress import ProgressFn
from .segmentation.data import Case

#: column prefixes in metrics.csv: the encoder's score, then the two references
PREFIX = "probe_"
REFERENCE_PREFIXES = {"random_init": "probe_random_init_", "patch_stats": "probe_patch_stats_"}

#: how the probe module's settings are called among pretraining's (`classes` -> `probe_classes`)
_SETTING_NAMES = ("classes", "label_names", "labels_map", "resample_labels", "images", "labels")


def column(name: str) -> str:
    """A class name as a column name: no spaces or commas (``"liver"`` -> ``"liver"``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


def probe_columns(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"encoder" | "random_init" | "patch_stats": {class column: dice}}`` of a metrics row
    (the columns :class:`ProbeMonitor` writes; empty when the row has none)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if not key.startswith(PREFIX) or value is None:
            continue
        source = next((s for s, p in REFERENCE_PREFIXES.items() if key.startswith(p)), "encoder")
        prefix = REFERENCE_PREFIXES.get(source, PREFIX)
        out.setdefault(source, {})[key[len(prefix) :]] = float(value)
    return out


def _renamed(exc: MaesilError) -> MaesilError:
    """A probe error in pretraining's words: `classes` -> `probe_classes`, and so on."""
    template = exc.template
    for name in _SETTING_NAMES:
        template = template.replace(f"`{name}`", f"`probe_{name}`")
    option = f"probe_{exc.option}" if exc.option in _SETTING_NAMES else exc.option
    return type(exc)(template, option=option)


def held_out_data(
    cfg: RunConfig, pcfg: ProbeConfig, cancel: Callable[[], bool] | None = None
) -> ProbeData:
    """The probe's training and test volumes on ``cfg``'s grid: ``test_images`` when given,
    else the last labelled CT of several, else the two halves of the one (head-feet)."""
    from .segmentation.data import label_names_for, resolve_labelled

    kw: dict[str, Any] = {
        "classes": list(pcfg.classes) or None,
        "resample_labels": pcfg.resample_labels,
        "cancel": cancel,
    }
    if pcfg.test_images:
        return prepare_probe_data(
            cfg,
            list(pcfg.images),
            list(pcfg.labels),
            list(pcfg.test_images),
            list(pcfg.test_labels),
            label_names=pcfg.label_names,
            **kw,
        )
    pairs = resolve_labelled(list(pcfg.images), list(pcfg.labels), what="probe training")
    names = label_names_for([lab for _, lab in pairs], pcfg.label_names)
    if len(pairs) > 1:
        *train, test = pairs
        return prepare_probe_data(
            cfg,
            [i for i, _ in train],
            [lab for _, lab in train],
            [test[0]],
            [test[1]],
            label_names=names,
            **kw,
        )
    data = prepare_probe_data(
        cfg, [pairs[0][0]], [pairs[0][1]], None, None, label_names=names, **kw
    )
    data.train, data.test = split_head_feet(data.train[0], cfg.model.patch)
    return data


def split_head_feet(case: Case, patch: Sequence[int]) -> tuple[list[Case], list[Case]]:
    """One case on the model grid (RAS: the last axis runs feet to head) cut into its feet
    half (trains the probe) and head half (scores it), each a whole number of patches long
    where the volume allows (a patch cell half padding would blur its statistics)."""
    p = int(patch[-1])
    n = case.image.shape[-1]
    cut = max(p, round(n / 2 / p) * p) if n >= 2 * p else n // 2
    end = cut + (n - cut) // p * p if n - cut >= p else n
    if cut < 1 or end <= cut:
        raise ConfigError(
            f"{case.name} has {n} slice(s) along the head-feet axis on the model grid: too few "
            "to hold half out; give `probe_test_images` and `probe_test_labels`.",
            option="probe_test_images",
        )
    head = Case(f"{case.name}[head]", case.image[..., cut:end], case.target[..., cut:end])
    feet = Case(f"{case.name}[feet]", case.image[..., :cut], case.target[..., :cut])
    return [feet], [head]


class ProbeMonitor:
    """The pretraining loop's probe: ``monitor(model) -> {"probe_<class>": dice, ...}``.

    Args:
        cfg: the run's config (the grid the volumes are put on, the architecture of the
            random-init reference).
        pcfg: the probe's settings.
        device: where the encoder computes its features.
        progress: receives ``{"phase": "prepare", "message": ...}`` while the data and the
            references are prepared.
        cancel: stops the preparation (Cancelled); during training a cancelled probe is
            left out of its row and the loop stops at its own check.
    """

    def __init__(
        self,
        cfg: RunConfig,
        pcfg: ProbeConfig,
        *,
        device: torch.device | str = "cpu",
        progress: ProgressFn | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.pcfg = pcfg.validate()
        self.device, self.cancel = device, cancel
        say = progress or (lambda info: None)
        say({"phase": "prepare", "message": "probe: reading the labelled CTs"})
        try:
            self.data = held_out_data(cfg, pcfg, cancel)
        except MaesilError as exc:
            raise _renamed(exc) from exc
        say(
            {
                "phase": "prepare",
                "message": f"probe: {len(self.data.train)} CT(s) train it, "
                f"{len(self.data.test)} score it; scoring random init and patch statistics",
            }
        )
        t0 = time.perf_counter()
        kw: dict[str, Any] = {"seed": pcfg.seed, "max_voxels": pcfg.max_voxels}
        random_init = probe_random_init(
            cfg, self.data, inits=pcfg.random_inits, device=device, cancel=cancel, **kw
        )
        patch_stats = probe_patch_stats(self.data, cfg.model.patch, **kw)
        self.references: dict[str, float] = {}
        for source, scores in (("random_init", random_init), ("patch_stats", patch_stats)):
            for name, dice in scores.items():
                self.references[REFERENCE_PREFIXES[source] + column(name)] = dice
        self.reference_seconds = time.perf_counter() - t0

    @property
    def classes(self) -> list[str]:
        return self.data.classes

    def __call__(self, model: nn.Module) -> dict[str, float]:
        """The probe's columns for the current ``model`` (an empty dict when cancelled)."""
        try:
            scores = probe_model(
                model,
                self.data,
                seed=self.pcfg.seed,
                max_voxels=self.pcfg.max_voxels,
                device=self.device,
                cancel=self.cancel,
            )
        except Cancelled:
            return {}
        return {**{PREFIX + column(c): v for c, v in scores.items()}, **self.references}


def recorded(probe: ProbeConfig | None) -> dict[str, Any] | None:
    """The probe's settings as a run records them: paths absolute (a resume from another
    folder finds the same CTs)."""
    if probe is None:
        return None
    d = probe.to_dict()
    for key in ("images", "labels", "test_images", "test_labels"):
        d[key] = [str(Path(p).absolute()) for p in d[key]]
    if d["label_names"]:
        d["label_names"] = str(Path(d["label_names"]).absolute())
    return d


__all__ = ["ProbeMonitor", "held_out_data", "probe_columns", "recorded", "split_head_feet"]
