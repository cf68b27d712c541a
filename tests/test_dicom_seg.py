"""DICOM-SEG output on the real DICOM series (dicom_ct) and its real organ labels."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest

from maesil_core.data.io import load_labels, load_volume, read_label_names
from maesil_core.errors import DataError
from maesil_core.interop.dicom_seg import read_dicom_seg, save_dicom_seg

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def series(shared_data):
    """The DICOM series and its TotalSegmentator labels, resampled onto the series' grid."""
    vol = load_volume(shared_data / "dicom_ct")
    lab = load_labels(
        shared_data / "dicom_ct_labels" / "labels.nii.gz", reference=vol, resample=True
    )
    names = read_label_names(shared_data / "dicom_ct_labels")
    return shared_data / "dicom_ct", vol, lab.array, names


def test_dicom_seg_round_trips_through_pydicom_with_the_nifti_voxels(series, tmp_path):
    folder, vol, labels, names = series
    from maesil_core.segmentation import Segmentation

    keep = {5: names[5], 1: names[1], 6: names[6], 52: names[52]}  # liver, spleen, stomach, aorta
    labels = np.where(np.isin(labels, list(keep)), labels, 0)
    nifti, _ = Segmentation(labels, vol.affine, keep, source=str(folder)).save(
        tmp_path / "s.nii.gz"
    )
    with pytest.warns(UserWarning, match="anonymised"):  # this series lost its Study/Series UIDs
        path = save_dicom_seg(tmp_path / "seg.dcm", labels, vol.affine, keep, folder)

    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SOPClassUID == SEG_STORAGE
    assert ds.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["spleen", "liver", "stomach", "aorta"]
    codes = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0] for s in ds.SegmentSequence}
    assert codes["liver"].CodeValue == "10200004" and codes["liver"].CodingSchemeDesignator == "SCT"
    # every frame points at a slice of the source series (its SOP Instance UID)
    source_uids = {
        str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
        for f in folder.iterdir()
    }
    for fg in ds.PerFrameFunctionalGroupsSequence:
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert str(ref) in source_uids
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced <= source_uids

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        back, segment_names = read_dicom_seg(path, folder)  # pydicom only
    ref = np.asarray(nib.load(nifti).dataobj)
    ids = {number: cid for cid, number in zip(sorted(keep), range(1, 5))}
    assert segment_names == {n: keep[c] for n, c in ids.items()}
    lut = np.zeros(5, dtype=np.int64)
    for number, cid in ids.items():
        lut[number] = cid
    assert (lut[back] == ref).all()
    assert (ref > 0).sum() > 50_000  # real organs, not an empty map


def test_dicom_seg_refuses_what_it_cannot_reference(series, shared_data, tmp_path):
    folder, vol, labels, names = series
    with pytest.raises(DataError, match="not a DICOM series folder"):
        save_dicom_seg(
            tmp_path / "a.dcm", labels, vol.affine, names, shared_data / "abdomen_ct" / "ct.nii.gz"
        )
    shifted = vol.affine.copy()
    shifted[:3, 3] += 5.0
    with pytest.raises(DataError, match="not on the voxel grid"):
        save_dicom_seg(tmp_path / "b.dcm", labels, shifted, names, folder)
    with pytest.raises(DataError, match="shape"):
        save_dicom_seg(tmp_path / "c.dcm", labels[:, :, :10], vol.affine, names, folder)
    with pytest.raises(DataError, match="empty"):
        save_dicom_seg(tmp_path / "d.dcm", np.zeros_like(labels), vol.affine, names, folder)
    (tmp_path / "e.dcm").write_bytes(b"x")
    with pytest.raises(DataError, match="exists"):
        save_dicom_seg(tmp_path / "e.dcm", labels, vol.affine, names, folder)
    assert (tmp_path / "e.dcm").read_bytes() == b"x"
