"""The bad-input catalogue (docs/bad-input.md), each case run as a user runs it.

Every case is a ``maesil`` command line with one thing wrong: a crafted volume (a crop of the
real ``abdomen_ct`` with a broken header or content), a damaged checkpoint of the tiny runs
(``tiny_runs``, made once per session), a checkpoint of the wrong kind, an impossible setting
or an output that cannot be written. Each must

- exit with status 2 and print exactly one line that names the problem and the fix
  (``needles``), never a traceback;
- write nothing: no output, no half-written file, nothing earlier changed (every file under
  the test's folders and the runs is compared, by content, before and after).

The table of cases is the one in docs/bad-input.md; a test keeps the two in step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from maesil_core.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"


# --------------------------------------------------------------------------- crafted inputs


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _with_header(path: Path, array: np.ndarray, **fields) -> Path:
    """A NIfTI whose raw header fields (pixdim, qform/sform codes, srow_*) are set as given,
    written without nibabel's corrections."""
    img = nib.Nifti1Image(array, np.eye(4))
    header = img.header
    for key, value in fields.items():
        header[key] = value
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * (int(header["vox_offset"]) - f.tell()))
        f.write(np.asarray(array, header.get_data_dtype()).tobytes(order="F"))
    return path


def _sform(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """A NIfTI whose sform is ``affine`` as written (no qform), however broken it is."""
    rows = np.asarray(affine, np.float32)
    return _with_header(
        path, array, sform_code=1, qform_code=0, srow_x=rows[0], srow_y=rows[1], srow_z=rows[2]
    )


def _with_meta(src: Path, dst: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of checkpoint ``src`` whose maesil header is ``edit(meta)`` (a dict, or a str
    written as is), weights unchanged, with its .json sidecar."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["maesil"])
    new = edit(meta)
    text = new if isinstance(new, str) else json.dumps(new)
    save_file(load_file(str(src)), str(dst), metadata={"maesil": text})
    dst.with_suffix(".json").write_text(text)
    return dst


def _newest(run: Path) -> Path:
    from maesil_core.checkpoint import list_checkpoints

    return list_checkpoints(run)[-1]


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory) -> Path:
    """A folder no file can be created in, also for root: a chmod 555 folder where that stops
    the user, else /sys/kernel (read-only sysfs), else /proc (no file can be created there
    on Linux, whoever asks). Finding none is a failure, not a skip: the module's every case
    depends on this fixture."""
    import tempfile

    folder = tmp_path_factory.mktemp("readonly")
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys/kernel"), Path("/proc")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            yield candidate
            break
    else:
        pytest.fail("no folder here is unwritable for this user, not even /proc")
    folder.chmod(0o755)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data, tiny_runs, unwritable) -> SimpleNamespace:
    """Every crafted input of the catalogue, in one folder (``root``); ``out`` for outputs."""
    import pydicom

    root = tmp_path_factory.mktemp("bad_inputs")
    src = nib.load(str(shared_data / "abdomen_ct" / "ct.nii.gz"))
    lab_src = nib.load(str(shared_data / "abdomen_ct" / "labels.nii.gz"))
    box = (slice(20, 84), slice(20, 84), slice(0, 24))  # 64 x 64 x 24 voxels of 3 mm, real HU
    ct = np.asarray(src.dataobj)[box].astype(np.int16)
    lab = np.asarray(lab_src.dataobj)[box].astype(np.int16)
    aff = src.affine.copy()
    x = SimpleNamespace(root=root, out=root / "out", runs=tiny_runs, unwritable=unwritable)
    x.out.mkdir()
    x.ct = _nifti(root / "ct.nii.gz", ct, aff)
    labels = root / "labels"
    labels.mkdir()
    shutil.copy(shared_data / "abdomen_ct" / "label_names.json", labels)
    x.lab = _nifti(labels / "labels.nii.gz", lab, aff)

    x.four_d = _nifti(root / "four_d.nii.gz", np.stack([ct, ct], -1), aff)
    x.single_slice = _nifti(root / "single_slice.nii.gz", ct[:, :, :1], aff)
    x.pixdim_zero = _with_header(
        root / "pixdim_zero.nii", ct, pixdim=[1, 0, 3, 3, 1, 1, 1, 1], qform_code=0, sform_code=0
    )
    x.pixdim_negative = _with_header(
        root / "pixdim_negative.nii",
        ct,
        pixdim=[1, -3, 3, 3, 1, 1, 1, 1],
        qform_code=1,
        sform_code=0,
        quatern_b=0,
        quatern_c=0,
        quatern_d=0,
    )
    zero_col = aff.copy()
    zero_col[:3, 2] = 0
    x.affine_zero_column = _sform(root / "affine_zero_column.nii", ct, zero_col)
    parallel = aff.copy()
    parallel[:3, 1] = parallel[:3, 0]
    x.affine_parallel = _sform(root / "affine_parallel.nii", ct, parallel)
    nan_aff = aff.copy()
    nan_aff[1, 1] = np.nan
    x.affine_nan = _sform(root / "affine_nan.nii", ct, nan_aff)
    x.spacing_huge = _nifti(root / "spacing_huge.nii.gz", ct, np.diag([0.8, 0.8, 3e6, 1.0]))
    whole = _nifti(root / "whole.nii", ct, aff).read_bytes()
    x.short = root / "short.nii"
    x.short.write_bytes(whole[: len(whole) // 2])  # the header promises twice this
    x.mask = _nifti(root / "mask.nii.gz", (lab > 0).astype(np.uint8), aff)
    x.zeros = _nifti(root / "zeros.nii.gz", np.zeros_like(ct), aff)
    x.air = _nifti(root / "air.nii.gz", np.full_like(ct, -1024), aff)
    nan_ct = ct.astype(np.float32)
    nan_ct[5, 5, 5] = np.nan
    x.nan_voxels = _nifti(root / "nan_voxels.nii.gz", nan_ct, aff)

    dicom = sorted((shared_data / "dicom_ct").iterdir())
    x.two_series = root / "two_series"
    x.two_series.mkdir()
    second_uid = pydicom.uid.generate_uid()
    for f in dicom:
        shutil.copy(f, x.two_series / f.name)
        ds = pydicom.dcmread(str(f))  # the same slices again as a second reconstruction
        ds.SeriesInstanceUID = second_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesNumber, ds.SeriesDescription = 7, "CT Lung 1.0"
        ds.save_as(str(x.two_series / f"second_{f.name}"))
    x.missing_slice = root / "missing_slice"
    x.missing_slice.mkdir()
    for i, f in enumerate(dicom):
        if i != 9:
            shutil.copy(f, x.missing_slice / f.name)

    other = root / "other_shape"
    other.mkdir()
    x.lab_other_shape = _nifti(other / "labels.nii.gz", lab[:40], aff)
    x.lab_float = _nifti(root / "labels_float.nii.gz", lab.astype(np.float32) + 0.5, aff)
    neg = lab.copy()
    neg[neg == 5] = -1
    x.lab_negative = _nifti(root / "labels_negative.nii.gz", neg, aff)
    x.names_not_json = root / "names_not_json.json"
    x.names_not_json.write_text('{"5": "liver", "1": spleen}')
    x.names_list = root / "names_list.json"
    x.names_list.write_text('["liver", "spleen"]')

    pre = _newest(tiny_runs["pretrain"])
    ck = root / "checkpoints"
    ck.mkdir()
    x.meta_not_json = _with_meta(pre, ck / "meta_not_json.safetensors", lambda m: "{not json")
    x.meta_no_config = _with_meta(
        pre,
        ck / "meta_no_config.safetensors",
        lambda m: {k: v for k, v in m.items() if k != "config"},
    )
    x.meta_config_str = _with_meta(
        pre, ck / "meta_config_str.safetensors", lambda m: m | {"config": "tiny"}
    )

    def abc(meta: dict) -> dict:
        meta["config"]["model"]["embed_dim"] = "abc"
        return meta

    x.meta_embed_abc = _with_meta(pre, ck / "meta_embed_abc.safetensors", abc)
    raw = pre.read_bytes()
    x.header_length = ck / "header_length.safetensors"
    x.header_length.write_bytes(struct.pack("<Q", 2**40) + raw[8:])  # a header past the end
    x.header_length.with_suffix(".json").write_text(pre.with_suffix(".json").read_text())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"][1] += 10**9  # a tensor that ends far past the file
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    x.tensor_offsets = ck / "tensor_offsets.safetensors"
    x.tensor_offsets.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    x.tensor_offsets.with_suffix(".json").write_text(pre.with_suffix(".json").read_text())
    x.no_sidecar = root / "no_sidecar"
    shutil.copytree(tiny_runs["pretrain"], x.no_sidecar)
    for j in (x.no_sidecar / "checkpoints").glob("step_*.json"):
        j.unlink()

    x.config_section = root / "config_section.json"
    x.config_section.write_text(json.dumps({"trian": {"steps": 5}}))
    x.config_top = root / "config_top.json"
    x.config_top.write_text(json.dumps({"steps": 5}))
    x.config_abc = root / "config_abc.json"
    x.config_abc.write_text(json.dumps({"model": {"embed_dim": "abc"}}))
    x.config_probe = root / "config_probe.json"
    x.config_probe.write_text(json.dumps({"probe": {"image": ["ct.nii.gz"]}}))
    x.config_preset = root / "config_preset.json"
    x.config_preset.write_text(json.dumps({"preset": "tiny"}))
    x.config_renamed = root / "config_renamed.json"
    x.config_renamed.write_text(json.dumps({"preset": "tiny-pretrain"}))
    x.config_probe_every = root / "config_probe_every.json"
    x.config_probe_every.write_text(
        json.dumps({"probe": {"images": [str(x.ct)], "labels": [str(x.lab)], "every": 0}})
    )

    # odd but valid: each must work (test_odd_but_valid_inputs_work)
    shear = aff.copy()
    shear[0, 2] = 0.3 * aff[2, 2]  # x shifts with z: a gantry-tilted acquisition
    x.ok_sheared = _nifti(root / "ok_sheared.nii.gz", ct, shear)
    x.ok_float64 = _nifti(root / "ok_float64.nii.gz", ct.astype(np.float64), aff)
    x.ok_uint8 = _nifti(
        root / "ok_uint8.nii.gz", (np.clip(ct + 1024, 0, 2047) // 8).astype(np.uint8), aff
    )
    x.ok_dicom_stray = root / "ok_dicom_stray"
    shutil.copytree(shared_data / "dicom_ct", x.ok_dicom_stray)
    (x.ok_dicom_stray / "README.txt").write_text("exported by the PACS\n")
    (x.ok_dicom_stray / "Thumbs.db").write_bytes(b"\0" * 64)

    x.a_file = root / "a_file.txt"
    x.a_file.write_text("not a folder\n")
    x.earlier = root / "earlier.nii.gz"  # an earlier output that must survive
    x.earlier.write_bytes(b"an earlier result")
    x.a_folder = root / "a_folder"
    x.a_folder.mkdir()
    return x


# --------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    id: str  #: the row in docs/bad-input.md
    needles: tuple[str, ...]  #: what the one line must say (case-insensitive)
    argv: Callable[[SimpleNamespace], list]  #: the command line


def seg_ckpt(x):
    return x.runs["segmentation"]


def pre_ckpt(x):
    return x.runs["pretrain"]


def segment(x, image, *more):
    return [
        "segment",
        "--checkpoint",
        seg_ckpt(x),
        "--input",
        image,
        "--out",
        x.out / "s.nii.gz",
        *more,
    ]


def reconstruct(x, image, *more):
    return [
        "reconstruct",
        "--checkpoint",
        pre_ckpt(x),
        "--input",
        image,
        "--out",
        x.out / "r",
        *more,
    ]


def pretrain(x, *more):
    return ["pretrain", "--out", x.out / "p", "--steps", 1, "--threads", 1, *more]


def finetune(x, images, labels, *more):
    return [
        "finetune", "--images", images, "--labels", labels, "--out", x.out / "f",
        "--pretrained", pre_ckpt(x), "--steps", 1, "--classes", "liver", *more,
    ]  # fmt: skip


def evaluate(x, images, labels, *more):
    return [
        "evaluate", "--checkpoint", seg_ckpt(x), "--images", images, "--labels", labels,
        "--csv", x.out / "e.csv", *more,
    ]  # fmt: skip


def probe(x, images, labels, checkpoint=pre_ckpt):
    return [
        "probe", "--checkpoint", checkpoint(x), "--images", images, "--labels", labels,
        "--test-images", images, "--test-labels", labels, "--classes", "liver",
    ]  # fmt: skip


def probe_flags(x):
    return ["--probe-images", x.ct, "--probe-labels", x.lab, "--probe-classes", "liver"]


CASES = [
    # ---- images
    Case("4d-nifti", ("four_d.nii.gz", "several channels"), lambda x: segment(x, x.four_d)),
    Case("single-slice", ("single_slice", "2d image"), lambda x: reconstruct(x, x.single_slice)),
    Case("pixdim-zero", ("pixdim_zero", "voxel size (0,"), lambda x: pretrain(x, "--data", x.pixdim_zero)),
    Case("pixdim-negative", ("pixdim_negative", "voxel size (-3,"), lambda x: reconstruct(x, x.pixdim_negative)),
    Case("affine-zero-column", ("affine_zero_column", "voxel size of 0 mm"), lambda x: segment(x, x.affine_zero_column)),
    Case("affine-parallel-axes", ("affine_parallel", "two parallel axes"), lambda x: pretrain(x, "--data", x.affine_parallel)),
    Case("affine-nan", ("affine_nan", "nan"), lambda x: reconstruct(x, x.affine_nan)),
    Case("spacing-3e6-mm", ("spacing_huge", "3e+06", "not plausible"), lambda x: segment(x, x.spacing_huge)),
    Case("header-promises-more", ("short.nii", "truncated", "promises"), lambda x: evaluate(x, x.short, x.lab)),
    Case("mask-as-ct", ("mask.nii.gz", "is a mask"), lambda x: segment(x, x.mask)),
    Case("all-zero-volume", ("zeros.nii.gz", "same value (0)"), lambda x: pretrain(x, "--data", x.zeros)),
    Case("constant-air-volume", ("air.nii.gz", "same value (-1024)"), lambda x: reconstruct(x, x.air)),
    Case("nan-voxels", ("nan_voxels", "1 nan voxels"), lambda x: probe(x, x.nan_voxels, x.lab)),
    Case("dicom-two-series", ("two_series", "2 dicom series", "CT Lung 1.0", "folder of its own"), lambda x: segment(x, x.two_series)),
    Case("dicom-missing-slice", ("missing_slice", "missing between"), lambda x: reconstruct(x, x.missing_slice)),
    # ---- labels
    Case("labels-other-shape", ("do not match image", "shape"), lambda x: finetune(x, x.ct, x.lab_other_shape)),
    Case("labels-float", ("labels_float", "non-integer"), lambda x: evaluate(x, x.ct, x.lab_float)),
    Case("labels-negative", ("labels_negative", "negative label ids (-1)"), lambda x: finetune(x, x.ct, x.lab_negative)),
    Case("class-not-in-names", ("unknown class name 'livr'", "liver"), lambda x: finetune(x, x.ct, x.lab, "--classes", "livr")),
    Case("label-names-not-json", ("names_not_json.json", '{"1": "liver"'), lambda x: finetune(x, x.ct, x.lab, "--label-names", x.names_not_json)),
    Case("label-names-a-list", ("names_list.json", '{"1": "liver"'), lambda x: finetune(x, x.ct, x.lab, "--label-names", x.names_list)),
    # ---- checkpoints of the wrong kind
    Case("pretrain-ckpt-to-segment", ("not a segmentation model", "maesil finetune"), lambda x: ["segment", "--checkpoint", pre_ckpt(x), "--input", x.ct, "--out", x.out / "s.nii.gz"]),
    Case("pretrain-ckpt-to-evaluate", ("not a segmentation model",), lambda x: ["evaluate", "--checkpoint", pre_ckpt(x), "--images", x.ct, "--labels", x.lab]),
    Case("seg-ckpt-to-reconstruct", ("segmentation checkpoint", "pretraining"), lambda x: ["reconstruct", "--checkpoint", seg_ckpt(x), "--input", x.ct, "--out", x.out / "r"]),
    Case("seg-ckpt-to-probe", ("segmentation checkpoint", "pretraining"), lambda x: probe(x, x.ct, x.lab, checkpoint=seg_ckpt)),
    Case("pretrain-resume-of-seg-run", ("segmentation", "maesil finetune"), lambda x: ["pretrain", "--out", seg_ckpt(x), "--resume"]),
    Case("finetune-resume-of-pretrain-run", ("pretrain", "segmentation"), lambda x: ["finetune", "--images", x.ct, "--labels", x.lab, "--out", pre_ckpt(x), "--resume"]),
    Case("pretrain-ckpt-to-bundle", ("segment",), lambda x: ["export", "--checkpoint", pre_ckpt(x), "--format", "monai-bundle", "--out", x.out / "b"]),
    # ---- damaged checkpoints
    Case("sidecar-missing", ("no_sidecar", "no checkpoint"), lambda x: ["info", x.no_sidecar]),
    Case("header-not-json", ("meta_not_json", "json"), lambda x: ["info", x.meta_not_json]),
    Case("header-without-config", ("meta_no_config", "config"), lambda x: ["reconstruct", "--checkpoint", x.meta_no_config, "--input", x.ct, "--out", x.out / "r"]),
    Case("header-config-a-string", ("meta_config_str", "config"), lambda x: ["info", x.meta_config_str]),
    Case("header-embed-dim-abc", ("meta_embed_abc", "model.embed_dim", "whole number"), lambda x: ["reconstruct", "--checkpoint", x.meta_embed_abc, "--input", x.ct, "--out", x.out / "r"]),
    Case("safetensors-header-length", ("header_length", "not a readable safetensors"), lambda x: ["info", x.header_length]),
    Case("safetensors-tensor-offsets", ("tensor_offsets", "corrupt"), lambda x: ["reconstruct", "--checkpoint", x.tensor_offsets, "--input", x.ct, "--out", x.out / "r"]),
    # ---- settings
    Case("config-misspelt-section", ("unknown section 'trian'", "did you mean 'train'"), lambda x: pretrain(x, "--config", x.config_section)),
    Case("config-unknown-top-key", ("unknown section 'steps'",), lambda x: pretrain(x, "--config", x.config_top)),
    Case("config-probe-unknown-key", ('unknown "probe" setting \'image\'', "did you mean 'images'"), lambda x: pretrain(x, "--config", x.config_probe)),
    Case("config-preset-disagrees", ("--preset smoke", "config_preset.json", "different presets", "give one of them"), lambda x: pretrain(x, "--config", x.config_preset, "--preset", "smoke")),
    Case("preset-renamed", ("--preset", "'tiny-pretrain' is called 'tiny'", "use 'tiny'"), lambda x: pretrain(x, "--preset", "tiny-pretrain")),
    Case("config-preset-renamed", ("config_renamed.json", "'tiny-pretrain' is called 'tiny'", "use 'tiny'"), lambda x: pretrain(x, "--config", x.config_renamed)),
    Case("config-probe-every-0", ("--probe-every", "at least 1", "config file", '"probe" section'), lambda x: pretrain(x, "--data", x.ct, "--config", x.config_probe_every)),
    Case("config-probe-half-pair", ("--probe-images", "but not its labels", "--probe-labels too"), lambda x: pretrain(x, "--data", x.ct, "--config", x.config_probe_every, "--probe-images", x.ct)),
    Case("config-embed-dim-abc", ("model.embed_dim", "whole number", "'abc'"), lambda x: pretrain(x, "--config", x.config_abc)),
    Case("sw-batch-size-0", ("--sw-batch-size 0", "1 or more"), lambda x: segment(x, x.ct, "--sw-batch-size", 0)),
    Case("roi-0", ("--roi 0", "positive"), lambda x: finetune(x, x.ct, x.lab, "--roi", 0)),
    Case("overlap-1", ("overlap", "[0, 1)"), lambda x: segment(x, x.ct, "--overlap", 1)),
    # ---- outputs
    Case("probe-without-labels", ("--probe-images", "--probe-labels"), lambda x: pretrain(x, "--data", x.ct, "--probe-images", x.ct)),
    Case("probe-every-0", ("--probe-every", "at least 1"), lambda x: pretrain(x, "--data", x.ct, *probe_flags(x), "--probe-every", 0)),
    Case("probe-test-without-labels", ("--probe-test-images", "--probe-test-labels"), lambda x: pretrain(x, "--data", x.ct, *probe_flags(x), "--probe-test-images", x.ct)),
    Case("probe-class-not-in-names", ("--probe-classes", "unknown class name 'livr'", "liver"), lambda x: pretrain(x, "--data", x.ct, "--probe-images", x.ct, "--probe-labels", x.lab, "--probe-classes", "livr")),
    Case("out-is-a-file", ("a_file.txt is a file",), lambda x: ["pretrain", "--out", x.a_file, "--steps", 1]),
    Case("out-under-a-file", ("a_file.txt is a file", "no folder can be made"), lambda x: segment(x, x.ct)[:-1] + [x.a_file / "seg.nii.gz"]),
    Case("out-read-only", ("cannot write in", "writable"), lambda x: reconstruct(x, x.ct)[:-1] + [x.unwritable / "recon"]),
    Case("finetune-out-read-only", ("cannot write in",), lambda x: finetune(x, x.ct, x.lab)[:6] + [x.unwritable / "run"] + finetune(x, x.ct, x.lab)[7:]),
    Case("reconstruct-out-a-file", ("is a file", "give a folder"), lambda x: reconstruct(x, x.ct)[:-1] + [x.earlier]),
    Case("segment-out-a-folder", ("a_folder is a folder", "file name"), lambda x: segment(x, x.ct, "--force")[:-2] + [x.a_folder, "--force"]),
    Case("segment-out-exists", ("earlier.nii.gz exists", "--force"), lambda x: segment(x, x.ct)[:-1] + [x.earlier]),
    Case("evaluate-csv-a-folder", ("a_folder is a folder", "file name"), lambda x: evaluate(x, x.ct, x.lab, "--force")[:-2] + [x.a_folder, "--force"]),
    Case("export-out-under-a-file", ("a_file.txt is a file",), lambda x: ["export", "--checkpoint", pre_ckpt(x), "--format", "monai-vit", "--out", x.a_file / "vit.pt"]),
    Case("import-out-a-file", ("a_file.txt is a file",), lambda x: ["import", "--from", "monai-vit", x.ct, "--out", x.a_file]),
]  # fmt: skip


def _snapshot(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` -> a hash of its bytes (and every folder -> 'dir')."""
    seen = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_dir():
                seen[str(p)] = "dir"
            elif p.is_file():
                seen[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
    return seen


def test_the_catalogue_has_thirty_cases_across_every_command(inputs):
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    commands = {c.argv(inputs)[0] for c in CASES}
    assert commands >= {
        "pretrain", "reconstruct", "finetune", "segment", "evaluate", "probe", "info", "export", "import",
    }  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, inputs, capsys):
    x = SimpleNamespace(**vars(inputs))
    x.out = inputs.out / case.id  # its own: a case that wrongly succeeds cannot hide the next
    argv = [str(a) for a in case.argv(x)]
    folders = [inputs.root, *(Path(r) for r in inputs.runs.values())]
    before = _snapshot(*folders)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in case.needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert _snapshot(*folders) == before  # nothing written, nothing earlier changed
    if os.environ.get("MAESIL_BAD_INPUT_LINES"):  # the lines docs/bad-input.md quotes
        shown = lines[0].replace(str(inputs.root) + "/", "").replace(str(x.out) + "/", "")
        for name, run in inputs.runs.items():
            shown = shown.replace(str(run), f"runs/{name}")
        with open(os.environ["MAESIL_BAD_INPUT_LINES"], "a") as f:
            f.write(json.dumps({"id": case.id, "command": argv[0], "line": shown}) + "\n")


def test_docs_list_every_case_with_what_the_user_sees():
    """docs/bad-input.md has one row per case: its id, and the words its message holds."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    catalogue = {c.id: c for c in CASES}
    assert set(rows) >= set(catalogue), sorted(set(catalogue) - set(rows))
    for cid, case in catalogue.items():
        for needle in case.needles:
            assert needle.lower() in rows[cid].lower(), (cid, needle)


@pytest.mark.parametrize("name", ["ok_sheared", "ok_float64", "ok_uint8", "ok_dicom_stray"])
def test_odd_but_valid_inputs_work(name, inputs, tmp_path, capsys):
    """A sheared affine (gantry tilt; resampled by world coordinates), float64 and uint8
    voxels (uint8 is taken as not HU: percentile scaling) and a DICOM folder with stray
    non-DICOM files (left out) are scans, not errors: reconstruct runs and writes its
    outputs on the input's own grid."""
    out = tmp_path / "r"
    argv = reconstruct(inputs, getattr(inputs, name))[:-1] + [out]
    code = main([str(a) for a in argv])
    assert code == 0, capsys.readouterr().err
    image = nib.load(str(out / "reconstruction.nii.gz"))
    assert image.shape[:3] in ((64, 64, 24), (512, 512, 20))
