"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

#: real CT for tests: ``../shared/data`` beside the repository root (see its README.md)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the shared real-CT folder; fails (never skips) when it is missing."""
    if not (SHARED_DATA / "abdomen_ct" / "ct.nii.gz").is_file():
        pytest.fail(
            f"shared test data not found at {SHARED_DATA}: the tests need the real CT folder "
            "`shared/data` beside the repository root (abdomen_ct, chest_ct, head_ct, dicom_ct)."
        )
    return SHARED_DATA
