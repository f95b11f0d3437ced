"""Shared test fixtures.

The read-only test data (real image pairs, the PyTorch reference's parity fixtures) live
outside the project; `.ci/run` points SMFNET_SHARED at them. Tests fail loudly when it is
unset rather than skipping, so a CI that forgot it cannot pass silently.
"""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    value = os.environ.get("SMFNET_SHARED")
    if not value:
        raise RuntimeError(
            "SMFNET_SHARED is not set: point it at the shared data folder "
            "(the one holding data/ and fixtures/), e.g. SMFNET_SHARED=../shared")
    path = Path(value).resolve()
    if not (path / "fixtures").is_dir():
        raise RuntimeError(f"SMFNET_SHARED={value} has no fixtures/ folder")
    return path
