"""Fine-tuning a pretrained encoder into an organ segmenter, on real labelled CT (tiny, CPU).

Data: ``abdomen_ct`` (one real abdominal CT at 3 mm, TotalSegmentator labels: 5 liver,
1 spleen) is cut into three 10-slice slabs along the cranio-caudal axis: slices 0-9 and 20-29
are two training volumes, slices 10-19 the held-out volume (same patient, anatomy the model
never saw). ``dicom_ct`` (another
patient, a DICOM series in LPS) is used for geometry checks only.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from maesil_core import api, cli
from maesil_core import segmentation as ft
from maesil_core.checkpoint import load_checkpoint, save_checkpoint
from maesil_core.cli import segmentation as cli_segment
from maesil_core.config import RunConfig, preset
from maesil_core.data import load_labels, load_volume
from maesil_core.data.labels import LabelSet, from_classes, from_mapping
from maesil_core.errors import CheckpointError, ConfigError, DataError
from maesil_core.models import build_model
from maesil_core.models.segmenter import UNETRSegmenter, default_layers
from maesil_core.train.loop import make_optimizer
from maesil_core.train.optim import cpu_computes_bf16

ORGANS = {"liver": "liver", "spleen": "spleen"}  # TotalSegmentator ids 5 and 1
TRAIN_SLABS = ([(None, None), (None, None), (0, 10)], [(None, None), (None, None), (20, 30)])
HELD_OUT_SLAB = [(None, None), (None, None), (10, 20)]
FT_STEPS = 200
ROI = (48, 48, 8)  # no thicker than a 10-slice slab (no padding); the superpatch is 32^3


@pytest.fixture(scope="module")
def abdomen(shared_data):
    folder = shared_data / "abdomen_ct"
    image = load_volume(folder / "ct.nii.gz")
    labels = load_labels(folder / "labels.nii.gz", image)
    return folder, image, labels


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, shared_data):
    """A tiny MAESIL pretrained briefly on the two abdominal CTs (no labels used)."""
    cfg = preset("smoke").override("train", steps=40, log_every=10, checkpoint_every=1000)
    cfg = cfg.override("data", num_workers=0)
    run = tmp_path_factory.mktemp("seg_pre") / "run"
    api.pretrain([shared_data / "abdomen_ct" / "ct.nii.gz", shared_data / "dicom_ct"], run, cfg)
    return run


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory, pretrained_run, abdomen):
    """Fine-tune liver + spleen on the two training slabs (no validation: the held-out slab
    must not pick the checkpoint); the run's last checkpoint is the model."""
    folder, image, labels = abdomen
    train = [[ft.crop_volume(v, box) for box in TRAIN_SLABS] for v in (image, labels)]
    cfg = ft.config_from_pretrained(load_checkpoint(pretrained_run))
    # fp32 everywhere: auto would fine-tune in bf16 on a CPU with AMX, another model than on
    # one without, and the bounds below were measured in fp32
    cfg = cfg.override(
        "train",
        steps=FT_STEPS,
        batch_size=4,
        lr=3e-3,
        warmup_steps=10,
        log_every=50,
        precision="fp32",
    )
    run = tmp_path_factory.mktemp("seg_ft") / "run"
    result = ft.finetune(
        train[0],
        train[1],
        run,
        cfg,
        pretrained=pretrained_run,
        seg=ft.SegmentationConfig(roi=ROI, feature_size=8),
        labels_map=ORGANS,
        label_names=folder / "label_names.json",
    )
    assert result.step == FT_STEPS and result.best_checkpoint is None
    return run


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- quality


def test_finetuning_segments_liver_on_a_held_out_slab(finetuned_run, abdomen):
    folder, image, labels = abdomen
    held = [ft.crop_volume(v, HELD_OUT_SLAB) for v in (image, labels)]
    report = ft.evaluate(finetuned_run, [held[0]], [held[1]])
    scores = report.summary()
    # Liver Dice alone proves little here: a 0..150 HU threshold scores ~0.5 on this slab, an
    # untrained network ~0.1-0.3. The threshold also calls the spleen (same HU, other side)
    # liver; the model must not. (The spleen itself is not reliably learnt in 200 tiny steps,
    # and stray voxels keep the liver HD95 far from clinical values: both are only reported.)
    assert scores["liver"]["dice"] > 0.7, report.table()
    assert np.isfinite(scores["liver"]["hd95"]), report.table()
    pred = ft.segment(finetuned_run, held[0]).labels
    spleen = held[1].array == 1
    soft_tissue = (held[0].array > 0) & (held[0].array < 150)
    # the threshold calls > 80 % of the spleen liver; the model at most half as much. (Seen:
    # 0.11 and 0.37. A 200-step model on a 40-step encoder varies with the encoder's noise:
    # torch thread count, the pretraining's crop augmentation on or off.)
    threshold_says_liver = soft_tissue[spleen].mean()
    assert threshold_says_liver > 0.8
    assert (pred[spleen] == 1).mean() < 0.5 * threshold_says_liver, (pred[spleen] == 1).mean()
    meta = load_checkpoint(finetuned_run, kind="segmentation").meta.to_dict()
    assert meta["kind"] == "segmentation"
    assert meta["extra"]["labels"]["classes"][0] == {"id": 1, "name": "liver", "source_ids": [5]}
    assert meta["extra"]["segmentation"]["roi"] == list(ROI)  # != the 32^3 superpatch
    assert meta["config"]["data"]["spacing"] == [3.0, 3.0, 3.0]


