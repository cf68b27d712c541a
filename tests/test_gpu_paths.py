"""The code paths a GPU run takes, exercised on the CPU: the loader's worker count and what it
cuts, augmentation on the device, and (below) bf16 autocast with fused AdamW."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from maesil_core import api
from maesil_core.config import DataConfig, preset
from maesil_core.data import infinite, make_pretrain_loader
from maesil_core.data.batch_augment import BatchAugment, to_device
from maesil_core.data.datasets import augment_on_device, default_workers

# --------------------------------------------------------------------------- loader


def test_loader_cuts_only_the_crops_a_batch_uses(shared_data):
    """Batch 2 of 4 crops per volume (the base preset's shape): one volume per batch and 2
    crops cut from it, not 4 of which 2 are thrown away; batch 6: 2 volumes x 3 crops."""
    cfg = DataConfig(spacing=(3.0, 3.0, 3.0), crops_per_volume=4, num_workers=0, augment=False)
    files = [shared_data / "abdomen_ct" / "ct.nii.gz", shared_data / "head_ct" / "ct_not_hu.nii.gz"]
    with pytest.warns(UserWarning, match="Hounsfield"):
        two = make_pretrain_loader(files, cfg, (16, 16, 16), 2, seed=0, endless=True)
        six = make_pretrain_loader(files, cfg, (16, 16, 16), 6, seed=0, endless=True)
    assert two.batch_size == 1 and len(two.dataset[0]) == 2
    assert six.batch_size == 2 and len(six.dataset[0]) == 3
    assert next(infinite(two))["image"].shape == (2, 1, 16, 16, 16)
    assert next(infinite(six))["image"].shape == (6, 1, 16, 16, 16)


def test_default_workers_follow_the_cores_and_the_device(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers("cpu") == 0  # the model needs the cores; workers cost more CPU
    assert default_workers("cuda") == 15  # all but the training process's core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 GPU processes share 16 cores
    assert default_workers("cuda") == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers("cuda") == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(128)), raising=False)
    assert default_workers("cuda") == 16
    assert DataConfig().num_workers is None  # the presets' default: from the cores


def test_augmentation_runs_in_the_loader_on_cpu_and_on_the_gpu_batch():
    cfg = DataConfig()
    assert cfg.augment_on == "auto"
    assert not augment_on_device(cfg, "cpu") and augment_on_device(cfg, "cuda")
    assert augment_on_device(dataclasses.replace(cfg, augment_on="device"), "cpu")
    assert not augment_on_device(dataclasses.replace(cfg, augment_on="loader"), "cuda")
    assert not augment_on_device(dataclasses.replace(cfg, augment=False), "cuda")
    with pytest.raises(Exception, match="augment_on must be"):
        dataclasses.replace(cfg, augment_on="gpu").validate()


def test_loader_leaves_augmentation_to_the_device_when_asked(shared_data):
    """augment_on="device": the loader's crops are plain crops of the cached volume (no flip,
    turn or gamma), and BatchAugment then changes them."""
    cfg = DataConfig(spacing=(3.0, 3.0, 3.0), crops_per_volume=4, num_workers=0)
    files = [shared_data / "abdomen_ct" / "ct.nii.gz"]
    for where, plain in (("device", True), ("loader", False)):
        loader = make_pretrain_loader(
            files, dataclasses.replace(cfg, augment_on=where), (24, 24, 24), 4, seed=1
        )
        cached = loader.dataset._cache[0]["image"].as_tensor()[0]  # (D, H, W)
        found = 0
        for batch, _ in zip(infinite(loader), range(4)):
            for crop in batch["image"][:, 0]:
                found += _is_crop_of(crop, cached)
        assert (found == 16) if plain else (found < 12), (where, found)


def _is_crop_of(crop: torch.Tensor, volume: torch.Tensor) -> bool:
    """Whether ``crop`` is a block of ``volume`` as it is (not flipped, turned or jittered)."""
    d, h, w = crop.shape
    corner = crop[0, 0, 0]
    for i, j, k in torch.nonzero(volume[: volume.shape[0] - d + 1] == corner).tolist():
        fits = j + h <= volume.shape[1] and k + w <= volume.shape[2]
        if fits and torch.equal(volume[i : i + d, j : j + h, k : k + w], crop):
            return True
    return False


def test_batch_augment_moves_image_and_padding_together():
    """As the loader's MONAI transforms: flips and axial turns act on image and valid alike,
    the gamma keeps each sample's range, and each happens about half of the time."""
    image = torch.linspace(0.0, 1.0, 16**3).reshape(1, 1, 16, 16, 16)  # a unique brightest voxel
    valid = torch.ones_like(image, dtype=torch.bool)
    valid[:, :, :3, :5, :] = False  # an asymmetric padded corner
    image = (image * valid).repeat(30, 1, 1, 1, 1)
    valid = valid.repeat(30, 1, 1, 1, 1)
    augment = BatchAugment(seed=0)
    where_brightest, jittered = set(), 0
    for _ in range(2):
        out = augment({"image": image, "valid": valid})
        x, v = out["image"], out["valid"]
        assert x.shape == image.shape and v.dtype == torch.bool
        assert torch.equal(~v, x == 0)  # padding (and only padding) went where the image went
        for xi in x:
            assert float(xi.min()) == 0.0 and abs(float(xi.max()) - 1.0) < 1e-5
            where_brightest.add(int(xi.argmax()))
            jittered += not torch.allclose(
                xi.flatten().sort().values, image[0].flatten().sort().values
            )
    assert torch.equal(image[0], image[1])  # the input batch is left as it was
    assert len(where_brightest) >= 6  # 8 flip combinations x 4 turns reach many corners
    assert 15 < jittered < 45  # contrast changed in about half of the 60 samples

    # the same seed gives the same augmentation; a non-square crop is flipped, never turned
    a = BatchAugment(seed=3)({"image": image})["image"]
    assert torch.equal(a, BatchAugment(seed=3)({"image": image})["image"])
    flat = torch.rand(8, 1, 8, 16, 4)
    assert BatchAugment(seed=1)({"image": flat})["image"].shape == flat.shape


