"""Warnings for segmentations that cannot be right: an organ full of air, or too large.

A segmenter asked about parts of a scan unlike its training crops may label air or the
whole field of view as an organ; a user who only sees "liver: 1,866 ml" does not know. The
checks are coarse on purpose (they catch a broken result, not a slightly wrong one):

- more than :data:`AIR_SHARE` of a class's voxels below -500 HU, for an organ that holds no
  air (:data:`AIR_ORGANS` may: lungs, airways, bowel, stomach);
- a volume above :data:`TYPICAL_MAX_ML` for a known organ (about twice the largest adult one);
- more than half of the body's volume, for any class.
"""

from __future__ import annotations

import numpy as np

#: classes that hold air or gas in life: a large share of air in them is no error
AIR_ORGANS = ("lung", "trachea", "bronch", "airway", "colon", "bowel", "intestin", "stomach",
              "duoden", "esophag", "oesophag", "sinus", "rectum")  # fmt: skip
#: about twice the largest adult organ (ml): a class above it is not that organ
TYPICAL_MAX_ML = {"liver": 4000.0, "spleen": 1500.0, "kidney": 600.0, "pancreas": 300.0,
                  "gallbladder": 300.0, "adrenal": 50.0, "heart": 1500.0, "aorta": 600.0,
                  "bladder": 1200.0, "prostate": 200.0, "thyroid": 100.0}  # fmt: skip
#: a class with more than this share of its voxels below -500 HU is mostly air
AIR_SHARE = 0.2
#: HU below which a voxel is air (lung parenchyma included)
AIR_HU = -500.0


def plausibility_warnings(
    labels: np.ndarray,
    image: np.ndarray,
    affine: np.ndarray,
    classes: dict[int, str],
    *,
    is_hu: bool = True,
    body: np.ndarray | None = None,
) -> list[str]:
    """One line per class whose segmentation cannot be right (see the module doc).

    Args:
        labels: the label map (X, Y, Z) of class ids, on the grid of ``image``.
        image: the CT as read (X, Y, Z); the air check needs HU (``is_hu``).
        affine: the voxel-to-world affine (for volumes in ml).
        classes: ``{id: name}`` of the classes to check.
        body: the body mask, when known (for the share of the body).
    """
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0
    body_ml = float(body.sum()) * voxel_ml if body is not None else None
    look = "look at it before using it (more labelled scans or steps train a better model)"
    out = []
    for cid, name in classes.items():
        mask = np.asarray(labels) == cid
        n = int(mask.sum())
        if not n:
            continue
        ml = n * voxel_ml
        low = name.lower()
        if is_hu and not any(a in low for a in AIR_ORGANS):
            air = float((np.asarray(image)[mask] < AIR_HU).mean())
            if air > AIR_SHARE:
                out.append(
                    f"{name}: {air:.0%} of its {ml:,.0f} ml is air (below {AIR_HU:.0f} HU), "
                    f"which a {name} does not hold: the model labels outside the organ; {look}"
                )
                continue
        limit = next((v for k, v in TYPICAL_MAX_ML.items() if k in low), None)
        if limit is not None and ml > limit:
            out.append(
                f"{name}: {ml:,.0f} ml is more than a {name} holds (about {limit:,.0f} ml at "
                f"most): the model labels outside the organ; {look}"
            )
        elif body_ml and ml > 0.5 * body_ml:
            out.append(
                f"{name}: {ml:,.0f} ml is more than half of the body ({body_ml:,.0f} ml): the "
                f"model labels outside the organ; {look}"
            )
    return out


__all__ = ["AIR_HU", "AIR_ORGANS", "AIR_SHARE", "TYPICAL_MAX_ML", "plausibility_warnings"]
