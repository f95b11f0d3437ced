"""Bad input gets one clear line and a usage exit status, and loses nothing (issue #23, the
rows done so far): config files that cannot give a config, a workdir that is a file, a
prepare output that is a folder, --tile 0, our own _grid outputs in an evaluated folder,
and Ctrl-C during fusion. (A bad $SMFNET_JAX_IMPL: tests/test_policy.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("body,expect", [
    (None, "no such file"),
    ("def get_config(:\n", "SyntaxError"),
    ("def get_config():\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("def get_config():\n    return 42\n", "get_config() returned int, not a ConfigDict"),
    ("x = 1\n", "defines no get_config()"),
])
def test_config_file_problems_are_one_line(body, expect, tmp_path, monkeypatch, capsys):
    from train import main as train_main
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
    cfg = tmp_path / "cfg.py"
    if body is not None:
        cfg.write_text(body)
    rc = train_main.main(["train.main", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --config {cfg}: ") and expect in err[0], err
    assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "train.main", "--config", "smoke.py", "--workdir", str(f)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: --workdir {f} is not a folder" in r.stderr
    assert f.read_text() == "keep me"


def test_prepare_refuses_a_folder_as_output_before_any_work(tmp_path, capsys):
    from train import prepare
    src = tmp_path / "src"
    for sub in ("ir", "vi"):
        (src / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / sub / "a.png")
    out = tmp_path / "out_folder"
    out.mkdir()
    assert prepare.main(["--src", str(src), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {out} is a folder: give the path of the H5 file to write"]
    assert list(out.iterdir()) == []
    with pytest.raises(prepare.PrepareError, match="is a folder"):
        prepare.prepare(src, out)


def test_tile_zero_is_documented_as_off():
    from infer.main import build_parser
    action = next(a for a in build_parser()._actions if "--tile" in a.option_strings)
    assert action.default == 0 and "0 (the default) is off" in action.help


def _png(path, seed, shape=(24, 20)):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)


def test_evaluate_ignores_our_own_grid_outputs(tmp_path, capsys):
    from infer import evaluate as ev
    dirs = {k: tmp_path / k for k in ("ir", "vi", "fused")}
    for d in dirs.values():
        d.mkdir()
    for i, k in enumerate(("ir", "vi", "fused")):
        _png(dirs[k] / "a.png", i, (48, 44))  # the metrics need >= 41 pixels a side
    Image.fromarray(np.zeros((60, 140, 3), np.uint8)).save(dirs["fused"] / "a_grid.png")  # --grid's
    _png(dirs["fused"] / "b_grid.png", 5)  # not beside a fused b.png: still reported
    rc = ev.main(["--ir", str(dirs["ir"]), "--vi", str(dirs["vi"]), "--fused", str(dirs["fused"])])
    err = capsys.readouterr().err
    assert rc == 1 and "a_grid" not in err and "b_grid" in err, err
    (dirs["fused"] / "b_grid.png").unlink()
    assert ev.main(["--ir", str(dirs["ir"]), "--vi", str(dirs["vi"]), "--fused", str(dirs["fused"])]) == 0


def test_ctrl_c_during_fusion_says_how_far_it_got(tmp_path, monkeypatch, capsys):
    import infer.main as cli
    ir, vi, out = (tmp_path / k for k in ("ir", "vi", "out"))
    ir.mkdir()
    vi.mkdir()
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        _png(ir / f"{name}.png", seed)
        _png(vi / f"{name}.png", seed + 10)
    calls = []

    def fuser(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.maximum(a, b).astype(np.float32)

    monkeypatch.setattr(cli, "load_fuser", lambda ckpt, **kw: fuser)
    monkeypatch.setattr(cli, "available_memory", lambda: None)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"unused")
    rc = cli.main(["--ckpt", str(ckpt), "--ir", str(ir), "--vi", str(vi), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == cli.EXIT_INTERRUPTED == 130
    assert err[-1] == f"interrupted: 1 of 3 pairs written to {out}", err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # complete, nothing partial


def test_atomic_writers_respect_what_the_target_is(tmp_path):
    """A symlink is followed (its target replaced, the link kept), a character device or a
    FIFO is written through (never replaced by a regular file), a folder refused; the same
    for every writer (JSON, PNG, .npy all go through smfnet_jax.fileio)."""
    import json
    import stat
    import threading

    from smfnet_jax.fileio import atomic_write_json
    from smfnet_jax.imageio import write_png
    target, link = tmp_path / "b.json", tmp_path / "a.json"
    target.write_text("old")
    link.symlink_to(target.name)
    atomic_write_json(link, {"x": 1})
    assert link.is_symlink() and json.loads(target.read_text()) == {"x": 1}
    png = tmp_path / "p.png"
    (tmp_path / "p_link.png").symlink_to(png)  # dangling: creates its target
    write_png(tmp_path / "p_link.png", np.zeros((4, 4), np.uint8))
    assert (tmp_path / "p_link.png").is_symlink() and png.is_file()

    atomic_write_json("/dev/null", {"x": 1})
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError, match="No space left"):
            atomic_write_json("/dev/full", {"x": 1})

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    atomic_write_json(fifo, {"y": 2})
    reader.join(10)
    assert json.loads(got[0]) == {"y": 2} and stat.S_ISFIFO(os.stat(fifo).st_mode)

    with pytest.raises(IsADirectoryError, match="is a folder"):
        atomic_write_json(tmp_path, {"x": 1})
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    from smfnet_jax.checkpoint import save_converted
    from smfnet_jax.model import create_model
    out = tmp_path_factory.mktemp("orbax") / "ckpt"
    save_converted(out, create_model(0), None, {})
    return out


def _corrupt(src: Path, dst: Path, kind: str) -> None:
    import shutil
    shutil.copytree(src, dst)
    model = dst / "0" / "model"
    largest = max((p for p in (model / "ocdbt.process_0" / "d").iterdir()), key=lambda p: p.stat().st_size)
    if kind == "deleted":
        largest.unlink()
    elif kind == "truncated":
        os.truncate(largest, largest.stat().st_size // 10)
    elif kind == "flipped":
        # the file's own structure (its first bytes); flips inside raw weight bytes load as other
        # finite weights: orbax keeps no checksum (docs/formats.md), so only non-finite ones are caught
        data = bytearray(largest.read_bytes())
        data[:64] = bytes(b ^ 0xFF for b in data[:64])
        largest.write_bytes(bytes(data))
    elif kind == "metadata":
        (model / "_METADATA").write_text("{garbage")
    elif kind == "manifest":
        for p in dst.rglob("manifest.ocdbt"):
            p.unlink()


@pytest.mark.parametrize("kind,names", [
    ("deleted", "{dst} step 0: corrupt or truncated orbax checkpoint"),
    ("truncated", "{dst} step 0: corrupt or truncated orbax checkpoint"),
    ("flipped", "{dst} step 0"),   # a checksum error or, where the bytes still decode, non-finite weights
    ("metadata", "{dst}/0/model/_METADATA: corrupt (not JSON"),
    ("manifest", "{dst}/0/model/manifest.ocdbt: missing: corrupt or truncated"),
])
def test_corrupt_orbax_checkpoint_is_one_clear_error(converted_dir, tmp_path, kind, names):
    from smfnet_jax.checkpoint import CheckpointError, load_checkpoint
    dst = tmp_path / "bad"
    _corrupt(converted_dir, dst, kind)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(dst)
    assert str(e.value).startswith(names.format(dst=dst)), str(e.value)[:300]
    assert "\n" not in str(e.value) and "tensorstore_spec" not in str(e.value)


@pytest.mark.parametrize("kind", ["deleted", "truncated"])
def test_corrupt_orbax_checkpoint_cli_prints_one_line(converted_dir, tmp_path, kind):
    """One line, also at exit: TensorStore's callbacks into orbax's closed event loop and the
    abandoned reads are dropped (checkpoint.quiet_orbax_failures)."""
    dst = tmp_path / "bad"
    _corrupt(converted_dir, dst, kind)
    r = subprocess.run([sys.executable, "-m", "convert.main", "--ckpt", str(dst), "--out",
                        str(tmp_path / "x.safetensors")], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if "Warning" not in line and line.strip()]
    assert r.returncode == 2 and "corrupt or truncated orbax checkpoint" in lines[0], r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]


# ------------------------------------------------------------------ row 13: a huge pair
def test_rendering_and_inputs_by_blocks_equal_the_whole_image(tmp_path, monkeypatch):
    """infer.main keeps a pair as 8-bit pixels and renders by row blocks: the network inputs
    of a region and the written image do not depend on the block size (colour and grey)."""
    import infer.main as cli
    from smfnet_jax import imageio
    from smfnet_jax.imageio import read_ycrcb, rgb_to_gray, ycrcb_to_rgb
    rng = np.random.default_rng(13)
    for colour in (True, False):
        shape = (29, 17, 3) if colour else (29, 17)
        for sub in ("ir", "vi"):
            (tmp_path / sub).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / sub / "p.png")
        pair = cli.Pair("p", tmp_path / "ir" / "p.png", tmp_path / "vi" / "p.png")
        loaded = cli.load_pair(pair)
        ycrcb = read_ycrcb(pair.vi)
        ir, vi = loaded.inputs()
        np.testing.assert_array_equal(ir, rgb_to_gray(np.asarray(Image.open(pair.ir))) / np.float32(255))
        np.testing.assert_array_equal(vi, ycrcb[..., 0] / np.float32(255))
        region = loaded.inputs(slice(3, 11), slice(5, 9))
        np.testing.assert_array_equal(region[1], vi[3:11, 5:9])
        fused = rng.random(shape[:2], dtype=np.float32)
        monkeypatch.setattr(imageio, "BLOCK_PIXELS", 4 * 17)
        blocks = cli.render(loaded, fused, normalize=True)
        monkeypatch.setattr(imageio, "BLOCK_PIXELS", 10**6)
        assert loaded.grey == (not colour)
        np.testing.assert_array_equal(blocks, cli.render(loaded, fused, normalize=True))
        f255 = (fused - fused.min()) / (fused.max() - fused.min()) * np.float32(255)
        if colour:  # the reference's formula on the whole image
            np.testing.assert_array_equal(blocks, ycrcb_to_rgb(np.stack([f255, ycrcb[..., 1], ycrcb[..., 2]], -1)))


def test_huge_pair_memory_grows_with_the_tile_not_the_image(tmp_path):
    """A 3000x3000 RGB pair through infer.main (auto-tiled; a stand-in fuser in place of the
    model, so only what grows with the image is measured) in a child process, against a
    256x256 one for the fixed part: the peak RSS grows by less than HUGE_PAIR_BYTES_PER_PIXEL
    per pixel. Before the 8-bit LoadedPair, the row-block conversions and our PNG encoder it
    grew by ~80 (docs/benchmarks.md, "Host memory of fusion")."""
    import json
    figs = {}
    for size in (256, 3000):
        out = tmp_path / f"{size}.json"
        r = subprocess.run([sys.executable, "-m", "infer.bench_memory", "--size", f"{size}x{size}",
                            "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        figs[size] = json.loads(out.read_text())
        print(r.stdout.strip())
    assert "fusing in 512-pixel tiles" in r.stderr, r.stderr[-2000:]
    grow = {s: f["peak_rss"] - f["rss_before"] for s, f in figs.items()}
    per_pixel = (grow[3000] - grow[256]) / (3000**2 - 256**2)
    print(f"{per_pixel:.1f} bytes per pixel")
    assert figs[3000]["rc"] == 0 and per_pixel < HUGE_PAIR_BYTES_PER_PIXEL, figs


def test_bench_memory_model_fuses_only_the_last_tiles():
    """--model-tiles N: the stand-in fuses the first tiles, the model the last N (the peak
    comes at the end, when every image-sized array is present)."""
    from infer.bench_memory import LastTilesByModel, main, stand_in
    calls = []

    def model(ir, vi):
        calls.append(fuser.calls)  # which call of the run this is
        return stand_in(ir, vi)

    fuser = LastTilesByModel(model, tiles=5, model_tiles=2)
    ones = np.ones((2, 2), np.float32)
    for _ in range(5):
        fuser(ones, ones)
    assert calls == [4, 5] and fuser.calls == 5
    assert main(["--size", "8x8", "--model-tiles", "2"]) == 2  # needs --ckpt


# 8-bit inputs (1 + 3 bytes per pixel), the fused float32 output (4) and the 8-bit RGB output
# (3) are the image-sized arrays left; decoding, blending, colour planes and PNG encoding
# work in blocks. Measured ~12-15 (infer.bench_memory); the slack covers allocator noise.
HUGE_PAIR_BYTES_PER_PIXEL = 18


# ------------------------------------------------------------------ row 8: disk full on save
DISK_FULL_CHILD = """
import sys
import numpy as np
from ml_collections import config_dict
import train.step
from train import main as train_main
from train.configs import smoke