def test_segment_cli_writes_labels_on_the_input_grid(finetuned_run, abdomen, tmp_path, capsys):
    folder, image, labels = abdomen
    out = tmp_path / "abdomen_seg.nii.gz"
    code, stdout, err = run_cli(
        capsys,
        "segment",
        "--checkpoint",
        finetuned_run,
        "--input",
        folder / "ct.nii.gz",
        "--out",
        out,
    )
    assert code == 0, err
    seg = nib.load(str(out))
    assert seg.shape == image.array.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
    names = json.loads((tmp_path / "abdomen_seg.json").read_text())
    assert names == {"1": "liver", "2": "spleen"}
    pred = np.asarray(seg.dataobj)
    ref = labels.array == 5
    dice = 2 * ((pred == 1) & ref).sum() / ((pred == 1).sum() + ref.sum())
    assert dice > 0.6, dice
    # the liver lands on the patient's right (low x in RAS world mm), the spleen's side is left
    xs = nib.affines.apply_affine(seg.affine, np.argwhere(pred == 1))[:, 0]
    xs_ref = nib.affines.apply_affine(image.affine, np.argwhere(ref))[:, 0]
    assert abs(np.median(xs) - np.median(xs_ref)) < 30.0
    assert "liver" in stdout and "ml" in stdout


def test_segment_a_dicom_series_keeps_its_geometry(finetuned_run, shared_data):
    dicom = load_volume(shared_data / "dicom_ct")
    result = ft.segment(finetuned_run, shared_data / "dicom_ct", overlap=0.0)
    assert result.labels.shape == dicom.array.shape  # (512, 512, 20), LPS
    np.testing.assert_allclose(result.affine, dicom.affine)
    assert set(np.unique(result.labels)) <= {0, 1, 2}


def test_segment_cli_writes_dicom_seg_of_a_dicom_series(
    finetuned_run, shared_data, tmp_path, capsys
):
    """--format dicom-seg: one named segment per class present, referencing the input series;
    read back with pydicom it covers the voxels of the NIfTI output. Refused, before the model
    runs, for a NIfTI input or a .nii.gz --out, and an existing file without --force."""
    from maesil_core.interop.dicom_seg import read_dicom_seg

    series = shared_data / "dicom_ct"
    nifti, dcm = tmp_path / "seg.nii.gz", tmp_path / "seg.dcm"
    common = ["segment", "--checkpoint", finetuned_run, "--input", series, "--overlap", "0"]
    common += ["--threads", "1"]
    code, _, err = run_cli(capsys, *common, "--out", nifti)
    assert code == 0, err
    code, stdout, err = run_cli(capsys, *common, "--format", "dicom-seg", "--out", dcm)
    assert code == 0, err
    assert "DICOM-SEG" in stdout and "liver" in stdout
    reference = np.asarray(nib.load(str(nifti)).dataobj)
    back, names = read_dicom_seg(dcm, series)  # pydicom only
    present = [int(i) for i in np.unique(reference) if i != 0]
    assert present, "the tiny segmenter found no organ on the series"
    classes = {1: "liver", 2: "spleen"}
    assert sorted(names.values()) == sorted(classes[i] for i in present)
    by_name = {name: number for number, name in names.items()}
    for cid in present:
        np.testing.assert_array_equal(back == by_name[classes[cid]], reference == cid)

    before = dcm.read_bytes()
    for argv, says in [
        ([*common, "--format", "dicom-seg", "--out", dcm], "--force"),
        ([*common, "--format", "dicom-seg", "--out", tmp_path / "x.nii.gz"], ".dcm"),
        (
            [*common[:4], shared_data / "abdomen_ct" / "ct.nii.gz", "--format", "dicom-seg"],
            "--format nifti",
        ),
    ]:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and says in err and "Traceback" not in err, err
    assert dcm.read_bytes() == before


