"""The comparison methods (MAE-3D, SimMIM, GL-MAE, AE, VAE, VQ-VAE) and the reconstruction benchmark.

Every method is pretrained briefly on real CT (32^3 crops of ``abdomen_ct`` from the shared
data, windowed to [0, 1]) with the project's training loop, must lower its own loss, reload
from its checkpoint to identical outputs, and (ViT-based methods) hand its encoder to the
segmentation model. Sizes are tiny so the file runs in about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maesil_core import cli  # at import time: cli.Progress binds sys.stderr as a default
from maesil_core.checkpoint import load_checkpoint
from maesil_core.config import preset
from maesil_core.models.registry import available_methods, build_from_checkpoint, build_model
from maesil_core.models.vit3d import ViTEncoder3D
from maesil_core.train import fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CT = SHARED / "abdomen_ct" / "ct.nii.gz"
VIT_METHODS = ("mae", "simmim", "gl-mae")
CONV_METHODS = ("ae", "vae", "vq-vae")

pytestmark = pytest.mark.skipif(not CT.is_file(), reason=f"{CT} not available")


def ct_crops(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n 32^3 crops of the real abdomen CT, -175..250 HU -> [0, 1], skipping almost-air crops."""
    nib = pytest.importorskip("nibabel")
    vol = np.asarray(nib.load(str(CT)).dataobj, dtype=np.float32)
    vol = np.clip((vol + 175.0) / 425.0, 0.0, 1.0)
    vol = np.pad(vol, [(0, max(0, size - s)) for s in vol.shape])
    rng = np.random.default_rng(seed)
    crops = []
    while len(crops) < n:
        start = [int(rng.integers(0, s - size + 1)) for s in vol.shape]
        crop = vol[tuple(slice(a, a + size) for a in start)]
        if crop.std() > 0.1:
            crops.append(crop)
    return torch.from_numpy(np.stack(crops))[:, None].contiguous()


def tiny_cfg(method: str, steps: int):
    cfg = preset("smoke")
    extra = {"ae_base_channels": 8} if method in CONV_METHODS else {}
    cfg.model = dataclasses.replace(cfg.model, method=method, extra=extra)
    cfg.train = dataclasses.replace(
        cfg.train,
        steps=steps,
        batch_size=2,
        lr=2e-3,
        warmup_steps=5,
        checkpoint_every=steps,
        log_every=5,
        device="cpu",
        precision="fp32",
        seed=0,
    )
    return cfg.validate()


