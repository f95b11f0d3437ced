"""Shared test fixtures.

The read-only test data (real image pairs, the PyTorch reference's parity fixtures) live
outside the project, in the folder SMFNET_SHARED names. Without it (a plain clone) the tests
that need it are skipped and one line says so; with it set, a missing folder or file is an
error, never a skip, and SMFNET_REQUIRE_SHARED=1 (set by .ci/run) makes an unset
SMFNET_SHARED an error too, so a CI that lost its data cannot pass silently.
"""
import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest

SHARED_ENV = "SMFNET_SHARED"
REQUIRE_ENV = "SMFNET_REQUIRE_SHARED"
SKIP_REASON = f"needs {SHARED_ENV}"
_SHARED = pytest.StashKey()  # the checked folder, or None to skip


def private_dir(path: Path) -> Path | None:
    """`path`, created with mode 0700 if missing, if it is a real directory that we own and
    only we can use (a group/world-open one of ours is closed to 0700); None if it cannot be
    made so: another user's directory, or a symlink, could feed us compiled code."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return None
        if stat.S_IMODE(st.st_mode) & 0o077:
            path.chmod(0o700)
        return path
    except OSError:
        return None


def _test_cache_dir() -> str:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = private_dir(base / "smfnet_jax" / "test_xla")
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="smfnet_jax_test_xla_"))  # private, not persistent
        print(f"conftest: {base / 'smfnet_jax' / 'test_xla'} is not a private directory of "
              f"ours; compiling into {path} for this run only", file=sys.stderr)
    return str(path)


# One persistent XLA compilation cache for the whole run, subprocesses included: the model's
# train step takes tens of seconds to compile on CPU, and several tests (and the processes
# they start) compile the very same programs. Set before JAX is imported by any test. It is
# per-user and private (not a shared /tmp path) because it holds code this process runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _test_cache_dir()
os.environ.setdefault("SMFNET_JAX_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def _shared_setting() -> Path | None:
    """The shared data folder, None to skip the tests that need it; a usage error (which
    stops the run before any test) when it is set wrongly or required but unset."""
    value = os.environ.get(SHARED_ENV)
    if not value:
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            raise pytest.UsageError(f"{SHARED_ENV} is not set but {REQUIRE_ENV} is: point it at "
                                    f"the shared data folder (the one holding data/ and fixtures/)")
        return None
    path = Path(value).resolve()
    if not (path / "fixtures").is_dir():
        raise pytest.UsageError(f"{SHARED_ENV}={value}: {path} has no fixtures/ folder")
    return path


def pytest_configure(config):
    config.stash[_SHARED] = _shared_setting()


def pytest_terminal_summary(terminalreporter, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if SKIP_REASON in str(getattr(r, "longrepr", ""))]
    if skipped and config.stash.get(_SHARED, None) is None:
        terminalreporter.write_line(
            f"{len(skipped)} tests skipped: they need the shared data; set "
            f"{SHARED_ENV}=path/to/shared (the folder holding data/ and fixtures/) to run them",
            yellow=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Report our skips at one location, so that -ra folds them into a single line instead
    of one per test (pytest puts a fixture's skip at the test's own line)."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and \
            report.longrepr[2].endswith(SKIP_REASON):
        report.longrepr = (str(Path(__file__).relative_to(item.config.rootpath)
                               if Path(__file__).is_relative_to(item.config.rootpath)
                               else __file__), None, report.longrepr[2])
    return report


@pytest.fixture(scope="session")
def shared_dir(pytestconfig) -> Path:
    """The shared data folder; every test that reads shared data gets it from here."""
    path = pytestconfig.stash[_SHARED]
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


def shared_file(shared_dir: Path, relative: str) -> Path:
    """A file of the shared folder, or an error naming it (a set SMFNET_SHARED never skips)."""
    path = shared_dir / relative
    if not path.is_file():
        raise FileNotFoundError(f"{SHARED_ENV}={shared_dir}: missing {relative}")
    return path


# --------------------------------------------------------------------------- the parity fixture
@pytest.fixture(scope="session")
def fixture_pth(shared_dir) -> Path:
    """A checkpoint in the released file's exact layout (random, perturbed weights)."""
    return shared_file(shared_dir, "fixtures/parity/smfnet_random_init.pth")


@pytest.fixture(scope="session")
def fixture_ckpt(fixture_pth) -> dict:
    """The fixture checkpoint as read by our torch-free reader: {sub-model: {key: array}}."""
    from smfnet_jax.torch_weights.pth_io import load_pth
    return load_pth(fixture_pth)


@pytest.fixture(scope="session")
def reference_arrays(shared_dir) -> dict:
    """The PyTorch reference's inputs, outputs and intermediates on the fixture (NCHW as saved)."""
    import numpy as np
    with np.load(shared_file(shared_dir, "fixtures/parity/reference.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def reference_losses(shared_dir) -> dict:
    """The reference's loss terms and per-sub-model gradient norms on the fixture inputs."""
    import json
    return json.loads(shared_file(shared_dir, "fixtures/parity/reference_losses.json").read_text())
