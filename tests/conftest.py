"""Shared test fixtures.

The read-only test data (real image pairs, the PyTorch reference's parity fixtures) live
outside the project; `.ci/run` points SMFNET_SHARED at them. Tests fail loudly when it is
unset rather than skipping, so a CI that forgot it cannot pass silently.
"""
import os
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the whole run, subprocesses included: the model's
# train step takes tens of seconds to compile on CPU, and several tests (and the processes
# they start) compile the very same programs. Set before JAX is imported by any test.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                               os.path.join(tempfile.gettempdir(), "smfnet_jax_test_xla_cache"))
os.environ.setdefault("SMFNET_JAX_CACHE", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


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
