"""Metrics: MSE / PSNR / SSIM for reconstruction (numpy, scikit-image), Dice for segmentation.

All reconstruction metrics take arrays of the same shape in a known intensity range
(``data_range``, 1.0 for the model's [0, 1] scale) and an optional boolean ``mask`` that
restricts the score to those voxels (e.g. the masked-out region of an MAE).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from skimage.metrics import structural_similarity

from .errors import Cancelled

#: slices of the first axis per piece of a masked SSIM (a check for ``cancel`` after each)
SSIM_SLAB = 32


def _select(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None):
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {target.shape}")
    if mask is None:
        return pred.ravel(), target.ravel()
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask selects no voxel")
    return pred[mask], target[mask]


def mse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    p, t = _select(pred, target, mask)
    return float(np.mean((p - t) ** 2))


def psnr(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, data_range: float = 1.0
) -> float:
    """Peak signal-to-noise ratio in dB (inf for a perfect match)."""
    err = mse(pred, target, mask)
    return float("inf") if err == 0 else float(10 * np.log10(data_range**2 / err))


def ssim(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 1.0,
    cancel: Callable[[], bool] | None = None,
) -> float:
    """3D SSIM (scikit-image, 7-voxel Gaussian-free window), averaged over ``mask`` if given.

    With a mask the SSIM map is made :data:`SSIM_SLAB` slices of the first axis at a time,
    each with the half window of its neighbours around it (the same map as in one piece:
    every value depends on its own window only, and the volume's edges are reflected the
    same way), and ``cancel()`` is checked after each piece (raises
    :class:`~maesil_core.errors.Cancelled`): a whole CT's takes seconds."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    win = min(7, *[s for s in pred.shape if s > 1])
    win = win if win % 2 else win - 1
    if win < 3:
        raise ValueError(f"volume {pred.shape} is too small for SSIM")
    if mask is None:
        return float(structural_similarity(target, pred, data_range=data_range, win_size=win))
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask selects no voxel")
    n, half, total, start = pred.shape[0], win // 2, 0.0, 0
    while start < n:
        stop = min(n, start + SSIM_SLAB)
        stop = n if n - stop < win else stop  # no last piece thinner than the window
        lo, hi = max(0, start - half), min(n, stop + half)
        _, smap = structural_similarity(
            target[lo:hi], pred[lo:hi], data_range=data_range, win_size=win, full=True
        )
        total += float(smap[start - lo : stop - lo][mask[start:stop]].sum())
        if cancel is not None and cancel():
            raise Cancelled()
        start = stop
    return total / int(mask.sum())