def test_to_device_moves_and_augments_every_batch():
    batches = iter([{"image": torch.rand(2, 1, 8, 8, 8), "name": "x"} for _ in range(3)])
    out = list(to_device(batches, "cpu", BatchAugment(seed=0)))
    assert len(out) == 3 and all(b["image"].shape == (2, 1, 8, 8, 8) for b in out)
    assert out[0]["name"] == "x"


def test_presets_record_the_new_data_settings():
    for name in ("small", "base", "mim-med3d"):
        cfg = preset(name).validate()
        assert cfg.data.num_workers is None and cfg.data.augment_on == "auto"


# --------------------------------------------------------------------------- decoder heads


def test_checkpoints_keep_the_decoder_head_count_they_were_trained_with(tmp_path):
    """The base preset's decoder has 8 heads of 64 now (MAE's 16 of 32 before): a checkpoint
    made with 16 heads builds with 16 again (its config says so) and computes what it did.
    Heads do not change a weight's shape, so only the config can tell them apart."""
    from maesil_core.checkpoint import save_checkpoint
    from maesil_core.models import build_model
    from maesil_core.models.registry import build_from_checkpoint

    assert preset("base").model.decoder_num_heads == 8
    assert preset("base").model.decoder_embed_dim // 8 == 64
    cfg = preset("smoke")
    cfg.model.decoder_num_heads = 16  # 64 wide: heads of 4, as an old checkpoint would differ
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    path = save_checkpoint(tmp_path / "run", model, cfg, 1, kind="pretrain")
    loaded, ckpt = build_from_checkpoint(path)
    assert ckpt.config.model.decoder_num_heads == 16
    assert all(b.attn.num_heads == 16 for b in loaded.decoder_blocks)
    x = torch.rand(2, 1, 32, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::2] = True
    with torch.no_grad():
        ref = model(x, mask=mask).loss
        assert torch.equal(loaded.eval()(x, mask=mask).loss, ref)
        # the same weights read as 8 heads compute something else: the count matters
        eight = build_model(dataclasses.replace(cfg.model, decoder_num_heads=8)).eval()
        eight.load_state_dict(model.state_dict())
        assert not torch.allclose(eight(x, mask=mask).loss, ref)


# --------------------------------------------------------------------------- bf16 on the CPU


