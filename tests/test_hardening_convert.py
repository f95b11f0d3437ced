"""Checkpoint outputs that must never destroy data, and recovery from a killed swap (issue #40's
convert rows): convert.main refuses, before any work and whatever --force says, an output
that is, contains or lies inside the checkpoint being read, and an existing folder that is
not a converted checkpoint; a conversion with --force killed between its two renames is put
right by the next convert run or reader; infer.export refuses repeated --platforms and
re-exporting an exported model.

The refusals need no model (the loader is replaced by one that fails the test if called);
the converted checkpoints here hold a tiny stand-in state, except the one that
load_checkpoint must really read back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def _snapshot(root: Path) -> dict:
    """Every path under `root` with its bytes (None for a folder): what must not change."""
    return {p.relative_to(root): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.fixture
def no_work(monkeypatch):
    """convert.main must refuse before loading anything: loading fails the test."""
    from smfnet_jax import checkpoint

    def load(*a, **k):
        raise AssertionError("the checkpoint was loaded: the refusal came after work started")

    monkeypatch.setattr(checkpoint, "load_checkpoint", load)


def _tiny_state(monkeypatch, value: float = 0.0):
    """save_converted writes a 3-number `model` item instead of the network's (a real orbax
    checkpoint in layout, written in well under a second)."""
    from smfnet_jax import checkpoint
    monkeypatch.setattr(checkpoint, "model_state", lambda model: {"w": np.full(3, value, np.float32)})


def _converted(path: Path, monkeypatch, which: str) -> Path:
    from smfnet_jax.checkpoint import save_converted
    _tiny_state(monkeypatch)
    save_converted(path, None, None, {"which": which})
    return path


def _which(path: Path) -> str:
    return json.loads((path / "0" / "meta" / "metadata").read_text())["which"]


def _convert(argv, capsys) -> tuple[int, list[str]]:
    from convert.main import main
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------ row 1: outputs that destroy inputs

def test_out_folder_holding_the_pth_is_refused_even_with_force(tmp_path, no_work, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pth").write_bytes(b"PK the released weights")
    (models / "notes.txt").write_text("keep me")
    before = _snapshot(tmp_path)
    rc, err = _convert(["--pth", str(models / "model.pth"), "--out", str(models), "--force"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --out {models}: contains the checkpoint being read "
                             f"(--pth {models / 'model.pth'})"), err
    assert _snapshot(tmp_path) == before


def test_out_folder_holding_the_workdir_is_refused_even_with_force(tmp_path, no_work, capsys):
    runs = tmp_path / "runs"
    for run in ("w", "w2"):
        (runs / run / "checkpoints" / "100").mkdir(parents=True)
        (runs / run / "metrics.jsonl").write_text("{}\n")
    before = _snapshot(tmp_path)
    rc, err = _convert(["--ckpt", str(runs / "w"), "--out", str(runs), "--force"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --out {runs}: contains the checkpoint being read"), err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("out_flag,name,how", [
    ("--out", "m.safetensors", "is"),            # the input file itself
    ("--out", "link.safetensors", "is"),         # a symlink to it
    ("--to-pth", "m.safetensors", "is"),
])
def test_output_file_that_is_the_input_is_refused_even_with_force(tmp_path, no_work, capsys, out_flag, name, how):
    src = tmp_path / "m.safetensors"
    src.write_bytes(b"the only copy")
    (tmp_path / "link.safetensors").symlink_to(src)
    before = _snapshot(tmp_path)
    rc, err = _convert(["--ckpt", str(src), out_flag, str(tmp_path / name), "--force"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {out_flag} {tmp_path / name}: {how} the checkpoint being read"), err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("out_flag,name", [("--out", "x.safetensors"), ("--to-pth", "x.pth"),
                                           ("--out", "inner")])
def test_output_inside_the_checkpoint_folder_is_refused(tmp_path, no_work, capsys, monkeypatch, out_flag, name):
    ckpt = _converted(tmp_path / "ck", monkeypatch, "source")
    before = _snapshot(tmp_path)
    rc, err = _convert(["--ckpt", str(ckpt), out_flag, str(ckpt / name), "--force"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {out_flag} {ckpt / name}: lies inside the checkpoint being read"), err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["files", "workdir", "workdir checkpoints", "file"])
@pytest.mark.parametrize("force", [True, False])
def test_existing_output_that_is_not_a_converted_checkpoint_is_never_replaced(
        tmp_path, no_work, capsys, kind, force):
    src = tmp_path / "m.pth"
    src.write_bytes(b"PK unused")
    out = tmp_path / "out"
    if kind == "files":
        out.mkdir()
        (out / "results.csv").write_text("1,2\n")
        expect = "is a folder that is not a converted orbax checkpoint (it holds results.csv)"
    elif kind.startswith("workdir"):
        (out / "checkpoints" / "7" / "opt").mkdir(parents=True)
        (out / "checkpoints" / "7" / "model").mkdir()
        (out / "config.json").write_text("{}")
        if kind == "workdir":
            expect = "is a training workdir, not a converted checkpoint"
        else:
            out = out / "checkpoints"
            expect = "is not a converted orbax checkpoint (its step 7 holds model, opt)"
    else:
        out.write_bytes(b"someone's file")
        expect = "is a file, not an orbax checkpoint folder"
    before = _snapshot(tmp_path)
    rc, err = _convert(["--pth", str(src), "--out", str(out)] + (["--force"] if force else []), capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --out {out}: {expect}: refusing to replace it"), err
    assert _snapshot(tmp_path) == before


def test_file_output_that_is_a_folder_is_refused_before_work(tmp_path, no_work, capsys):
    src = tmp_path / "m.pth"
    src.write_bytes(b"PK unused")
    (tmp_path / "folder.pth").mkdir()
    rc, err = _convert(["--pth", str(src), "--to-pth", str(tmp_path / "folder.pth"), "--force"], capsys)
    assert rc == 2 and err == [f"error: --to-pth {tmp_path / 'folder.pth'}: is a folder: "
                               "give the path of the file to write"], err


def test_library_refuses_to_replace_what_is_not_a_converted_checkpoint(tmp_path, monkeypatch):
    from smfnet_jax.checkpoint import CheckpointError, save_converted
    _tiny_state(monkeypatch)
    (tmp_path / "runs" / "w" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "notes.txt").write_text("keep")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="not a converted orbax checkpoint"):
        save_converted(tmp_path / "runs", None, None, {}, overwrite=True)
    with pytest.raises(CheckpointError, match="is a training workdir"):
        save_converted(tmp_path / "runs" / "w", None, None, {}, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_force_still_replaces_a_converted_checkpoint(tmp_path, monkeypatch, capsys):
    """The refusals leave --force its job: a converted checkpoint (and an empty folder) is replaced."""
    from smfnet_jax import checkpoint
    ck = _converted(tmp_path / "ck", monkeypatch, "previous")
    empty = tmp_path / "empty"
    empty.mkdir()
    src = tmp_path / "m.pth"
    src.write_bytes(b"PK unused")
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, step=None: checkpoint.Loaded(None))
    for out in (ck, empty):
        rc, err = _convert(["--pth", str(src), "--out", str(out), "--force"], capsys)
        assert rc == 0, err
        assert json.loads((out / "0" / "meta" / "metadata").read_text())["source"] == str(src.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "empty", "m.pth"]  # nothing left aside


# ------------------------------------------------------------------ row 9: a swap killed between its renames

def _killed_swap(name: Path) -> None:
    """Run save_converted(name, overwrite=True) in a child process that is SIGKILLed right
    after the old checkpoint was renamed aside, before the new one is renamed in."""
    code = textwrap.dedent(f"""
        import os, re, signal
        import numpy as np
        from smfnet_jax import checkpoint
        checkpoint.model_state = lambda model: {{"w": np.ones(3, np.float32)}}
        real = os.replace
        def replace(a, b):
            if re.fullmatch(r"\\.{name.name}\\.[0-9a-f]{{12}}\\.tmp", os.path.basename(a)):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(a, b)
        os.replace = replace
        checkpoint.save_converted({str(name)!r}, None, None, {{"which": "new"}}, overwrite=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    left = sorted(p.name.rsplit(".", 1)[1] for p in name.parent.iterdir() if p.name.startswith(f".{name.name}."))
    assert not name.exists() and left == ["old", "tmp"], sorted(name.parent.iterdir())


def _set_aside(ck: Path) -> Path:
    """The state _killed_swap leaves, made by hand for the readers' tests: the checkpoint
    renamed to `.NAME.<tag>.old` beside a half-written `.NAME.<tag>.tmp`; returns the `.old`."""
    old = ck.with_name(f".{ck.name}.0123456789ab.old")
    os.rename(ck, old)
    (ck.with_name(f".{ck.name}.0123456789ab.tmp") / "0.orbax-checkpoint-tmp-1").mkdir(parents=True)
    return old


def test_next_convert_run_restores_the_checkpoint_a_killed_swap_set_aside(tmp_path, monkeypatch, capsys):
    ck = _converted(tmp_path / "ck", monkeypatch, "previous")
    _killed_swap(ck)
    src = tmp_path / "m.pth"
    src.write_bytes(b"PK unused")
    from smfnet_jax import checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path, step=None: checkpoint.Loaded(None))
    from convert.main import main
    with pytest.raises(SystemExit) as e:  # no --force: the old one is back, and kept
        main(["--pth", str(src), "--out", str(ck)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith(f"note: restored {ck} from .ck.") and "interrupted" in err[0], err
    assert "pass --force" in err[-1], err
    assert _which(ck) == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "m.pth"]  # the unproven .tmp removed


def test_readers_restore_the_checkpoint_a_killed_swap_set_aside(tmp_path, monkeypatch, capsys):
    """infer.main --ckpt NAME finds it (a note says so) and fuses with it."""
    import infer.main as cli
    ck = _converted(tmp_path / "ck", monkeypatch, "previous")
    _set_aside(ck)
    ir, vi, out = (tmp_path / k for k in ("ir", "vi", "out"))
    for d in (ir, vi):
        d.mkdir()
        Image.fromarray(np.full((8, 8), 9, np.uint8)).save(d / "a.png")
    loaded = []
    monkeypatch.setattr(cli, "load_fuser", lambda path, **kw: loaded.append(_which(Path(path)))
                        or (lambda a, b: np.maximum(a, b).astype(np.float32)))
    monkeypatch.setattr(cli, "available_memory", lambda: None)
    rc = cli.main(["--ckpt", str(ck), "--ir", str(ir), "--vi", str(vi), "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 0 and loaded == ["previous"], err
    assert err[0].startswith(f"note: restored {ck} from .ck.") and "interrupted" in err[0], err
    assert (out / "a.png").is_file() and _which(ck) == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "ir", "out", "vi"]


def test_load_checkpoint_restores_a_set_aside_checkpoint(tmp_path):
    """The library reader: a real checkpoint set aside by a killed swap loads under its name."""
    from smfnet_jax.checkpoint import CheckpointRestoredWarning, load_checkpoint, model_state, save_converted
    from smfnet_jax.model import create_model
    ck = tmp_path / "ck"
    model = create_model(3)
    save_converted(ck, model, None, {"which": "previous"})
    _killed_swap(ck)
    with pytest.warns(CheckpointRestoredWarning, match="interrupted"):
        loaded = load_checkpoint(ck)
    assert loaded.meta == {"which": "previous"}
    want, got = model_state(model), model_state(loaded.model)
    import jax
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))