def reconstruction_scores(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float = 1.0,
    cancel: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """``{"mse", "psnr", "ssim"}`` over ``mask`` (or everywhere); ``cancel`` as in
    :func:`ssim`."""
    return {
        "mse": mse(pred, target, mask),
        "psnr": psnr(pred, target, mask, data_range),
        "ssim": ssim(pred, target, mask, data_range, cancel),
    }


def _per_tile(
    fill, target: np.ndarray, mask: np.ndarray, tile, cancel: Callable[[], bool] | None = None
) -> np.ndarray:
    """``fill(target_box, mask_box)`` on each tile of ``tile`` voxels (from 0 on every axis);
    ``cancel()`` checked after each tile (raises :class:`~maesil_core.errors.Cancelled`)."""
    out = np.empty_like(target)
    starts = [range(0, n, int(t)) for n, t in zip(target.shape, tile)]
    for corner in itertools.product(*starts):
        box = tuple(slice(c, c + int(t)) for c, t in zip(corner, tile))
        out[box] = fill(target[box], mask[box])
        if cancel is not None and cancel():
            raise Cancelled()
    return out


def fill_from_visible(
    target: np.ndarray,
    mask: np.ndarray,
    sigma: float | tuple[float, ...],
    tile: tuple[int, ...] | list[int] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """The no-learning reference for a masked autoencoder: hidden voxels interpolated from
    the visible ones.

    ``target`` (D, H, W), ``mask`` (D, H, W) bool, True where hidden. Visible voxels are kept;
    each hidden voxel gets the Gaussian-weighted mean (``sigma`` in voxels, e.g. half a
    patch) of the visible voxels around it (normalised convolution), or the mean of all
    visible voxels where none is near. A model that does not beat this has learnt nothing
    beyond smoothing its input.
    ``tile`` (e.g. the superpatch of a tiled reconstruction): each tile is filled from its
    own visible voxels only, as the model sees them, not from its neighbours' across the
    border (tiles start at 0 on every axis, as in :func:`~maesil_core.inference.tile_grid`);
    ``cancel()`` is then checked after each tile.
    """
    from scipy.ndimage import gaussian_filter

    target = np.asarray(target, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if tile is not None:
        fill = lambda t, m: fill_from_visible(t, m, sigma)  # noqa: E731
        return _per_tile(fill, target, mask, tile, cancel)
    seen = ~mask
    if not seen.any():
        return np.zeros_like(target)
    num = gaussian_filter(np.where(seen, target, 0.0), sigma, mode="constant")
    den = gaussian_filter(seen.astype(np.float64), sigma, mode="constant")
    fill = np.where(den > 1e-6, num / np.maximum(den, 1e-6), target[seen].mean())
    return np.where(seen, target, fill)


def fill_with_visible_mean(
    target: np.ndarray, mask: np.ndarray, tile: tuple[int, ...] | list[int] | None = None
) -> np.ndarray:
    """The crudest reference: every hidden voxel set to the mean of the visible voxels (of
    its ``tile``, as the model sees them; 0 where a tile shows nothing). A masked model whose
    masked-voxel MSE is not well below this one's predicts no more than a tile's brightness."""
    target = np.asarray(target, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if tile is not None:
        return _per_tile(fill_with_visible_mean, target, mask, tile)
    seen = ~mask
    return np.where(seen, target, target[seen].mean() if seen.any() else 0.0)


def interpolation_fill(
    target: np.ndarray,
    mask: np.ndarray,
    patch: tuple[int, ...] | list[int],
    tile: tuple[int, ...] | list[int] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> np.ndarray:
    """The reference picture (D, H, W) float64: :func:`fill_from_visible` with sigma half a
    ``patch``, per ``tile`` if given (the superpatch of a tiled reconstruction)."""
    return fill_from_visible(target, mask, [float(p) / 2 for p in patch], tile, cancel)


def interpolation_scores(
    target: np.ndarray,
    mask: np.ndarray,
    patch: tuple[int, ...] | list[int],
    tile: tuple[int, ...] | list[int] | None = None,
    *,
    fill: np.ndarray | None = None,
) -> dict[str, float]:
    """:func:`reconstruction_scores` of :func:`interpolation_fill` (sigma half a ``patch``,
    per ``tile`` if given) on the hidden voxels: the score a masked autoencoder has to beat.
    Also ``mean_fill_mse``: the MSE of :func:`fill_with_visible_mean` on the same voxels.
    ``fill``: that picture, when the caller already made it (to show it beside the model's)."""
    if fill is None:
        fill = interpolation_fill(target, mask, patch, tile)
    scores = reconstruction_scores(fill, target, mask)
    scores["mean_fill_mse"] = mse(fill_with_visible_mean(target, mask, tile), target, mask)
    return scores


def dice_per_class(
    pred: np.ndarray, target: np.ndarray, labels: list[int] | None = None
) -> dict[int, float]:
    """Dice of each label id present in ``target`` (or listed); NaN where both are empty."""
    pred = np.asarray(pred)
    target = np.asarray(target)
    if labels is None:
        labels = [int(v) for v in np.unique(target) if v != 0]
    out: dict[int, float] = {}
    for lab in labels:
        p, t = pred == lab, target == lab
        denom = p.sum() + t.sum()
        out[lab] = float("nan") if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)
    return out
