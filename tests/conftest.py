"""Shared fixtures: tiny synthetic data and paths to real sample files shipped in packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VOL3D_ID_KEY", "0123456789abcdef" * 4)  # 128 bits of hex: a test key, not a secret


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    import pydicom

    return Path(pydicom.__file__).parent / "data" / "test_files"


@pytest.fixture(scope="session")
def nibabel_test_data() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"
