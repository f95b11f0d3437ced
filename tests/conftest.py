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


# --------------------------------------------------------------------------- the parity fixture
@pytest.fixture(scope="session")
def fixture_pth(shared_dir) -> Path:
    """A checkpoint in the released file's exact layout (random, perturbed weights)."""
    return shared_dir / "fixtures/parity/smfnet_random_init.pth"


@pytest.fixture(scope="session")
def fixture_ckpt(fixture_pth) -> dict:
    """The fixture checkpoint as read by our torch-free reader: {sub-model: {key: array}}."""
    from smfnet_jax.torch_weights.pth_io import load_pth
    return load_pth(fixture_pth)


@pytest.fixture(scope="session")
def reference_arrays(shared_dir) -> dict:
    """The PyTorch reference's inputs, outputs and intermediates on the fixture (NCHW as saved)."""
    import numpy as np
    with np.load(shared_dir / "fixtures/parity/reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def reference_losses(shared_dir) -> dict:
    """The reference's loss terms and per-sub-model gradient norms on the fixture inputs."""
    import json
    return json.loads((shared_dir / "fixtures/parity/reference_losses.json").read_text())