def test_labels_stay_inside_the_body_unless_asked(finetuned_run, shared_data):
    """On the 512 x 512 DICOM series (two thirds air) labels are kept inside the body by
    default; --no-body-mask gives the model's own answer, which is the same inside it."""
    from maesil_core.data.body import body_mask
    from maesil_core.segmentation.plausibility import plausibility_warnings

    dicom = load_volume(shared_data / "dicom_ct")
    segmenter = ft.Segmenter.load(finetuned_run)
    assert segmenter.seg.body_mask  # the default, stored in the checkpoint
    inside = segmenter.segment(dicom, overlap=0.0)
    whole = segmenter.segment(dicom, overlap=0.0, body_mask=False)
    body = body_mask(dicom.array, dicom.affine)
    assert not inside.labels[~body].any()
    np.testing.assert_array_equal(inside.labels[body], whole.labels[body])
    assert inside.extra["body_mask"] and not whole.extra["body_mask"]
    for result, mask in ((inside, body), (whole, None)):  # what segment prints as warnings
        expected = plausibility_warnings(
            result.labels, dicom.array, dicom.affine, result.classes, body=mask
        )
        assert result.warnings == expected


def test_segment_precision_is_checked_before_the_model_runs(capsys):
    """--precision takes auto, bf16 or fp32 (a precision the device lacks is refused:
    tests/test_train.py). No test compares bf16 with fp32 label maps on the CPU: on torch
    2.13's CPU autocast this model's bf16 windows gave NaN or wrong logits in some runs and not
    in others (label maps 89 % and 92 % equal to fp32, 99.9 % in others; BENCHMARKS.md), so
    auto stays fp32 on the CPU and the bf16 comparison waits for a GPU."""
    with pytest.raises(SystemExit) as stop:  # argparse's own usage error, exit 2
        cli.main(
            ["segment", "--checkpoint", str(finetuned_run), "--input", "x", "--precision", "half"]
        )
    assert stop.value.code == 2 and "--precision" in capsys.readouterr().err


# --------------------------------------------------------------------------- the model


def test_pretrained_encoder_is_loaded_and_a_wrong_one_refused(pretrained_run, tmp_path):
    ckpt = load_checkpoint(pretrained_run)
    cfg = ft.config_from_pretrained(ckpt)
    torch.manual_seed(0)
    scratch = UNETRSegmenter(cfg.model, 2, feature_size=8)
    torch.manual_seed(0)
    loaded = UNETRSegmenter(cfg.model, 2, feature_size=8)
    ft.load_pretrained_encoder(loaded, ckpt)
    enc = {k[8:]: v for k, v in ckpt.state_dict.items() if k.startswith("encoder.")}
    own = loaded.encoder.state_dict()
    assert set(enc) == set(own) and all(torch.equal(own[k], enc[k]) for k in enc)
    assert not torch.equal(
        scratch.encoder.blocks[0].attn.qkv.weight, own["blocks.0.attn.qkv.weight"]
    )
    for (name, a), b in zip(scratch.ups.state_dict().items(), loaded.ups.state_dict().values()):
        assert torch.equal(a, b), name  # the decoder keeps its initialisation

    # an encoder of another width: refused, saying what differs
    other = preset("smoke").model
    other.embed_dim, other.num_heads = 48, 3
    wrong = save_checkpoint(tmp_path / "wide", build_model(other), preset("smoke"), 1)
    wrong_cfg = load_checkpoint(wrong).config
    wrong_cfg.model = other
    wrong = save_checkpoint(tmp_path / "wide", build_model(other), wrong_cfg, 1)
    with pytest.raises(CheckpointError, match="embed_dim 48 vs 96"):
        ft.load_pretrained_encoder(UNETRSegmenter(cfg.model, 2, feature_size=8), wrong)


def test_unetr_layers_and_any_multiple_of_the_patch():
    assert default_layers(12, 4) == [2, 5, 8, 11]  # UNETR's 3, 6, 9, 12 for ViT-B / patch 16
    assert default_layers(4, 3) == [0, 2, 3]
    model = UNETRSegmenter(preset("smoke").model, 3, feature_size=4).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 48, 32, 16)).shape == (1, 4, 48, 32, 16)


def test_sliding_window_equals_direct_forward_where_both_fit():
    torch.manual_seed(0)
    model = UNETRSegmenter(preset("smoke").model, 2, feature_size=4).eval()
    x = torch.rand(1, 64, 32, 96)  # three times the 32^3 window along W, twice along D
    with torch.no_grad():
        tiles = [
            [model(x[None, :, d : d + 32, :, w : w + 32])[0] for w in (0, 32, 64)] for d in (0, 32)
        ]
        direct = torch.cat([torch.cat(row, dim=-1) for row in tiles], dim=1)
        # zero overlap, constant blending: every voxel comes from exactly one window
        sw = ft.sliding_window_logits(model, x, (32, 32, 32), overlap=0.0, blend="constant")
        torch.testing.assert_close(sw, direct, rtol=1e-5, atol=1e-5)
        # a volume the size of the window: one window, any blending = the direct forward
        one = ft.sliding_window_logits(model, x[:, :32, :, :32], (32, 32, 32), overlap=0.5)
        torch.testing.assert_close(one, model(x[None, :, :32, :, :32])[0], rtol=1e-5, atol=1e-5)
    assert ft.count_windows((64, 32, 96), (32, 32, 32), 0.0) == 6


