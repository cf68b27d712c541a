"""MONAI interoperability on real CT: a Bundle MONAI runs, ViT / UNETR weights both ways.

Every check goes through MONAI's own code: ``monai.bundle.verify_net_in_out``,
``ConfigWorkflow.check_properties``, the Bundle specification's required metadata, a subprocess
``python -m monai.bundle run``, and ``monai.networks.nets.ViT`` / ``UNETR`` / ``ViTAutoEnc``
loading our weights with ``strict=True``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from maesil_core import segmentation as ft
from maesil_core.checkpoint import load_checkpoint, save_checkpoint
from maesil_core.config import ModelConfig, RunConfig, preset
from maesil_core.data.labels import LabelClass, LabelSet
from maesil_core.data.transforms import inference_transforms
from maesil_core.errors import CheckpointError, ConfigError
from maesil_core.interop import monai_bundle, monai_vit
from maesil_core.models.segmenter import UNETRSegmenter

pytest.importorskip("einops")  # MONAI's ViT attention needs it (a testing dependency)


def _crop(path: str | Path, cfg: RunConfig, size: tuple[int, int, int]) -> torch.Tensor:
    """(1, 1, *size) crop from the middle of a real CT, preprocessed as the model sees it."""
    img = inference_transforms(cfg.data)({"image": str(path)})["image"]
    x = torch.as_tensor(img).as_subclass(torch.Tensor).float()
    starts = [max(0, (s - c) // 2) for s, c in zip(x.shape[1:], size)]
    x = x[:, starts[0] : starts[0] + size[0], starts[1] : starts[1] + size[1]]
    x = x[..., starts[2] : starts[2] + size[2]]
    assert tuple(x.shape[1:]) == size, x.shape
    return x[None]


def _match_eps(net: torch.nn.Module, eps: float) -> None:
    for m in net.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps


# --------------------------------------------------------------------------- a segmenter


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, shared_data):
    """A tiny liver + spleen segmenter, briefly fine-tuned from scratch on abdomen_ct."""
    cfg = preset("smoke").override(
        "train", steps=30, batch_size=2, lr=3e-3, warmup_steps=5, log_every=10, threads=1
    )
    cfg = cfg.override("train", checkpoint_every=1000)
    run = tmp_path_factory.mktemp("interop") / "seg"
    folder = shared_data / "abdomen_ct"
    ft.finetune(
        [folder / "ct.nii.gz"], [folder / "labels.nii.gz"], run, cfg, classes=["liver", "spleen"]
    )
    return run


@pytest.fixture(scope="module")
def bundle(seg_run, tmp_path_factory):
    return monai_bundle.export_bundle(seg_run, tmp_path_factory.mktemp("bundle") / "b")


def test_bundle_licence_is_the_real_one_with_src_on_the_path():
    """With ``src`` first on ``sys.path`` (as the benchmarks put it), the build's
    ``src/napari_maesil.egg-info`` is the first napari-maesil distribution found, and it
    lists no LICENSE: the bundle got the one-line fallback instead of the licence (this test
    failed or passed with the order the tests ran in)."""
    src = Path(monai_bundle.__file__).resolve().parents[2]
    script = "from maesil_core.interop.monai_bundle import _licence_text; print(_licence_text())"
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("BSD 3-Clause License"), out.stdout[:200]


def test_bundle_layout_and_metadata_describe_the_checkpoint(bundle, seg_run):
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert (bundle / rel).is_file(), rel
    assert (bundle / "docs" / "README.md").read_text().startswith("# napari-maesil")
    assert (bundle / "LICENSE").read_text().startswith("BSD 3-Clause License")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert image["spacing"] == [3.0, 3.0, 3.0] and image["hu_window"] == [-175.0, 250.0]
    assert image["spatial_shape"] == [32, 32, 32] and image["value_range"] == [0, 1]
    assert pred["channel_def"] == {"0": "background", "1": "liver", "2": "spleen"}
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    ckpt = load_checkpoint(seg_run)
    assert set(state) == set(ckpt.state_dict)
    infer = json.loads((bundle / "configs" / "inference.json").read_text())
    chain = [t["_target_"] for t in infer["preprocessing"]["transforms"]]
    assert chain[:5] == [
        "LoadImaged",
        "EnsureChannelFirstd",
        "Orientationd",
        "Spacingd",
        "ScaleIntensityRanged",
    ]
    post = [t["_target_"] for t in infer["postprocessing"]["transforms"]]
    assert post[0] == "AsDiscreted" and "Invertd" in post and post[-1] == "SaveImaged"
    assert infer["inferer"]["_target_"] == "SlidingWindowInferer"


def test_bundle_passes_monai_verify_net_in_out_and_workflow_properties(bundle):
    from monai.bundle import ConfigWorkflow, verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
    )
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(bundle),
    )
    workflow.initialize()
    assert workflow.check_properties() in ([], None)  # no missing required property


#: what MONAI's Bundle specification requires of configs/metadata.json (the top-level keys of its
#: meta schema, and of each tensor under network_data_format); MONAI's verify_metadata downloads
#: that schema, which CI cannot (no internet): docs/interop.md records the run against it
SPEC_KEYS = (
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
TENSOR_KEYS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")


def test_bundle_metadata_has_what_the_bundle_specification_requires(bundle):
    import monai

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert [k for k in SPEC_KEYS if k not in meta] == []
    assert meta["schema"].startswith("https://") and meta["schema"].endswith(".json")
    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert isinstance(meta["required_packages_version"], dict)
    assert "napari-maesil" in meta["required_packages_version"]
    io = meta["network_data_format"]
    for group in ("inputs", "outputs"):
        assert io[group], group
        for name, tensor in io[group].items():
            assert [k for k in TENSOR_KEYS if k not in tensor] == [], (group, name)
            assert tensor["type"] == "image" and len(tensor["spatial_shape"]) == 3
            assert isinstance(tensor["num_channels"], int) and len(tensor["value_range"]) == 2


def test_bundle_run_by_monai_agrees_with_maesil_segment(bundle, seg_run, shared_data, tmp_path):
    """`python -m monai.bundle run` on a real CT gives maesil segment's labels (measured:
    identical voxels, Dice 1.000 for liver and spleen, on abdomen_ct)."""
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(shared_data / "abdomen_ct" / "ct.nii.gz", data / "abdomen.nii.gz")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    cmd += [str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle)]
    cmd += ["--dataset_dir", str(data), "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    img = nib.load(out / "abdomen_seg.nii.gz")
    theirs = np.asarray(img.dataobj)
    # the bundle runs the network only: compare with maesil segment's own answer, before the
    # body mask that segment applies by default (docs/interop.md)
    ours = ft.segment(seg_run, shared_data / "abdomen_ct" / "ct.nii.gz", body_mask=False)
    assert theirs.shape == ours.labels.shape
    np.testing.assert_allclose(img.affine, ours.affine, atol=1e-4)
    for cid, name in ours.classes.items():
        a, b = theirs == cid, ours.labels == cid
        if a.sum() + b.sum():
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            print(f"{name}: Dice bundle vs maesil segment {dice:.4f} ({b.sum()} voxels)")
            assert dice > 0.99, (name, dice)
    assert (ours.labels == 1).sum() > 1000, "the segmenter finds no liver: nothing to compare"
    assert (theirs == ours.labels).mean() > 0.999


def test_bundle_export_refuses_what_it_cannot_do(bundle, trained_run, seg_run, tmp_path):
    with pytest.raises(CheckpointError, match="fine-tune it first"):
        monai_bundle.export_bundle(trained_run, tmp_path / "x")
    with pytest.raises(ConfigError, match="--force"):
        monai_bundle.export_bundle(seg_run, bundle)  # not empty


# --------------------------------------------------------------------------- ViT / UNETR


def test_monai_vit_export_loads_strict_and_gives_the_same_features(
    trained_run, shared_data, tmp_path
):
    """A pretrained encoder in MONAI's ViT, on a held-out real CT crop (chest_ct)."""
    from monai.networks.nets import ViT

    ckpt = load_checkpoint(trained_run)
    model_cfg = ckpt.config.model
    from maesil_core.models import build_model

    ours = build_model(model_cfg).eval()
    ours.load_state_dict(ckpt.state_dict)
    out = monai_vit.export_vit(trained_run, tmp_path / "vit.pt")
    assert json.loads(out.kwargs_path.read_text())["kwargs"] == out.kwargs
    vit = ViT(**out.kwargs).eval()
    vit.load_state_dict(torch.load(out.path, weights_only=True), strict=True)
    x = _crop(shared_data / "chest_ct" / "ct.nii.gz", ckpt.config, (32, 32, 32))
    with torch.no_grad():
        ref = ours.encoder(x)
        hidden = ours.encoder.forward_features(x, list(range(model_cfg.depth - 1)))
        feats, states = vit(x)
        diff = float((feats - ref).abs().max())
        diff_h = max(float((a - b).abs().max()) for a, b in zip(hidden, states))
        _match_eps(vit, model_cfg.norm_eps)
        exact = float((vit(x)[0] - ref).abs().max())
    print(f"max |MONAI ViT - maesil| {diff:.2e} (eps 1e-5 vs 1e-6), {exact:.2e} with eps matched")
    assert float(ref.abs().max()) > 0.1  # real features, not zeros
    assert diff < 1e-3 and diff_h < 1e-3  # only the LayerNorm epsilon differs
    assert exact < 1e-5


