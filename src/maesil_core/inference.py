"""Whole-volume inference for pretraining models: tile a CT into superpatches, mask,
reconstruct and stitch back.

The volume arrives preprocessed on the model's grid (RAS, target spacing, [0, 1]); putting
the results back onto the input file's own grid is ``api.reconstruct``'s job (MONAI's
inverse transforms). Tiles are non-overlapping superpatches, exactly the model's input
unit, so what is shown is what the model was trained to do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import Cancelled
from .progress import CancelHooks


@dataclass
class TiledReconstruction:
    """Results on the model grid. recon/pred: (C, D, H, W); mask: (1, D, H, W) 1 = masked."""

    recon: torch.Tensor  #: input on visible patches, prediction on masked ones
    pred: torch.Tensor  #: raw prediction everywhere
    mask: torch.Tensor


def tile_grid(shape: tuple[int, ...], tile: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Corners of the non-overlapping tiles covering ``shape`` (padded up to a multiple)."""
    counts = [math.ceil(s / t) for s, t in zip(shape, tile)]
    return [
        (i * tile[0], j * tile[1], k * tile[2])
        for i in range(counts[0])
        for j in range(counts[1])
        for k in range(counts[2])
    ]


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    """(C, D, H, W) zero-padded at the far end of each axis up to a multiple of ``multiple``."""
    pad: list[int] = []
    for s, m in reversed(list(zip(x.shape[1:], multiple))):
        pad += [0, math.ceil(s / int(m)) * int(m) - s]
    return F.pad(x.float(), pad, value=0.0)


def tile_inside(
    corner: Sequence[int], shape: Sequence[int], tile: Sequence[int]
) -> tuple[slice, ...]:
    """The part of the tile at ``corner`` that lies inside ``shape``, in the tile's own
    voxels: all of it but the padding :func:`iter_tiles` adds at the far ends."""
    return tuple(slice(0, min(int(t), int(s) - int(c))) for c, s, t in zip(corner, shape, tile))


def tile_valid(
    corners: Sequence[tuple[int, int, int]], shape: Sequence[int], tile: Sequence[int]
) -> torch.Tensor:
    """(b, 1, *tile) float, 1.0 on the voxels of each tile at ``corners`` that lie inside
    ``shape`` (:func:`tile_inside`) and 0.0 on the padding."""
    valid = torch.zeros((len(corners), 1, *tile), dtype=torch.float32)
    for n, corner in enumerate(corners):
        valid[(n, slice(None), *tile_inside(corner, shape, tile))] = 1.0
    return valid


def iter_tiles(
    image: torch.Tensor,
    tile: Sequence[int],
    batch_size: int,
    device: torch.device,
    cancel: Callable[[], bool] | None = None,
) -> Iterator[tuple[list[tuple[int, int, int]], torch.Tensor]]:
    """Batches ``(corners, tiles (b, C, *tile) on device)`` of the non-overlapping tiles of
    ``image`` (C, D, H, W), zero-padded up to a multiple of ``tile``; ``cancel()`` is checked
    before each batch and raises :class:`~maesil_core.errors.Cancelled`."""
    t = tuple(int(v) for v in tile)
    x = pad_to_multiple(image, t)  # (C, D', H', W')
    corners = tile_grid(tuple(image.shape[1:]), t)  # type: ignore[arg-type]
    for start in range(0, len(corners), batch_size):
        if cancel is not None and cancel():
            raise Cancelled()
        chunk = corners[start : start + batch_size]
        tiles = torch.stack(
            [x[:, i : i + t[0], j : j + t[1], k : k + t[2]] for i, j, k in chunk]
        ).to(device)  # (b, C, *tile)
        yield chunk, tiles


@torch.no_grad()
def reconstruct_volume(
    model: nn.Module,
    image: torch.Tensor,
    *,
    mode: str | None = None,
    ratio: float | None = None,
    seed: int = 0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> TiledReconstruction:
    """Mask and reconstruct every superpatch of ``image`` (C, D, H, W) in [0, 1].

    The masks are drawn from ``seed``, so the same call gives the same picture. With
    ``amp_dtype`` (bf16) the model runs under autocast and the pictures are kept in float32;
    a batch whose autocast output is not finite is run again in float32.
    ``progress(done, total)`` is called after each batch of tiles; ``cancel()`` is checked
    between batches and raises :class:`~maesil_core.errors.Cancelled`.
    """
    tile = tuple(model.cfg.superpatch)
    c, *spatial = image.shape
    padded = [math.ceil(s / t) * t for s, t in zip(spatial, tile)]
    n_tiles = len(tile_grid(tuple(spatial), tile))
    recon = torch.zeros((c, *padded), dtype=torch.float32)  # (C, D', H', W')
    pred = torch.zeros_like(recon)
    mask = torch.zeros((1, *padded), dtype=torch.float32)
    device = torch.device(device)
    model = model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    done = 0
    hooks = CancelHooks(model, cancel) if cancel is not None else contextlib.nullcontext()
    with hooks:  # a cancel lands between the model's modules too, not only between batches
        for chunk, tiles in iter_tiles(image, tile, batch_size, device, cancel):
            # the padding of edge tiles is no visible voxel for the model's interpolation prior
            kw = {"mode": mode, "ratio": ratio, "generator": generator, "return_raw": True}
            kw["valid"] = tile_valid(chunk, spatial, tile).to(device)  # (b, 1, *tile)
            state = generator.get_state()  # the same masks if the batch must run again
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                r, m, p = model.reconstruct(tiles, **kw)
            if amp_dtype is not None and not (torch.isfinite(r).all() and torch.isfinite(p).all()):
                generator.set_state(state)
                r, m, p = model.reconstruct(tiles, **kw)
            for n, (i, j, k) in enumerate(chunk):
                sl = (
                    slice(None),
                    slice(i, i + tile[0]),
                    slice(j, j + tile[1]),
                    slice(k, k + tile[2]),
                )
                recon[sl] = r[n].float().cpu()
                pred[sl] = p[n].float().cpu()
                mask[sl] = m[n].float().cpu()
            done += len(chunk)
            if progress is not None:
                progress(done, n_tiles)
    crop = (slice(None), *[slice(0, s) for s in spatial])
    return TiledReconstruction(recon=recon[crop], pred=pred[crop], mask=mask[crop])