def test_a_cancel_inside_a_window_batch_stops_before_the_next_module(abdomen):
    """issue 14, Cancel under 1 s: a cancel set while a batch of windows is in the model
    raises Cancelled before the next module runs (not after the batch, seconds later on a
    full-size CT), and the model is left without the cancel's hooks. On the real CT, on the
    smoke preset's grid."""
    import threading

    from maesil_core.data import inference_transforms
    from maesil_core.errors import Cancelled

    _, image, _ = abdomen
    x = inference_transforms(preset("smoke").data)({"image": image})["image"]
    model = UNETRSegmenter(preset("smoke").model, 2, feature_size=4).eval()
    leaves = [m for m in model.modules() if not list(m.children())]
    flag, ran_after, seen = threading.Event(), [], []

    def arm(_m, _args):  # in the second batch, half-way through the model
        seen.append(1)
        if len(seen) == 2:
            flag.set()

    def after(m, _args, _out):
        if flag.is_set():
            ran_after.append(type(m).__name__)

    leaves[len(leaves) // 2].register_forward_pre_hook(arm)
    for m in model.modules():
        m.register_forward_hook(after)
    progress = []
    with pytest.raises(Cancelled):
        ft.sliding_window_logits(
            model, x, (32, 32, 32), sw_batch_size=2, cancel=flag.is_set,
            progress=lambda done, total: progress.append(done),
        )  # fmt: skip
    assert flag.is_set() and ran_after == [] and progress == [2]  # one whole batch, no more
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 1  # the test's own


def test_a_cancel_during_validation_stops_the_run_there_without_its_score(
    abdomen, tmp_path, monkeypatch
):
    """A cancel lands inside a validation pass (whole-case sliding windows) too: the run
    stops at that step with its checkpoint, its metrics row has the loss but no Dice from the
    cut-short validation, and no best checkpoint is taken from it."""
    import csv
    import threading

    from maesil_core.checkpoint import list_checkpoints
    from maesil_core.segmentation import train as seg_train

    folder, _, _ = abdomen
    ct, lab = folder / "ct.nii.gz", folder / "labels.nii.gz"
    flag, ran_after = threading.Event(), []
    real = seg_train.build_segmenter

    def build_and_watch(*args, **kwargs):
        model = real(*args, **kwargs)

        def arm(m, _args):  # the first forward of the first validation
            if not m.training:
                flag.set()

        def after(m, _args, _out):
            if flag.is_set():
                ran_after.append(type(m).__name__)

        model.register_forward_pre_hook(arm)
        for m in model.modules():
            m.register_forward_hook(after)
        return model

    monkeypatch.setattr(seg_train, "build_segmenter", build_and_watch)
    cfg = preset("smoke").override(
        "train", steps=6, batch_size=1, log_every=2, checkpoint_every=1000
    )
    result = ft.finetune(
        [ct], [lab], tmp_path / "run", cfg.override("data", num_workers=0),
        seg=ft.SegmentationConfig(feature_size=4, eval_every=2), classes=["liver"],
        val_images=[ct], val_labels=[lab], cancel=flag,
    )  # fmt: skip
    assert result.cancelled and result.step == 2 and ran_after == []
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_000002.safetensors"]
    with (tmp_path / "run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2"] and rows[0]["loss"]
    assert not rows[0].get("val_dice")  # the validation that was cut short scored nothing
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_count_windows_matches_what_monai_runs():
    """The progress total equals the windows MONAI's sliding_window_inference really runs,
    for volumes smaller than, equal to and between multiples of the window, any overlap."""
    from monai.inferers import sliding_window_inference

    seen = []

    def predictor(batch):
        seen.append(batch.shape[0])
        return batch

    for shape in [(64, 32, 96), (33, 70, 17), (32, 32, 32), (100, 41, 64), (5, 5, 5)]:
        for roi in [(32, 32, 32), (16, 24, 32)]:
            for overlap in (0.0, 0.25, 0.5, 0.9):
                seen.clear()
                sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, predictor, overlap)
                assert ft.count_windows(shape, roi, overlap) == sum(seen), (shape, roi, overlap)


def test_layer_decay_and_frozen_encoder_reach_the_optimizer():
    cfg = preset("smoke")
    seg = ft.SegmentationConfig(feature_size=4, layer_decay=0.5)
    model = ft.build_segmenter(cfg, seg, 2)
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale_of[id(model.encoder.blocks[3].attn.qkv.weight)] == 0.5
    assert scale_of[id(model.encoder.blocks[0].attn.qkv.weight)] == 0.5**4
    assert scale_of[id(model.out.conv.conv.weight)] == 1.0
    frozen = ft.build_segmenter(cfg, ft.SegmentationConfig(feature_size=4, freeze_encoder=True), 2)
    opt = make_optimizer(frozen, cfg.train, torch.device("cpu"))
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in frozen.encoder.parameters()}
    assert id(frozen.out.conv.conv.weight) in trained


# --------------------------------------------------------------------------- label sets