@pytest.fixture(scope="module")
def ct_batch(shared_data) -> dict:
    """Two 32^3 crops of the real abdominal CT at 3 mm, as the smoke preset's loader cuts them."""
    cfg = preset("smoke")
    data = dataclasses.replace(cfg.data, num_workers=0, augment=False)
    files = [shared_data / "abdomen_ct" / "ct.nii.gz"]
    return next(infinite(make_pretrain_loader(files, data, cfg.model.superpatch, 2, seed=0)))


@pytest.mark.parametrize("method", ["maesil", "mae", "simmim", "gl-mae", "ae", "vae", "vq-vae"])
def test_every_method_trains_under_bf16_autocast_with_fused_adamw(method, ct_batch):
    """What a GPU step does (bf16 autocast, fused AdamW), on the CPU, where both exist: on a
    real CT crop the loss is finite and within bf16 rounding of the fp32 loss, every gradient
    is finite and float32 (the weights stay float32), and the fused update moves the weights."""
    from maesil_core.models import build_model
    from maesil_core.train.loop import pretrain_loss

    cfg = preset("smoke").override("model", method=method)
    batch = ct_batch
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def loss_under(dtype):
        torch.manual_seed(1)  # the same mask in both precisions
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return pretrain_loss(model, batch)[0]

    ref = loss_under(None).detach()
    loss = loss_under(torch.bfloat16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) <= 0.05 * abs(ref.item()) + 1e-4, (loss, ref)
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# --------------------------------------------------------------------------- batch and lr


def test_base_preset_batch_and_the_square_root_learning_rate_rule():
    """Base trains 16 superpatches per GPU and step at the lr the stated rule gives from the
    first setting (1.5e-4 for 2), over the same 200,000 superpatches and warm-up share."""
    from maesil_core.config import scaled_lr

    base = preset("base").train
    assert base.batch_size == 16 and base.accum_steps == 1
    assert base.lr == pytest.approx(1.5e-4 * (16 / 2) ** 0.5, rel=1e-3)
    assert base.steps * base.batch_size == 100_000 * 2
    assert base.warmup_steps / base.steps == pytest.approx(2000 / 100_000)
    assert scaled_lr(4.2e-4, 16, 64) == pytest.approx(8.4e-4)  # 4 GPUs x 16
    assert scaled_lr(1e-3, 8, 8) == 1e-3
    with pytest.raises(Exception, match="at least 1"):
        scaled_lr(1e-3, 0, 8)


def test_gpu_flags_reach_the_run_config():
    """--accum-steps, --compile and --augment-on end up in the run's config (and so in its
    checkpoints); left out, the preset's settings stay."""
    from maesil_core.cli import build_parser
    from maesil_core.cli.common import run_config_from_args

    parser = build_parser()
    args = parser.parse_args(
        ["pretrain", "--out", "x", "--preset", "base", "--batch-size", "4", "--accum-steps", "4"]
        + ["--compile", "--augment-on", "device"]
    )
    cfg = run_config_from_args(args).validate()
    assert (cfg.train.batch_size, cfg.train.accum_steps, cfg.train.compile) == (4, 4, True)
    assert cfg.data.augment_on == "device" and cfg.train.lr == preset("base").train.lr
    cfg = run_config_from_args(parser.parse_args(["pretrain", "--out", "x"])).validate()
    assert (cfg.train.accum_steps, cfg.train.compile, cfg.data.augment_on) == (1, False, "auto")


def test_reconstruction_under_bf16_autocast_matches_fp32(trained_run, shared_data):
    """Whole-CT reconstruction as a GPU runs it (the model under bf16 autocast, pictures in
    float32), on the CPU's bf16 autocast: the same masks, pictures in float32 and finite, and
    the masked-voxel error within a few percent of fp32's."""
    ct = shared_data / "chest_ct" / "ct.nii.gz"  # held out of trained_run's pretraining
    fp32 = api.reconstruct(trained_run, ct, precision="fp32", threads=1)
    bf16 = api.reconstruct(trained_run, ct, precision="bf16", threads=1)
    np.testing.assert_array_equal(bf16.mask, fp32.mask)
    assert bf16.reconstruction.dtype == fp32.reconstruction.dtype
    assert np.isfinite(bf16.reconstruction).all()
    a, b = fp32.scores["mse"], bf16.scores["mse"]
    assert abs(b - a) < 0.05 * a, (a, b)
