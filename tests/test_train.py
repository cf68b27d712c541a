"""The training loop, checkpoints and resume, on real CT (smoke preset, CPU)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from maesil_core import api, runs
from maesil_core.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from maesil_core.config import preset
from maesil_core.errors import CheckpointError, ConfigError
from maesil_core.models.registry import build_from_checkpoint
from maesil_core.resume_state import load_resume_state
from maesil_core.train import lr_at


def tiny_cfg(steps: int, **train):
    cfg = preset("smoke")
    cfg = cfg.override("train", steps=steps, log_every=5, checkpoint_every=1000, **train)
    return cfg.override("data", num_workers=0, cache="memory")


def read_metrics(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items() if v} for r in csv.DictReader(f)]


def test_pretraining_on_real_ct_lowers_the_masked_loss(trained_run):
    rows = read_metrics(trained_run)
    first = np.mean([r["loss"] for r in rows[:2]])
    last = np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.5 * first, (first, last)
    assert (trained_run / "loss.png").stat().st_size > 5000
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
    assert all(r["volumes_per_s"] > 0 for r in rows)


def test_checkpoint_reloads_to_identical_outputs(trained_run):
    path = resolve_checkpoint(trained_run)
    model_a, ckpt = build_from_checkpoint(path)
    model_b, _ = build_from_checkpoint(path.with_suffix(".json"))
    assert ckpt.kind == "pretrain" and ckpt.step == 200
    x = torch.rand(2, 1, 32, 32, 32)
    out_a = model_a(x, mask=_token_mask(model_a, x, seed=3))
    out_b = model_b(x, mask=_token_mask(model_b, x, seed=3))
    assert torch.equal(out_a.pred, out_b.pred)
    assert out_a.loss.item() == out_b.loss.item()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["config"]["model"]["superpatch"] == [32, 32, 32]
    assert meta["config"]["data"]["spacing"] == [3.0, 3.0, 3.0]
    assert meta["package_version"]


def _token_mask(model, x, seed):
    from maesil_core.models.masking import make_mask

    return make_mask(model.cfg, x.shape[0], generator=torch.Generator().manual_seed(seed))


def test_resume_continues_the_same_schedule(tmp_path, abdomen_ct, monkeypatch):
    """Same step count and lr schedule; the crops after the resume are new ones, not a
    replay of the crops the run started with."""
    from maesil_core import data

    made = []  # the arguments of every loader the runs build

    def spy(*args, **kwargs):
        made.append((args, kwargs))
        return make_loader(*args, **kwargs)

    make_loader = data.make_pretrain_loader
    monkeypatch.setattr(data, "make_pretrain_loader", spy)
    run = tmp_path / "run"
    stop_at = 15

    def cancel_after(info):
        if info.get("step", 0) >= stop_at:
            flag["stop"] = True

    flag = {"stop": False}
    cfg = tiny_cfg(30, warmup_steps=10)
    first = api.pretrain([abdomen_ct], run, cfg, progress=cancel_after, cancel=lambda: flag["stop"])
    assert first.cancelled and first.step == stop_at
    assert [p.name for p in list_checkpoints(run)] == [f"step_{stop_at:06d}.safetensors"]
    state = load_resume_state(resolve_checkpoint(run))
    assert state["step"] == stop_at and state["optimizer"]["state"]

    with pytest.raises(ConfigError, match="already holds a run"):
        api.pretrain([abdomen_ct], run, cfg)

    second = api.pretrain([abdomen_ct], run, None, resume=True)
    assert not second.cancelled and second.step == 30
    rows = read_metrics(run)
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 30 and stop_at in steps
    for r in rows:  # the learning rate follows one uninterrupted schedule
        assert r["lr"] == pytest.approx(lr_at(int(r["step"]) - 1, cfg.train), rel=1e-4)
    assert len(made) == 2
    for _, kwargs in made:  # the first run's cancel flag is set by now: rebuild without it
        kwargs.pop("cancel", None)
    first_batches = [next(data.infinite(make_loader(*a, **k)))["image"] for a, k in made]
    assert not torch.equal(*first_batches)


def test_resume_without_data_continues_on_the_runs_own_scans(tmp_path, abdomen_ct, monkeypatch):
    """--resume without --data must not fall back to the phantom (it once did, silently)."""
    run = tmp_path / "run"
    flag = {"stop": False}

    def stop_after_2(info):
        flag["stop"] = flag["stop"] or info.get("step", 0) >= 2

    api.pretrain([abdomen_ct], run, tiny_cfg(4), progress=stop_after_2, cancel=lambda: flag["stop"])
    recorded = load_checkpoint(resolve_checkpoint(run)).meta.extra["data"]
    assert recorded == [os.path.abspath(abdomen_ct)]

    second = api.pretrain(None, run, None, resume=True)
    assert second.step == 4 and not (run / "phantom").exists()
    assert load_checkpoint(resolve_checkpoint(run)).meta.extra["data"] == recorded

    # a run from before the data were recorded: refused with the fix, not trained on the phantom
    real = runs.load_checkpoint

    def without_data(path, **kw):
        ck = real(path, **kw)
        ck.meta.extra.pop("data")
        return ck

    monkeypatch.setattr(runs, "load_checkpoint", without_data)
    with pytest.raises(ConfigError, match="resume it with --data"):
        api.pretrain(None, run, tiny_cfg(6), resume=True)
    assert not (run / "phantom").exists()


def test_force_overwrites_and_fresh_runs_are_refused(tmp_path, abdomen_ct):
    run = tmp_path / "run"
    api.pretrain([abdomen_ct], run, tiny_cfg(2))
    with pytest.raises(ConfigError, match="--force"):
        api.pretrain([abdomen_ct], run, tiny_cfg(2))
    api.pretrain([abdomen_ct], run, tiny_cfg(3), force=True)
    assert [p.name for p in list_checkpoints(run)] == ["step_000003.safetensors"]


def test_killed_write_leaves_only_complete_checkpoints(tmp_path, trained_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = resolve_checkpoint(run)
    # a kill between the weights and the JSON: the half-written checkpoint is ignored
    (run / "checkpoints" / "step_999999.safetensors").write_bytes(b"partial")
    assert resolve_checkpoint(run) == last


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path, trained_run):
    path = resolve_checkpoint(trained_run)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt|not a readable"):
        load_checkpoint(broken)

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="without maesil metadata"):
        load_checkpoint(foreign)

    # same metadata, weights of another architecture
    ckpt = load_checkpoint(path)
    meta = ckpt.meta.to_dict()
    meta["config"] = json.loads(json.dumps(meta["config"]))
    meta["config"]["model"]["embed_dim"] = 192
    other = tmp_path / "other.safetensors"
    save_file(ckpt.state_dict, str(other), metadata={"maesil": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="another architecture"):
        build_from_checkpoint(other)
    with pytest.raises(CheckpointError, match="segmentation checkpoint is needed"):
        load_checkpoint(path, kind="segmentation")


def test_threads_setting_reaches_torch(tmp_path, abdomen_ct):
    from maesil_core import cli

    args = cli.build_parser().parse_args(["pretrain", "--out", str(tmp_path), "--threads", "1"])
    assert cli.run_config_from_args(args).train.threads == 1
    with pytest.raises(ConfigError, match="threads"):
        tiny_cfg(2, threads=-1).validate()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []
        api.pretrain(
            [abdomen_ct],
            tmp_path / "run",
            tiny_cfg(2, threads=1),
            progress=lambda info: info["phase"] == "train" and seen.append(torch.get_num_threads()),
        )
        assert seen and set(seen) == {1}  # the run trained on 1 thread ...
        assert torch.get_num_threads() == 2  # ... and gave the caller its 2 back
        saved = json.loads((tmp_path / "run" / "config.json").read_text())
        assert saved["train"]["threads"] == 1
        # --resume keeps the run's config but takes --threads from the command line
        args = cli.build_parser().parse_args(
            ["pretrain", "--out", str(tmp_path / "run"), "--resume", "--threads", "2"]
        )
        resumed = cli.resume_config(args)
        assert resumed.train.threads == 2 and resumed.train.steps == 2
    finally:
        torch.set_num_threads(before)


def test_resumed_config_takes_only_steps_device_and_threads():
    """What pretrain and finetune --resume keep of the run and take from the caller."""
    saved = tiny_cfg(100, threads=0)
    given = tiny_cfg(50, threads=2).override("train", device="cpu", lr=1.0)
    merged = runs.resumed_config(saved, given)
    assert merged.train.steps == 100  # never fewer steps than the run planned
    assert (merged.train.device, merged.train.threads) == ("cpu", 2)
    assert merged.train.lr == tiny_cfg(100).train.lr  # the rest stays the run's own
    assert runs.resumed_config(saved, tiny_cfg(300)).train.steps == 300
    assert runs.resumed_config(saved, None) is saved


def test_learning_rate_schedule_shape():
    cfg = preset("smoke").train
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] < lrs[cfg.warmup_steps - 1] == pytest.approx(cfg.lr)
    assert lrs[-1] < 0.01 * cfg.lr + cfg.min_lr
    assert all(a >= b for a, b in zip(lrs[cfg.warmup_steps :], lrs[cfg.warmup_steps + 1 :]))


def test_bf16_where_the_device_has_none_is_a_clear_error(monkeypatch):
    """--precision bf16 runs on the CPU (PyTorch's CPU autocast); on a GPU without bf16 it is
    a ConfigError naming the setting, not a silent fp32 run ("auto" still falls back)."""
    from maesil_core.train.optim import autocast_dtype

    cfg = tiny_cfg(1).train
    cfg.precision = "bf16"
    assert autocast_dtype(cfg, torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ConfigError, match="Tesla T4 has no bf16") as info:
        autocast_dtype(cfg, torch.device("cuda", 0))
    assert info.value.option == "precision"
    with pytest.raises(ConfigError, match="not available on device mps"):
        autocast_dtype(cfg, torch.device("mps"))
    cfg.precision = "auto"
    assert autocast_dtype(cfg, torch.device("cuda", 0)) is None
    cfg.precision = "fp32"
    assert autocast_dtype(cfg, torch.device("cpu")) is None


# --------------------------------------------------------------------------- cancel inside a step


def _modules_in_order(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if not list(m.children())]  # the leaves


built: list[torch.nn.Module] = []


def _cancelled_run(tmp_path, abdomen_ct, monkeypatch, name: str, where: str):
    """Tiny pretraining with a cancel set ``where``: "between" steps (from the progress
    report of step 3), or inside step 4's "forward" (before a leaf module half-way through
    the model) or "backward" (when the gradient reaches that module's output). Returns the
    result and the modules that ran after the flag was set; the model is appended to
    ``built``."""
    import threading

    from maesil_core import models

    flag = threading.Event()
    ran_after: list[str] = []
    real = getattr(models.build_model, "unwatched", models.build_model)

    def build_and_watch(*args, **kwargs):
        model = real(*args, **kwargs)
        leaves = _modules_in_order(model)
        middle = leaves[len(leaves) // 2]
        steps = {"n": 0}

        def count(_m, _args):
            steps["n"] += 1

        def arm(_m, _args):
            if where == "forward" and steps["n"] == 4:
                flag.set()

        def on_output(_m, _args, out):
            if where == "backward" and steps["n"] == 4 and out.requires_grad:
                out.register_hook(lambda grad: flag.set())

        def after(m, _args, _out):
            if flag.is_set():
                ran_after.append(type(m).__name__)

        model.register_forward_pre_hook(count)
        middle.register_forward_pre_hook(arm)
        middle.register_forward_hook(on_output)
        for m in model.modules():
            m.register_forward_hook(after)
        built.append(model)
        return model

    build_and_watch.unwatched = real  # type: ignore[attr-defined]
    monkeypatch.setattr(models, "build_model", build_and_watch)

    def report(info):
        if where == "between" and info.get("phase") == "train" and info.get("step") == 3:
            flag.set()

    cfg = tiny_cfg(10).override("train", log_every=1)
    result = api.pretrain([abdomen_ct], tmp_path / name, cfg, progress=report, cancel=flag)
    return result, ran_after


def test_a_cancel_from_the_loader_on_the_first_step_stops_the_run_as_before(tmp_path):
    """The loader itself raises Cancelled (MONAI's chain checks the flag between transforms
    when it reads a volume in the training process) on the first step, which the in-step
    hooks leave alone: it reaches the caller as a cancellation, as it did before the hooks
    (it was an AttributeError on the missing StepUndo)."""
    import threading

    from maesil_core.errors import Cancelled
    from maesil_core.models import build_model
    from maesil_core.train.loop import fit

    flag = threading.Event()

    def batches():
        flag.set()
        raise Cancelled()
        yield  # pragma: no cover

    cfg = tiny_cfg(3)
    with pytest.raises(Cancelled):
        fit(build_model(cfg.model), batches(), cfg, tmp_path / "run", cancel=flag)


def _flat(value, prefix=""):
    """Nested dicts / lists of tensors and numbers -> {path: value} for comparison."""
    if isinstance(value, dict):
        return {k: v for key in value for k, v in _flat(value[key], f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, x in enumerate(value) for k, v in _flat(x, f"{prefix}/{i}").items()}
    return {prefix: value}


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_cancel_inside_a_step_drops_that_step_and_keeps_the_last_whole_one(
    where, tmp_path, abdomen_ct, monkeypatch
):
    """issue 14, Cancel under 1 s: a cancel set inside a training step stops it before the
    next module runs (forward) or before the backward pass goes further; that step is
    dropped (no optimiser step, the random streams as before it), so what is written is the
    last whole step: the same weights, optimiser state and random state as a run cancelled
    between steps at that step, which resumes as exactly."""
    between, _ = _cancelled_run(tmp_path, abdomen_ct, monkeypatch, "between", "between")
    inside, ran_after = _cancelled_run(tmp_path, abdomen_ct, monkeypatch, "inside", where)
    assert between.cancelled and between.step == 3
    assert inside.cancelled and inside.step == 3, inside.step
    if where == "forward":
        assert ran_after == []  # not one module finished once the flag was set
    assert [p.name for p in list_checkpoints(tmp_path / "inside")] == ["step_000003.safetensors"]
    a, b = (load_checkpoint(r.checkpoint) for r in (between, inside))
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    sa, sb = (_flat(load_resume_state(r.checkpoint)) for r in (between, inside))
    assert sa.keys() == sb.keys() and any("rng" in k for k in sa)
    for key in sa:
        if torch.is_tensor(sa[key]) or isinstance(sa[key], np.ndarray):
            assert np.array_equal(np.asarray(sa[key]), np.asarray(sb[key])), key
        else:
            assert sa[key] == sb[key], key
    rows = read_metrics(tmp_path / "inside")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # no row for the dropped step
    # nor loss.png: a stopping run writes what a resume needs, not the figure a Cancel would
    # wait for (the command line draws it after: tests/test_faults.py)
    assert not (tmp_path / "inside" / "loss.png").exists()
    # the cancel's hooks are gone: this test's own two pre-hooks are all the model holds
    assert sum(len(m._forward_pre_hooks) for m in built[-1].modules()) == 2