def test_label_sets_select_rename_and_merge(abdomen):
    folder, _, labels = abdomen
    names = json.loads((folder / "label_names.json").read_text())
    names = {int(k): v for k, v in names.items()}
    lset = from_mapping(
        {"liver": "liver", "kidneys": ["kidney_left", "kidney_right"], "spleen": 1}, names
    )
    assert lset.names == ["liver", "kidneys", "spleen"] and lset.ids == [1, 2, 3]
    assert lset.classes[1].source_ids == (3, 2)
    out = lset.to_ids(labels.array)
    assert (out == 2).sum() == ((labels.array == 2) | (labels.array == 3)).sum()
    assert (out == 1).sum() == (labels.array == 5).sum()
    assert set(np.unique(out)) == {0, 1, 2, 3}
    assert LabelSet.from_dict(lset.to_dict()) == lset
    assert from_classes(["Liver", 1], names).names == ["liver", "spleen"]
    with pytest.raises(DataError, match="did you mean liver"):
        from_classes(["livr"], names)
    with pytest.raises(DataError, match="unknown label id 999"):
        from_classes([999], names)


# --------------------------------------------------------------------------- the CLI


def test_cli_finetune_then_evaluate(pretrained_run, abdomen, tmp_path, capsys):
    folder, _, _ = abdomen
    ct, lab = folder / "ct.nii.gz", folder / "labels.nii.gz"
    out = tmp_path / "cli_run"
    args = ["finetune", "--images", ct, "--labels", lab, "--pretrained", pretrained_run]
    args += ["--out", out, "--classes", "liver", "spleen", "--steps", 3, "--batch-size", 1]
    args += ["--feature-size", 4, "--layer-decay", 0.75, "--val-images", ct, "--val-labels", lab]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "best validation Dice" in stdout
    meta = load_checkpoint(out / "best.safetensors", kind="segmentation").meta.to_dict()
    # precision auto: bf16 where the CPU computes it natively (AMX), as the run says
    native = cpu_computes_bf16()
    assert meta["config"]["train"]["precision"] == ("bf16" if native else "auto")
    assert ("fine-tuning in bf16" in stdout) == native
    assert meta["extra"]["pretrained"].endswith(".safetensors")
    assert meta["config"]["model"]["embed_dim"] == 96
    code, stdout, err = run_cli(
        capsys,
        "evaluate",
        "--checkpoint",
        out,
        "--images",
        ct,
        "--labels",
        lab,
        "--csv",
        tmp_path / "e.csv",
    )
    assert code == 0, err
    assert "hd95" in stdout and "spleen" in stdout
    rows = (tmp_path / "e.csv").read_text().splitlines()
    assert rows[0] == "case,class,id,dice,hd95_mm" and len(rows) == 1 + 2 + 2
    # an existing table is not overwritten unless asked, and the refusal comes first
    eval_args = ["evaluate", "--checkpoint", out, "--images", ct, "--labels", lab]
    code, _, err = run_cli(capsys, *eval_args, "--csv", tmp_path / "e.csv")
    assert code == 2 and "e.csv exists; pass --force" in err
    for name in ("evaluation.csv", "evaluation-2.csv"):  # the run's default: never clobbered
        code, stdout, err = run_cli(capsys, *eval_args)
        assert code == 0 and (out / name).is_file() and f"saved: {out / name}" in stdout, err


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("bad")
    return {
        "ct": shared_data / "abdomen_ct" / "ct.nii.gz",
        "lab": shared_data / "abdomen_ct" / "labels.nii.gz",
        "chest_lab": shared_data / "chest_ct" / "labels.nii.gz",
        "dicom": shared_data / "dicom_ct",
        "dicom_lab": shared_data / "dicom_ct_labels" / "labels.nii.gz",
        "out": folder / "run",
    }


@pytest.mark.parametrize(
    "case, message",
    [
        ("geometry", "do not match image"),
        ("resampled_world", "do not match image"),
        ("unknown_name", "unknown class name 'livr' (did you mean liver?)"),
        ("unknown_id", "unknown label id 200"),
        ("count", "no label map found for"),
        ("n_labelled", "--n-labelled 3 but only 1 labelled volumes"),
        ("absent", "occurs in none of the 1 label maps"),
        ("architecture", "has another encoder than this segmenter (patch [8, 8, 8] vs"),
        ("pretrain_to_segment", "is a pretrain (maesil) checkpoint, not a segmentation model"),
    ],
)
def test_bad_input_exits_2_with_one_line(case, message, bad_inputs, pretrained_run, capsys):
    b = bad_inputs
    ft_args = ["finetune", "--out", b["out"], "--steps", 1]
    argv = {
        "geometry": ft_args + ["--images", b["ct"], "--labels", b["chest_lab"]],
        "resampled_world": ft_args + ["--images", b["dicom"], "--labels", b["dicom_lab"]],
        "unknown_name": ft_args + ["--images", b["ct"], "--labels", b["lab"], "--classes", "livr"],
        "unknown_id": ft_args + ["--images", b["ct"], "--labels", b["lab"], "--classes", 200],
        "count": ft_args + ["--images", b["ct"], b["dicom"], "--labels", b["lab"]],
        "n_labelled": ft_args + ["--images", b["ct"], "--labels", b["lab"], "--n-labelled", 3],
        "absent": ft_args + ["--images", b["ct"], "--labels", b["lab"], "--classes", "brain"],
        "architecture": ft_args
        + ["--images", b["ct"], "--labels", b["lab"], "--pretrained", pretrained_run]
        + ["--preset", "mim-med3d"],
        "pretrain_to_segment": ["segment", "--checkpoint", pretrained_run, "--input", b["ct"]],
    }[case]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (b["out"] / "checkpoints").exists()