def test_set_aside_checkpoint_without_its_swap_partner_is_named_not_guessed(tmp_path, monkeypatch, capsys):
    """A `.old` whose `.tmp` is gone is not the killed-swap state: nothing is renamed, and
    the one error line says where the previous checkpoint is."""
    import infer.main as cli
    import shutil
    ck = _converted(tmp_path / "ck", monkeypatch, "previous")
    old = _set_aside(ck)
    shutil.rmtree(next(tmp_path.glob(".ck.*.tmp")))
    for d in ("ir", "vi"):
        (tmp_path / d).mkdir()
    rc = cli.main(["--ckpt", str(ck), "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"),
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --ckpt {ck}: missing;"), err
    assert str(old) in err[0] and "rename the one to keep to ck" in err[0], err
    assert not ck.exists() and old.is_dir()


def test_a_finished_swap_leftover_is_cleaned_by_the_next_write(tmp_path, monkeypatch):
    """A `.old` beside an existing checkpoint (killed after the swap, before the delete) is the
    superseded checkpoint that --force meant to delete: the next save_converted deletes it."""
    from smfnet_jax.checkpoint import save_converted
    ck = _converted(tmp_path / "ck", monkeypatch, "previous")
    stale = tmp_path / ".ck.0123456789ab.old"
    os.rename(_converted(tmp_path / "older", monkeypatch, "older"), stale)
    save_converted(ck, None, None, {"which": "newest"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and _which(ck) == "newest"


# ------------------------------------------------------------------ row 13: infer.export arguments

def test_export_refuses_repeated_platforms(tmp_path, capsys):
    from infer import export
    from smfnet_jax.export import export_fusion
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"PK unused")
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "m.jaxexport"), "--platforms", "cpu,cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith("error: --platforms cpu,cpu: cpu given more than once"), err
    with pytest.raises(ValueError, match="cpu given more than once"):
        export_fusion(None, ("cpu", "cuda", "cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


@pytest.mark.parametrize("suffix", [".jaxexport", ".onnx"])
def test_export_refuses_an_exported_model_as_checkpoint(tmp_path, capsys, suffix):
    from infer import export
    ckpt = tmp_path / f"m{suffix}"
    ckpt.write_bytes(b"an exported model")
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "again.jaxexport")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert err[-1].endswith(f"error: --ckpt {ckpt}: is an exported model, which cannot be exported again "
                            "(its weights and compute policy are baked in): pass the checkpoint it was "
                            "exported from (.pth, .safetensors, orbax folder or training workdir)"), err
    assert "policy cannot change it" not in "\n".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]


def test_export_restores_a_set_aside_checkpoint_and_refuses_an_out_inside_it(tmp_path, monkeypatch, capsys):
    from infer import export
    from smfnet_jax import api
    ck = _converted(tmp_path / "ck", monkeypatch, "previous")
    _set_aside(ck)
    loaded = []

    def load_fuser(path, **kw):
        loaded.append(_which(Path(path)))
        raise ValueError("stand-in: not a real model")

    monkeypatch.setattr(api, "load_fuser", load_fuser)
    assert export.main(["--ckpt", str(ck), "--out", str(tmp_path / "m.jaxexport")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert loaded == ["previous"] and err[0].startswith(f"note: restored {ck} from .ck."), err
    with pytest.raises(SystemExit) as e:
        export.main(["--ckpt", str(ck), "--out", str(ck / "m.jaxexport")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].endswith(f"error: --out {ck / 'm.jaxexport'}: lies inside the "
                                                  f"checkpoint being read (--ckpt {ck}): write the output elsewhere"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and sorted(p.name for p in ck.iterdir()) == ["0"]
