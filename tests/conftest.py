"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: real CT for tests: ``../shared/data`` beside the repository root (see its README.md)
SHARED_DATA = (Path(__file__).resolve().parents[1].parent / "shared" / "data").resolve()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Every test computes with one intra-op torch thread.

    Float sums depend on how they are split over threads, so a model trained in a test with 1
    thread and the same model trained with 2 are different models: the fine-tuning test's
    "spleen called liver" share was 0.28 with 1 thread and 0.64 with 2 for the same seed
    (six seeds with 1 thread: 0.00-0.33, bound 0.48). Fixing the count makes each test's
    training the same on every machine whatever its core count, and spares a loaded 2-core
    machine the spin-waiting of a second thread. Tests that change it restore it.
    ``OMP_NUM_THREADS=1`` makes the same choice for the runs' ``threads=0`` (auto: it takes
    an explicit OMP_NUM_THREADS as given) and for the commands tests start as processes.
    """
    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the shared real-CT folder; fails (never skips) when it is missing."""
    if not (SHARED_DATA / "abdomen_ct" / "ct.nii.gz").is_file():
        pytest.fail(
            f"shared test data not found at {SHARED_DATA}: the tests need the real CT folder "
            "`shared/data` beside the repository root (abdomen_ct, chest_ct, head_ct, dicom_ct)."
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def abdomen_ct(shared_data) -> str:
    """Real abdominal CT (RAS, 3 mm, HU) with 41 TotalSegmentator labels beside it."""
    return str(shared_data / "abdomen_ct" / "ct.nii.gz")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, shared_data) -> Path:
    """A tiny MAESIL pretrained for 200 steps on two real CTs (abdomen, DICOM series).

    chest_ct is kept out of it, as a held-out scan for reconstruction tests.
    """
    from maesil_core import api
    from maesil_core.config import preset

    cfg = preset("smoke").override("train", steps=200, log_every=10, checkpoint_every=100)
    cfg = cfg.override("data", num_workers=0)
    run = tmp_path_factory.mktemp("pretrained") / "run"
    data = [shared_data / "abdomen_ct" / "ct.nii.gz", shared_data / "dicom_ct"]
    result = api.pretrain(data, run, cfg)
    assert result.step == 200 and not result.cancelled
    return run


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, shared_data) -> dict[str, Path]:
    """Two-step runs made with the command line, for tests that need a checkpoint of each
    kind but not a trained one (bad inputs, faults): ``{"pretrain": RUN, "segmentation": RUN}``
    (a tiny MAESIL on abdomen_ct; a liver + spleen segmenter fine-tuned from it)."""
    from maesil_core.cli import main

    folder = tmp_path_factory.mktemp("tiny_runs")
    ct = shared_data / "abdomen_ct" / "ct.nii.gz"
    pre, seg = folder / "pre", folder / "seg"
    small = ["--preset", "smoke", "--steps", "2", "--batch-size", "1", "--threads", "1",
             "--workers", "0"]  # fmt: skip
    assert main(["pretrain", "--data", str(ct), "--out", str(pre), *small]) == 0
    code = main(
        ["finetune", "--images", str(ct), "--labels", str(ct.with_name("labels.nii.gz"))]
        + ["--pretrained", str(pre), "--out", str(seg), "--classes", "liver", "spleen"]
        + ["--feature-size", "8", *small]
    )
    assert code == 0
    return {"pretrain": pre, "segmentation": seg}
