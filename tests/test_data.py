"""Tests of maesil_core.data on the real CT in ../shared/data (see its README.md)."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.affines import apply_affine

from maesil_core.config import DataConfig, preset
from maesil_core.data import (
    ORGANS,
    PUBLIC_CT,
    Volume,
    check_inputs,
    fetch,
    inference_transforms,
    infinite,
    invert_to_input,
    load_labels,
    load_volume,
    make_phantom,
    make_pretrain_loader,
    read_label_names,
    resample_labels_to,
    resolve_inputs,
    resolve_pairs,
    save_volume,
    write_phantom,
)
from maesil_core.data import download as download_mod
from maesil_core.data.phantom import ORGAN_HU
from maesil_core.data.transforms import DataCompose, augment_transforms
from maesil_core.errors import DataError

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def abdomen(shared_data) -> Volume:
    return load_volume(shared_data / "abdomen_ct" / "ct.nii.gz")


@pytest.fixture(scope="module")
def dicom(shared_data) -> Volume:
    return load_volume(shared_data / "dicom_ct")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- reading


def test_read_abdomen(abdomen, shared_data):
    assert abdomen.array.shape == (122, 101, 30)
    assert abdomen.array.dtype == np.float32
    assert abdomen.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert nib.aff2axcodes(abdomen.affine) == ("R", "A", "S")
    assert abdomen.array.min() == -1100 and abdomen.array.max() == 1207
    assert abdomen.is_hu
    assert abdomen.name == "ct"
    assert abdomen.path == str(shared_data / "abdomen_ct" / "ct.nii.gz")


def test_read_chest_lps(shared_data):
    v = load_volume(shared_data / "chest_ct" / "ct.nii.gz")
    assert v.array.shape == (512, 512, 61)
    assert v.spacing == pytest.approx((0.627, 0.627, 5.0), abs=1e-3)
    assert nib.aff2axcodes(v.affine) == ("L", "P", "S")
    assert v.array.min() == -1024 and v.array.max() == 1671
    assert v.is_hu


def test_head_ct_is_not_hu(shared_data):
    v = load_volume(shared_data / "head_ct" / "ct_not_hu.nii.gz")
    assert v.array.shape == (175, 248, 58)
    assert not v.is_hu
    assert v.array.min() >= 0 and v.array.max() <= 255


def test_dicom_series_geometry_and_hu(dicom, shared_data):
    import pydicom

    assert dicom.array.shape == (512, 512, 20)
    assert dicom.spacing == pytest.approx((0.9766, 0.9766, 2.0), abs=1e-3)
    assert nib.aff2axcodes(dicom.affine) == ("L", "P", "S")
    assert dicom.is_hu
    assert -1100 < dicom.array.min() <= -1000 and 1000 < dicom.array.max() < 3100
    # slices sorted along the normal: voxel (0, 0, 0) is the lowest slice's first pixel,
    # its DICOM (LPS) position with x and y negated
    headers = [
        pydicom.dcmread(str(f), stop_before_pixels=True)
        for f in sorted((shared_data / "dicom_ct").iterdir())
    ]
    lowest = min(headers, key=lambda h: float(h.ImagePositionPatient[2]))
    lx, ly, lz = (float(v) for v in lowest.ImagePositionPatient)
    np.testing.assert_allclose(dicom.affine[:3, 3], [-lx, -ly, lz], atol=1e-3)
    assert dicom.affine[2, 2] == pytest.approx(2.0)


def test_dicom_labels_resampled_by_world_coordinates(dicom, shared_data):
    """dicom_ct_labels is LAS while the series reads as LPS: only world coordinates align."""
    labels = load_labels(shared_data / "dicom_ct_labels" / "labels.nii.gz")
    assert labels.array.dtype == np.uint8  # the file's own integer type: 1 byte a voxel
    assert nib.aff2axcodes(labels.affine) == ("L", "A", "S")
    with pytest.raises(DataError, match="orientation LAS vs LPS") as exc:
        load_labels(shared_data / "dicom_ct_labels" / "labels.nii.gz", reference=dicom)
    _one_line(exc)

    res = resample_labels_to(labels, dicom)
    assert res.shape == dicom.array.shape
    names = read_label_names(shared_data / "dicom_ct_labels")
    assert names[5] == "liver" and names[1] == "spleen"
    for label in (5, 1):  # liver, spleen: soft tissue (contrast CT) 40..200 HU
        hu = dicom.array[res == label]
        assert hu.size > 10_000
        assert np.mean((hu > 40) & (hu < 200)) > 0.9
    # the naive array-order overlay is wrong (spleen lands mostly outside soft tissue)
    naive = dicom.array[labels.array == 1]
    assert np.mean((naive > 40) & (naive < 200)) < 0.5
    # liver centroid in world coordinates is the same in both grids
    c_lab = apply_affine(labels.affine, np.argwhere(labels.array == 5).mean(0))
    c_res = apply_affine(dicom.affine, np.argwhere(res == 5).mean(0))
    np.testing.assert_allclose(c_lab, c_res, atol=1.0)

    same = load_labels(
        shared_data / "dicom_ct_labels" / "labels.nii.gz", reference=dicom, resample=True
    )
    np.testing.assert_array_equal(same.array, res)


def test_labels_with_matching_reference(abdomen, shared_data):
    labels = load_labels(shared_data / "abdomen_ct" / "labels.nii.gz", reference=abdomen)
    assert labels.array.shape == abdomen.array.shape
    liver = abdomen.array[labels.array == 5]
    assert 40 < np.median(liver) < 200
    names = read_label_names(shared_data / "abdomen_ct" / "labels.nii.gz")
    assert names == read_label_names(shared_data / "abdomen_ct" / "label_names.json")
    assert names[5] == "liver" and len(names) == 117
    with pytest.raises(DataError, match="shape"):
        load_labels(shared_data / "chest_ct" / "labels.nii.gz", reference=abdomen)


# --------------------------------------------------------------------------- bad inputs


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "does not exist"),
        ("empty_dir", "empty folder"),
        ("dir_without_dicom", "no DICOM"),
        ("text_as_nifti", "not a valid NIfTI"),
        ("truncated", "truncated or corrupt"),
        ("2d", "2D image"),
        ("3d_flat", "2D image"),
        ("4d_two_channels", "several channels"),
        ("nan", "contains 7 NaN voxels"),
        ("inf", "infinite voxels"),
        ("unknown_suffix", "not a supported image file"),
    ],
)
def test_bad_inputs_raise_dataerror(case, match, tmp_path, shared_data):
    p = tmp_path / "scan.nii.gz"
    if case == "missing":
        p = tmp_path / "nope.nii.gz"
    elif case == "empty_dir":
        p = tmp_path / "empty"
        p.mkdir()
    elif case == "dir_without_dicom":
        p = tmp_path / "notes"
        p.mkdir()
        (p / "readme.txt").write_text("not an image\n")
    elif case == "text_as_nifti":
        p.write_text("this is not an image\n" * 20)
    elif case == "truncated":
        data = (shared_data / "abdomen_ct" / "ct.nii.gz").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "2d":
        _nifti(p, np.zeros((64, 64), np.int16))
    elif case == "3d_flat":
        _nifti(p, np.zeros((64, 64, 1), np.int16))
    elif case == "4d_two_channels":
        _nifti(p, np.zeros((16, 16, 16, 2), np.int16))
    elif case == "nan":
        a = np.zeros((16, 16, 16), np.float32)
        a.flat[:7] = np.nan
        _nifti(p, a)
    elif case == "inf":
        a = np.zeros((16, 16, 16), np.float32)
        a[0, 0, 0] = np.inf
        _nifti(p, a)
    elif case == "unknown_suffix":
        p = tmp_path / "scan.png"
        p.write_bytes(b"\x89PNG....")
    with pytest.raises(DataError, match=match) as exc:
        load_volume(p)
    assert str(p) in _one_line(exc)


def test_truncated_gzip_variants(tmp_path, shared_data):
    """Cut points inside the header, early and late in the data all give a DataError."""
    data = (shared_data / "abdomen_ct" / "ct.nii.gz").read_bytes()
    for frac in (0.001, 0.1, 0.9, 0.999):
        p = tmp_path / f"cut{frac}.nii.gz"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(DataError):
            load_volume(p)
    bad = bytearray(gzip.compress(b"\x00" * 1000))
    bad[20:30] = b"\xff" * 10
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(DataError):
        load_volume(tmp_path / "corrupt.nii.gz")


def test_nrrd_without_pynrrd_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nrrd", None)  # as if pynrrd were not installed
    p = tmp_path / "scan.nrrd"
    p.write_bytes(b"NRRD0004\n")
    with pytest.raises(DataError, match="pip install pynrrd"):
        load_volume(p)


def test_single_channel_4d_is_squeezed(tmp_path):
    ct = np.random.default_rng(0).integers(-1000, 1000, (8, 9, 10, 1), dtype=np.int16)
    p = _nifti(tmp_path / "c1.nii.gz", ct)
    assert load_volume(p).array.shape == (8, 9, 10)


def test_nan_in_transform_chain_names_file(tmp_path, abdomen):
    a = abdomen.array.copy()
    a[10, 10, 10] = np.nan
    p = _nifti(tmp_path / "nan_ct.nii.gz", a)
    cfg = DataConfig(spacing=None, num_workers=0, cache="none")
    loader = make_pretrain_loader([str(p)], cfg, (32, 32, 32), 4)
    with pytest.raises(DataError, match="nan_ct.nii.gz contains 1 NaN"):
        next(iter(loader))
    # with the memory cache the file is loaded, and refused, when the loader is built
    cfg.cache = "memory"
    with pytest.raises(DataError, match="nan_ct.nii.gz contains 1 NaN"):
        make_pretrain_loader([str(p)], cfg, (32, 32, 32), 4)
    with pytest.raises(DataError, match="nan_ct.nii.gz contains 1 NaN"):
        inference_transforms(cfg)({"image": str(p)})


def test_check_inputs(tmp_path, shared_data):
    good = [str(shared_data / "abdomen_ct" / "ct.nii.gz"), str(shared_data / "dicom_ct")]
    assert check_inputs(good) == good
    flat = _nifti(tmp_path / "flat.nii.gz", np.zeros((32, 32), np.int16))
    with pytest.raises(DataError, match="flat.nii.gz is a 2D image"):
        check_inputs([*good, str(flat)])
    junk = tmp_path / "junk.nii.gz"
    junk.write_text("hello")
    with pytest.raises(DataError, match="junk.nii.gz is not a readable NIfTI"):
        check_inputs([str(junk)])
    with pytest.raises(DataError, match="does not exist"):
        check_inputs([str(tmp_path / "gone.nii")])


# --------------------------------------------------------------------------- writing


def test_save_volume_roundtrip_atomic_and_no_overwrite(tmp_path, abdomen):
    out = tmp_path / "sub" / "copy.nii.gz"
    assert save_volume(abdomen.array, abdomen.affine, out, dtype=np.int16) == out
    back = load_volume(out)
    np.testing.assert_array_equal(back.array, abdomen.array)
    np.testing.assert_allclose(back.affine, abdomen.affine, atol=1e-4)
    assert nib.load(str(out)).get_data_dtype() == np.int16
    before = out.read_bytes()
    with pytest.raises(DataError, match="exists; pass --force / overwrite=True") as exc:
        save_volume(np.zeros((4, 4, 4)), np.eye(4), out)
    _one_line(exc)
    assert out.read_bytes() == before
    save_volume(np.ones((4, 4, 4), np.float32), np.eye(4), out, overwrite=True)
    assert nib.load(str(out)).shape == (4, 4, 4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.nii.gz"]  # no temp left
    with pytest.raises(DataError, match=r"\.nii"):
        save_volume(np.zeros((4, 4, 4)), np.eye(4), tmp_path / "x.png")


def test_save_volume_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_volume(np.zeros((4, 4, 4)), np.eye(4), tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- resolving


def test_resolve_inputs_folder_skips_labels_and_counts_dicom_once(shared_data):
    found = resolve_inputs([shared_data])
    assert found == [
        str(shared_data / "abdomen_ct" / "ct.nii.gz"),
        str(shared_data / "chest_ct" / "ct.nii.gz"),
        str(shared_data / "dicom_ct"),
        str(shared_data / "head_ct" / "ct_not_hu.nii.gz"),
    ]
    assert resolve_inputs(shared_data / "dicom_ct") == [str(shared_data / "dicom_ct")]
    # a single DICOM file stands for its series
    one = next((shared_data / "dicom_ct").iterdir())
    assert resolve_inputs([one]) == [str(shared_data / "dicom_ct")]


def test_resolve_inputs_folder_of_dicom_series(tmp_path, shared_data):
    root = tmp_path / "series"
    root.mkdir()
    for name in ("a", "b"):
        os.symlink(shared_data / "dicom_ct", root / name, target_is_directory=True)
    found = resolve_inputs([root])
    assert [Path(f).name for f in found] == ["dicom_ct"]  # both links are the same folder
    assert len(resolve_inputs([root / "a", root / "b"])) == 1


def test_resolve_inputs_glob_txt_json(tmp_path, shared_data):
    ab = str(shared_data / "abdomen_ct" / "ct.nii.gz")
    chest = str(shared_data / "chest_ct" / "ct.nii.gz")
    head = str(shared_data / "head_ct" / "ct_not_hu.nii.gz")
    assert resolve_inputs([str(shared_data / "*" / "ct.nii.gz")]) == [ab, chest]
    assert resolve_inputs([str(shared_data / "**" / "*.nii.gz")]) == [ab, chest, head]

    link = tmp_path / "data"
    os.symlink(shared_data, link, target_is_directory=True)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# my scans\ndata/abdomen_ct/ct.nii.gz\n\n{chest}  # absolute\ndata/dicom_ct\n")
    found = resolve_inputs([lst])
    assert [Path(f).name for f in found] == ["ct.nii.gz", "ct.nii.gz", "dicom_ct"]
    assert found[1] == chest

    ds = tmp_path / "dataset.json"
    ds.write_text(
        json.dumps(
            {
                "name": "test",
                "training": [
                    {"image": "data/abdomen_ct/ct.nii.gz", "label": "data/abdomen_ct/labels.nii.gz"}
                ],
                "test": ["data/head_ct/ct_not_hu.nii.gz"],
            }
        )
    )
    assert [Path(f).name for f in resolve_inputs([ds])] == ["ct.nii.gz", "ct_not_hu.nii.gz"]
    pairs = resolve_pairs([ds])
    assert len(pairs) == 1 and pairs[0]["label"].endswith("abdomen_ct/labels.nii.gz")


def test_resolve_inputs_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist") as exc:
        resolve_inputs([tmp_path / "missing.nii.gz"])
    _one_line(exc)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CT files found in .*empty; give .nii/.nii.gz files"):
        resolve_inputs([tmp_path / "empty"])
    with pytest.raises(DataError, match="no CT files found in the pattern"):
        resolve_inputs([str(tmp_path / "*.nii.gz")])
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="not a CT file"):
        resolve_inputs([tmp_path / "notes.csv"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not an MSD-style"):
        resolve_inputs([tmp_path / "bad.json"])


def test_resolve_pairs(tmp_path, shared_data):
    imgs = tmp_path / "imagesTr"
    labs = tmp_path / "labelsTr"
    imgs.mkdir()
    labs.mkdir()
    for name in ("abdomen", "chest"):
        os.symlink(shared_data / f"{name}_ct" / "ct.nii.gz", imgs / f"{name}.nii.gz")
        os.symlink(shared_data / f"{name}_ct" / "labels.nii.gz", labs / f"{name}.nii.gz")
    pairs = resolve_pairs([imgs], [labs])
    assert [(Path(p["image"]).name, Path(p["label"]).name) for p in pairs] == [
        ("abdomen.nii.gz", "abdomen.nii.gz"),
        ("chest.nii.gz", "chest.nii.gz"),
    ]
    # the links' names pair them, their targets are what is read
    assert Path(pairs[0]["image"]).resolve() == shared_data / "abdomen_ct" / "ct.nii.gz"
    assert Path(pairs[0]["label"]).resolve() == shared_data / "abdomen_ct" / "labels.nii.gz"
    # labelsTr is skipped when scanning the parent folder for images
    assert len(resolve_inputs([tmp_path])) == 2
    # one label map for two images: the one without names the other's
    with pytest.raises(DataError, match=r"no label map found for .*abdomen\.nii\.gz") as exc:
        resolve_pairs([imgs], [labs / "chest.nii.gz"])
    _one_line(exc)
    with pytest.raises(DataError, match="needs label maps"):
        resolve_pairs([imgs])


def test_resolve_pairs_labels_beside_the_images_in_one_folder(shared_data):
    """Issue 17: ``--images abdomen_ct/ --labels abdomen_ct/`` counted ct.nii.gz as a label
    map ("found 1 images but 2 label maps"); ct.nii.gz / labels.nii.gz in one folder pair."""
    folder = shared_data / "abdomen_ct"
    pairs = resolve_pairs([folder], [folder])
    assert pairs == [{"image": str(folder / "ct.nii.gz"), "label": str(folder / "labels.nii.gz")}]
    # a DICOM series and the folder of its labels (dicom_ct <-> dicom_ct_labels/labels.nii.gz)
    pairs = resolve_pairs([shared_data / "dicom_ct"], [shared_data / "dicom_ct_labels"])
    assert pairs[0]["label"] == str(shared_data / "dicom_ct_labels" / "labels.nii.gz")
    # two case folders at once, labels given in the other order: paired by name, not order
    pairs = resolve_pairs(
        [shared_data / "dicom_ct", folder / "ct.nii.gz"],
        [folder / "labels.nii.gz", shared_data / "dicom_ct_labels"],
    )
    assert [Path(p["label"]).parent.name for p in pairs] == ["dicom_ct_labels", "abdomen_ct"]
    # the images alone, given as the labels too: the message names what it found
    with pytest.raises(DataError, match=r"no label maps found .*only the images .*ct\.nii\.gz"):
        resolve_pairs([folder / "ct.nii.gz"], [folder / "ct.nii.gz"])


def test_resolve_pairs_by_name_seg_labels_and_nnunet(tmp_path, shared_data):
    """``case`` <-> ``case_seg`` / ``case_labels`` in one folder, nnU-Net's
    ``imagesTr/case_0000`` <-> ``labelsTr/case``; unpaired files are named in the error."""
    both = tmp_path / "both"
    both.mkdir()
    for name, suffix in (("abdomen", "_seg"), ("chest", "_labels")):
        os.symlink(shared_data / f"{name}_ct" / "ct.nii.gz", both / f"{name}.nii.gz")
        os.symlink(shared_data / f"{name}_ct" / "labels.nii.gz", both / f"{name}{suffix}.nii.gz")
    pairs = resolve_pairs([both], [both])
    assert [(Path(p["image"]).name, Path(p["label"]).name) for p in pairs] == [
        ("abdomen.nii.gz", "abdomen_seg.nii.gz"),
        ("chest.nii.gz", "chest_labels.nii.gz"),
    ]
    nn = tmp_path / "Dataset001"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    for name in ("abdomen", "chest"):
        os.symlink(
            shared_data / f"{name}_ct" / "ct.nii.gz", nn / "imagesTr" / f"{name}_0000.nii.gz"
        )
        os.symlink(shared_data / f"{name}_ct" / "labels.nii.gz", nn / "labelsTr" / f"{name}.nii.gz")
    pairs = resolve_pairs([nn / "imagesTr"], [nn / "labelsTr"])
    assert [(Path(p["image"]).name, Path(p["label"]).name) for p in pairs] == [
        ("abdomen_0000.nii.gz", "abdomen.nii.gz"),
        ("chest_0000.nii.gz", "chest.nii.gz"),
    ]
    # a label map that names no image: both leftovers are in the one-line message
    os.rename(nn / "labelsTr" / "chest.nii.gz", nn / "labelsTr" / "thorax.nii.gz")
    with pytest.raises(DataError, match=r"chest_0000\.nii\.gz .*left over: .*thorax\.nii\.gz"):
        resolve_pairs([nn / "imagesTr"], [nn / "labelsTr"])
    # no name in common and different counts: every file is listed
    with pytest.raises(DataError, match=r"found 2 images \(.*abdomen_0000.*\) but 1 label maps"):
        resolve_pairs([nn / "imagesTr"], [shared_data / "dicom_ct_labels"])


# --------------------------------------------------------------------------- transforms


def test_auto_intensity_warns_for_non_hu(shared_data):
    path = str(shared_data / "head_ct" / "ct_not_hu.nii.gz")
    cfg = DataConfig(spacing=None, intensity="auto")
    with pytest.warns(UserWarning, match="does not look like CT in Hounsfield units"):
        out = inference_transforms(cfg)({"image": path})["image"]
    assert out.meta["intensity"] == "percentile"
    assert out.shape == (1, 175, 248, 58)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert 0.005 < float((out == 1.0).float().mean()) < 0.02  # the top 0.5 % clipped
    # HU scans choose "hu" without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        ab = inference_transforms(cfg)({"image": str(shared_data / "abdomen_ct" / "ct.nii.gz")})
    assert ab["image"].meta["intensity"] == "hu"


def test_inference_transforms_invert_to_input(shared_data):
    """chest_ct is LPS and anisotropic; taken at every other voxel in-plane for speed."""
    full = load_volume(shared_data / "chest_ct" / "ct.nii.gz")
    affine = full.affine.copy()
    affine[:3, :2] *= 2
    vol = Volume(full.array[::2, ::2].copy(), affine, full.path, True)  # 256x256x61 LPS
    low, high = DataConfig().window()
    expected = np.clip((vol.array - low) / (high - low), 0, 1)

    # spacing None: only the LPS -> RAS flip, inverted exactly
    tr = inference_transforms(DataConfig(spacing=None, intensity="hu"))
    data = tr({"image": vol})
    img = data["image"]
    assert nib.aff2axcodes(img.affine.numpy()) == ("R", "A", "S")
    back = invert_to_input(img, data, tr)
    assert back.shape == (1, 256, 256, 61)
    np.testing.assert_array_equal(back[0].numpy(), expected)

    # resampling to 2 mm isotropic and back: same grid, values close
    tr = inference_transforms(DataConfig(spacing=(2.0, 2.0, 2.0), intensity="hu"))
    data = tr({"image": vol})
    img = data["image"]
    assert img.shape[1:] == (161, 161, 151)
    assert np.allclose(np.linalg.norm(img.affine[:3, :3].numpy(), axis=0), 2.0)
    back = invert_to_input(img, data, tr)
    assert back.shape == (1, 256, 256, 61)
    np.testing.assert_allclose(back.affine.numpy(), vol.affine, atol=1e-4)
    diff = np.abs(back[0].numpy() - expected)
    assert diff.mean() < 0.02
    assert np.corrcoef(back[0].numpy().ravel(), expected.ravel())[0, 1] > 0.98
    # the other accepted call forms give the same result
    np.testing.assert_array_equal(invert_to_input(img, tr).numpy(), back.numpy())
    np.testing.assert_array_equal(
        invert_to_input({**data, "pred": img.clone()}, tr).numpy(), back.numpy()
    )
    # a plain tensor prediction (what a model returns) and a label-like one (nearest)
    plain = torch.as_tensor(np.asarray(img))
    assert type(plain) is torch.Tensor
    np.testing.assert_array_equal(invert_to_input(plain, data, tr).numpy(), back.numpy())
    mask = (plain > 0.5).float()
    back_mask = invert_to_input(mask, data, tr, nearest=True)
    assert set(np.unique(back_mask.numpy())) <= {0.0, 1.0}


# --------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("cache", ["memory", "none", "disk"])
def test_pretrain_loader_abdomen(cache, shared_data, tmp_path):
    cfg = preset("smoke").data  # 3 mm, 4 crops per volume, no workers
    cfg.cache = cache
    files = resolve_inputs([shared_data / "abdomen_ct" / "ct.nii.gz"])
    loader = make_pretrain_loader(files, cfg, (32, 32, 32), 4, cache_dir=tmp_path / "cache")
    assert isinstance(loader, torch.utils.data.DataLoader)
    batches = [b for b, _ in zip(infinite(loader), range(3))]
    for b in batches:
        x = b["image"]
        assert x.shape == (4, 1, 32, 32, 32) and x.dtype == torch.float32
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert float(x.std()) > 0.05  # real anatomy, not padding
    assert not torch.equal(batches[0]["image"], batches[1]["image"])  # random crops
    if cache == "disk":
        assert any((tmp_path / "cache").rglob("*.pt"))


def test_pretrain_crops_mark_padding_of_a_thin_scan(shared_data):
    """The DICOM series is 20 slices x 2 mm: at 2 mm a 32^3 superpatch needs 12+ slices of
    padding. ``valid`` marks exactly those, and the image holds 0 (air) there."""
    cfg = DataConfig(spacing=(2.0, 2.0, 2.0), crops_per_volume=4, num_workers=0)
    loader = make_pretrain_loader([shared_data / "dicom_ct"], cfg, (32, 32, 32), 4, seed=2)
    batch = next(infinite(loader))
    x, valid = batch["image"], batch["valid"]
    assert valid.shape == x.shape == (4, 1, 32, 32, 32) and valid.dtype == torch.bool
    valid = valid.float()
    assert set(torch.unique(valid).tolist()) == {0.0, 1.0}
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.all(x[valid == 0] == 0)
    # padding is whole axial planes (W is the S axis in RAS): the scan's 20 slices are kept
    per_plane = valid.mean(dim=(1, 2, 3))  # (B, W)
    assert set(torch.unique(per_plane).tolist()) == {0.0, 1.0}
    assert torch.all(per_plane.sum(-1) == 20)
    assert float(x[valid == 1].std()) > 0.05  # the scan's anatomy

    # a volume larger than the superpatch has no padding anywhere
    cfg3 = DataConfig(spacing=(3.0, 3.0, 3.0), crops_per_volume=4, num_workers=0)
    files = [shared_data / "abdomen_ct" / "ct.nii.gz"]
    big = next(infinite(make_pretrain_loader(files, cfg3, (16, 16, 16), 4)))
    assert torch.all(big["valid"] == 1)


def test_augmentation_moves_image_and_padding_together():
    """Flips and axial turns act on image and valid alike; the gamma jitter keeps the
    crop's range (air 0, the brightest voxel 1)."""
    image = torch.linspace(0.0, 1.0, 16**3).reshape(1, 16, 16, 16)  # a unique brightest voxel
    valid = torch.ones_like(image)
    valid[:, :3, :5, :] = 0.0  # an asymmetric padded corner
    image = image * valid
    chain = DataCompose(augment_transforms((16, 16, 16)))
    chain.set_random_state(seed=0)
    where_brightest, jittered = set(), 0
    for _ in range(60):
        out = chain({"image": image.clone(), "valid": valid.clone()})
        x, v = torch.as_tensor(out["image"]), torch.as_tensor(out["valid"])
        assert torch.equal(v == 0, x == 0)  # padding (and only padding) went where the image went
        assert float(x.min()) == 0.0 and abs(float(x.max()) - 1.0) < 1e-5
        where_brightest.add(int(x.argmax()))
        jittered += not torch.allclose(x.flatten().sort().values, image.flatten().sort().values)
    assert len(where_brightest) >= 6  # 8 flip combinations x 4 turns reach many corners
    assert 10 < jittered < 50  # contrast changed in about half of the draws