# --------------------------------------------------------------------------- resume


def test_cli_resume_continues_a_finetuning_run(pretrained_run, abdomen, tmp_path, capsys):
    """Stopped at step 4 of 8, ``maesil finetune --resume`` (no --steps) finishes the same run:
    the same step count, one unbroken lr schedule, its best checkpoint kept unless beaten."""
    import csv

    from maesil_core.checkpoint import list_checkpoints
    from maesil_core.train import lr_at

    folder, _, _ = abdomen
    ct, lab = folder / "ct.nii.gz", folder / "labels.nii.gz"
    run, stop_at, steps = tmp_path / "resumed", 4, 8
    cfg = ft.config_from_pretrained(load_checkpoint(pretrained_run))
    cfg = cfg.override(
        "train", steps=steps, batch_size=1, warmup_steps=3, log_every=2, checkpoint_every=1000
    )
    flag = {"stop": False}

    def stop_after(info):
        flag["stop"] = flag["stop"] or info.get("step", 0) >= stop_at

    first = ft.finetune(
        [ct],
        [lab],
        run,
        cfg,
        pretrained=pretrained_run,
        seg=ft.SegmentationConfig(feature_size=4, eval_every=2),
        classes=["liver", "spleen"],
        val_images=[ct],
        val_labels=[lab],
        progress=stop_after,
        cancel=lambda: flag["stop"],
    )
    assert first.cancelled and first.step == stop_at
    assert [p.name for p in list_checkpoints(run)] == [f"step_{stop_at:06d}.safetensors"]
    pretrained = load_checkpoint(run, kind=ft.KIND).meta.extra["pretrained"]
    assert pretrained.endswith(".safetensors")
    # the best so far must survive the resume unless beaten: give the first half's best a
    # Dice no 8-step run reaches, so the resumed validations cannot replace it
    from safetensors.torch import save_file

    best_ckpt = load_checkpoint(run / "best.safetensors", kind=ft.KIND)
    meta = {**best_ckpt.meta.to_dict(), "metrics": {**best_ckpt.meta.metrics, "val_dice": 1.0}}
    header = {"maesil": json.dumps(meta)}
    save_file(best_ckpt.state_dict, str(run / "best.safetensors"), metadata=header)
    (run / "best.json").write_text(json.dumps(meta))
    assert meta["step"] <= stop_at

    args = ["finetune", "--images", ct, "--labels", lab, "--val-images", ct, "--val-labels", lab]
    code, stdout, err = run_cli(capsys, *args, "--out", run, "--resume")
    assert code == 0, err
    assert f"finished at step {steps}" in stdout
    assert [p.name for p in list_checkpoints(run)][-1] == f"step_{steps:06d}.safetensors"
    last = load_checkpoint(run / "checkpoints" / f"step_{steps:06d}.safetensors", kind=ft.KIND)
    assert last.config.train.steps == steps
    assert last.meta.extra["labels"]["classes"][0]["name"] == "liver"
    assert last.meta.extra["pretrained"] == pretrained  # provenance survives the resume

    with (run / "metrics.csv").open() as f:
        rows = [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    for r in rows:  # one uninterrupted warm-up + cosine schedule
        assert r["lr"] == pytest.approx(lr_at(int(r["step"]) - 1, cfg.train), rel=1e-4)
    assert all(0 <= r["val_dice"] < 1 for r in rows)  # validated in both halves
    best = json.loads((run / "best.json").read_text())
    assert (best["step"], best["metrics"]["val_dice"]) == (meta["step"], 1.0)


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_finetuning_on_cpu_writes_one_checkpoint_set(
    pretrained_run, abdomen, tmp_path
):
    """``torchrun --nproc-per-node 2`` (gloo, CPU): both ranks train, rank 0 alone writes."""
    import os
    import subprocess
    import sys

    from maesil_core.checkpoint import list_checkpoints

    folder, image, labels = abdomen
    ct, lab = folder / "ct.nii.gz", folder / "labels.nii.gz"
    run = tmp_path / "ddp"
    argv = ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
    argv += ["--master-port", _free_port(), "-m", "maesil_core", "finetune"]
    argv += ["--images", ct, "--labels", lab, "--pretrained", pretrained_run, "--out", run]
    argv += ["--classes", "liver", "spleen", "--val-images", ct, "--val-labels", lab]
    argv += ["--steps", 4, "--batch-size", 1, "--checkpoint-every", 2, "--eval-every", 2]
    argv += ["--feature-size", 4, "--largest-component", "--device", "cpu", "--workers", 0]
    result = subprocess.run(
        [sys.executable, *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("finished at step 4") == 1  # rank 0 alone reports
    assert result.stdout.count("best validation Dice") == 1
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [
        f"step_00000{s}{ext}"
        for s in (2, 4)
        for ext in (".json", ".safetensors", ".state.safetensors")
    ]
    assert [p.name for p in list_checkpoints(run)] == [
        "step_000002.safetensors",
        "step_000004.safetensors",
    ]
    assert (run / "best.safetensors").is_file() and not (run / ".best").exists()
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    header, steps = rows[0].split(","), [line.split(",")[0] for line in rows[1:]]
    assert steps == ["2", "4"] and "val_dice" in header  # one writer, no duplicated rows
    ckpt = load_checkpoint(run, kind=ft.KIND)
    assert ckpt.step == 4 and ckpt.meta.extra["segmentation"]["largest_component"] is True

    # the stored setting drives inference: one piece per class unless asked otherwise
    held = ft.crop_volume(image, HELD_OUT_SLAB)
    seg = ft.segment(run, held)
    assert seg.extra["largest_component"] is True
    assert all(_parts(seg.labels, cid) <= 1 for cid in seg.classes)
    assert ft.segment(run, held, largest_component=False).extra["largest_component"] is False


def test_select_device_gives_each_torchrun_process_its_own_gpu(monkeypatch):
    from maesil_core.train import distributed as D

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.select_device("auto") == torch.device("cuda", 1)
    assert D.select_device("cuda") == torch.device("cuda", 1)
    assert D.select_device("cuda:0") == torch.device("cuda", 0)  # explicit wins
    assert D.select_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert D.select_device("auto") == torch.device("cuda", 0)


# --------------------------------------------------------------------------- --preset vs --pretrained


def test_finetune_takes_the_architecture_and_geometry_from_pretrained(
    pretrained_run, abdomen, tmp_path, capsys
):
    """With --pretrained, --preset sets training settings only; the checkpoint's encoder,
    spacing and HU window win unless --spacing / --window say otherwise."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "With --pretrained the architecture always comes from the checkpoint" in help_text

    # the same tiny encoder, pretrained at 4 mm with the wide window (smoke's own: 3 mm, abdomen)
    ckpt = load_checkpoint(pretrained_run)
    cfg4 = ckpt.config.override("data", spacing=(4.0, 4.0, 4.0), hu_window="wide")
    pre4 = save_checkpoint(tmp_path / "pre4", build_model(cfg4.model), cfg4, 1)
    folder, _, _ = abdomen
    base = ["finetune", "--images", folder / "ct.nii.gz", "--labels", folder / "labels.nii.gz"]
    base += ["--pretrained", pre4, "--classes", "liver", "--steps", 1, "--batch-size", 1]
    base += ["--feature-size", 4]
    cases = [
        ([], [4.0] * 3, preset("smoke").train.lr),
        (["--preset", "smoke", "--lr", 2e-3], [4.0] * 3, 2e-3),
        (["--preset", "smoke", "--spacing", 3], [3.0] * 3, preset("smoke").train.lr),
    ]
    for n, (extra, spacing, lr) in enumerate(cases):
        out = tmp_path / f"run{n}"
        code, _, err = run_cli(capsys, *base, "--out", out, *extra)
        assert code == 0, err
        config = load_checkpoint(out, kind=ft.KIND).meta.to_dict()["config"]
        assert config["data"]["spacing"] == spacing, extra
        assert config["data"]["hu_window"] == "wide", extra
        assert config["model"] == json.loads(json.dumps(cfg4.to_dict()))["model"], extra
        assert config["train"]["lr"] == pytest.approx(lr), extra


def test_tiny_fine_tunes_at_its_own_batch_not_its_pretraining_one(tmp_path):
    """tiny pretrains at batch 32 for 1,000 steps; fine-tuning (from a tiny checkpoint, with
    --preset tiny, or from scratch) takes batch 4 and 300 steps, a step of the segmenter being
    100x the arithmetic; --batch-size / --steps / a --config file still choose."""
    cfg = preset("tiny")
    pre = load_checkpoint(save_checkpoint(tmp_path / "pre", build_model(cfg.model), cfg, 1))
    parser = cli.build_parser()
    out = str(tmp_path / "seg")

    def finetune(*flags, checkpoint=pre):
        argv = ["finetune", "--images", "x.nii.gz", "--out", out, *flags]
        return cli_segment.finetune_config(parser.parse_args(argv), checkpoint).train

    def pretrain(*flags):
        args = parser.parse_args(["pretrain", "--out", out, *flags])
        return cli.run_config_from_args(args).train

    assert (pretrain().batch_size, pretrain().steps) == (32, 1000)
    for got in (finetune(), finetune("--preset", "tiny"), finetune(checkpoint=None)):
        assert (got.batch_size, got.steps) == (4, 300)
    for got in (ft.config_from_pretrained(pre).train, ft.config_from_pretrained(None).train):
        assert (got.batch_size, got.steps) == (4, 300)  # the Python API, the widgets
    assert finetune("--batch-size", "8", "--steps", "50").batch_size == 8
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train": {"batch_size": 16}}))
    assert finetune("--config", str(config)).batch_size == 16
    assert finetune(checkpoint=None).lr == cfg.train.lr  # the rest is the preset's
    with pytest.raises(ConfigError, match="'tiny-pretrain' is called 'tiny'"):
        finetune("--preset", "tiny-pretrain")
    old = cfg.to_dict() | {"preset": "tiny-pretrain"}  # a run from before the rename
    old = load_checkpoint(save_checkpoint(tmp_path / "old", build_model(cfg.model),
                                          RunConfig.from_dict(old), 1))  # fmt: skip
    for got in (finetune(checkpoint=old), ft.config_from_pretrained(old).train):
        assert (got.batch_size, got.steps) == (4, 300)


@pytest.mark.parametrize("method", ["ae", "vae", "vq-vae", "mae"])
def test_preset_beside_pretrained_is_compared_with_the_checkpoints_method(method, tmp_path):
    """--preset smoke beside a smoke run of any method (pretrain --method, not the preset, chose
    it) only sets the training settings; a preset of another size is refused."""
    cfg = preset("smoke").override("model", method=method)
    pre = load_checkpoint(save_checkpoint(tmp_path / "pre", build_model(cfg.model), cfg, 1))

    def config(*flags):
        argv = ["finetune", "--images", "x.nii.gz", "--out", str(tmp_path / "seg"), *flags]
        return cli_segment.finetune_config(cli.build_parser().parse_args(argv), pre)

    got = config("--preset", "smoke", "--lr", "2e-3")
    assert got.model.method == method and got.train.lr == pytest.approx(2e-3)
    with pytest.raises(CheckpointError, match="--preset small"):
        config("--preset", "small")


# --------------------------------------------------------------------------- post-processing


def _parts(labels: np.ndarray, cid: int) -> int:
    """Connected components of class ``cid`` (26-connectivity, as MONAI's default)."""
    from scipy import ndimage

    return int(ndimage.label(labels == cid, structure=np.ones((3, 3, 3)))[1])


def test_largest_component_removes_stray_voxels(finetuned_run, abdomen, tmp_path, capsys):
    """segment / evaluate --largest-component on the held-out slab: one piece per organ,
    nothing but stray voxels removed, HD95 no worse."""
    from scipy import ndimage

    from maesil_core.data import save_volume

    folder, image, labels = abdomen
    ct, lab = tmp_path / "held_ct.nii.gz", tmp_path / "held_labels.nii.gz"
    for vol, path in ((image, ct), (labels, lab)):
        held = ft.crop_volume(vol, HELD_OUT_SLAB)
        save_volume(held.array, held.affine, path, dtype=np.int16)
    flags = ("--no-largest-component", "--largest-component")

    segs = []
    for flag in flags:
        out = tmp_path / f"seg{flag}.nii.gz"
        argv = ["segment", "--checkpoint", finetuned_run, "--input", ct, "--out", out, flag]
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
        segs.append(np.asarray(nib.load(str(out)).dataobj))
    raw, clean = segs
    assert _parts(raw, 1) > 1  # the tiny model leaves stray liver voxels ...
    assert _parts(clean, 1) == 1 and _parts(clean, 2) <= 1  # ... which are gone
    assert not clean[clean != raw].any()  # voxels are only removed, never relabelled
    pieces, _ = ndimage.label(raw == 1, structure=np.ones((3, 3, 3)))
    assert (clean == 1).sum() == np.bincount(pieces.ravel())[1:].max()  # the largest, whole

    liver = []
    for flag in flags:
        csv_path = tmp_path / f"eval{flag}.csv"
        argv = ["evaluate", "--checkpoint", finetuned_run, "--images", ct, "--labels", lab]
        code, _, err = run_cli(capsys, *argv, "--csv", csv_path, flag)
        assert code == 0, err
        rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:]]
        liver += [(float(r[3]), float(r[4])) for r in rows if r[:2] == ["mean", "liver"]]
    (dice_raw, hd_raw), (dice_clean, hd_clean) = liver
    assert hd_clean <= hd_raw, (hd_raw, hd_clean)
    assert dice_clean >= dice_raw, (dice_raw, dice_clean)
    print(f"liver Dice {dice_raw:.4f} -> {dice_clean:.4f}, HD95 {hd_raw:.1f} -> {hd_clean:.1f} mm")