def _tiny_vit_b_segmenter(layers):
    """A ViT-B-shaped (patch 16, 12 blocks) but narrow segmenter, as a checkpoint's content."""
    cfg = ModelConfig(
        superpatch=(32, 32, 32),
        patch=(16, 16, 16),
        embed_dim=24,
        depth=12,
        num_heads=2,
        decoder_embed_dim=24,
        decoder_depth=1,
        decoder_num_heads=2,
        block=(1, 1, 1),
    )
    torch.manual_seed(0)
    return UNETRSegmenter(cfg, 2, feature_size=8, layers=layers).eval(), cfg


def _save_segmentation(model, cfg, run, layers):
    rc = RunConfig(preset="custom", model=cfg)
    rc.data.spacing = (3.0, 3.0, 3.0)
    labels = LabelSet([LabelClass(1, "liver", (5,)), LabelClass(2, "spleen", (1,))])
    seg = ft.SegmentationConfig(feature_size=8, layers=layers)
    extra = {"segmentation": seg.to_dict(), "labels": labels.to_dict()}
    return save_checkpoint(run, model, rc, 1, kind="segmentation", extra=extra)


def test_monai_unetr_export_for_the_matching_shape(tmp_path, shared_data):
    from monai.networks.nets import UNETR

    layers = monai_vit.MONAI_UNETR_LAYERS
    model, cfg = _tiny_vit_b_segmenter(layers)
    ckpt = _save_segmentation(model, cfg, tmp_path / "seg", layers)
    out = monai_vit.export_unetr(ckpt, tmp_path / "unetr.pt")
    net = UNETR(**out.kwargs).eval()
    net.load_state_dict(torch.load(out.path, weights_only=True), strict=True)
    x = _crop(shared_data / "chest_ct" / "ct.nii.gz", preset("smoke"), (32, 32, 32))
    with torch.no_grad():
        ref = model(x)
        _match_eps(net, 1e-6)
        diff = float((net(x) - ref).abs().max())
    print(f"max |MONAI UNETR - maesil| logits {diff:.2e} (eps matched)")
    assert diff < 1e-4

    default, cfg = _tiny_vit_b_segmenter(None)  # UNETR-paper taps 2, 5, 8: not MONAI's
    ckpt = _save_segmentation(default, cfg, tmp_path / "seg2", None)
    with pytest.raises(CheckpointError, match=r"decoder fed by blocks \[2, 5, 8, 11\]"):
        monai_vit.export_unetr(ckpt, tmp_path / "no.pt")