def test_pretrain_loader_batches_across_volumes(tmp_path, shared_data):
    """batch_size 6 with 4 crops per volume: 2 volumes per step, trimmed to 6."""
    ct, _ = write_phantom(tmp_path / "phantom", shape=(64, 64, 48), spacing=(3.0, 3.0, 3.0))
    files = [str(shared_data / "abdomen_ct" / "ct.nii.gz"), str(ct)]
    cfg = DataConfig(spacing=(3.0, 3.0, 3.0), crops_per_volume=4, num_workers=0)
    loader = make_pretrain_loader(files, cfg, (32, 32, 32), 6, seed=1)
    it = infinite(loader)
    for _ in range(3):
        assert next(it)["image"].shape == (6, 1, 32, 32, 32)

    # two ranks split the two volumes; infinite() advances the sampler's epoch
    ranks = [
        make_pretrain_loader(files, cfg, (32, 32, 32), 4, rank=r, world_size=2) for r in (0, 1)
    ]
    sampler = ranks[0].sampler
    assert isinstance(sampler, torch.utils.data.DistributedSampler)
    assert len(ranks[0]) == len(ranks[1]) == 1
    it = infinite(ranks[0])
    next(it)
    next(it)
    assert sampler.epoch == 1


def test_memory_cache_is_cropped_in_place_never_copied_or_modified(shared_data):
    """The cached volumes are not deep-copied per item, and many draws leave them intact.

    24^3 crops of volumes larger than that: no padding, so every crop is a view (a crop
    with padding is a crop-sized copy, see test_pretrain_crops_mark_padding_of_a_thin_scan)."""
    files = [
        str(shared_data / "abdomen_ct" / "ct.nii.gz"),
        str(shared_data / "head_ct" / "ct_not_hu.nii.gz"),
    ]
    # no augmentation either: a flipped crop is a (crop-sized) copy
    cfg = DataConfig(spacing=(3.0, 3.0, 3.0), crops_per_volume=4, num_workers=0, augment=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # head_ct is not in HU
        loader = make_pretrain_loader(files, cfg, (24, 24, 24), 4, seed=3, endless=True)
    dataset = loader.dataset
    cached = [item["image"] for item in dataset._cache]
    before = [
        (x.clone(), x.affine.clone(), len(x.applied_operations), x.untyped_storage().data_ptr())
        for x in cached
    ]
    # an item's crops are views into the cached volume: no copy of the whole volume
    for i, x in enumerate(cached):
        crops = dataset[i]
        assert len(crops) == 4
        base = x.untyped_storage().data_ptr()
        assert all(c["image"].untyped_storage().data_ptr() == base for c in crops)
    # many draws, each batch then scribbled on in place: the cache stays as it was
    seen = set()
    for batch, _ in zip(infinite(loader), range(40)):
        x = batch["image"]
        assert x.shape == (4, 1, 24, 24, 24) and float(x.std()) > 0.05
        seen.add(x.sum().item())
        x.mul_(-1.0).add_(7.0)
    assert len(seen) > 30  # fresh random crops every time
    for x, (data, affine, n_ops, ptr) in zip(dataset._cache, before):
        img = x["image"]
        assert torch.equal(img.as_tensor(), data.as_tensor())
        assert torch.equal(img.affine, affine) and len(img.applied_operations) == n_ops
        assert img.untyped_storage().data_ptr() == ptr


def test_endless_loader_shards_every_pass_like_distributed_sampler(shared_data):
    """endless=True: one never-ending iterator; every pass is the DistributedSampler's epoch."""
    files = [
        str(shared_data / "abdomen_ct" / "ct.nii.gz"),
        str(shared_data / "chest_ct" / "ct.nii.gz"),
        str(shared_data / "dicom_ct"),
    ]
    cfg = DataConfig(spacing=(3.0, 3.0, 3.0), cache="none", num_workers=0)
    loaders = [
        make_pretrain_loader(
            files, cfg, (32, 32, 32), 4, seed=5, rank=r, world_size=2, endless=True
        )
        for r in (0, 1)
    ]
    per_pass = 2  # 3 volumes padded to 4, two per rank
    draws = [list(zip(range(5 * per_pass), iter(lo.sampler))) for lo in loaders]
    for epoch in range(5):
        shard = []
        for rank, drawn in enumerate(draws):
            got = [i for _, i in drawn[epoch * per_pass : (epoch + 1) * per_pass]]
            ref = torch.utils.data.DistributedSampler(
                range(3), num_replicas=2, rank=rank, shuffle=True, seed=5
            )
            ref.set_epoch(epoch)
            assert got == list(ref), (epoch, rank)
            shard += got
        assert set(shard) == {0, 1, 2}  # each pass covers every volume across the ranks
    assert loaders[0].sampler.base.epoch == 4

    # single process, in a loader worker: passes roll on inside one iterator
    cfg = DataConfig(spacing=(3.0, 3.0, 3.0), cache="memory", num_workers=1)
    loader = make_pretrain_loader(files[:1], cfg, (32, 32, 32), 4, seed=1, endless=True)
    batches = infinite(loader)
    got = [next(batches)["image"] for _ in range(4)]  # one volume: a pass per batch
    assert all(b.shape == (4, 1, 32, 32, 32) for b in got)
    assert not torch.equal(got[0], got[1])
    assert loader.sampler.epoch >= 3
    batches.close()


# --------------------------------------------------------------------------- phantom


def test_phantom_organs_and_hu():
    ph = make_phantom(seed=0)
    assert ph.ct.shape == ph.labels.shape == (128, 128, 96)
    assert ph.ct.dtype == np.int16 and ph.labels.dtype == np.uint8
    assert ph.names == ORGANS
    assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
    assert ph.spacing == (2.0, 2.0, 2.5)
    assert set(np.unique(ph.labels)) == {0, *ORGANS}
    assert np.mean(ph.ct[ph.labels == 0] < -900) > 0.99  # air outside
    for label, (low, high) in ORGAN_HU.items():
        hu = ph.ct[ph.labels == label]
        assert hu.size > 1000, ORGANS[label]
        assert np.mean((hu >= low) & (hu <= high)) > 0.85, ORGANS[label]
    assert 40 <= np.median(ph.ct[ph.labels == 2]) <= 80  # liver
    assert np.median(ph.ct[ph.labels == 8]) < -800  # lung

    def centroid(label):
        return np.argwhere(ph.labels == label).mean(0)

    assert centroid(2)[0] > centroid(3)[0]  # liver on the patient's right (+x in RAS)
    assert centroid(5)[0] > centroid(4)[0]  # right kidney right of the left one
    assert centroid(8)[2] > centroid(2)[2] > centroid(4)[2]  # lungs above liver above kidneys
    assert centroid(6)[1] < centroid(7)[1]  # spine posterior of the aorta
    other = make_phantom(seed=1)
    assert not np.array_equal(other.labels, ph.labels)
    np.testing.assert_array_equal(make_phantom(seed=0).ct, ph.ct)


def test_write_phantom(tmp_path, shared_data):
    ct, lab = write_phantom(tmp_path, seed=2, shape=(48, 48, 32))
    vol = load_volume(ct)
    labels = load_labels(lab, reference=vol)
    assert vol.is_hu and vol.array.shape == (48, 48, 32)
    assert set(np.unique(labels.array)) <= {0, *ORGANS}
    names = read_label_names(lab)
    assert names == ORGANS
    # same json layout as the shared data's label_names.json
    shared = json.loads((shared_data / "abdomen_ct" / "label_names.json").read_text())
    mine = json.loads((tmp_path / "label_names.json").read_text())
    assert all(isinstance(k, str) and k.isdigit() for k in [*shared, *mine])
    with pytest.raises(DataError, match="exists"):
        write_phantom(tmp_path)
    write_phantom(tmp_path, shape=(32, 32, 32), overwrite=True)
    assert load_volume(ct).array.shape == (32, 32, 32)


# --------------------------------------------------------------------------- download


@pytest.fixture
def local_server(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1; yields (folder, base_url)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_download_verify_and_cache(local_server, tmp_path, monkeypatch, shared_data):
    www, base = local_server
    name = "totalseg_example_ct"
    entry = dict(PUBLIC_CT[name])
    shutil.copy(shared_data / "abdomen_ct" / "ct.nii.gz", www / "example_ct_sm.nii.gz")
    cache = tmp_path / "cache"
    monkeypatch.setenv("MAESIL_CACHEDIR", str(cache))
    assert download_mod.cache_dir() == cache
    monkeypatch.setitem(PUBLIC_CT, name, {**entry, "url": f"{base}/example_ct_sm.nii.gz"})

    # (a) downloads and verifies (the registry hash is that of the shared copy)
    path = fetch(name)
    assert path == cache / entry["filename"]
    assert load_volume(path).array.shape == (122, 101, 30)

    # (c) a cached file with the right hash is reused without network
    monkeypatch.setitem(PUBLIC_CT, name, {**entry, "url": "http://127.0.0.1:9/unreachable"})
    assert fetch(name) == path

    # (b) a wrong hash is refused (and the bad download not kept)
    monkeypatch.setitem(
        PUBLIC_CT,
        name,
        {**entry, "url": f"{base}/example_ct_sm.nii.gz", "sha256": "0" * 64},
    )
    path.unlink()
    with pytest.raises(DataError, match="does not match") as exc:
        fetch(name)
    _one_line(exc)
    assert not path.exists()


def test_fetch_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MAESIL_CACHEDIR", str(tmp_path))
    name = "totalseg_example_seg"
    entry = PUBLIC_CT[name]
    monkeypatch.setitem(PUBLIC_CT, name, {**entry, "url": "http://127.0.0.1:9/x.nii.gz"})
    with pytest.raises(DataError) as exc:
        fetch(name)
    msg = _one_line(exc)
    assert msg.startswith(f"could not download {name} (")
    assert entry["filename"] in msg and entry["sha256"] in msg and str(tmp_path) in msg
    assert "MAESIL_CACHEDIR" in msg
    with pytest.raises(DataError, match="unknown public CT"):
        fetch("nope")


def test_fill_from_visible_interpolates_real_ct(abdomen_ct):
    """The reference a masked autoencoder must beat: on real CT, interpolating the hidden
    patches from the visible voxels beats filling them with the visible mean, and leaves
    the visible voxels as they are."""
    from maesil_core.data import load_volume
    from maesil_core.metrics import fill_from_visible, fill_with_visible_mean, mse

    vol = load_volume(abdomen_ct).array[:96, :96, :24].astype(np.float64)
    vol = np.clip((vol + 175) / 425, 0, 1)  # abdomen window -> [0, 1]
    rng = np.random.default_rng(0)
    hidden = rng.random((12, 12, 3)) < 0.75  # 8-voxel patches, 75 % hidden
    mask = hidden.repeat(8, 0).repeat(8, 1).repeat(8, 2)
    filled = fill_from_visible(vol, mask, 4.0)
    np.testing.assert_array_equal(filled[~mask], vol[~mask])
    mean_fill = np.full_like(vol, vol[~mask].mean())
    assert mse(filled, vol, mask) < 0.8 * mse(mean_fill, vol, mask)
    assert np.isfinite(filled).all() and filled.min() >= 0 and filled.max() <= 1

    # per tile (as a tiled reconstruction sees it): a tile's fill ignores its neighbours
    other = vol.copy()
    other[48:][~mask[48:]] = 1.0 - other[48:][~mask[48:]]  # change the second tile's visible
    tiles = (48, 96, 24)
    for fill_fn, first_tile_changes in (
        (lambda v: fill_from_visible(v, mask, 4.0, tiles), False),
        (lambda v: fill_from_visible(v, mask, 4.0), True),
    ):
        a, b = fill_fn(vol)[:48], fill_fn(other)[:48]
        assert np.array_equal(a, b) is not first_tile_changes
    tiled = fill_from_visible(vol, mask, 4.0, tiles)
    np.testing.assert_array_equal(tiled[~mask], vol[~mask])
    assert mse(tiled, vol, mask) < 0.8 * mse(mean_fill, vol, mask)

    # the visible-mean fill per tile: each tile's hidden voxels get its own visible mean
    per_tile = fill_with_visible_mean(vol, mask, tiles)
    np.testing.assert_array_equal(per_tile[~mask], vol[~mask])
    for box in (np.s_[:48], np.s_[48:]):
        hidden_values = np.unique(per_tile[box][mask[box]])
        assert hidden_values.size == 1 and hidden_values[0] == vol[box][~mask[box]].mean()
    np.testing.assert_array_equal(fill_with_visible_mean(vol, mask)[mask], mean_fill[mask])


def test_masked_ssim_in_slabs_equals_one_piece_and_the_scores_stop_when_cancelled(abdomen_ct):
    """The explorer's whole-volume scores (a whole CT's SSIM: 15 s; its interpolation
    reference: 4 s) once ran as one uninterruptible step. The masked SSIM now goes by slabs
    of the first axis, each with its neighbours' half window: the same number as the map
    made in one piece (real CT, 122 slices, in slabs of 32, 40 and 121: a remainder thinner
    than the window joins the last slab); a cancel stops it, and the per-tile fill, before the next slab or tile."""
    from skimage.metrics import structural_similarity

    from maesil_core import metrics
    from maesil_core.data import load_volume
    from maesil_core.errors import Cancelled

    vol = np.clip((load_volume(abdomen_ct).array.astype(np.float64) + 175) / 425, 0, 1)
    rng = np.random.default_rng(0)
    pred = np.clip(vol + rng.normal(0, 0.05, vol.shape), 0, 1)
    mask = rng.random(vol.shape) < 0.5
    _, smap = structural_similarity(vol, pred, data_range=1.0, win_size=7, full=True)
    for slab in (32, 40, 121):  # 122 = 3 x 40 + 2, 121 + 1: remainders thinner than 7
        metrics.SSIM_SLAB = slab
        try:
            assert metrics.ssim(pred, vol, mask) == pytest.approx(smap[mask].mean(), rel=1e-12)
        finally:
            metrics.SSIM_SLAB = 32
    calls = []
    with pytest.raises(Cancelled):
        metrics.reconstruction_scores(pred, vol, mask, cancel=lambda: calls.append(1) or True)
    assert len(calls) == 1  # stopped after the first slab
    calls.clear()
    with pytest.raises(Cancelled):
        metrics.interpolation_fill(
            vol, mask, (8, 8, 8), (32, 32, 32), lambda: calls.append(1) or True
        )
    assert len(calls) == 1  # after the first tile


# --------------------------------------------------------------------------- label names, cancel


def test_label_names_beside_each_map_and_the_shared_folder_file(tmp_path, shared_data):
    """One convention for writing and reading: ``<stem>.json`` beside each label map (two
    maps in one folder keep their own names), a folder's ``label_names.json`` still read."""
    from maesil_core.data.io import write_label_names
    from maesil_core.data.labels import find_label_names

    labels = load_labels(shared_data / "abdomen_ct" / "labels.nii.gz")
    a = save_volume(labels.array, labels.affine, tmp_path / "a_seg.nii.gz", dtype=np.uint8)
    b = save_volume(labels.array, labels.affine, tmp_path / "b_seg.nii.gz", dtype=np.uint8)
    assert write_label_names(a, {0: "background", 5: "liver"}) == tmp_path / "a_seg.json"
    write_label_names(b, {1: "spleen"})
    assert read_label_names(a) == {5: "liver"} and read_label_names(b) == {1: "spleen"}
    assert find_label_names(b) == {1: "spleen"}
    assert oct(os.stat(tmp_path / "a_seg.json").st_mode & 0o777) == oct(0o666 & ~_umask())
    # a sidecar that is not a names map is passed over for the folder's label_names.json
    (tmp_path / "c_seg.json").write_text('{"Modality": "CT"}')
    shutil.copy(shared_data / "abdomen_ct" / "label_names.json", tmp_path / "label_names.json")
    assert read_label_names(tmp_path / "c_seg.nii.gz")[5] == "liver"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_downloaded_labels_arrive_with_their_organ_names(tmp_path, monkeypatch, shared_data):
    cache = tmp_path / "cache"
    cache.mkdir()
    name = "totalseg_example_seg"
    shutil.copy(shared_data / "abdomen_ct" / "labels.nii.gz", cache / PUBLIC_CT[name]["filename"])
    monkeypatch.setenv("MAESIL_CACHEDIR", str(cache))
    path = fetch(name)  # in the cache with the right hash: no network
    names = read_label_names(path)
    shared = json.loads((shared_data / "abdomen_ct" / "label_names.json").read_text())
    assert names == {int(k): v for k, v in shared.items()}  # all 117, ids as TotalSegmentator's


def test_loading_chain_stops_when_cancelled_but_the_memory_cache_keeps_it(shared_data):
    """``cancel`` stops a volume's loading between steps; once cached, a set flag no longer
    matters (the check is part of the deterministic, cached chain)."""
    from maesil_core.errors import Cancelled

    cfg = preset("smoke").data
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        inference_transforms(cfg, cancel=stop)({"image": shared_data / "abdomen_ct" / "ct.nii.gz"})
    with pytest.raises(Cancelled):
        make_pretrain_loader([shared_data / "abdomen_ct" / "ct.nii.gz"], cfg, (32,) * 3, 4,
                             cancel=stop)  # fmt: skip
    go = threading.Event()
    loader = make_pretrain_loader(
        [shared_data / "abdomen_ct" / "ct.nii.gz"], cfg, (32,) * 3, 4, endless=True, cancel=go
    )
    go.set()  # after the cache was filled: batches keep coming
    batch = next(infinite(loader))
    assert batch["image"].shape == (4, 1, 32, 32, 32)


@pytest.mark.parametrize("case", ["chest_ct/ct.nii.gz", "abdomen_ct/ct.nii.gz", "dicom_ct"])
def test_labels_to_input_matches_monai_inversion(case, shared_data):
    """A label map on the model grid put back on the input grid by one gather per axis is
    MONAI's nearest-neighbour inversion (Invertd), voxel for voxel, at the smoke preset's 3 mm."""
    from maesil_core.data.inverse import labels_to_input

    tr = inference_transforms(preset("smoke").data)
    data = tr({"image": load_volume(shared_data / case)})
    shape = data["image"].shape[1:]
    labels = np.random.default_rng(0).integers(0, 6, size=shape).astype(np.uint8)
    fast = labels_to_input(labels, data, tr)
    ref = invert_to_input(torch.from_numpy(labels[None].astype(np.float32)), data, tr, nearest=True)
    assert fast.dtype == np.uint8 and fast.shape == tuple(data["image"].meta["spatial_shape"])
    np.testing.assert_array_equal(fast, np.rint(ref[0].numpy()).astype(np.uint8))


def test_transposing_copy_in_slabs_is_exact_and_stops_when_cancelled(shared_data):
    """c_order copies a file's Fortran-ordered volume one slab at a time (short GIL holds, a
    cancel check between slabs): the same voxels as NumPy's copy; a check that raises stops
    it (issue 14: Cancel while a full-size CT is being loaded)."""
    from maesil_core.data.transforms import c_order
    from maesil_core.errors import Cancelled

    arr = np.asanyarray(nib.load(str(shared_data / "chest_ct" / "ct.nii.gz")).dataobj)
    assert arr.ndim == 3 and not arr.flags.c_contiguous  # nibabel's voxel order
    out = c_order(arr)
    assert out.flags.c_contiguous and out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        c_order(arr, check)
    assert len(calls) == 3


# --------------------------------------------------------------------------- cancel in slabs


class _CountingFlag:
    """A cancel flag that turns True at its ``at``-th look (and counts every look)."""

    def __init__(self, at: int) -> None:
        self.at, self.looks = at, 0

    def __call__(self) -> bool:
        self.looks += 1
        return self.looks >= self.at


def test_label_values_are_numpys_in_slabs_and_a_cancel_stops_before_the_next_slab(
    shared_data, monkeypatch
):
    """The label set of a full-size map is read a slab at a time (issue 14: Fine-tune's
    preparation could not be stopped for 42-96 s): the same values as ``np.unique`` in
    either memory order, and a flag set while reading stops before the next slab."""
    from maesil_core.data import slabs
    from maesil_core.data.slabs import label_values
    from maesil_core.errors import Cancelled
    from maesil_core.progress import stop_fn

    monkeypatch.setattr(slabs, "VALUE_SLAB", 4)  # this map has 35 slices: 9 slabs
    labels = np.asanyarray(nib.load(str(shared_data / "abdomen_ct" / "labels.nii.gz")).dataobj)
    assert not labels.flags.c_contiguous  # nibabel's order: slabs along the last axis
    expected = np.unique(labels)
    assert len(expected) > 10
    np.testing.assert_array_equal(label_values(labels), expected)
    np.testing.assert_array_equal(label_values(np.ascontiguousarray(labels)), expected)
    assert -(-labels.shape[2] // slabs.VALUE_SLAB) > 3
    flag = _CountingFlag(at=3)  # set while the second slab is read
    with pytest.raises(Cancelled):
        label_values(labels, stop_fn(flag))
    assert flag.looks == 3  # two slabs read, the third never started


def test_fine_tune_preparation_stops_between_slabs_with_the_same_cases_otherwise(
    shared_data, monkeypatch
):
    """The label set, the label look-up and the loading chain of ``finetune`` check the
    cancel flag slab by slab; a flag set at any of those looks stops at that look (nothing
    after it is read), and without a cancel the cases are those of the chain as it was (one
    Orientationd and one Spacingd for image and labels together), voxel for voxel."""
    from monai.transforms import Orientationd, Spacingd

    from maesil_core.data import slabs
    from maesil_core.data.transforms import IntensityToUnitd, LoadVolumed
    from maesil_core.errors import Cancelled
    from maesil_core.segmentation.data import make_label_set, prepare_cases

    monkeypatch.setattr(slabs, "VALUE_SLAB", 4)  # 8 or 9 slabs, as the map is stored
    ct = load_volume(shared_data / "abdomen_ct" / "ct.nii.gz")
    lab = load_labels(shared_data / "abdomen_ct" / "labels.nii.gz")
    cfg = preset("smoke")
    looks = _CountingFlag(at=10**9)
    labelset = make_label_set([(lab.path, lab.array)], classes=[5, 6], cancel=looks)
    n_set = looks.looks
    (case,) = prepare_cases([(ct, lab)], labelset, cfg, cancel=looks)
    n_prepare = looks.looks - n_set
    # slab by slab (the loading chain alone has 7 looks: before and after each step)
    assert n_set >= 8 and n_prepare >= 10, (n_set, n_prepare)
    for at in (2, n_set + 1, n_set + n_prepare // 2, n_set + n_prepare):
        flag = _CountingFlag(at)
        with pytest.raises(Cancelled):
            ls = make_label_set([(lab.path, lab.array)], classes=[5, 6], cancel=flag)
            prepare_cases([(ct, lab)], ls, cfg, cancel=flag)
        assert flag.looks == at
    # the chain as it was before the per-key split, on the same pair
    keys = ("image", "label")
    before = DataCompose(
        [
            LoadVolumed(keys),
            Orientationd(keys, axcodes="RAS", labels=None),
            Spacingd(keys, pixdim=cfg.data.spacing, mode=("bilinear", "nearest"),
                     dtype=torch.float32),
            IntensityToUnitd.from_config(cfg.data),
        ]
    )  # fmt: skip
    index = labelset.to_index(lab.array).astype(np.int32)
    out = before({"image": ct, "label": Volume(index, ct.affine, lab.path, False)})
    np.testing.assert_array_equal(case.image.numpy(), np.asarray(out["image"]))
    np.testing.assert_array_equal(case.target.numpy(), np.rint(np.asarray(out["label"])))
    assert case.target.max() == 2  # both classes are there


def test_reading_an_uncompressed_nifti_is_converted_in_slabs_and_stops_between_them(
    shared_data, tmp_path
):
    """A ``.nii`` (what the Pretrain widget writes of a layer) is memory-mapped and turned
    into float32 C order one slab at a time (issue 14: Pretrain's preparation held a 7 s
    whole-volume conversion): the same voxels as NumPy's conversion, and a cancel flag set
    while it runs stops it at the next slab."""
    from maesil_core.errors import Cancelled
    from maesil_core.progress import stop_fn

    src = nib.load(str(shared_data / "chest_ct" / "ct.nii.gz"))
    path = tmp_path / "layer.nii"
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj).astype(np.int16), src.affine), path)
    expected = np.ascontiguousarray(np.asanyarray(nib.load(str(path)).dataobj), np.float32)
    vol = load_volume(path)
    assert vol.array.dtype == np.float32 and vol.array.flags.c_contiguous
    np.testing.assert_array_equal(vol.array, expected)
    looks = _CountingFlag(at=10**9)
    load_volume(path, check=stop_fn(looks))
    assert looks.looks > 20  # slab by slab
    flag = _CountingFlag(at=looks.looks // 2)
    with pytest.raises(Cancelled):
        load_volume(path, check=stop_fn(flag))
    assert flag.looks == looks.looks // 2
