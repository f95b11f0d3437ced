"""No output of a CLI may replace what it reads, and no two outputs of a run may be one file:
every output path is planned and checked before any work, and a bad one is one line, exit
status 2, with nothing written (infer.main's --out / --json / per-pair files, infer.evaluate
--json, train.prepare --out, the benchmarks' --json). Also train.prepare's usage errors
(--src, --patch, --stride) exit 2 like every other CLI's. Small images and a numpy stand-in
for the model: the subject is the paths, not the network."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


def _png(path: Path, seed: int, shape=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)


def _pairs(tmp_path: Path, names) -> tuple[Path, Path]:
    ir, vi = tmp_path / "ir", tmp_path / "vi"
    for i, name in enumerate(names):
        _png(ir / f"{name}.png", i)
        _png(vi / f"{name}.png", i + 100)
    return ir, vi


def _snapshot(*folders: Path) -> dict:
    """Every file under the folders (links not followed) -> its bytes (or link target)."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            out[p] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
    return out


@pytest.fixture
def fuse_cli(tmp_path, monkeypatch):
    """infer.main with a numpy fuser; `fuse_cli.loaded` counts model loads."""
    import infer.main as cli

    loads = []

    def load(ckpt, **kw):
        loads.append(ckpt)
        return lambda a, b: np.maximum(a, b).astype(np.float32)

    monkeypatch.setattr(cli, "load_fuser", load)
    monkeypatch.setattr(cli, "available_memory", lambda: None)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"weights")
    return SimpleNamespace(main=cli.main, loaded=loads, ckpt=ckpt)


def _fuse(cli, ir, vi, out, *extra):
    return cli.main(["--ckpt", str(cli.ckpt), "--ir", str(ir), "--vi", str(vi), "--out", str(out),
                     *map(str, extra)])


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --------------------------------------------------------------------- an output is an input

def test_fuse_json_that_is_an_input_image_is_refused(fuse_cli, tmp_path, capsys):
    ir, vi = _pairs(tmp_path, ["x", "y"])
    before = _snapshot(ir, vi)
    out = tmp_path / "out"
    assert _fuse(fuse_cli, ir, vi, out, "--json", ir / "x.png") == 2
    assert _one_error(capsys) == (f"error: --json {ir / 'x.png'}: is the input file; "
                                  "refusing to overwrite an input")
    assert _snapshot(ir, vi) == before and not out.exists() and not fuse_cli.loaded


def test_fuse_json_that_is_the_checkpoint_is_refused(fuse_cli, tmp_path, capsys):
    ir, vi = _pairs(tmp_path, ["x"])
    assert _fuse(fuse_cli, ir, vi, tmp_path / "out", "--json", fuse_cli.ckpt) == 2
    assert "is the --ckpt checkpoint" in _one_error(capsys)
    assert fuse_cli.ckpt.read_bytes() == b"weights" and not fuse_cli.loaded


