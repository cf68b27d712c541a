"""Pretraining augmentation of a whole batch on the training device (a GPU), not in the loader.

The same random flips, axial 90-degree turns and gamma contrast jitter as
:func:`~maesil_core.data.transforms.augment_transforms` (the loader's MONAI transforms),
drawn with the same probabilities and ranges, but applied with torch on the batch where it
already is. On a GPU they cost microseconds, while in the loader they cost about 10 ms of CPU
per 128^3 superpatch (BENCHMARKS.md), which is what limits how fast CPU workers can feed a
GPU. The random decisions are drawn on the CPU (a seeded ``torch.Generator``), so applying
them never waits for the device.

    batches = to_device(infinite(loader), device, BatchAugment(seed))
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .transforms import IMAGE_KEY, VALID_KEY

#: probability of each of the three random operations, as in augment_transforms
PROB = 0.5
#: range of the gamma of the contrast jitter, as in augment_transforms
GAMMA = (0.8, 1.25)


class BatchAugment:
    """Augment ``batch["image"]`` (B, C, D, H, W) and ``batch["valid"]`` sample by sample.

    For each sample, with probability 1/2 each: a flip along each of the three axes; a turn
    by k x 90 degrees (k = 1, 2 or 3) in the D-H (R-L x A-P) plane when it is square; a gamma
    ``((x - min) / (max - min)) ** gamma * (max - min) + min`` with gamma uniform in
    0.8..1.25 (MONAI's ``AdjustContrast``: the sample's darkest and brightest values stay).
    ``valid`` (the padding mask) moves with the image and is never contrast-jittered.
    """

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(int(seed) % 2**63)

    def _draw(self) -> tuple[list[int], int, float | None]:
        """Flip axes, quarter turns and gamma (None: no jitter) of one sample."""
        r = torch.rand(7, generator=self.generator).tolist()
        flips = [axis for axis in range(3) if r[axis] < PROB]
        k = 1 + min(2, int(r[4] * 3)) if r[3] < PROB else 0
        gamma = GAMMA[0] + r[6] * (GAMMA[1] - GAMMA[0]) if r[5] < PROB else None
        return flips, k, gamma

    def __call__(self, batch: dict) -> dict:
        image = batch[IMAGE_KEY]  # (B, C, D, H, W)
        valid = batch.get(VALID_KEY)  # (B, 1, D, H, W) bool or None
        square = image.shape[2] == image.shape[3]
        images, valids = [], []
        for i in range(image.shape[0]):
            x = image[i]  # (C, D, H, W)
            v = None if valid is None else valid[i]
            flips, k, gamma = self._draw()
            dims = [1 + axis for axis in flips]
            if dims:
                x = torch.flip(x, dims)
                v = None if v is None else torch.flip(v, dims)
            if k and square:
                x = torch.rot90(x, k, dims=(1, 2))
                v = None if v is None else torch.rot90(v, k, dims=(1, 2))
            if gamma is not None:
                low, high = x.amin(), x.amax()  # stay on the device: no synchronisation
                span = high - low
                x = ((x - low) / (span + 1e-7)).pow(gamma) * span + low
            images.append(x)
            valids.append(v)
        out = dict(batch)
        out[IMAGE_KEY] = torch.stack(images)
        if valid is not None:
            out[VALID_KEY] = torch.stack(valids)
        return out


def to_device(
    batches: Iterator[dict],
    device: torch.device | str,
    augment: BatchAugment | None = None,
) -> Iterator[dict]:
    """Move each batch's tensors to ``device`` (without blocking, from pinned memory) and,
    with ``augment``, augment it there."""
    device = torch.device(device)
    for batch in batches:
        batch = {
            k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        yield augment(batch) if augment is not None else batch
