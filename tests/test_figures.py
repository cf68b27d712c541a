"""figure.png is drawn the radiological way, as napari shows this plugin's layers."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from maesil_core.data.io import load_labels, load_volume
from maesil_core.figures import orthogonal_slices, reconstruction_figure


def _ras(vol) -> np.ndarray:
    return nib.orientations.apply_orientation(
        vol.array, nib.orientations.io_orientation(vol.affine)
    )


def test_liver_on_the_screen_left_and_slices_equal_napari(shared_data, tmp_path):
    """abdomen_ct: the liver (patient's right) lands on the left of the axial and coronal
    views, and the axial view is exactly the slice napari shows for the same layer."""
    from napari_maesil._geometry import volume_to_layer  # no Qt: the plugin's geometry

    folder = shared_data / "abdomen_ct"
    ct = load_volume(folder / "ct.nii.gz")
    labels = load_labels(folder / "labels.nii.gz", ct)
    liver = _ras(labels) == 5
    center = tuple(int(round(c)) for c in np.argwhere(liver).mean(0))
    axial, coronal, sagittal = orthogonal_slices(liver, center)
    for view in (axial, coronal):
        cols = np.nonzero(view)[1]
        assert cols.size and cols.mean() < 0.4 * view.shape[1], "liver not on the screen's left"
    # sagittal: anterior on the left, head at the top; the spine (vertebrae) lies posterior
    spine = np.isin(_ras(labels), list(range(26, 51)))  # vertebrae S1..C1
    sag = orthogonal_slices(spine, (int(np.argwhere(spine).mean(0)[0]), 0, 0))[2]
    assert np.nonzero(sag)[1].mean() > 0.5 * sag.shape[1], "spine not on the screen's right"

    data, _, _ = volume_to_layer(np.asarray(ct.array), ct.affine)  # napari (z, y, x) of LPS
    ras_ct = _ras(ct)
    z = center[2]  # RAS and LPS share the S axis
    np.testing.assert_array_equal(orthogonal_slices(ras_ct, center)[0], data[z])

    out = reconstruction_figure(tmp_path / "figure.png", {"CT": ct.array}, ct.affine, center=center)
    assert out.stat().st_size > 1000