def test_import_monai_ssl_vit_gives_its_features_and_fine_tunes(tmp_path, shared_data):
    """MONAI's self-supervised ViTAutoEnc weights (smoke preset's shape, MONAI's own init and
    default qkv_bias=False) -> a checkpoint whose encoder computes MONAI's features exactly,
    that fine-tunes, and that exports back to the same ViT weights."""
    from monai.networks.nets import ViTAutoEnc

    torch.manual_seed(1)
    kwargs = dict(in_channels=1, img_size=32, patch_size=16, hidden_size=96, mlp_dim=384)
    ssl = ViTAutoEnc(**kwargs, num_layers=4, num_heads=3).eval()
    weights = tmp_path / "ssl_vit.pt"
    torch.save(ssl.state_dict(), weights)
    run = tmp_path / "imported"
    tiny16 = preset("smoke").override("model", patch=(16, 16, 16), block=(1, 1, 1))
    monai_vit.import_vit(weights, run, tiny16)
    ckpt = load_checkpoint(run)
    assert ckpt.meta.extra["encoder_only"] and ckpt.config.model.pos_embed == "learned"
    from maesil_core.models import build_model

    ours = build_model(ckpt.config.model).eval()
    ours.load_state_dict(ckpt.state_dict)
    x = _crop(shared_data / "abdomen_ct" / "ct.nii.gz", ckpt.config, (32, 32, 24))
    x = torch.nn.functional.pad(x, (0, 8))  # to MONAI's fixed 32^3
    with torch.no_grad():
        _, states = ssl(x)
        hidden = ours.encoder.forward_features(x, [0, 1, 2])
    diff = max(float((a - b).abs().max()) for a, b in zip(hidden, states[:3]))
    print(f"max |maesil - MONAI ViTAutoEnc| hidden states {diff:.2e}")
    assert diff < 1e-5

    back = monai_vit.export_vit(run, tmp_path / "back.pt")
    again = torch.load(back.path, weights_only=True)
    for key, value in ssl.state_dict().items():
        if key in again and "norm_cross_attn" not in key:
            torch.testing.assert_close(again[key], value, msg=key)

    cfg = ft.config_from_pretrained(ckpt).override(
        "train", steps=2, batch_size=1, log_every=1, checkpoint_every=1000, threads=1
    )
    folder = shared_data / "abdomen_ct"
    result = ft.finetune(
        [folder / "ct.nii.gz"],
        [folder / "labels.nii.gz"],
        tmp_path / "ft",
        cfg,
        pretrained=run,
        classes=["liver"],
    )
    assert result.step == 2


