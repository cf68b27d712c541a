"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

#: real CT for tests: ``../shared/data`` beside the repository root (see its README.md)
SHARED_DATA = (Path(__file__).resolve().parents[1].parent / "shared" / "data").resolve()


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

    cfg = preset("tiny").override("train", steps=200, log_every=10, checkpoint_every=100)
    cfg = cfg.override("data", num_workers=0)
    run = tmp_path_factory.mktemp("pretrained") / "run"
    data = [shared_data / "abdomen_ct" / "ct.nii.gz", shared_data / "dicom_ct"]
    result = api.pretrain(data, run, cfg)
    assert result.step == 200 and not result.cancelled
    return run