def jit_train_step(graphdef, phase, cfg, mesh, tx):  # no compile: the state unchanged, a finite loss
    return lambda state, vi, ir: (state, {"loss": np.float32(1.0)})

train.step.jit_train_step = jit_train_step
cfg = smoke.get_config()
cfg.data.h5, cfg.data.crop_size = sys.argv[2], 0
cfg.steps_per_epoch, cfg.num_epochs, cfg.phase1_epochs = 2, 2, 1
cfg.checkpoint_every_steps, cfg.log_every_steps, cfg.progress = 1, 1, False
sys.exit(train_main.run(config_dict.FrozenConfigDict(cfg), sys.argv[1]))
"""


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 15 MB tmpfs (a checkpoint of the untrained model is ~10 MB): the second save runs out."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=15m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(r.stderr or r.stdout).strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_while_saving_is_one_line_and_frees_the_space(small_tmpfs, tmp_path):
    from train.data import write_synthetic_h5
    h5 = write_synthetic_h5(tmp_path / "tiny.h5", n=8, size=16, seed=3)
    workdir = small_tmpfs / "w"
    r = subprocess.run([sys.executable, "-c", DISK_FULL_CHILD, str(workdir), str(h5)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(lines) <= 2, r.stderr[-3000:]  # describe + error
    ckpts = workdir / "checkpoints"
    assert lines[-1] == (f"error: no space left on device saving checkpoint step 2 in {ckpts} "
                         "(its partial files removed); the last good checkpoint is step 1"), lines
    assert sorted(p.name for p in ckpts.iterdir()) == ["1"]  # no *.orbax-checkpoint-tmp left
    from smfnet_jax.checkpoint import load_checkpoint
    assert load_checkpoint(workdir).step == 1
