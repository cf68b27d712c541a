"""A linear probe: what a frozen pretrained encoder has learnt, measured per organ.

Longer than 500 lines because the probe is one experiment (the data on a model grid, the
three feature extractors, the classifier, the report) whose parts only make sense together.

    from maesil_core import probe

    result = probe.probe("runs/ct", ["ct.nii.gz"], ["labels.nii.gz"], classes=["liver", "spleen"],
                         test_images=["other_ct/"], test_labels=["other_labels.nii.gz"],
                         resample_labels=True)
    print(result.scores)   # {"encoder": {"liver": .., ..}, "random_init": {..}, "patch_stats": {..}}

The encoder is frozen. Each CT is read and resampled as the model was trained (spacing, HU
window, [0, 1]), tiled into non-overlapping tiles of the model's input unit exactly as
``maesil reconstruct`` tiles it (the superpatch; GL-MAE: its local view), and every tile is
encoded without a mask: one feature vector per patch (the ViT's normed tokens; for AE / VAE /
VQ-VAE the latent vector of the patch: VAE its mean, VQ-VAE before quantisation). The token
features are upsampled to voxels (trilinear) and a linear classifier (multinomial logistic
regression on standardised features, L-BFGS, fixed voxel sample, deterministic) is trained per
voxel on the training images; per-class Dice is scored on the test images, on the model grid.

Two references go through the same pipeline in the same call:

- ``random_init``: the same architecture at random initialisation (seeded), not trained;
- ``patch_stats``: four raw statistics of each patch (mean, std, min, max of its voxels).

An encoder that does not beat them has learnt nothing a linear read-out can use beyond what
the intensities of a patch already say. Because the classifier and trilinear upsampling are
both linear, the classifier is applied to the token grid and its logits are upsampled (the
same numbers as classifying upsampled features, at a fraction of the memory).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Int3, RunConfig
from .data.labels import LabelSet
from .errors import Cancelled, ConfigError
from .progress import ProgressFn
from .segmentation.data import (
    Case,
    label_names_for,
    load_pair,
    make_label_set,
    prepare_cases,
    resolve_labelled,
)
from .segmentation.evaluate import dice_scores

REFERENCES = ("encoder", "random_init", "patch_stats")

#: budget of the training matrix (voxels x features floats) for the classifier
_MAX_TRAIN_FLOATS = 40_000_000


@dataclass
class ProbeData:
    """Labelled volumes on a model grid: ``train`` and ``test`` cases, one label set."""

    train: list[Case]
    test: list[Case]
    labelset: LabelSet

    @property
    def classes(self) -> list[str]:
        return list(self.labelset.names)


@dataclass
class ProbeResult:
    """Per-class Dice on the test images of the encoder and of the two references."""

    scores: dict[str, dict[str, float]]  #: {"encoder"|"random_init"|"patch_stats": {class: dice}}
    classes: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table: one row per class, one column per feature source."""
        head = f"{'class':<16}" + "".join(f"{k:>14}" for k in REFERENCES)
        lines = [head]
        for c in self.classes:
            lines.append(
                f"{c:<16}"
                + "".join(f"{self.scores[k].get(c, float('nan')):>14.3f}" for k in REFERENCES)
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- data


def prepare_probe_data(
    cfg: RunConfig,
    images: Any,
    labels: Any,
    test_images: Any,
    test_labels: Any,
    *,
    classes: Sequence[str | int] | None = None,
    label_names: str | Path | dict | None = None,
    labels_map: str | Path | dict | None = None,
    resample_labels: bool = False,
    cancel: Callable[[], bool] | None = None,
) -> ProbeData:
    """Read, resample and label-map the training and test pairs onto ``cfg``'s grid.

    Label names come from ``label_names`` or the ``label_names.json`` beside the training
    labels, classes from ``classes`` / ``labels_map`` (as in ``finetune``); the test labels
    are mapped through the same source ids. ``test_images`` None: no test cases.
    ``cancel()`` is checked between the volumes and their loading steps (Cancelled).
    """
    pairs = resolve_labelled(images, labels, what="probe training")
    test_pairs = (
        resolve_labelled(test_images, test_labels, what="probe test")
        if test_images is not None
        else []  # the caller holds part of the training data out (probe_monitor)
    )
    source_names = label_names_for([lab for _, lab in pairs], label_names)
    loaded = [load_pair(i, lab, resample_labels) for i, lab in pairs]
    test_loaded = [load_pair(i, lab, resample_labels) for i, lab in test_pairs]
    labelset = make_label_set(
        [(lab.path, lab.array) for _, lab in loaded],
        classes=classes,
        labels_map=labels_map,
        source_names=source_names,
    )
    return ProbeData(
        train=prepare_cases(loaded, labelset, cfg, cancel),
        test=prepare_cases(test_loaded, labelset, cfg, cancel),
        labelset=labelset,
    )


# --------------------------------------------------------------------------- features


def feature_tile(model: nn.Module) -> Int3:
    """The tile a model encodes at a time: its input unit (GL-MAE: the local view)."""
    view = getattr(model, "view", None)
    return tuple(int(v) for v in (view or model.cfg.superpatch))  # type: ignore[return-value]


def encode_tiles(model: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """Frozen features of whole tiles (B, C, *tile) -> (B, F, *grid), one vector per patch.

    ViT methods: the encoder's normed tokens, all of them (no mask). AE / VAE / VQ-VAE: the
    encoder's latent (VAE: the mean; VQ-VAE: before quantisation).
    """
    if hasattr(model, "enc"):  # conv autoencoders: latent grid = token grid
        z = model.enc(tiles)
        factor = int(getattr(model, "latent_factor", 1))
        return z[:, : z.shape[1] // factor] if factor > 1 else z
    encoder = model.encoder
    grid = encoder.grid_of(tiles)
    tokens = encoder(tiles)  # (B, L, E), C order over the grid
    return tokens.transpose(1, 2).reshape(tiles.shape[0], -1, *grid)  # (B, E, gd, gh, gw)


@torch.no_grad()
def token_features(
    model: nn.Module,
    image: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Feature grid (F, gd, gh, gw) on the CPU of a whole ``image`` (1, D, H, W) in [0, 1].

    The image is zero-padded up to a multiple of :func:`feature_tile` and tiled without
    overlap, as ``reconstruct`` does. The grid has one cell per ``patch`` voxels from voxel 0
    and ``ceil(D / patch)`` cells along D (and so on): cells of padding only are dropped.
    """
    from .inference import iter_tiles

    tile = feature_tile(model)
    patch = tuple(int(p) for p in model.cfg.patch)
    spatial = tuple(image.shape[1:])
    x = torch.as_tensor(image).as_subclass(torch.Tensor)
    device = torch.device(device)
    model = model.to(device).eval()
    out: torch.Tensor | None = None
    for chunk, tiles in iter_tiles(x, tile, batch_size, device, cancel):
        feats = encode_tiles(model, tiles).float().cpu()  # (b, F, *tile_grid)
        if out is None:
            padded = [math.ceil(s / t) * t for s, t in zip(spatial, tile)]
            out = torch.zeros(feats.shape[1], *[p // q for p, q in zip(padded, patch)])
        for n, corner in enumerate(chunk):
            g0 = [c // q for c, q in zip(corner, patch)]
            g = feats.shape[2:]
            out[:, g0[0] : g0[0] + g[0], g0[1] : g0[1] + g[1], g0[2] : g0[2] + g[2]] = feats[n]
    assert out is not None
    cells = [math.ceil(s / q) for s, q in zip(spatial, patch)]  # the cells the volume touches
    return out[:, : cells[0], : cells[1], : cells[2]].contiguous()


def patch_stat_features(image: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """(4, gd, gh, gw): mean, std, min and max of each patch of ``image`` (1, D, H, W),
    zero-padded up to a multiple of the patch (the same grid as :func:`token_features`)."""
    from .inference import pad_to_multiple

    p = tuple(int(v) for v in patch)
    x = pad_to_multiple(torch.as_tensor(image).as_subclass(torch.Tensor), p)[0]
    g = [s // q for s, q in zip(x.shape, p)]  # ceil(D / patch), ...: as token_features
    blocks = x.reshape(g[0], p[0], g[1], p[1], g[2], p[2]).permute(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(*g, -1)  # (gd, gh, gw, prod(patch))
    stats = [blocks.mean(-1), blocks.std(-1), blocks.amin(-1), blocks.amax(-1)]
    return torch.stack(stats)  # (4, gd, gh, gw)


def sample_features(grid: torch.Tensor, voxels: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Features (N, F) at voxel indices ``voxels`` (N, 3) of a feature ``grid`` (F, gd, gh, gw):
    the values ``F.interpolate(grid, scale_factor=patch, mode="trilinear")`` has there."""
    cells = grid.shape[1:]
    norm = []
    for a in range(3):
        # trilinear upsampling (align_corners=False) samples voxel i at grid coordinate
        # (i + 0.5) / patch - 0.5, clamped to the grid
        src = ((voxels[:, a].double() + 0.5) / int(patch[a]) - 0.5).clamp(0, cells[a] - 1)
        norm.append(src / max(cells[a] - 1, 1) * 2 - 1)  # align_corners=True: -1..1 = 0..g-1
    coords = torch.stack(norm[::-1], dim=-1).float().view(1, -1, 1, 1, 3)  # (x, y, z) = (W, H, D)
    out = F.grid_sample(grid[None], coords, mode="bilinear", align_corners=True)
    return out.view(grid.shape[0], -1).T.contiguous()  # (N, F)


def upsample_to_voxels(
    grid: torch.Tensor, patch: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """(F, gd, gh, gw) -> (F, *shape): trilinear upsampling by ``patch``, cropped to ``shape``."""
    size = [g * int(p) for g, p in zip(grid.shape[1:], patch)]
    up = F.interpolate(grid[None], size=size, mode="trilinear", align_corners=False)[0]
    return up[:, : shape[0], : shape[1], : shape[2]]


# --------------------------------------------------------------------------- classifier


#: L2 strength of the probe's logistic regression (on standardised features, mean loss).
#: Fixed, not cross-validated: trained on one patient, a weaker penalty let the classifier fit
#: that patient's layout (within-patient folds chose 1e-4, which scored worst on another
#: patient), a stronger one shrank the four patch statistics (RESULTS.md, "Representation probe").
DEFAULT_L2 = 1e-2


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features: ``logits = W (f - mu) / sd + b``."""

    mean: torch.Tensor  #: (F,)
    std: torch.Tensor  #: (F,)
    weight: torch.Tensor  #: (K+1, F)
    bias: torch.Tensor  #: (K+1,)

    @classmethod
    def fit(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        num_classes: int,
        *,
        l2: float = DEFAULT_L2,
        max_iter: int = 100,
    ) -> LinearProbe:
        """Train on features ``x`` (N, F) and targets ``y`` (N,) in 0..num_classes-1: mean
        cross-entropy + ``l2 * |W|^2``, full-batch L-BFGS (strong Wolfe) from zero weights on
        the CPU, so the same data give the same classifier."""
        x = x.float()
        mean = x.mean(0)
        std = x.std(0).clamp(min=1e-6)
        z = (x - mean) / std
        w = torch.zeros(num_classes, z.shape[1], requires_grad=True)
        b = torch.zeros(num_classes, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=max_iter,
            history_size=20,
            tolerance_grad=1e-6,
            tolerance_change=1e-9,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z @ w.T + b, y) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(mean, std, w.detach(), b.detach())

    def logits_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Logits (K+1, gd, gh, gw) of a feature grid (F, gd, gh, gw)."""
        f = (grid.flatten(1).T - self.mean) / self.std  # (L, F)
        out = f @ self.weight.T + self.bias  # (L, K+1)
        return out.T.reshape(-1, *grid.shape[1:])

    def predict(
        self, grid: torch.Tensor, patch: Sequence[int], shape: Sequence[int]
    ) -> torch.Tensor:
        """Class index per voxel (D, H, W): the logits upsampled to voxels, argmax."""
        return upsample_to_voxels(self.logits_grid(grid), patch, shape).argmax(0)


def _sample_voxels(cases: Sequence[Case], n_total: int, seed: int) -> list[torch.Tensor]:
    """Per case, voxel indices (n_i, 3) drawn uniformly without replacement (all voxels when
    they fit), ``n_total`` in all, split in proportion to each case's size."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(c.target[0].numel()) for c in cases]
    total = sum(sizes)
    out = []
    for case, n in zip(cases, sizes):
        take = n if total <= n_total else max(1, round(n_total * n / total))
        flat = torch.randperm(n, generator=g)[:take].sort().values if take < n else torch.arange(n)
        shape = case.target.shape[1:]
        idx = torch.stack(torch.unravel_index(flat, tuple(shape)), dim=1)  # (take, 3)
        out.append(idx)
    return out


def fit_and_score(
    grids_train: Sequence[torch.Tensor],
    grids_test: Sequence[torch.Tensor],
    data: ProbeData,
    patch: Sequence[int],
    *,
    max_voxels: int = 50_000,
    seed: int = 0,
    l2: float = DEFAULT_L2,
) -> dict[str, float]:
    """Train the linear probe on feature grids of ``data.train``; per-class Dice (mean over
    the test cases, classes absent from a case left out) on ``data.test``."""
    n_feat = grids_train[0].shape[0]
    budget = max(1000, min(max_voxels, _MAX_TRAIN_FLOATS // max(1, n_feat)))
    picks = _sample_voxels(data.train, budget, seed)
    xs, ys = [], []
    for grid, case, idx in zip(grids_train, data.train, picks):
        xs.append(sample_features(grid, idx, patch))
        ys.append(case.target[0][idx[:, 0], idx[:, 1], idx[:, 2]].long())
    k = len(data.labelset)
    clf = LinearProbe.fit(torch.cat(xs), torch.cat(ys), k + 1, l2=l2)
    per_case = []
    for grid, case in zip(grids_test, data.test):
        pred = clf.predict(grid, patch, case.target.shape[1:])
        per_case.append(dice_scores(pred, case.target[0], k))
    dice = torch.stack(per_case).nanmean(0)  # (K,)
    return {name: float(v) for name, v in zip(data.classes, dice.tolist())}


# --------------------------------------------------------------------------- the probe


def probe_model(
    model: nn.Module,
    data: ProbeData,
    *,
    seed: int = 0,
    max_voxels: int = 50_000,
    l2: float = DEFAULT_L2,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    cancel: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Per-class test Dice of a linear probe on ``model``'s frozen features (any method)."""
    patch = tuple(int(p) for p in model.cfg.patch)
    was_training = model.training

    def grids(cases: Sequence[Case]) -> list[torch.Tensor]:
        return [
            token_features(model, c.image, batch_size=batch_size, device=device, cancel=cancel)
            for c in cases
        ]

    try:
        train, test = grids(data.train), grids(data.test)
    finally:
        model.train(was_training)
    return fit_and_score(train, test, data, patch, max_voxels=max_voxels, seed=seed, l2=l2)


def probe_patch_stats(
    data: ProbeData,
    patch: Sequence[int],
    *,
    seed: int = 0,
    max_voxels: int = 50_000,
    l2: float = DEFAULT_L2,
) -> dict[str, float]:
    """Per-class test Dice of the same probe on (mean, std, min, max) of each patch."""
    train = [patch_stat_features(c.image, patch) for c in data.train]
    test = [patch_stat_features(c.image, patch) for c in data.test]
    return fit_and_score(train, test, data, patch, max_voxels=max_voxels, seed=seed, l2=l2)


def random_init_model(cfg: RunConfig, seed: int = 0) -> nn.Module:
    """The architecture of ``cfg`` at its random initialisation for ``seed`` (not trained)."""
    from .models import build_model

    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build_model(cfg.model)
    finally:
        torch.set_rng_state(state)


def probe_random_init(
    cfg: RunConfig, data: ProbeData, *, inits: int = 3, seed: int = 0, **kw: Any
) -> dict[str, float]:
    """Mean per-class Dice of the probe on ``inits`` random initialisations of ``cfg``'s
    architecture (seeds ``seed``, ``seed + 1``, ...): one random network is a noisy reference
    (liver Dice 0.04 to 0.65 over three seeds of the tiny ViT, RESULTS.md)."""
    runs = [
        probe_model(random_init_model(cfg, seed + i), data, seed=seed, **kw) for i in range(inits)
    ]
    return {c: float(np.nanmean([r[c] for r in runs])) for c in data.classes}


def probe(
    checkpoint: str | Path,
    images: Any,
    labels: Any,
    *,
    test_images: Any,
    test_labels: Any,
    classes: Sequence[str | int] | None = None,
    label_names: str | Path | None = None,
    labels_map: str | Path | dict | None = None,
    resample_labels: bool = False,
    seed: int = 0,
    max_voxels: int = 50_000,
    random_inits: int = 3,
    device: str = "auto",
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ProbeResult:
    """Linear probe of a pretraining checkpoint's frozen encoder, beside its two references.

    ``images`` / ``labels`` train the per-voxel classifier, ``test_images`` /
    ``test_labels`` score it (paths as for ``finetune``: files, folders, globs, lists, or
    :class:`~maesil_core.data.io.Volume` objects). ``classes`` (names or ids) /
    ``labels_map`` pick the classes; names from ``label_names`` or the ``label_names.json``
    beside the training labels. ``resample_labels`` aligns label maps of another grid in world
    coordinates. ``seed`` draws the training voxels and the random initialisations
    (``random_inits`` of them, averaged). Returns per-class Dice of ``encoder``,
    ``random_init`` and ``patch_stats``.
    """
    from .models.registry import build_from_checkpoint
    from .train import distributed as D

    if max_voxels < 100:
        raise ConfigError(f"max_voxels must be at least 100, got {max_voxels}.")
    if random_inits < 1:
        raise ConfigError(f"random_inits must be at least 1, got {random_inits}.")
    model, ckpt = build_from_checkpoint(checkpoint)
    if ckpt.kind != "pretrain":
        raise ConfigError(
            f"{ckpt.path} is a {ckpt.kind} checkpoint; the probe needs a pretraining checkpoint "
            "(a run of maesil pretrain)."
        )
    cfg = ckpt.config
    t0 = time.perf_counter()
    data = prepare_probe_data(
        cfg,
        images,
        labels,
        test_images,
        test_labels,
        classes=classes,
        label_names=label_names,
        labels_map=labels_map,
        resample_labels=resample_labels,
    )
    dev = D.select_device(device)
    kw: dict[str, Any] = {"seed": seed, "max_voxels": max_voxels}
    runs: dict[str, Callable[[], dict[str, float]]] = {
        "encoder": lambda: probe_model(model, data, device=dev, cancel=cancel, **kw),
        "random_init": lambda: probe_random_init(
            cfg, data, inits=random_inits, device=dev, cancel=cancel, **kw
        ),
        "patch_stats": lambda: probe_patch_stats(data, cfg.model.patch, **kw),
    }
    scores: dict[str, dict[str, float]] = {}
    for done, (name, run) in enumerate(runs.items(), start=1):
        if cancel is not None and cancel():
            raise Cancelled()
        scores[name] = run()
        if progress is not None:
            progress({"phase": "probe", "step": done, "steps": len(runs)})
    return ProbeResult(
        scores=scores,
        classes=data.classes,
        extra={
            "checkpoint": str(ckpt.path),
            "method": cfg.model.method,
            "step": ckpt.step,
            "n_train": len(data.train),
            "n_test": len(data.test),
            "random_inits": random_inits,
            "seconds": time.perf_counter() - t0,
        },
    )


__all__ = [
    "LinearProbe",
    "ProbeData",
    "ProbeResult",
    "prepare_probe_data",
    "probe",
    "probe_model",
    "probe_patch_stats",
    "probe_random_init",
    "random_init_model",
    "token_features",
]
