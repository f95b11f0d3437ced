"""Training refuses bad input in one line (exit 2) and recovers what it can: a damaged latest
checkpoint is set aside (renamed, never deleted) and the newest intact step resumed, with
config.json and config_history/ untouched until the restore has succeeded; an `init_from`
that holds no trainable weights (an image, an empty folder, an exported model), a seed that
JAX cannot take, and a workdir that cannot be written are each one line naming the file or
key. No step is compiled: `train.step.jit_train_step` is replaced by a step that adds 1 to
every array of the state (so each checkpoint differs), and the model is the subject of none."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from train.configs import smoke


def _cfg(**overrides):
    """The smoke config on 8 synthetic 16x16 pairs, 2 steps per epoch, a checkpoint per step."""
    from ml_collections import config_dict
    cfg = smoke.get_config()
    cfg.data.synthetic_pairs, cfg.data.synthetic_size, cfg.data.crop_size = 8, 16, 0
    cfg.steps_per_epoch, cfg.num_epochs, cfg.phase1_epochs = 2, 2, 1
    cfg.checkpoint_every_steps, cfg.log_every_steps, cfg.progress = 1, 1, False
    cfg.max_steps = 2
    for key, value in overrides.items():
        cfg[key] = value
    return config_dict.FrozenConfigDict(cfg)


def _no_compile(monkeypatch):
    import jax
    import train.step

    def jit_train_step(graphdef, phase, cfg, mesh, *, tx=None):
        return lambda state, vi, ir: (jax.tree.map(lambda x: x + 1, state),
                                      {"loss": np.float32(1.0)})

    monkeypatch.setattr(train.step, "jit_train_step", jit_train_step)


def _run(cfg, workdir, capsys) -> tuple[int, list[str]]:
    from train import main as train_main
    capsys.readouterr()
    rc = train_main.run(cfg, str(workdir))
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A workdir trained to step 2 with checkpoints 1 and 2 (and its config.json)."""
    from train import main as train_main
    workdir = tmp_path_factory.mktemp("two_steps") / "w"
    with pytest.MonkeyPatch.context() as mp:
        _no_compile(mp)
        assert train_main.run(_cfg(), str(workdir)) == 0
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    return workdir


# --------------------------------------------------------------------------- damaged checkpoints
def _damage(step_dir: Path, kind: str) -> str:
    """Damage one item of a step as a crash or a full disk can; returns what the error names."""
    if kind == "opt_truncated":  # `truncate -s 100` the files of opt's OCDBT root
        files = [p for p in (step_dir / "opt" / "d").iterdir() if p.is_file()]
        assert files
        for f in files:
            os.truncate(f, 100)
        return "ValueError: OUT_OF_RANGE"
    if kind == "data_deleted":  # the data iterator's item gone
        shutil.rmtree(step_dir / "data")
        return 'KeyError: Item "data" was not found'
    if kind == "metadata_deleted":
        (step_dir / "model" / "_METADATA").unlink()
        return "FileNotFoundError"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["opt_truncated", "data_deleted", "metadata_deleted"])
