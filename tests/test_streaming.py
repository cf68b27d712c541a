"""The full-size paths (issue 13, item 3) compute what the whole-volume ones did: slab-by-slab
resampling back onto the input's grid equals MONAI's inverse transforms, and Dice / HD95 from
index maps (no one-hot) equal MONAI's metrics on one-hots, on real CT and real labels."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from maesil_core.config import preset
from maesil_core.data import inference_transforms, invert_to_input, load_labels, load_volume
from maesil_core.data.inverse import to_input_grid
from maesil_core.segmentation.evaluate import dice_scores, hd95_scores


@pytest.mark.parametrize("scan", ["abdomen_ct/ct.nii.gz", "dicom_ct", "chest_ct/ct.nii.gz"])
def test_slab_resampling_back_to_the_input_grid_equals_monais_inverse(scan, shared_data):
    """abdomen_ct (RAS, 3 mm), the DICOM series (LPS, 512 x 512) and chest_ct (0.6 x 0.6 x
    5 mm): linear values to float precision, nearest labels identical."""
    vol = load_volume(shared_data / scan)
    transform = inference_transforms(preset("smoke").data)
    sample = transform({"image": vol})
    grid = np.asarray(sample["image"])[0]  # (D, H, W) on the model grid
    assert grid.shape != vol.array.shape or scan.startswith("abdomen")
    ref = np.asarray(invert_to_input(torch.as_tensor(grid)[None], sample, transform))[0]
    ours = to_input_grid(grid, sample, vol)
    assert ours.shape == vol.array.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-4
    index = (grid > np.median(grid)).astype(np.uint8) + (grid > np.percentile(grid, 90))
    ref_n = invert_to_input(torch.as_tensor(index).float()[None], sample, transform, nearest=True)
    ours_n = to_input_grid(index, sample, vol, nearest=True)
    assert ours_n.dtype == np.uint8  # one byte a voxel all the way
    assert np.array_equal(ours_n, np.rint(np.asarray(ref_n)[0]).astype(np.uint8))


def test_dice_and_hd95_from_index_maps_equal_monais_on_one_hots(shared_data):
    """Reference: the real abdomen labels (liver 1, spleen 2 after mapping); prediction: the
    same shifted by two voxels with the spleen dropped from a slab, and a class absent from
    both (NaN) and one absent from the prediction only (Dice 0, HD95 NaN)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    lab = load_labels(shared_data / "abdomen_ct" / "labels.nii.gz").array
    ref = np.zeros(lab.shape, np.uint8)
    ref[lab == 5], ref[lab == 1] = 1, 2  # liver, spleen (label_names.json)
    ref[:4, :4, :4] = 3  # a small third class the prediction misses
    pred = np.roll(ref, 2, axis=0)
    pred[pred == 3] = 0
    pred[:, :, 10:14][pred[:, :, 10:14] == 2] = 0
    k = 4  # class 4 is in neither map
    ours = dice_scores(torch.as_tensor(pred), torch.as_tensor(ref), k).numpy()
    p = one_hot(torch.as_tensor(pred)[None, None].long(), k + 1)
    t = one_hot(torch.as_tensor(ref)[None, None].long(), k + 1)
    theirs = compute_dice(p, t, include_background=False, ignore_empty=True)[0].numpy()
    assert np.allclose(ours, theirs, equal_nan=True, atol=1e-6)
    assert 0.5 < ours[0] < 1 and ours[2] == 0 and np.isnan(ours[3])
    spacing = [3.0, 3.0, 3.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd_theirs = compute_hausdorff_distance(
            p, t, include_background=False, percentile=95, spacing=spacing
        )[0].numpy()
    hd_ours = np.array(hd95_scores(pred, ref, k, spacing))
    assert np.allclose(hd_ours[:2], hd_theirs[:2], atol=1e-4) and hd_ours[0] > 0
    assert np.isnan(hd_ours[2]) and np.isnan(hd_ours[3])


def test_reconstruction_outputs_are_int16_hu_with_the_interpolation_reference(
    tiny_runs, shared_data, tmp_path
):
    """abdomen_ct (int16 HU): reconstruction / masked in int16 HU on the input's grid, the
    visible voxels the input itself, the hidden ones the model's prediction inside the window;
    the error map back to 1/255 of its range from its uint8 file; the five files together at
    most 2.5 x the input file; the interpolation reference equal to metrics.fill_from_visible
    on the hidden voxels."""
    import nibabel as nib

    from maesil_core import api

    ct = shared_data / "abdomen_ct" / "ct.nii.gz"
    result = api.reconstruct(tiny_runs["pretrain"], ct, threads=1)
    assert result.units == "HU"
    from maesil_core.checkpoint import load_checkpoint

    low, high = load_checkpoint(tiny_runs["pretrain"]).config.data.window()
    image = np.clip(np.asarray(nib.load(str(ct)).dataobj), low, high)
    hidden = result.mask.astype(bool)
    assert result.reconstruction.dtype == result.masked.dtype == np.int16
    assert 0.5 < hidden.mean() < 0.95
    assert np.array_equal(result.reconstruction[~hidden], np.rint(image[~hidden]))
    assert np.all(result.masked[hidden] == low)
    pred = result.reconstruction[hidden]
    assert pred.min() >= low and pred.max() <= high and pred.std() > 10
    written = result.save(tmp_path / "r")
    back = {k: np.asarray(nib.load(str(p)).dataobj) for k, p in written.items()}
    assert np.array_equal(back["reconstruction"], result.reconstruction)
    err = nib.load(str(written["error"])).get_fdata()
    step = float(result.error.max()) / 255
    assert np.abs(err - result.error).max() <= step / 2 + 1e-3
    assert set(written) == set(api.Reconstruction.FILES)
    assert np.array_equal(back["interpolation"], result.interpolation)
    total = sum(p.stat().st_size for p in written.values())
    assert total <= 2.5 * ct.stat().st_size, (total, ct.stat().st_size)

    # the interpolation reference: the input where the model saw it; where hidden, exactly
    # metrics.fill_from_visible (sigma half a patch, per superpatch) on the model grid,
    # which for abdomen_ct (RAS, 3 mm) under the smoke preset is the input's own grid
    from maesil_core.metrics import fill_from_visible

    cfg = load_checkpoint(tiny_runs["pretrain"]).config
    sample = inference_transforms(cfg.data)({"image": load_volume(ct)})
    unit = np.asarray(sample["image"])[0]
    assert unit.shape == hidden.shape
    sigma = [p / 2 for p in cfg.model.patch]
    fill = fill_from_visible(unit, hidden, sigma, cfg.model.superpatch)
    expected = np.rint(np.clip(low + fill[hidden] * (high - low), low, high))
    ref = result.interpolation
    assert ref.dtype == np.int16 and np.array_equal(ref[~hidden], np.rint(image[~hidden]))
    diff = np.abs(ref[hidden] - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    assert not np.array_equal(ref[hidden], result.reconstruction[hidden])