def test_fuse_output_linked_to_an_input_is_refused(fuse_cli, tmp_path, capsys):
    """out/x.png is a link to the input ir/x.png: writing it would replace the input."""
    ir, vi = _pairs(tmp_path, ["x", "y"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").symlink_to(ir / "x.png")
    before = _snapshot(ir, vi, out)
    assert _fuse(fuse_cli, ir, vi, out) == 2
    assert _one_error(capsys) == (f"error: --out {out / 'x.png'}: is the input file {ir / 'x.png'}; "
                                  "refusing to overwrite an input")
    assert _snapshot(ir, vi, out) == before and not fuse_cli.loaded


def test_fuse_out_inside_an_input_folder_is_refused(fuse_cli, tmp_path, capsys):
    ir, vi = _pairs(tmp_path, ["x"])
    out = vi / "fused"
    assert _fuse(fuse_cli, ir, vi, out) == 2
    assert _one_error(capsys) == (f"error: --out {out}: lies inside the --vi folder {vi}; "
                                  "refusing to write among the inputs")
    assert not out.exists() and not fuse_cli.loaded


def test_fuse_out_may_hold_the_input_folders_and_json_may_go_in_a_new_out(fuse_cli, tmp_path, capsys):
    """Not over-refused: --out above --ir/--vi writes beside them; --json in a --out that
    the run creates is fine."""
    ir, vi = _pairs(tmp_path, ["x"])
    assert _fuse(fuse_cli, ir, vi, tmp_path) == 0
    assert (tmp_path / "x.png").is_file()
    out = tmp_path / "new"
    # the metrics need images of at least 41x41: evaluation skips these (exit 1), the JSON is written
    assert _fuse(fuse_cli, ir, vi, out, "--json", out / "metrics.json") == 1
    assert (out / "metrics.json").is_file() and (out / "x.png").is_file()


def test_evaluate_json_that_is_a_fused_image_is_refused(tmp_path, capsys):
    from infer import evaluate
    ir, vi = _pairs(tmp_path, ["a"])
    fused = tmp_path / "fused"
    _png(fused / "a.png", 7)
    before = _snapshot(ir, vi, fused)
    assert evaluate.main(["--ir", str(ir), "--vi", str(vi), "--fused", str(fused),
                          "--json", str(fused / "a.png")]) == 2
    assert _one_error(capsys) == (f"error: --json {fused / 'a.png'}: is the input file; "
                                  "refusing to overwrite an input")
    assert _snapshot(ir, vi, fused) == before


def test_prepare_out_that_is_an_input_image_is_refused(tmp_path, capsys):
    from train import prepare
    src = tmp_path / "s"
    _pairs(src, ["a", "b"])
    before = _snapshot(src)
    target = src / "ir" / "a.png"
    assert prepare.main(["--src", str(src), "--out", str(target), "--patch", "8", "--stride", "8",
                         "--quiet"]) == 2
    assert _one_error(capsys) == f"error: --out {target}: is the input file; refusing to overwrite an input"
    assert _snapshot(src) == before
    # a link to an input is the input
    link = tmp_path / "patches.h5"
    link.symlink_to(src / "vi" / "b.png")
    assert prepare.main(["--src", str(src), "--out", str(link), "--patch", "8", "--quiet"]) == 2
    assert f"is the input file {src / 'vi' / 'b.png'}" in _one_error(capsys)
    assert _snapshot(src) == before


def _no_work(*args, **kwargs):
    raise AssertionError("the work started before --json was checked")


@pytest.mark.parametrize("module", ["infer.bench", "infer.bench_memory", "infer.bench_metrics",
                                    "infer.device_check"])
def test_bench_json_that_is_an_input_is_refused_before_any_work(module, tmp_path, monkeypatch, capsys):
    import importlib
    mod = importlib.import_module(module)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"weights")
    if module == "infer.bench":
        monkeypatch.setattr(mod.subprocess, "run", _no_work)
        target, argv = ckpt, ["--ckpt", str(ckpt), "--sizes", "16x16"]
    elif module == "infer.bench_memory":
        monkeypatch.setattr(mod, "synthetic_pair", _no_work)
        target, argv = ckpt, ["--size", "16x16", "--ckpt", str(ckpt)]
    elif module == "infer.bench_metrics":
        monkeypatch.setattr(mod, "load_pairs", _no_work)
        ir, vi = _pairs(tmp_path, ["a"])
        target, argv = vi / "a.png", ["--ir", str(ir), "--vi", str(vi)]
    else:
        monkeypatch.setattr(mod, "fusion_rows", _no_work)
        monkeypatch.setattr(mod, "parity_rows", _no_work)
        fixtures = tmp_path / "fixtures"
        fixtures.mkdir()
        (fixtures / "reference.npz").write_bytes(b"reference")
        target, argv = fixtures / "reference.npz", ["--quick", "--fixtures", str(fixtures)]
    before = target.read_bytes()
    assert mod.main([*argv, "--json", str(target)]) == 2
    assert _one_error(capsys).startswith(f"error: --json {target}: is the ")
    assert target.read_bytes() == before


# --------------------------------------------------------------------- two outputs, one file

def test_grid_of_x_and_fused_image_of_x_grid_collide_and_are_refused(fuse_cli, tmp_path, capsys):
    ir, vi = _pairs(tmp_path, ["x", "x_grid", "y"])
    out = tmp_path / "out"
    assert _fuse(fuse_cli, ir, vi, out, "--grid") == 2
    assert _one_error(capsys) == (
        f"error: {out / 'x_grid.png'}: pair x's grid (--grid) and pair x_grid's fused image would "
        "both be written to this file; rename one of the pairs' files")
    assert not out.exists() and not fuse_cli.loaded
    # without --grid the two names are distinct outputs
    assert _fuse(fuse_cli, ir, vi, out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x.png", "x_grid.png", "y.png"]


def test_json_naming_a_fused_output_is_refused(fuse_cli, tmp_path, capsys):
    ir, vi = _pairs(tmp_path, ["x", "y"])
    out = tmp_path / "out"
    out.mkdir()
    assert _fuse(fuse_cli, ir, vi, out, "--json", out / "y.png") == 2
    assert _one_error(capsys) == (f"error: {out / 'y.png'}: pair y's fused image and --json would both "
                                  "be written to this file; choose another --json")
    assert list(out.iterdir()) == [] and not fuse_cli.loaded


def test_two_outputs_linked_to_one_file_are_refused(fuse_cli, tmp_path, capsys):
    """out/a.png and out/b.png link to one file: one pair's result would silently replace the
    other's."""
    ir, vi = _pairs(tmp_path, ["a", "b"])
    out = tmp_path / "out"
    out.mkdir()
    shared = tmp_path / "elsewhere.png"
    shared.write_bytes(b"keep")
    for name in ("a", "b"):
        (out / f"{name}.png").symlink_to(shared)
    assert _fuse(fuse_cli, ir, vi, out) == 2
    assert _one_error(capsys) == (f"error: {out / 'b.png'}: pair a's fused image and pair b's fused "
                                  "image would both be written to this file; rename one of the pairs' files")
    assert shared.read_bytes() == b"keep" and not fuse_cli.loaded


# --------------------------------------------------------------------- prepare's usage errors

@pytest.mark.parametrize("case,expect", [
    ("nosrc", "error: --src {src}: not a folder"),
    ("novi", "error: --src {src}: has no 'vi/' subfolder (expected {src}/ir and {src}/vi)"),
    ("stride0", "error: --stride 0: must be at least 1 (pixels)"),
    ("patch-4", "error: --patch -4: must be at least 1 (pixels)"),
])
def test_prepare_usage_errors_exit_2_before_any_work(case, expect, tmp_path, capsys):
    from train import prepare
    src = tmp_path / "s"
    if case != "nosrc":
        _pairs(src, ["a"])
    if case == "novi":
        for p in (src / "vi").iterdir():
            p.unlink()
        (src / "vi").rmdir()
    argv = {"stride0": ["--stride", "0"], "patch-4": ["--patch", "-4"]}.get(case, [])
    out = tmp_path / "p.h5"
    assert prepare.main(["--src", str(src), "--out", str(out), "--quiet", *argv]) == 2
    assert _one_error(capsys) == expect.format(src=src)
    assert not out.exists()


# --------------------------------------------------------------------- the shared helper

def test_find_overlap_resolves_links_and_keeps_the_order_of_outputs(tmp_path):
    from smfnet_jax.fileio import find_overlap, overlap
    data = tmp_path / "data"
    (data / "ir").mkdir(parents=True)
    img = data / "ir" / "1.png"
    img.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(data)
    sources = [img, data / "ir"]
    assert find_overlap([tmp_path / "o.png", link / "ir" / "1.png"], sources) == (link / "ir" / "1.png", img, "is")
    assert find_overlap([tmp_path / "o.png"], sources) is None
    assert find_overlap([link], sources)[2] == "contains"
    assert find_overlap([link], sources, hows=("is", "lies inside")) is None
    assert find_overlap([data / "ir" / "new" / "f"], sources)[1:] == (data / "ir", "lies inside")
    for out, src, how in [(img, link / "ir" / "1.png", "is"), (data, img, "contains"),
                          (img, data, "lies inside"), (data / "vi", img, None)]:
        assert overlap(out, src) == how
