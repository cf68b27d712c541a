"""Token masks for masked autoencoders: pure functions on a patch grid.

Every mask is a bool tensor (B, L), True = masked (hidden from the encoder), with
L = gd * gh * gw tokens in C order over the grid (gd, gh, gw), the order in which
:class:`~maesil_core.models.vit3d.PatchEmbed3D` flattens them. Every sample has exactly
``round(ratio * L)`` masked tokens, so the visible tokens gather into a dense (B, L_keep).

All randomness is drawn on ``device`` (pass a ``generator`` that lives on that device to
reproduce a mask): no index is built on the CPU in a GPU training step.

One trick serves all three modes: give every token a sort key ``level + noise`` with noise
uniform in [0, 1) and mask the ``n_mask`` tokens with the smallest keys. Tokens of level 0
are masked first, then level 1 in random order, and so on, so the count is always exact.

Dual masking is OUR interpretation: the MAESIL paper names a "dual-masking strategy" but
does not define it (see docs/method.md). We take the union of a coarse mask of whole
``block``-sized cubes of patches (about ``coarse_fraction`` of the masked tokens) and fine
random patches drawn from the remaining tokens up to the exact total.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import ConfigError


def num_masked(grid: Sequence[int], ratio: float) -> int:
    """Masked tokens per sample: round(ratio * L), checked to leave at least one visible token."""
    total = math.prod(grid)
    n = round(ratio * total)
    if not 0 <= n < total:
        raise ConfigError(
            f"mask ratio {ratio} masks {n} of {total} tokens; it must leave one visible."
        )
    return n


def _mask_smallest(key: torch.Tensor, n: int) -> torch.Tensor:
    """(B, L) float keys -> (B, L) bool, True on the n smallest keys of each row."""
    ids = torch.argsort(key, dim=1)[:, :n]  # (B, n)
    mask = torch.zeros(key.shape, dtype=torch.bool, device=key.device)
    return mask.scatter_(1, ids, True)


def _block_ranks(
    batch: int, grid: Sequence[int], block: Sequence[int], device, generator
) -> torch.Tensor:
    """(B, L) long: a random rank 0..nb-1 of the block each token belongs to (same within a block)."""
    gd, gh, gw = (int(g) for g in grid)
    bd, bh, bw = (int(b) for b in block)
    if any(b <= 0 or g % b for g, b in zip((gd, gh, gw), (bd, bh, bw))):
        raise ConfigError(
            f"mask block {[bd, bh, bw]} (in patches) does not divide the patch grid {[gd, gh, gw]}."
        )
    nd, nh, nw = gd // bd, gh // bh, gw // bw
    noise = torch.rand(batch, nd * nh * nw, device=device, generator=generator)  # (B, nb)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (B, nb) a random permutation
    ranks = ranks.view(batch, nd, 1, nh, 1, nw, 1).expand(-1, -1, bd, -1, bh, -1, bw)
    return ranks.reshape(batch, gd * gh * gw)  # (B, L) in C order over (gd, gh, gw)


def random_mask(
    batch: int, grid: Sequence[int], ratio: float, *, device=None, generator=None
) -> torch.Tensor:
    """(B, L) bool: round(ratio * L) tokens per sample chosen uniformly at random (MAE)."""
    n = num_masked(grid, ratio)
    noise = torch.rand(batch, math.prod(grid), device=device, generator=generator)
    return _mask_smallest(noise, n)


def block_mask(
    batch: int,
    grid: Sequence[int],
    ratio: float,
    block: Sequence[int],
    *,
    device=None,
    generator=None,
) -> torch.Tensor:
    """(B, L) bool: whole aligned blocks of ``block`` patches, topped up inside one more block.

    floor(n_mask / block_vol) random blocks are masked entirely, and the remainder is taken
    at random from one further random block, so the count is exactly round(ratio * L).
    """
    n = num_masked(grid, ratio)
    ranks = _block_ranks(batch, grid, block, device, generator)  # (B, L)
    n_full = n // math.prod(block)
    # level 0: full blocks, 1: the one partial block, 2: the rest
    level = (ranks >= n_full).float() + (ranks > n_full).float()
    noise = torch.rand(ranks.shape, device=ranks.device, generator=generator)
    return _mask_smallest(level + noise, n)


def dual_mask(
    batch: int,
    grid: Sequence[int],
    ratio: float,
    block: Sequence[int],
    coarse_fraction: float,
    *,
    device=None,
    generator=None,
    return_parts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool: coarse whole blocks united with fine random patches, exactly round(ratio*L).

    OUR interpretation of MAESIL's dual masking (the paper does not define it):
    ``n_blocks = min(round(coarse_fraction * n_mask / block_vol), n_mask // block_vol)`` whole
    blocks (the coarse mask, about ``coarse_fraction`` of the masked tokens), then the fine
    mask: ``n_mask - n_blocks * block_vol`` single patches drawn uniformly from the tokens the
    coarse mask left visible. ``return_parts=True`` returns ``(coarse, fine)`` (disjoint)
    instead of their union.
    """
    n = num_masked(grid, ratio)
    vol = math.prod(block)
    n_blocks = min(round(coarse_fraction * n / vol), n // vol)
    ranks = _block_ranks(batch, grid, block, device, generator)  # (B, L)
    coarse = ranks < n_blocks  # (B, L) whole blocks
    noise = torch.rand(ranks.shape, device=ranks.device, generator=generator)
    mask = _mask_smallest((~coarse).float() + noise, n)  # coarse tokens first, then random ones
    if return_parts:
        return coarse, mask & ~coarse
    return mask


def make_mask(
    cfg: ModelConfig,
    batch: int,
    *,
    mode: str | None = None,
    ratio: float | None = None,
    device=None,
    generator=None,
) -> torch.Tensor:
    """(B, L) bool mask for ``cfg.grid`` by ``mode`` (default ``cfg.mask_mode``) and ``ratio``."""
    mode = cfg.mask_mode if mode is None else mode
    ratio = cfg.mask_ratio if ratio is None else float(ratio)
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"mask ratio must be between 0 and 1 (exclusive), got {ratio}.")
    if mode == "random":
        return random_mask(batch, cfg.grid, ratio, device=device, generator=generator)
    if mode == "block":
        return block_mask(batch, cfg.grid, ratio, cfg.block, device=device, generator=generator)
    if mode == "dual":
        return dual_mask(
            batch,
            cfg.grid,
            ratio,
            cfg.block,
            cfg.coarse_fraction,
            device=device,
            generator=generator,
        )  # type: ignore[return-value]
    raise ConfigError(f"mask mode must be dual, random or block, got {mode!r}.")


