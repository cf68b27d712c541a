"""Segmentations stay inside the body (issue 17, item 3), on real CT.

The body mask (``data.body``) and the plausibility warnings (``segmentation.plausibility``)
are checked against reference labels: ``dicom_ct`` (a 512 x 512 DICOM series, two thirds of
it air around the patient) with ``dicom_ct_labels`` aligned in world coordinates, and
``chest_ct`` (lungs, which are air inside the body). Deterministic: no model is trained here;
the model-level checks are in test_segmentation.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from maesil_core.data import load_labels, load_volume
from maesil_core.data.body import axial_axis, body_mask
from maesil_core.segmentation.plausibility import plausibility_warnings

LIVER, SPLEEN = 5, 1  # TotalSegmentator ids


@pytest.fixture(scope="module")
def dicom(shared_data):
    image = load_volume(shared_data / "dicom_ct")
    labels = load_labels(shared_data / "dicom_ct_labels" / "labels.nii.gz", image, resample=True)
    return image, labels.array


def test_body_mask_holds_every_organ_and_leaves_the_air_out(dicom, shared_data):
    image, labels = dicom
    body = body_mask(image.array, image.affine)
    assert body.shape == image.array.shape and body.dtype == bool
    assert body[labels > 0].all()  # every labelled organ voxel is inside
    air = image.array < -500
    assert body[air].mean() < 0.02, body[air].mean()  # the air around the patient is not
    assert 0.2 < body.mean() < 0.6, body.mean()  # the patient fills about a third
    corners = body[:40, :40].any() or body[-40:, :40].any() or body[:40, -40:].any()
    assert not corners  # the field of view's corners are air
    # the lungs are air inside the body: filled, not cut out
    chest = load_volume(shared_data / "chest_ct" / "ct.nii.gz")
    tumour = load_labels(shared_data / "chest_ct" / "labels.nii.gz", chest).array > 0
    chest_body = body_mask(chest.array, chest.affine)
    assert chest_body[tumour].all()
    inside_air = (chest.array < -500) & chest_body
    assert inside_air.sum() > 0.15 * chest_body.sum(), inside_air.sum() / chest_body.sum()


def test_body_mask_follows_the_axial_axis_and_non_hu_scans(shared_data):
    head = load_volume(shared_data / "head_ct" / "ct_not_hu.nii.gz")
    assert not head.is_hu
    mask = body_mask(head.array, head.affine, is_hu=False)  # Otsu level, not -500 HU
    assert 0.2 < mask.mean() < 0.7, mask.mean()
    assert axial_axis(head.affine) == 2
    eye = np.eye(4)
    assert axial_axis(eye[:, [0, 2, 1, 3]]) == 1  # head-feet along the array's second axis
    assert body_mask(np.full((8, 8, 8), -1000.0), eye).all()  # no tissue: nothing to restrict


def test_a_liver_in_the_air_is_reported_the_reference_is_not(dicom):
    image, labels = dicom
    classes = {1: "liver", 2: "spleen"}
    ref = np.zeros(labels.shape, np.uint8)
    ref[labels == LIVER], ref[labels == SPLEEN] = 1, 2
    body = body_mask(image.array, image.affine)
    assert plausibility_warnings(ref, image.array, image.affine, classes, body=body) == []

    # the tiled grid of "liver" in front of the patient that issue 17 saw: liver + air boxes
    bad = ref.copy()
    air = (image.array < -500) & ~body
    grid = np.zeros_like(air)
    grid[::32, ::32] = True
    from scipy import ndimage

    bad[ndimage.binary_dilation(grid, iterations=6) & air] = 1
    warnings = plausibility_warnings(bad, image.array, image.affine, classes, body=body)
    assert len(warnings) == 1 and warnings[0].startswith("liver: "), warnings
    assert "is air (below -500 HU)" in warnings[0]
    share = float((image.array[bad == 1] < -500).mean())
    assert f"{share:.0%}" in warnings[0]
    # a lung class may hold air: no warning for the same voxels named "lung"
    assert plausibility_warnings(bad, image.array, image.affine, {1: "lung", 2: "spleen"}) == []


def test_an_organ_as_large_as_the_body_is_reported(dicom):
    image, labels = dicom
    body = body_mask(image.array, image.affine)
    whole = body.astype(np.uint8)  # "spleen" = the whole body: tissue, no air, far too big
    voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
    assert whole.sum() * voxel_ml > 1500
    warnings = plausibility_warnings(whole, image.array, image.affine, {1: "spleen"}, body=body)
    assert len(warnings) == 1 and "more than a spleen holds" in warnings[0], warnings
    # an organ without a known size: more than half of the body is what gives it away
    warnings = plausibility_warnings(whole, image.array, image.affine, {1: "organ"}, body=body)
    assert len(warnings) == 1 and "more than half of the body" in warnings[0], warnings