def batches(pool: torch.Tensor, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    while True:
        for idx in torch.randperm(len(pool), generator=g).split(batch):
            if len(idx) == batch:
                yield {"image": pool[idx]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads that spin-wait for a
    busy core make every step many times slower (measured: 700 s vs 30 s for 150 steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return ct_crops(16)


@pytest.fixture(scope="module")
def trained(pool, tmp_path_factory):
    """Each method trained briefly with ``fit``: {method: (model, FitResult, loss before, after)}."""
    out = {}
    probe = pool[:2]

    def eval_loss(model) -> float:
        model.eval()
        with torch.no_grad():
            loss = model(probe, generator=torch.Generator().manual_seed(123)).loss.item()
        model.train()
        return loss

    for method in VIT_METHODS + CONV_METHODS:
        steps = 30 if method != "gl-mae" else 20
        cfg = tiny_cfg(method, steps)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        before = eval_loss(model)
        run_dir = tmp_path_factory.mktemp(method)
        res = fit(model, batches(pool), cfg, run_dir, device=torch.device("cpu"))
        out[method] = (model.eval(), res, before, eval_loss(model))
    return out


def test_registry_lists_every_method():
    assert set(available_methods()) >= {"maesil", "mae", "simmim", "gl-mae", "ae", "vae", "vq-vae"}


@pytest.mark.parametrize("method", VIT_METHODS + CONV_METHODS)
def test_pretraining_lowers_own_loss(trained, method):
    _, res, before, after = trained[method]
    assert res.step == res.history[-1]["step"] and not res.cancelled
    assert after < 0.9 * before, (method, before, after)


@pytest.mark.parametrize("method", VIT_METHODS + CONV_METHODS)
def test_every_method_leaves_padding_out_of_its_loss(trained, pool, method):
    """The loop passes batch["valid"]: all-ones is the plain loss, zeros change it, and for the
    autoencoders the loss is exactly the MSE over the scan's voxels."""
    model = trained[method][0]
    x = pool[:2]
    valid = torch.ones_like(x)
    valid[..., 12:] = 0.0  # the last 20 of 32 voxels along W are padding

    def loss(**kw):
        was_training = model.training
        model.eval()  # no VQ codebook update between the calls
        try:
            with torch.no_grad():
                return model(x, generator=torch.Generator().manual_seed(7), **kw)
        finally:
            model.train(was_training)

    plain = loss()
    torch.testing.assert_close(loss(valid=torch.ones_like(x)).loss, plain.loss)
    part = loss(valid=valid)
    assert torch.isfinite(part.loss) and not torch.allclose(part.loss, plain.loss)
    if method == "ae":
        expected = ((part.pred - x) ** 2 * valid).sum() / valid.sum()
        torch.testing.assert_close(part.loss, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", VIT_METHODS + CONV_METHODS)
def test_checkpoint_reloads_to_identical_outputs(trained, pool, method):
    model, res, _, _ = trained[method]
    reloaded, ckpt = build_from_checkpoint(res.checkpoint)
    assert ckpt.meta.method == method and type(reloaded) is type(model)
    x = pool[4:6]
    a = model.reconstruct(x, generator=torch.Generator().manual_seed(7), return_raw=True)
    b = reloaded.reconstruct(x, generator=torch.Generator().manual_seed(7), return_raw=True)
    for u, v in zip(a, b):
        assert u.shape == x.shape[:1] + u.shape[1:] and torch.equal(u, v)
    recon, vox, raw = a
    if method in CONV_METHODS:  # autoencoders see everything: no mask, recon = prediction
        assert torch.count_nonzero(vox) == 0 and torch.equal(recon, raw)
    else:  # input kept on visible voxels
        vis = vox == 0
        assert 0 < vox.mean() < 1 and torch.equal(recon[vis], x[vis])


@pytest.mark.parametrize("method", VIT_METHODS)
def test_encoder_loads_into_segmentation_model(trained, method):
    model, res, _, _ = trained[method]
    assert isinstance(model.encoder, ViTEncoder3D)
    state = load_checkpoint(res.checkpoint).state_dict
    enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    fresh = ViTEncoder3D(model.cfg)
    assert set(enc) == set(fresh.state_dict())
    fresh.load_state_dict(enc, strict=True)
    if importlib.util.find_spec("maesil_core.models.segmenter") is not None:
        from maesil_core.models.segmenter import UNETRSegmenter

        seg = UNETRSegmenter(model.cfg, num_classes=2)
        assert seg.load_encoder(state, str(res.checkpoint)) == len(enc)
        torch.testing.assert_close(
            seg.encoder(torch.ones(1, 1, 32, 32, 32)), model.encoder(torch.ones(1, 1, 32, 32, 32))
        )


@pytest.mark.parametrize("method", CONV_METHODS)
def test_conv_checkpoint_loads_into_the_conv_segmenter(trained, pool, method):
    """AE / VAE / VQ-VAE: the encoder and decoder load (changing the initial weights), the
    output layer is new, and at step 0 the segmenter's decoder computes what was pretrained:
    the zero-initialised skips add nothing, the latent is z (AE), mu (VAE), unquantised z (VQ)."""
    from maesil_core import segmentation as ft
    from maesil_core.models.conv_segmenter import ConvAESegmenter

    model, res, _, _ = trained[method]
    ckpt = load_checkpoint(res.checkpoint)
    cfg = ft.config_from_pretrained(ckpt)
    assert cfg.model.method == method and cfg.model.extra == model.cfg.extra
    torch.manual_seed(0)
    scratch = ft.build_segmenter(cfg, ft.SegmentationConfig(feature_size=4), 2)
    torch.manual_seed(0)
    seg = ft.build_segmenter(cfg, ft.SegmentationConfig(feature_size=4), 2)
    assert isinstance(seg, ConvAESegmenter)
    ft.load_pretrained_encoder(seg, ckpt)
    own = seg.state_dict()
    loaded = [k for k in own if k.startswith(("enc.", "dec."))]
    assert loaded and all(torch.equal(own[k], ckpt.state_dict[k]) for k in loaded)
    assert any(k.startswith("dec.") for k in loaded)
    assert not torch.equal(
        own["enc.body.0.conv.weight"], scratch.state_dict()["enc.body.0.conv.weight"]
    )
    last = f"dec.body.{2 * seg.stages - 1}.conv.weight"  # the pretrained output layer
    assert last in ckpt.state_dict and last not in own  # replaced by the class head
    for k in ("out.conv.conv.weight", "up0.transp_conv.conv.weight"):
        assert torch.equal(own[k], scratch.state_dict()[k])  # the head keeps its initialisation
    assert not any(k.startswith("quantizer.") for k in own)  # VQ-VAE: codebook not used

    x = pool[6:8]
    model.eval()
    seg.eval()
    with torch.no_grad():
        enc_out = model.enc(x)
        z, feats = seg.latent(x)
        torch.testing.assert_close(z, enc_out[:, : seg.latent_channels])  # VAE: mu
        y = seg.dec.inp(z)
        for k in range(seg.stages):  # the segmenter's decoder path, skips included
            y = y + seg.skips[k](feats[seg.stages - 1 - k])
            y = seg.dec.body[2 * k](y)
            if k + 1 < seg.stages:
                y = seg.dec.body[2 * k + 1](y)
        pretrained = model.dec.body[:-1](model.dec.inp(enc_out[:, : seg.latent_channels]))
        torch.testing.assert_close(y, pretrained)
        logits = seg(torch.rand(1, 1, 48, 32, 16))
    assert logits.shape == (1, 3, 48, 32, 16)


def test_conv_and_vit_checkpoints_are_refused_by_the_other_segmenter(trained):
    from maesil_core import segmentation as ft
    from maesil_core.errors import CheckpointError
    from maesil_core.models.conv_segmenter import ConvAESegmenter
    from maesil_core.models.segmenter import UNETRSegmenter

    ae, vit = (
        load_checkpoint(trained["ae"][1].checkpoint),
        load_checkpoint(trained["mae"][1].checkpoint),
    )
    with pytest.raises(CheckpointError, match=r"encoder ViT \(mae\) vs conv \(ae\)"):
        ft.load_pretrained_encoder(ConvAESegmenter(ae.config.model, 2), vit)
    with pytest.raises(CheckpointError, match=r"encoder conv \(ae\) vs ViT \(mae\)"):
        ft.load_pretrained_encoder(UNETRSegmenter(vit.config.model, 2), ae)
    with pytest.raises(CheckpointError, match="holds no convolutional autoencoder weights"):
        ConvAESegmenter(ae.config.model, 2).load_encoder(vit.state_dict, "mae")
    with pytest.raises(CheckpointError, match=r"method vae vs ae"):
        vae = load_checkpoint(trained["vae"][1].checkpoint)
        ft.load_pretrained_encoder(ConvAESegmenter(ae.config.model, 2), vae)


@pytest.mark.parametrize("method", CONV_METHODS)
def test_cli_finetunes_a_conv_autoencoder_run_and_segments(trained, method, tmp_path, capsys):
    """``maesil finetune --pretrained RUN_DIR`` of an AE / VAE / VQ-VAE run on the real abdomen CT
    (liver, spleen): the Dice + CE loss falls within 60 steps, and the run segments a CT."""
    import nibabel as nib

    from maesil_core import segmentation as ft

    _, res, _, _ = trained[method]
    run_dir = Path(res.checkpoint).parents[1]
    assert load_checkpoint(run_dir).meta.method == method
    labels = SHARED / "abdomen_ct" / "labels.nii.gz"
    out = tmp_path / "seg"
    argv = ["finetune", "--images", CT, "--labels", labels, "--pretrained", run_dir]
    argv += ["--out", out, "--classes", "liver", "spleen", "--steps", 60, "--batch-size", 2]
    argv += ["--lr", 3e-3, "--roi", 32, 32, 16, "--feature-size", 4, "--device", "cpu"]
    code = cli.main([str(a) for a in argv])
    assert code == 0, capsys.readouterr().err
    rows = (out / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    losses = [float(r.split(",")[head.index("loss")]) for r in rows[1:]]
    assert len(losses) >= 3 and losses[-1] < 0.85 * losses[0], losses
    meta = load_checkpoint(out, kind="segmentation").meta.to_dict()
    assert meta["method"] == method and meta["extra"]["pretrained"].endswith(".safetensors")
    result = ft.segment(out, CT)
    assert result.labels.shape == nib.load(str(CT)).shape and set(np.unique(result.labels)) <= {
        0,
        1,
        2,
    }


def test_vqvae_uses_many_codes(trained):
    _, res, _, _ = trained["vq-vae"]
    last = res.history[-1]
    assert last["codes_used"] > 1 and last["perplexity"] > 1.5, last
    assert 0 < last["codebook_usage"] <= 1


def test_glmae_consistency_terms_nonzero_and_falling(trained):
    model, res, _, _ = trained["gl-mae"]
    rows = res.history
    for key in ("g2g", "g2l", "rec_local", "rec_global"):
        assert all(r[key] > 0 for r in rows), key
    first = (rows[0]["g2g"] + rows[0]["g2l"]) / 2
    last = (rows[-1]["g2g"] + rows[-1]["g2l"]) / 2
    assert last < first, (first, last)
    # the EMA teacher moved away from its initial copy of the student, but is not the student
    t = model.teacher_encoder.patch_embed.proj.weight
    s = model.encoder.patch_embed.proj.weight
    assert not torch.equal(t, s)


def test_glmae_ema_once_per_optimiser_step(tmp_path):
    cfg = tiny_cfg("gl-mae", 1).model
    torch.manual_seed(0)
    m = build_model(cfg).train()
    x = torch.rand(2, 1, 32, 32, 32)
    teacher0 = m.teacher_encoder.norm.weight.clone()
    m(x)  # forwards never move the teacher (gradient accumulation runs several)
    m(x)
    assert torch.equal(m.teacher_encoder.norm.weight, teacher0)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m(x).loss.backward()
    opt.step()
    m.after_optimizer_step()  # the loop's after-step hook: teacher = m * teacher + (1 - m) * student
    expected = m.momentum * teacher0 + (1 - m.momentum) * m.encoder.norm.weight
    torch.testing.assert_close(m.teacher_encoder.norm.weight, expected)
    with torch.no_grad():
        opt.step()  # eval-mode / no-grad forwards never move the teacher
        m.eval()
        before = m.teacher_encoder.norm.weight.clone()
        m(x)
    assert torch.equal(m.teacher_encoder.norm.weight, before)

    # fit() calls the hook once per optimiser step, not once per micro-batch
    from maesil_core.train import fit

    calls = []
    m.after_optimizer_step = lambda: calls.append(1)  # noqa: E731  (instance attribute)
    run = tiny_cfg("gl-mae", 3).override("train", accum_steps=2, batch_size=1)
    batches = iter(lambda: {"image": torch.rand(1, 1, 32, 32, 32)}, None)
    assert fit(m, batches, run, tmp_path / "run").step == 3 and len(calls) == 3


def test_mae_masks_at_random_and_simmim_runs_encoder_on_full_grid():
    cfg = dataclasses.replace(preset("smoke").model, method="mae", mask_mode="dual")
    assert build_model(cfg).cfg.mask_mode == "random"
    sim = build_model(dataclasses.replace(cfg, method="simmim"))
    x = torch.rand(1, 1, 32, 32, 32)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :48] = True
    assert sim.forward_encoder(x, mask).shape == (1, 64, cfg.embed_dim)
    # a masked patch's voxels do not reach the encoder
    x2 = x.clone()
    x2[:, :, :8] = 0.5  # the first 16 tokens (depth slab 0) are masked
    torch.testing.assert_close(sim.forward_encoder(x2, mask), sim.forward_encoder(x, mask))


def test_cli_pretrain_method(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "maesil_core.cli", "pretrain", "--method", "vae", "--data", str(CT),
         "--preset", "smoke", "--steps", "3", "--batch-size", "2", "--out", str(run), "--device", "cpu",
         "--workers", "0"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = load_checkpoint(run).meta.to_dict()
    assert meta["method"] == "vae" and meta["step"] == 3


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_recon", ROOT / "benchmarks" / "reconstruction.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up in sys.modules
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    return bench


def test_benchmark_quick_writes_table(tmp_path):
    bench = _bench_module()
    out = tmp_path / "bench"
    results = tmp_path / "table.md"
    assert (
        bench.main(
            [
                "--quick",
                "--out",
                str(out),
                "--results",
                str(results),
                "--only",
                "MAESIL (dual)",
                "vq-vae",
            ]
        )
        == 0
    )
    text = results.read_text()
    assert "| MAESIL (dual) |" in text and "| VQ-VAE |" in text and "masked PSNR" in text
    assert (out / "reconstruction.png").stat().st_size > 0
    assert (out / "reconstruction.json").is_file()


def test_benchmark_size_ablation_quick(tmp_path):
    """--ablation size end to end at a coarse spacing: a full-batch row, and a reduced-batch
    row whose full-batch s/step is timed; token counts, padding shares and the table."""
    bench = _bench_module()
    out = tmp_path / "size"
    argv = ["--ablation", "size", "--quick", "--spacing", "6", "--out", str(out)]
    assert bench.main([*argv, "--only", "sp64-p16", "sp128-p16-small-batch"]) == 0
    rows = {r["id"]: r for r in json.loads((out / "reconstruction.json").read_text())["rows"]}
    assert set(rows) == {"sp64-p16", "sp128-p16-small-batch"}
    small, full = rows["sp128-p16-small-batch"], rows["sp64-p16"]
    assert (full["tokens"], full["batch"], full["block"]) == (64, 4, [2, 2, 2])
    assert (small["tokens"], small["batch"], small["full_batch"]) == (512, 1, 4)
    assert small["full_batch_s_per_step"] > 0 and "full_batch" not in full
    # a 6 mm held-out volume is far smaller than a 128^3 tile: mostly padding, not scored
    assert 0 < small["heldout_real_share"] < full["heldout_real_share"] < 1
    assert 0 < small["pool_body_share"] < 1
    assert all(math.isfinite(r["masked_psnr"]) for r in rows.values())
    assert all(-1 < r["masked_body_bias"] < 1 for r in rows.values())
    text = (out / "reconstruction.md").read_text()
    assert "| 128³ | 16³ | 512 |" in text and "at batch 4)" in text and "at 6 mm" in text
    assert "--ablation size" in text and "masked-body bias" in text
    # the coarse mask block is 32^3 voxels in every row: 4^3 patches of 8^3
    (e,) = [e for e in bench.size_entries() if e.id == "sp128-p8"]
    cfg = bench.run_config(e, 2, 4, 0, 1.5)
    assert cfg.model.block == (4, 4, 4) and cfg.train.batch_size == 1
    assert cfg.data.spacing == (1.5, 1.5, 1.5)


def test_classifier_finetunes_from_pretrained_encoder(trained, tmp_path):
    """Organ-present classification (liver, spleen) from label maps: train on the DICOM series
    with its NIfTI labels (aligned in world coordinates), test on the held-out abdomen CT."""
    from maesil_core.classification import finetune_classifier
    from maesil_core.models.classifier import EncoderClassifier

    _, res, _, _ = trained["mae"]
    train = [(SHARED / "dicom_ct", SHARED / "dicom_ct_labels" / "labels.nii.gz")]
    test = [(CT, SHARED / "abdomen_ct" / "labels.nii.gz")]
    out = finetune_classifier(
        train, test, [5, 1], tmp_path / "cls", checkpoint=res.checkpoint, steps=4, train_crops=8
    )
    assert out.pretrained_from == str(res.checkpoint) and out.n_train == 8 and out.n_test > 4
    assert 0.0 <= out.accuracy <= 1.0 and set(out.per_organ) == {5, 1}
    assert out.per_organ[5]["positives"] > 0  # the liver is in some test crops: AUROC defined
    assert 0.0 <= out.per_organ[5]["auroc"] <= 1.0
    assert load_checkpoint(out.checkpoint).kind == "classification"
    # the encoder really came from the checkpoint
    clf = EncoderClassifier(trained["mae"][0].cfg, 2)
    with pytest.raises(Exception, match="no ViT encoder"):
        clf.load_encoder(load_checkpoint(trained["ae"][1].checkpoint).state_dict, "ae")


def test_method_options_are_typed_and_checked_before_a_run(tmp_path):
    """``ModelConfig.extra`` becomes the method's options dataclass: a misspelt key or a bad
    value is refused by validate() (exit 2 from the CLI) before anything is built; a
    checkpoint whose config carries an extra dict rebuilds with those options."""
    from maesil_core.checkpoint import save_checkpoint
    from maesil_core.errors import ConfigError

    cfg = preset("smoke").override("model", method="gl-mae", extra={"n_local": 1})
    assert cfg.model.options.n_local == 1 and cfg.model.options.global_scale == 2
    for bad, needle in (({"n_locals": 1}, "n_locals"), ({"n_local": 1.5}, "n_local")):
        with pytest.raises(ConfigError, match=needle):
            preset("smoke").override("model", method="gl-mae", extra=bad).validate()
    with pytest.raises(ConfigError, match="simmim_loss"):
        preset("smoke").override("model", method="simmim", extra={"simmim_loss": "l3"}).validate()
    model = build_model(cfg.model)
    assert model.n_local == 1
    reloaded, ckpt = build_from_checkpoint(save_checkpoint(tmp_path, model, cfg, 1))
    assert ckpt.meta.to_dict()["config"]["model"]["extra"] == {"n_local": 1}
    assert reloaded.n_local == 1