def mask_to_keep_indices(
    mask: torch.Tensor, n_masked: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> (ids_keep (B, L_keep), ids_masked (B, L_mask)), each ascending.

    Rows must all have the same number of masked tokens. Pass ``n_masked`` when it is known
    to skip counting (counting reads the mask back from the device).
    """
    if n_masked is None:
        counts = mask.sum(dim=1)
        n_masked = int(counts[0])
        if bool((counts != n_masked).any()):
            raise ValueError("every row of the mask must hide the same number of tokens.")
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible first, then masked
    n_keep = mask.shape[1] - n_masked
    return order[:, :n_keep], order[:, n_keep:]


def mask_to_voxels(mask: torch.Tensor, grid: Sequence[int], patch: Sequence[int]) -> torch.Tensor:
    """(B, L) bool -> (B, 1, D, H, W) float, 1.0 on the voxels of masked patches."""
    gd, gh, gw = (int(g) for g in grid)
    pd, ph, pw = (int(p) for p in patch)
    b = mask.shape[0]
    vox = mask.float().view(b, 1, gd, 1, gh, 1, gw, 1).expand(-1, -1, -1, pd, -1, ph, -1, pw)
    return vox.reshape(b, 1, gd * pd, gh * ph, gw * pw)


def paste_visible(
    x: torch.Tensor,
    raw: torch.Tensor,
    mask: torch.Tensor,
    grid: Sequence[int],
    patch: Sequence[int],
    return_raw: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The MAE "reconstruction + visible" picture shared by the masked models' ``reconstruct``.

    x, raw (B, C, D, H, W); mask (B, L) True = masked. Returns ``(recon, voxel_mask)`` with
    recon = x on visible patches and raw on masked ones, voxel_mask (B, 1, D, H, W) 1.0 where
    masked; ``return_raw`` appends ``raw``.
    """
    vox = mask_to_voxels(mask, grid, patch).to(x.dtype)
    recon = x * (1 - vox) + raw * vox
    return (recon, vox, raw) if return_raw else (recon, vox)


@dataclass(frozen=True)
class TokenMask:
    """A token mask with the index views the encoder and decoder need, computed once.

    ``mask`` (B, L) bool, True = hidden; ``ids_keep`` (B, L_keep) and ``ids_masked``
    (B, L_mask) the visible and hidden tokens, each ascending; ``grid`` the patch grid the
    L tokens lie on. Build it with :meth:`draw` (a new random mask) or :meth:`of` (from a
    bool mask or another TokenMask).
    """

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_masked: torch.Tensor
    grid: tuple[int, int, int]

    @classmethod
    def of(
        cls, mask: torch.Tensor | TokenMask, grid: Sequence[int], n_masked: int | None = None
    ) -> TokenMask:
        """``mask`` as a TokenMask; ``n_masked``, when known, saves reading the mask back."""
        if isinstance(mask, TokenMask):
            return mask
        ids_keep, ids_masked = mask_to_keep_indices(mask, n_masked)
        return cls(mask, ids_keep, ids_masked, tuple(int(g) for g in grid))  # type: ignore[arg-type]

    @classmethod
    def draw(
        cls,
        cfg: ModelConfig,
        batch: int,
        *,
        mode: str | None = None,
        ratio: float | None = None,
        device=None,
        generator=None,
    ) -> TokenMask:
        """A new mask on ``cfg.grid`` (:func:`make_mask`); the count is known, no sync."""
        mask = make_mask(cfg, batch, mode=mode, ratio=ratio, device=device, generator=generator)
        n = num_masked(cfg.grid, cfg.mask_ratio if ratio is None else float(ratio))
        return cls.of(mask, cfg.grid, n)

    @classmethod
    def random(
        cls, batch: int, grid: Sequence[int], ratio: float, *, device=None, generator=None
    ) -> TokenMask:
        """Uniformly random tokens on ``grid`` (:func:`random_mask`, MAE's masking)."""
        mask = random_mask(batch, grid, ratio, device=device, generator=generator)
        return cls.of(mask, grid, num_masked(grid, ratio))

    @property
    def ids_all(self) -> torch.Tensor:
        """(B, L): the visible tokens' ids, then the hidden ones' (a permutation of 0..L-1)."""
        return torch.cat([self.ids_keep, self.ids_masked], dim=1)

    @property
    def n_keep(self) -> int:
        return self.ids_keep.shape[1]

    def to_voxels(self, patch: Sequence[int]) -> torch.Tensor:
        """(B, 1, D, H, W) float, 1.0 on the voxels of hidden patches."""
        return mask_to_voxels(self.mask, self.grid, patch)
