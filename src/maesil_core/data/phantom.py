"""A procedural torso CT phantom with organ labels, for tests, demos and smoke runs.

Not anatomy: ellipsoids and cylinders with realistic Hounsfield units, smooth tissue
texture and CT noise, in RAS voxel order (index x grows to the patient's right,
y to anterior, z to superior). Shapes and positions vary with ``seed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import DataError
from .io import save_volume

#: label id -> organ name
ORGANS: dict[int, str] = {
    1: "body",
    2: "liver",
    3: "spleen",
    4: "kidney_left",
    5: "kidney_right",
    6: "spine",
    7: "aorta",
    8: "lung_left",
    9: "lung_right",
}

#: typical HU (low, high) of each label in the phantom (body mixes fat and muscle)
ORGAN_HU: dict[int, tuple[float, float]] = {
    1: (-150.0, 90.0),
    2: (30.0, 100.0),
    3: (20.0, 90.0),
    4: (100.0, 200.0),
    5: (100.0, 200.0),
    6: (300.0, 1100.0),
    7: (150.0, 260.0),
    8: (-950.0, -700.0),
    9: (-950.0, -700.0),
}


@dataclass
class Phantom:
    """``ct`` (X, Y, Z) int16 HU and ``labels`` (X, Y, Z) uint8, both RAS with ``affine``."""

    ct: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    names: dict[int, str]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.diag(self.affine)[:3])  # type: ignore[return-value]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Unit-std smooth noise, made at quarter resolution and upsampled (fast)."""
    small = tuple(max(4, s // 4) for s in shape)
    n = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / 4)
    n /= n.std() + 1e-6
    return ndimage.zoom(n, [s / m for s, m in zip(shape, small)], order=1)[
        : shape[0], : shape[1], : shape[2]
    ]


def make_phantom(
    shape: tuple[int, int, int] = (128, 128, 96),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
    seed: int = 0,
) -> Phantom:
    """Build a torso phantom of ``shape`` voxels at ``spacing`` mm (< 1 s at the default)."""
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 16:
        raise DataError(f"phantom shape must be three sizes of at least 16 voxels, got {shape}.")
    rng = np.random.default_rng(seed)
    sx, sy, sz = (float(s) for s in spacing)
    ext = np.array(shape) * np.array([sx, sy, sz])  # field of view in mm
    # centred mm coordinates; u, v, w in [-1, 1] relative to the half field of view
    x = (np.arange(shape[0], dtype=np.float32) - (shape[0] - 1) / 2) * sx
    y = (np.arange(shape[1], dtype=np.float32) - (shape[1] - 1) / 2) * sy
    z = (np.arange(shape[2], dtype=np.float32) - (shape[2] - 1) / 2) * sz
    X, Y, Z = x[:, None, None], y[None, :, None], z[None, None, :]
    hx, hy, hz = ext / 2

    def jitter(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    def ellipsoid(cx, cy, cz, rx, ry, rz):
        return ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 + ((Z - cz) / rz) ** 2 <= 1.0

    ct = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    # body: elliptic cylinder, slightly wider in the middle; fat rim, muscle inside
    ax = hx * (0.82 + jitter(0.05)) * (1.0 - 0.06 * (Z / hz) ** 2)
    ay = hy * (0.62 + jitter(0.05)) * (1.0 - 0.06 * (Z / hz) ** 2)
    r_body = (X / ax) ** 2 + (Y / ay) ** 2
    body = np.broadcast_to(r_body <= 1.0, shape)
    fat_depth = 0.80 + jitter(0.04)
    inner = np.broadcast_to(r_body <= fat_depth**2, shape)
    ct[body] = -100.0
    ct[inner] = 40.0
    labels[body] = 1

    # lungs: upper part, left (low x) and right (high x)
    lung_top = hz * 0.95
    lung_bottom = hz * (0.05 + jitter(0.08))
    lz, lrz = (lung_top + lung_bottom) / 2, (lung_top - lung_bottom) / 2
    for label, side in ((8, -1.0), (9, 1.0)):
        m = ellipsoid(
            side * ax.max() * (0.42 + jitter(0.04)),
            hy * (0.05 + jitter(0.05)),
            lz,
            ax.max() * (0.30 + jitter(0.03)),
            ay.max() * (0.62 + jitter(0.04)),
            lrz,
        )
        m &= inner
        ct[m] = -850.0
        labels[m] = label

    # liver: right side, just below the lungs (its dome tucks under the right lung)
    liver_z = lung_bottom - hz * (0.12 + jitter(0.04))
    liver = (
        ellipsoid(
            ax.max() * (0.30 + jitter(0.04)),
            hy * (0.08 + jitter(0.04)),
            liver_z,
            ax.max() * (0.40 + jitter(0.03)),
            ay.max() * (0.55 + jitter(0.04)),
            hz * (0.28 + jitter(0.03)),
        )
        & inner
    )
    liver &= labels != 9
    ct[liver] = 60.0
    labels[liver] = 2

    # spleen: left, posterior
    spleen = (
        ellipsoid(
            -ax.max() * (0.55 + jitter(0.04)),
            -ay.max() * (0.25 + jitter(0.05)),
            liver_z + hz * 0.05,
            ax.max() * 0.20,
            ay.max() * 0.32,
            hz * (0.20 + jitter(0.02)),
        )
        & inner
    )
    spleen &= labels == 1
    ct[spleen] = 50.0
    labels[spleen] = 3

    # kidneys: posterior, either side of the spine, lower abdomen
    kidney_z = liver_z - hz * (0.30 + jitter(0.05))
    for label, side in ((4, -1.0), (5, 1.0)):
        k = (
            ellipsoid(
                side * ax.max() * (0.32 + jitter(0.03)),
                -ay.max() * (0.45 + jitter(0.04)),
                kidney_z + jitter(hz * 0.04),
                ax.max() * 0.17,
                ay.max() * 0.22,
                hz * 0.26,
            )
            & inner
        )
        k &= labels <= 2
        ct[k] = 150.0
        labels[k] = label

    # spine: vertebral bodies (cylinders) along z with discs between them
    spine_y = -ay.max() * (0.62 + jitter(0.03))
    spine_r = min(hx, hy) * 0.14
    cyl = (X**2 + (Y - spine_y) ** 2) <= spine_r**2
    period = 28.0 + jitter(3.0)  # mm per vertebra
    phase = (Z - jitter(period)) % period
    disc = phase < 5.0
    bone_z = np.broadcast_to(~disc, shape)
    vert = np.broadcast_to(cyl, shape) & bone_z & inner
    cortex = np.broadcast_to(cyl & ((X**2 + (Y - spine_y) ** 2) >= (spine_r * 0.75) ** 2), shape)
    ct[vert] = 450.0
    ct[vert & cortex] = 900.0
    labels[vert] = 6

    # aorta: cylinder anterior-left of the spine, below the lungs' top
    aorta_r = spine_r * (0.55 + jitter(0.05))
    aorta = (X + spine_r * 0.9) ** 2 + (Y - spine_y - spine_r * 1.9) ** 2 <= aorta_r**2
    aorta = np.broadcast_to(aorta, shape) & (hz * 0.7 > Z) & inner & (labels != 6)
    ct[aorta] = 200.0
    labels[aorta] = 7

    # texture (organ-scale smooth variation), lung parenchyma texture, then CT noise
    tissue = labels > 0
    texture = _smooth_noise(rng, shape, sigma=3.0)
    lungs = (labels == 8) | (labels == 9)
    ct += np.where(lungs, 40.0, 10.0) * texture * tissue
    bone = labels == 6
    ct += np.where(bone, 60.0, 0.0) * texture
    ct += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)

    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * np.array([sx, sy, sz])
    return Phantom(ct=ct, labels=labels, affine=affine, names=dict(ORGANS))


def write_phantom(
    out_dir: str | Path,
    seed: int = 0,
    shape: tuple[int, int, int] = (128, 128, 96),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``ct.nii.gz``, ``labels.nii.gz`` and ``label_names.json`` to ``out_dir``.

    Returns ``(ct_path, labels_path)``.
    """
    out = Path(out_dir)
    ph = make_phantom(shape=shape, spacing=spacing, seed=seed)
    ct_path = out / "ct.nii.gz"
    lab_path = out / "labels.nii.gz"
    names_path = out / "label_names.json"
    if not overwrite:
        for p in (ct_path, lab_path, names_path):
            if p.exists():
                raise DataError(
                    f"{p} exists; pass `force` / overwrite=True to replace it.", option="force"
                )
    save_volume(ph.ct, ph.affine, ct_path, overwrite=overwrite, dtype=np.int16)
    save_volume(ph.labels, ph.affine, lab_path, overwrite=overwrite, dtype=np.uint8)
    names_path.write_text(json.dumps({str(k): v for k, v in ph.names.items()}, indent=1))
    return ct_path, lab_path
