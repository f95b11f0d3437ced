"""Packaging and the test set-up itself: console scripts, version, the shared-data switch,
the private compilation cache directory."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

import conftest
import smfnet_jax

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("script", sorted(PYPROJECT["project"]["scripts"]))
def test_console_script_resolves_to_a_callable(script):
    module, _, attr = PYPROJECT["project"]["scripts"][script].partition(":")
    assert callable(getattr(importlib.import_module(module), attr)), script


def test_floor_pins_are_pyprojects_floors():
    """Every runtime and [test] requirement's floor is pinned, at that version, in
    .ci/constraints-min.txt (the floor venv of .ci/run tests exactly what pyproject claims)."""
    import re
    pins = {}
    for line in (ROOT / ".ci/constraints-min.txt").read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, _, version = spec.partition("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    reqs = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]
    floors = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)\s*", req.split(";")[0])
        assert m, f"requirement without a plain floor: {req!r}"
        floors[m.group(1).lower().replace("_", "-")] = m.group(2)
    def same(a, b):  # 3.11 == 3.11.0
        def norm(v):
            parts = v.split(".")
            while len(parts) > 1 and parts[-1] == "0":
                parts.pop()
            return parts
        return a is not None and norm(a) == norm(b)
    missing = {n: v for n, v in floors.items() if not same(pins.get(n), v)}
    assert not missing, f"floors not pinned as in pyproject: {missing} (pins: {pins})"


def test_console_script_names_itself_in_usage(monkeypatch):
    from smfnet_jax.cli import program_name
    monkeypatch.setattr(sys, "argv", ["/venv/bin/smfnet-fuse", "--help"])
    assert program_name("infer.main") == "smfnet-fuse"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "infer" / "main.py"), "--help"])
    assert program_name("infer.main") == "python -m infer.main"


def test_version_is_the_installed_metadata_version():
    try:
        installed = importlib.metadata.version("smfnet-jax")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("smfnet-jax is not installed (plain checkout): no metadata to compare")
    assert smfnet_jax.__version__ == installed, "reinstall: metadata is stale"
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "smfnet_jax.__version__"}


def test_packaged_data_files_exist():
    for package, names in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for name in names:
            assert (ROOT / package / name).is_file(), f"{package}/{name}"
    for name in PYPROJECT["project"]["license-files"]:
        assert (ROOT / name).is_file(), name


# --------------------------------------------------------------------------- shared data switch
TINY_TEST = '''
def test_needs_nothing():
    assert 1 + 1 == 2

def test_needs_shared(shared_dir):
    assert shared_dir.is_dir()

def test_needs_fixture(fixture_pth):
    assert fixture_pth.is_file()
'''


def _pytest_on_tiny_file(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """Our conftest.py (copied) and a three-test file, in a fresh pytest: no JAX involved."""
    work = tmp_path / "suite"
    work.mkdir(exist_ok=True)
    shutil.copy(Path(conftest.__file__), work / "conftest.py")
    (work / "test_tiny.py").write_text(TINY_TEST)
    base = {k: v for k, v in os.environ.items() if k not in (conftest.SHARED_ENV, conftest.REQUIRE_ENV)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                           "--rootdir", str(work), str(work / "test_tiny.py")],
                          cwd=work, env={**base, **env}, capture_output=True, text=True, timeout=120)


def test_plain_clone_skips_with_one_line(tmp_path):
    run = _pytest_on_tiny_file(tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "1 passed, 2 skipped" in out, out
    assert out.count("SMFNET_SHARED=path/to/shared") == 1, out
    # -ra folds the skips into one summary line: one location, one short reason
    assert f"SKIPPED [2] conftest.py: {conftest.SKIP_REASON}" in out, out
    assert out.count("SKIPPED") == 1, out


def test_required_but_unset_is_an_error(tmp_path):
    run = _pytest_on_tiny_file(tmp_path, **{conftest.REQUIRE_ENV: "1"})
    assert run.returncode != 0 and "passed" not in run.stdout, run.stdout + run.stderr
    assert f"{conftest.SHARED_ENV} is not set" in run.stderr, run.stderr


def test_missing_shared_folder_is_an_error(tmp_path):
    missing = tmp_path / "no_such_shared"
    run = _pytest_on_tiny_file(tmp_path, **{conftest.SHARED_ENV: str(missing)})
    assert run.returncode != 0 and "passed" not in run.stdout, run.stdout + run.stderr
    assert str(missing) in run.stderr and "no fixtures/" in run.stderr, run.stderr


def test_missing_fixture_file_is_an_error_not_a_skip(tmp_path):
    shared = tmp_path / "shared"
    (shared / "fixtures").mkdir(parents=True)
    run = _pytest_on_tiny_file(tmp_path, **{conftest.SHARED_ENV: str(shared)})
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "2 passed, 1 error" in out and "skipped" not in out, out
    assert "missing fixtures/parity/smfnet_random_init.pth" in out, out


# --------------------------------------------------------------------------- private cache dir
def test_private_dir_is_created_0700(tmp_path):
    path = conftest.private_dir(tmp_path / "a" / "cache")
    assert path == tmp_path / "a" / "cache"
    assert path.stat().st_mode & 0o777 == 0o700


def test_private_dir_closes_our_own_open_directory(tmp_path):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    assert conftest.private_dir(tmp_path / "open") == tmp_path / "open"
    assert (tmp_path / "open").stat().st_mode & 0o777 == 0o700


def test_private_dir_refuses_someone_elses_directory(tmp_path, monkeypatch):
    (tmp_path / "theirs").mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)  # not the owner
    assert conftest.private_dir(tmp_path / "theirs") is None


def test_private_dir_refuses_a_symlink_and_a_file(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert conftest.private_dir(tmp_path / "link") is None
    (tmp_path / "file").write_text("")
    assert conftest.private_dir(tmp_path / "file") is None


def test_test_cache_dir_is_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = Path(conftest._test_cache_dir())
    assert path == tmp_path / "smfnet_jax" / "test_xla"
    assert path.stat().st_mode & 0o777 == 0o700


def test_test_cache_dir_falls_back_when_not_ours(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "smfnet_jax" / "test_xla").mkdir(parents=True)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    path = Path(conftest._test_cache_dir())
    try:
        assert path.parent == Path(tempfile.gettempdir()) and path.name.startswith("smfnet_jax_test_xla_")
        assert path.stat().st_mode & 0o777 == 0o700
        assert "is not a private directory of ours" in capsys.readouterr().err
    finally:
        path.rmdir()