def test_damaged_latest_step_is_set_aside_and_the_newest_intact_one_resumed(
        two_steps, kind, tmp_path, monkeypatch, capsys):
    _no_compile(monkeypatch)
    workdir = tmp_path / "w"
    shutil.copytree(two_steps, workdir)
    ckpts = workdir / "checkpoints"
    names = _damage(ckpts / "2", kind)
    damaged = _snapshot(ckpts / "2")
    recorded = (workdir / "config.json").read_bytes()

    rc, err = _run(_cfg(max_steps=3), workdir, capsys)
    assert rc == 0, err
    aside = [p for p in ckpts.iterdir() if p.name.startswith("2.damaged-")]
    assert len(aside) == 1, sorted(p.name for p in ckpts.iterdir())
    assert err[0].startswith(f"warning: checkpoint step 2 is damaged ({names}"), err
    assert err[0].endswith(f"); set aside as {aside[0]}"), err
    assert err[1] == f"resumed from {ckpts} step 1 (the newest intact step)", err
    assert "Traceback" not in "\n".join(err) and "tensorstore_spec" not in err[0]
    assert _snapshot(aside[0]) == damaged  # renamed, not deleted nor repaired
    # trained on from step 1: steps 2 and 3 saved again (step 1 then dropped: keep_checkpoints=2)
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "3"]
    assert [json.loads(r)["step"] for r in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    # the accepted change (max_steps) recorded against the step really restored
    assert json.loads((workdir / "config.json").read_text())["max_steps"] == 3
    assert (workdir / "config_history" / "step_00000001.json").read_bytes() == recorded
    assert not (workdir / "config_history" / "step_00000002.json").exists()
    from smfnet_jax.checkpoint import load_checkpoint
    assert load_checkpoint(workdir).step == 3  # the set-aside folder is not taken for a step


def test_no_intact_step_is_one_line_and_changes_nothing(two_steps, tmp_path, monkeypatch, capsys):
    _no_compile(monkeypatch)
    workdir = tmp_path / "w"
    shutil.copytree(two_steps, workdir)
    ckpts = workdir / "checkpoints"
    newest = _damage(ckpts / "2", "opt_truncated")
    older = _damage(ckpts / "1", "data_deleted")
    before = _snapshot(workdir)

    rc, err = _run(_cfg(max_steps=3), workdir, capsys)  # max_steps: a change that would be recorded
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {ckpts}: no checkpoint step restores (step 2: {newest}"), err
    assert f"; step 1: {older}" in err[0] and "nothing was changed" in err[0], err
    assert _snapshot(workdir) == before  # config.json, config_history, metrics, both steps as they were
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl",
                                                          "summary.json", "tensorboard"]


# --------------------------------------------------------------------------- bad config values
def _png(path: Path) -> Path:
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kind,expect", [
    ("png", "{p}: not a PyTorch checkpoint (not a zip archive)"),
    ("empty_folder", "{p}: no orbax checkpoint step found"),
])
def test_init_from_without_weights_is_one_line(kind, expect, tmp_path, monkeypatch, capsys):
    _no_compile(monkeypatch)
    if kind == "png":
        init = _png(tmp_path / "photo.png")
    else:
        init = tmp_path / "empty"
        init.mkdir()
    workdir = tmp_path / "w"
    rc, err = _run(_cfg(init_from=str(init)), workdir, capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: init_from: {expect.format(p=init)}"), err
    assert not (workdir / "config.json").exists()  # nothing recorded for a run that never started


@pytest.mark.parametrize("suffix", [".jaxexport", ".onnx"])
def test_init_from_an_exported_model_is_refused_before_any_work(suffix, tmp_path, capsys):
    from train.configs.validate import ConfigError, check_config
    exported = tmp_path / f"model{suffix}"
    exported.write_bytes(b"SMFNET-JAXEXPORT 1\n{}\n" if suffix == ".jaxexport" else b"\x08\x07")
    with pytest.raises(ConfigError) as e:
        check_config(_cfg(init_from=str(exported)))
    assert e.value.problems == [
        f"init_from={str(exported)!r}: an exported model ({suffix}) holds a compiled function, not "
        "trainable weights; start from a .pth, a .safetensors, a converted orbax folder or a training workdir"]
    rc, err = _run(_cfg(init_from=str(exported)), tmp_path / "w", capsys)
    assert rc == 2 and err == [f"error: invalid config: {e.value.problems[0]}"], err
    assert not (tmp_path / "w").exists()


def test_seed_must_fit_jax_random_key(tmp_path, capsys):
    """jax.random.key keeps 32 bits of a seed (key(2**32 + 5) is key(5)) and overflows past
    2**63 - 1: the config takes [0, 2**32 - 1]."""
    import jax
    from train.configs.validate import config_problems
    assert (jax.random.key_data(jax.random.key(2**32 + 5)) == jax.random.key_data(jax.random.key(5))).all()
    assert config_problems(_cfg(seed=2**32 - 1)) == []
    for seed in (2**32, 99999999999999999999999):
        assert config_problems(_cfg(seed=seed)) == [f"seed={seed}: must be an integer in [0, 4294967295]"]
    rc, err = _run(_cfg(seed=99999999999999999999999), tmp_path / "w", capsys)
    assert rc == 2 and err == ["error: invalid config: seed=99999999999999999999999: must be an "
                               "integer in [0, 4294967295]"], err
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- unwritable workdirs
@pytest.mark.parametrize("kind", ["file", "dangling_link"])
def test_workdir_that_cannot_be_made_is_one_line(kind, tmp_path, monkeypatch, capsys):
    """A path component that is a regular file, or a symbolic link to nothing (tests run as
    root, whom chmod does not stop)."""
    _no_compile(monkeypatch)
    blocker = tmp_path / "notes.txt"
    if kind == "file":
        blocker.write_text("keep me")
        reason = "not a folder"
    else:
        blocker.symlink_to(tmp_path / "gone" / "runs")
        reason = "a symbolic link to nothing"
    workdir = blocker / "run1"
    rc, err = _run(_cfg(), workdir, capsys)
    assert rc == 2 and err == [f"error: {blocker}: {reason}, so the workdir {workdir} cannot be made "
                               "there"], err
    assert blocker.read_text() == "keep me" if kind == "file" else not (tmp_path / "gone").exists()


def test_lock_file_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    """EACCES on creating WORKDIR/train.lock (what a read-only workdir gives a non-root user;
    os.open is made to fail for that one path, as tests run as root)."""
    import train.workdir
    _no_compile(monkeypatch)
    workdir = tmp_path / "w"
    workdir.mkdir()
    lock = workdir / train.workdir.LOCK_NAME
    real_open = os.open

    def open_(path, *args, **kwargs):
        if Path(path) == lock:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(train.workdir.os, "open", open_)
    rc, err = _run(_cfg(), workdir, capsys)
    assert rc == 2 and err == [f"error: {lock}: Permission denied (the workdir {workdir} must be a "
                               "folder this process can write)"], err
    assert list(workdir.iterdir()) == []


def test_checkpoints_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """Orbax's save into WORKDIR/checkpoints that is a file waits forever: refused at start."""
    from train.trainer import Trainer
    from train.workdir import WorkdirError
    _no_compile(monkeypatch)
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a folder")
    message = f"{workdir / 'checkpoints'}: not a folder (the workdir's checkpoints go there)"
    with pytest.raises(WorkdirError) as e:
        Trainer(_cfg(), workdir)
    assert str(e.value) == message
    rc, err = _run(_cfg(), workdir, capsys)
    assert rc == 2 and err == [f"error: {message}"], err
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints"]
