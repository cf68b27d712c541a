"""Token masks: exact counts, block structure, dual = coarse blocks + fine, seeds, voxel masks."""

from __future__ import annotations

import math

import pytest
import torch

from maesil_core.config import ModelConfig, preset
from maesil_core.errors import ConfigError
from maesil_core.models.masking import (
    block_mask,
    dual_mask,
    make_mask,
    mask_to_keep_indices,
    mask_to_voxels,
    random_mask,
)

GRIDS_BLOCKS = [((4, 4, 4), (2, 2, 2)), ((16, 16, 16), (4, 4, 4)), ((2, 4, 6), (1, 2, 3))]
RATIOS = [0.1, 0.5, 0.75, 0.9]


def blockwise(mask: torch.Tensor, grid, block) -> torch.Tensor:
    """(B, L) -> (B, n_blocks, block_vol): the tokens of each aligned block in one row."""
    (gd, gh, gw), (bd, bh, bw) = grid, block
    m = mask.view(-1, gd // bd, bd, gh // bh, bh, gw // bw, bw)
    return m.permute(0, 1, 3, 5, 2, 4, 6).reshape(mask.shape[0], -1, bd * bh * bw)


@pytest.mark.parametrize("grid,block", GRIDS_BLOCKS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_count_all_modes(grid, block, ratio):
    n_expected = round(ratio * math.prod(grid))
    for mask in (
        random_mask(5, grid, ratio),
        block_mask(5, grid, ratio, block),
        dual_mask(5, grid, ratio, block, 0.5),
    ):
        assert mask.dtype == torch.bool and mask.shape == (5, math.prod(grid))
        assert mask.sum(1).tolist() == [n_expected] * 5


@pytest.mark.parametrize("grid,block", GRIDS_BLOCKS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_block_mask_is_whole_blocks_plus_one_partial(grid, block, ratio):
    mask = block_mask(8, grid, ratio, block)
    per_block = blockwise(mask, grid, block).sum(-1)  # (B, n_blocks) masked tokens per block
    vol = math.prod(block)
    n = round(ratio * math.prod(grid))
    for row in per_block:
        full = int((row == vol).sum())
        partial = row[(row > 0) & (row < vol)]
        assert full == n // vol
        assert len(partial) == (1 if n % vol else 0)
        if len(partial):
            assert int(partial[0]) == n % vol


@pytest.mark.parametrize("grid,block", GRIDS_BLOCKS)
@pytest.mark.parametrize("coarse_fraction", [0.0, 0.5, 1.0])
def test_dual_mask_is_coarse_blocks_plus_fine(grid, block, coarse_fraction):
    ratio = 0.75
    n = round(ratio * math.prod(grid))
    vol = math.prod(block)
    n_blocks = min(round(coarse_fraction * n / vol), n // vol)
    coarse, fine = dual_mask(6, grid, ratio, block, coarse_fraction, return_parts=True)
    per_block = blockwise(coarse, grid, block).sum(-1)
    # the coarse part is exactly n_blocks complete blocks, nothing else
    assert ((per_block == 0) | (per_block == vol)).all()
    assert (per_block == vol).sum(1).tolist() == [n_blocks] * 6
    # the fine part is disjoint and tops the union up to the exact count
    assert not (coarse & fine).any()
    assert (coarse | fine).sum(1).tolist() == [n] * 6
    assert fine.sum(1).tolist() == [n - n_blocks * vol] * 6


def test_dual_union_equals_returned_mask_and_has_complete_blocks():
    g = torch.Generator().manual_seed(3)
    mask = dual_mask(4, (4, 4, 4), 0.75, (2, 2, 2), 0.5, generator=g)
    g = torch.Generator().manual_seed(3)
    coarse, fine = dual_mask(4, (4, 4, 4), 0.75, (2, 2, 2), 0.5, generator=g, return_parts=True)
    assert torch.equal(mask, coarse | fine)
    # 48 masked, 0.5 * 48 / 8 = 3 coarse blocks at least complete in the union
    assert ((blockwise(mask, (4, 4, 4), (2, 2, 2)).sum(-1) == 8).sum(1) >= 3).all()


@pytest.mark.parametrize("mode", ["random", "block", "dual"])
def test_generator_reproduces_and_samples_differ(mode):
    cfg = preset("smoke").model

    def draw(seed):
        return make_mask(cfg, 4, mode=mode, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))
    m = draw(0)
    assert not all(torch.equal(m[0], m[i]) for i in range(1, 4))  # samples differ


def test_make_mask_dispatch_and_ratio():
    cfg = ModelConfig(superpatch=(32, 64, 64), patch=(4, 8, 8), block=(2, 2, 2))  # grid 8^3
    assert cfg.grid == (8, 8, 8)
    for mode in ("random", "block", "dual"):
        m = make_mask(cfg, 2, mode=mode, ratio=0.6)
        assert m.sum(1).tolist() == [round(0.6 * 512)] * 2
    with pytest.raises(ConfigError):
        make_mask(cfg, 2, mode="checkerboard")
    with pytest.raises(ConfigError):
        make_mask(cfg, 2, ratio=1.0)
    with pytest.raises(ConfigError):
        block_mask(2, (4, 4, 4), 0.5, (3, 3, 3))


def test_keep_indices_are_sorted_and_partition():
    mask = random_mask(3, (4, 4, 4), 0.75, generator=torch.Generator().manual_seed(0))
    keep, hidden = mask_to_keep_indices(mask)
    assert keep.shape == (3, 16) and hidden.shape == (3, 48)
    assert (keep.diff(dim=1) > 0).all() and (hidden.diff(dim=1) > 0).all()
    assert not torch.gather(mask, 1, keep).any()
    assert torch.gather(mask, 1, hidden).all()
    keep2, hidden2 = mask_to_keep_indices(mask, 48)
    assert torch.equal(keep, keep2) and torch.equal(hidden, hidden2)
    ragged = mask.clone()
    ragged[0, keep[0, 0]] = True
    with pytest.raises(ValueError):
        mask_to_keep_indices(ragged)


def test_mask_to_voxels_matches_patches():
    grid, patch = (2, 4, 3), (4, 2, 3)
    mask = random_mask(2, grid, 0.5, generator=torch.Generator().manual_seed(1))
    vox = mask_to_voxels(mask, grid, patch)
    assert vox.shape == (2, 1, 8, 8, 9) and vox.dtype == torch.float32
    for b in range(2):
        for i, (d, h, w) in enumerate(
            (d, h, w) for d in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])
        ):
            cube = vox[b, 0, d * 4 : (d + 1) * 4, h * 2 : (h + 1) * 2, w * 3 : (w + 1) * 3]
            assert torch.all(cube == float(mask[b, i]))