def test_import_refuses_what_does_not_map(tmp_path):
    from monai.networks.nets import ViT

    cls = ViT(1, 32, 8, hidden_size=96, mlp_dim=384, num_layers=4, num_heads=3, classification=True)
    torch.save(cls.state_dict(), tmp_path / "cls.pt")
    with pytest.raises(CheckpointError, match="class token"):
        monai_vit.import_vit(tmp_path / "cls.pt", tmp_path / "a", preset("smoke"))
    wide = ViT(1, 32, 8, hidden_size=120, mlp_dim=480, num_layers=4, num_heads=3)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ConfigError, match=r"embed_dim 120 \(weights\) vs 96"):
        monai_vit.import_vit(tmp_path / "wide.pt", tmp_path / "b", preset("smoke"))
    torch.save({"model": ConfigError("not a tensor")}, tmp_path / "pickle.pt")  # a pickled object
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        monai_vit.import_vit(tmp_path / "pickle.pt", tmp_path / "c", preset("smoke"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- the command line


def _cli(capsys, *argv):
    from maesil_core import cli

    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_exports_and_imports_an_encoder(trained_run, shared_data, tmp_path, capsys):
    """maesil export --format monai-vit, then maesil import of the same weights: the imported
    run holds the same encoder and `maesil info` describes it; `maesil reconstruct` refuses
    it (its decoder was never trained) with one line that says what to do."""
    code, out, err = _cli(
        capsys, "export", "--checkpoint", trained_run, "--format", "monai-vit", "--out",
        tmp_path / "vit.pt",
    )  # fmt: skip
    assert code == 0, err
    assert "monai.networks.nets.ViT" in out and (tmp_path / "vit.json").is_file()
    code, out, err = _cli(
        capsys, "import", "--from", "monai-vit", tmp_path / "vit.pt", "--preset", "smoke",
        "--out", tmp_path / "imported",
    )  # fmt: skip
    assert code == 0, err
    original, imported = load_checkpoint(trained_run), load_checkpoint(tmp_path / "imported")
    assert imported.meta.extra["encoder_only"]
    for key, value in original.state_dict.items():
        if key.startswith("encoder."):
            torch.testing.assert_close(imported.state_dict[key], value, msg=key)
    code, out, err = _cli(capsys, "info", tmp_path / "imported")
    assert code == 0 and "maesil" in out, err
    ct = shared_data / "chest_ct" / "ct.nii.gz"
    code, out, err = _cli(
        capsys, "reconstruct", "--checkpoint", tmp_path / "imported", "--input", ct,
        "--out", tmp_path / "recon",
    )  # fmt: skip
    assert code == 2 and "never trained" in err and "--resume" in err, err
    assert "Traceback" not in err and not (tmp_path / "recon").exists()


def test_cli_exports_a_bundle_and_never_overwrites_one(seg_run, tmp_path, capsys):
    out_dir = tmp_path / "bundle"
    code, out, err = _cli(
        capsys, "export", "--checkpoint", seg_run, "--format", "monai-bundle", "--out", out_dir
    )
    assert code == 0, err
    assert "python -m monai.bundle run" in out
    model = out_dir / "models" / "model.pt"
    before = (model.stat().st_mtime_ns, model.read_bytes())
    code, out, err = _cli(
        capsys, "export", "--checkpoint", seg_run, "--format", "monai-bundle", "--out", out_dir
    )
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1, err
    assert (model.stat().st_mtime_ns, model.read_bytes()) == before


class _Payload:
    """Unpickling this would create ``self.path``: the import must never do it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize(
    "case",
    ["bundle-of-pretrain", "bundle-img-size", "bad-img-size", "missing", "unetr-of-pretrain",
     "pickle-payload", "wrong-width", "import-into-a-file"],
)  # fmt: skip
def test_cli_export_and_import_refuse_bad_input_with_one_line(case, trained_run, tmp_path, capsys):
    from monai.networks.nets import ViT

    marker = tmp_path / "payload-ran"
    vit = tmp_path / "vit.pt"
    if case == "pickle-payload":
        torch.save({"model": _Payload(marker)}, vit)
    elif case == "wrong-width":
        torch.save(ViT(1, 32, 8, hidden_size=120, mlp_dim=480, num_layers=4, num_heads=3)
                   .state_dict(), vit)  # fmt: skip
    elif case == "import-into-a-file":
        torch.save(ViT(1, 32, 8, hidden_size=96, mlp_dim=384, num_layers=4, num_heads=3)
                   .state_dict(), vit)  # fmt: skip
        (tmp_path / "out").write_text("a file")
    export = ["export", "--checkpoint", trained_run, "--out", tmp_path / "out"]
    export_pt = ["export", "--checkpoint", trained_run, "--out", tmp_path / "out.pt"]
    argv, expect = {
        "bundle-of-pretrain": (export + ["--format", "monai-bundle"], "fine-tune it first"),
        "bundle-img-size": (
            [
                "export",
                "--checkpoint",
                trained_run,
                "--format",
                "monai-bundle",
                "--img-size",
                "32",
                "--out",
                tmp_path / "b",
            ],
            "--img-size",
        ),  # fmt: skip
        "bad-img-size": (export_pt + ["--format", "monai-vit", "--img-size", "0"], "--img-size"),
        "missing": (
            [
                "export",
                "--checkpoint",
                tmp_path / "nope",
                "--format",
                "monai-vit",
                "--out",
                tmp_path / "v.pt",
            ],
            "does not exist",
        ),  # fmt: skip
        "unetr-of-pretrain": (export_pt + ["--format", "monai-unetr"], "fine-tune first"),
        "pickle-payload": (
            ["import", "--from", "monai-vit", vit, "--out", tmp_path / "run"],
            "state dict",
        ),  # fmt: skip
        "wrong-width": (
            ["import", "--from", "monai-vit", vit, "--out", tmp_path / "run"],
            "embed_dim 120",
        ),  # fmt: skip
        "import-into-a-file": (
            ["import", "--from", "monai-vit", vit, "--out", tmp_path / "out"],
            "is a file",
        ),  # fmt: skip
    }[case]
    code, out, err = _cli(capsys, *argv)
    assert code == 2, (case, out, err)
    assert expect in err and len(err.strip().splitlines()) == 1, (case, err)
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "run").exists()
