"""The fusion CLI's mechanics, with a tiny numpy fuser standing in for the model.

The model is replaced through the ``infer.main.load_fuser`` seam, so these tests cover
pairing, output formats, post-processing and error handling in well under a second each.
"""
import sys
import types

import numpy as np
import pytest
from PIL import Image

import infer.main as cli


def _fuser_max(ir, vi):
    return np.maximum(ir, vi).astype(np.float32)


@pytest.fixture
def use_fuser(monkeypatch):
    """Install a numpy fuser; returns the list of checkpoints it was loaded from."""
    loaded = []

    def install(fn):
        def fake_load(ckpt):
            loaded.append(ckpt)
            return fn
        monkeypatch.setattr(cli, "load_fuser", fake_load)
        monkeypatch.setattr(cli, "available_memory", lambda: None)  # unknown: no memory plan
        return loaded
    return install


@pytest.fixture
def dirs(tmp_path):
    ir, vi, out = tmp_path / "ir", tmp_path / "vi", tmp_path / "out"
    ir.mkdir()
    vi.mkdir()
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"not read by the fake fuser")
    return ir, vi, out, ckpt


def _args(ir, vi, out, ckpt, *extra):
    return ["--ckpt", str(ckpt), "--ir", str(ir), "--vi", str(vi), "--out", str(out), *extra]


def _save(path, arr):
    Image.fromarray(arr).save(path)


def _ramp(h, w):
    """Grey test image holding 0 and 255 (so min-max normalisation of it is the identity)."""
    x = (np.arange(h * w).reshape(h, w) * 37) % 256
    x.flat[0], x.flat[1] = 0, 255
    return x.astype(np.uint8)


def test_pairs_grey_and_colour_outputs(dirs, use_fuser):
    ir, vi, out, ckpt = dirs
    rng = np.random.default_rng(0)
    _save(ir / "a.png", _ramp(12, 10))
    _save(vi / "a.JPG", rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))  # colour
    g = _ramp(7, 9)
    _save(ir / "b.bmp", g)
    _save(vi / "b.tif", np.stack([g[::-1]] * 3, -1))  # grey stored as RGB (as TNO)
    loaded = use_fuser(_fuser_max)
    assert cli.main(_args(ir, vi, out, ckpt)) == 0
    assert loaded == [ckpt]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    with Image.open(out / "a.png") as a, Image.open(out / "b.png") as b:
        assert (a.mode, a.size) == ("RGB", (10, 12))
        assert (b.mode, b.size) == ("L", (9, 7))


def test_min_max_normalisation_and_no_normalize(dirs, use_fuser):
    ir, vi, out, ckpt = dirs
    x = _ramp(6, 8)
    _save(ir / "p.png", x)
    _save(vi / "p.png", np.zeros_like(x))
    use_fuser(lambda a, b: a * np.float32(0.5) + np.float32(0.25))  # range 0.25..0.75

    assert cli.main(_args(ir, vi, out, ckpt)) == 0
    # normalised back to 0..1, so the output is the input again
    np.testing.assert_array_equal(np.asarray(Image.open(out / "p.png")), x)

    out2 = out.parent / "raw"
    assert cli.main(_args(ir, vi, out2, ckpt, "--no-normalize")) == 0
    expected = np.rint(x.astype(np.float64) * 0.5 + 63.75).astype(np.uint8)  # never a .5 tie
    np.testing.assert_array_equal(np.asarray(Image.open(out2 / "p.png")), expected)


def test_constant_output_is_not_divided_by_zero(dirs, use_fuser):
    ir, vi, out, ckpt = dirs
    _save(ir / "c.png", _ramp(4, 5))
    _save(vi / "c.png", _ramp(4, 5))
    use_fuser(lambda a, b: np.full_like(a, 0.5))
    assert cli.main(_args(ir, vi, out, ckpt)) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "c.png")), 128)  # 127.5 -> 128


def test_save_npy_is_raw_sigmoid_before_normalisation(dirs, use_fuser):
    ir, vi, out, ckpt = dirs
    x = _ramp(5, 7)
    _save(ir / "n.png", x)
    _save(vi / "n.png", x)
    use_fuser(lambda a, b: a * np.float32(0.5) + np.float32(0.25))
    assert cli.main(_args(ir, vi, out, ckpt, "--save-npy")) == 0
    raw = np.load(out / "n.npy")
    assert raw.dtype == np.float32 and raw.shape == x.shape
    np.testing.assert_array_equal(raw, (x / np.float32(255)) * np.float32(0.5) + np.float32(0.25))


def test_colour_is_kept(dirs, use_fuser):
    ir, vi, out, ckpt = dirs
    rgb = np.random.default_rng(1).integers(0, 256, (8, 11, 3), dtype=np.uint8)
    _save(ir / "k.png", np.zeros(rgb.shape[:2], np.uint8))
    _save(vi / "k.png", rgb)
    use_fuser(lambda a, b: b)  # "fuse" = the visible Y itself
    assert cli.main(_args(ir, vi, out, ckpt, "--no-normalize")) == 0
    got = np.asarray(Image.open(out / "k.png")).astype(int)
    assert np.abs(got - rgb).max() <= 1  # Y from the fuser + the input's Cr/Cb = the input


def test_bad_pairs_reported_others_fused(dirs, use_fuser, capsys):
    ir, vi, out, ckpt = dirs
    x = _ramp(6, 6)
    _save(ir / "good.png", x)
    _save(vi / "good.png", x)
    _save(ir / "size.png", x)
    _save(vi / "size.png", _ramp(6, 7))
    _save(ir / "lonely_ir.png", x)
    _save(vi / "lonely_vi.jpg", np.stack([x] * 3, -1))
    (ir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    _save(vi / "broken.png", x)
    _save(ir / "twice.png", x)
    _save(ir / "twice.bmp", x)
    _save(vi / "twice.png", x)
    (ir / "notes.txt").write_text("not an image: ignored")
    use_fuser(_fuser_max)

    assert cli.main(_args(ir, vi, out, ckpt)) == 1
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]
    err = capsys.readouterr()
    summary = err.out
    assert "fused 1 of 6 pairs" in summary
    for name, why in [("size", "sizes differ"), ("lonely_ir", "no file in the vi folder"),
                      ("lonely_vi", "no file in the ir folder"), ("broken", "broken.png"),
                      ("twice", "several files")]:
        assert any(line.strip().startswith(f"{name}:") and why in line
                   for line in summary.splitlines()), (name, summary)
    assert "notes" not in summary


def test_model_failure_on_one_pair(dirs, use_fuser):
    ir, vi, out, ckpt = dirs
    for name, shape in [("ok", (4, 4)), ("bad", (5, 5))]:
        _save(ir / f"{name}.png", _ramp(*shape))
        _save(vi / f"{name}.png", _ramp(*shape))

    def fuser(a, b):
        if a.shape == (5, 5):
            raise RuntimeError("boom")
        return a
    use_fuser(fuser)
    assert cli.main(_args(ir, vi, out, ckpt, "--save-npy")) == 1
    assert sorted(p.name for p in out.iterdir()) == ["ok.npy", "ok.png"]


def test_failed_write_leaves_nothing_for_the_pair(dirs, use_fuser, monkeypatch):
    ir, vi, out, ckpt = dirs
    _save(ir / "w.png", _ramp(4, 4))
    _save(vi / "w.png", _ramp(4, 4))
    use_fuser(_fuser_max)

    def broken_npy(path, array):
        raise OSError("disk full")
    monkeypatch.setattr(cli, "write_npy", broken_npy)
    assert cli.main(_args(ir, vi, out, ckpt, "--save-npy")) == 1
    assert list(out.iterdir()) == []  # the PNG written first was removed again


def test_refuses_to_write_into_an_input_folder(dirs, use_fuser, capsys):
    ir, vi, out, ckpt = dirs
    _save(ir / "a.png", _ramp(4, 4))
    _save(vi / "a.png", _ramp(4, 4))
    before = {p: p.read_bytes() for p in list(ir.iterdir()) + list(vi.iterdir())}
    use_fuser(_fuser_max)
    assert cli.main(_args(ir, vi, ir, ckpt)) == 2
    assert cli.main(_args(ir, vi, str(vi) + "/../vi/", ckpt)) == 2
    assert "refusing" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in list(ir.iterdir()) + list(vi.iterdir())} == before


def test_usage_errors(dirs, use_fuser):
    ir, vi, out, ckpt = dirs
    use_fuser(_fuser_max)
    assert cli.main(_args(ir / "nope", vi, out, ckpt)) == 2
    assert cli.main(_args(ir, vi, out, ckpt.parent / "missing.pth")) == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


def test_evaluate_is_called_after_fusing(dirs, use_fuser, monkeypatch, capsys):
    ir, vi, out, ckpt = dirs
    _save(ir / "e.png", _ramp(4, 4))
    _save(vi / "e.png", _ramp(4, 4))
    use_fuser(_fuser_max)
    calls = []
    fake = types.ModuleType("infer.evaluate")

    def evaluate_folders(ir_dir, vi_dir, fused_dir, ssim_range, scale16):
        calls.append((ir_dir, vi_dir, fused_dir, ssim_range, scale16,
                      sorted(p.name for p in fused_dir.iterdir())))
        return {"EN": 1.0}, []
    fake.evaluate_folders = evaluate_folders
    fake.format_table = lambda results: f"TABLE {results}"
    fake.undefined_lines = lambda results: []
    fake.exit_status = lambda results, errors: 0
    monkeypatch.setitem(sys.modules, "infer.evaluate", fake)
    assert cli.main(_args(ir, vi, out, ckpt, "--evaluate")) == 0
    assert calls == [(ir, vi, out, 255.0, "high", ["e.png"])]
    assert "TABLE {'EN': 1.0}" in capsys.readouterr().out


def test_real_files(shared_dir, tmp_path, use_fuser):
    """Real formats: TNO grey-as-RGB PNG, RoadScene 1-channel/colour JPEGs, colour PET,
    and the shared sample's corrupt MSRS file."""
    data = shared_dir / "data"
    ir, vi, out = tmp_path / "ir", tmp_path / "vi", tmp_path / "out"
    ir.mkdir()
    vi.mkdir()
    links = [("TNO/ir/01.png", "TNO/vi/01.png", "tno"),
             ("RoadScene/ir/FLIR_00977.jpg", "RoadScene/vi/FLIR_00977.jpg", "road"),
             ("MRI_PET/MRI/11.png", "MRI_PET/PET/11.png", "pet"),
             ("MSRS_sample/ir/00085D.png", "MSRS_sample/vi/00085D.png", "msrs_corrupt")]
    for a, b, name in links:
        (ir / f"{name}{a[a.rfind('.'):]}").symlink_to(data / a)
        (vi / f"{name}{b[b.rfind('.'):]}").symlink_to(data / b)
    use_fuser(_fuser_max)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"")
    assert cli.main(_args(ir, vi, out, ckpt)) == 1  # the corrupt MSRS file
    assert sorted(p.name for p in out.iterdir()) == ["pet.png", "road.png", "tno.png"]
    expect = {"tno": ("L", data / "TNO/ir/01.png"), "road": ("RGB", data / "RoadScene/ir/FLIR_00977.jpg"),
              "pet": ("RGB", data / "MRI_PET/MRI/11.png")}
    for name, (mode, src) in expect.items():
        with Image.open(out / f"{name}.png") as im, Image.open(src) as s:
            assert (im.mode, im.size) == (mode, s.size)


def test_tiles_with_a_per_pixel_fuser_equal_whole_image(dirs, use_fuser):
    """--tile routes every pair through fuse_tiled; a per-pixel fuser makes tiling exact."""
    ir, vi, out, ckpt = dirs
    rng = np.random.default_rng(5)
    _save(ir / "t.png", rng.integers(0, 256, (70, 45), dtype=np.uint8))
    _save(vi / "t.png", rng.integers(0, 256, (70, 45), dtype=np.uint8))
    calls = []

    def fuser(a, b):
        calls.append(a.shape)
        return _fuser_max(a, b)

    use_fuser(fuser)
    assert cli.main(_args(ir, vi, out, ckpt, "--save-npy", "--tile", "32", "--overlap", "8")) == 0
    assert len(calls) > 1 and set(calls) == {(32, 32)}
    whole = out.parent / "whole"
    assert cli.main(_args(ir, vi, whole, ckpt, "--save-npy")) == 0
    np.testing.assert_allclose(np.load(out / "t.npy"), np.load(whole / "t.npy"), rtol=0, atol=1e-6)
    assert cli.main(_args(ir, vi, out, ckpt, "--tile", "32", "--overlap", "20")) == 2


def test_batch_fuses_same_size_pairs_together(dirs, use_fuser, capsys):
    """--batch N: consecutive same-size pairs in one call (NxHxW stacks), a size change or a
    corrupt pair never mixes into a batch, and the outputs are those of --batch 1."""
    ir, vi, out, ckpt = dirs
    rng = np.random.default_rng(4)
    for name, (h, w) in [("a", (6, 6)), ("b", (6, 6)), ("c", (6, 6)), ("d", (5, 7)), ("e", (6, 6))]:
        _save(ir / f"{name}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
        _save(vi / f"{name}.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
    (ir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    _save(vi / "bad.png", rng.integers(0, 256, (6, 6), dtype=np.uint8))
    calls = []

    def fuser(a, b):
        calls.append(a.shape)
        return (0.25 * a + 0.75 * b * b).astype(np.float32)

    use_fuser(fuser)
    outputs = {}
    for n in (1, 2):
        calls.clear()
        dest = out / f"n{n}"
        assert cli.main(_args(ir, vi, dest, ckpt, "--batch", str(n), "--save-npy")) == 1
        assert "bad: " in capsys.readouterr().out            # the corrupt pair is named
        outputs[n] = {p.name: p.read_bytes() for p in dest.iterdir()}
        assert sorted(outputs[n]) == [f"{s}.{e}" for s in "abcde" for e in ("npy", "png")]
        if n == 1:
            assert calls == [(6, 6)] * 3 + [(5, 7), (6, 6)]
        else:  # a, b | bad skipped | c alone before the size change | d | e
            assert calls == [(2, 6, 6), (6, 6), (5, 7), (6, 6)]
    assert outputs[1] == outputs[2]
    assert cli.main(_args(ir, vi, out / "x", ckpt, "--batch", "0")) == 2


# ----------------------------------------------------------------------------- everyday use

def test_grid_first_line_and_plain_progress(dirs, use_fuser, capsys):
    """--grid writes infrared | visible | fused; the first line names device, dtype and
    checkpoint; without a terminal (capsys) progress comes as plain lines."""
    ir, vi, out, ckpt = dirs
    g = _ramp(20, 30)
    _save(ir / "g.png", g)
    _save(vi / "g.png", g[::-1].copy())
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    _save(ir / "c.png", g)
    _save(vi / "c.png", rgb)
    use_fuser(_fuser_max)
    assert cli.main(_args(ir, vi, out, ckpt, "--grid")) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("device cpu (") and "dtype float32" in err[0], err[0]
    assert f"checkpoint {ckpt} (.pth file)" in err[0]
    assert any(line.startswith("fusing: 2/2 pairs") for line in err), err
    assert sorted(p.name for p in out.iterdir()) == ["c.png", "c_grid.png", "g.png", "g_grid.png"]
    for name, mode, src_vi in [("g", "L", g[::-1]), ("c", "RGB", rgb)]:
        grid = np.asarray(Image.open(out / f"{name}_grid.png"))
        fused = np.asarray(Image.open(out / f"{name}.png"))
        assert Image.open(out / f"{name}_grid.png").mode == mode
        h, w = g.shape
        label_h = grid.shape[0] - h
        assert grid.shape[:2] == (h + label_h, 3 * w + 8) and 8 <= label_h <= 30
        panels = [grid[label_h:, i * (w + 4):i * (w + 4) + w] for i in range(3)]
        expect_ir = g if mode == "L" else np.repeat(g[..., None], 3, -1)
        np.testing.assert_array_equal(panels[0], expect_ir)
        assert np.abs(panels[1].astype(int) - src_vi).max() <= 1  # via YCrCb and back
        np.testing.assert_array_equal(panels[2], fused)
        assert (grid[:label_h] != grid[0, 0]).any()  # a label was drawn


def test_describe_run_names_checkpoint_kind_and_step(tmp_path):
    from smfnet_jax.policy import ComputePolicy
    (tmp_path / "w" / "checkpoints" / "12").mkdir(parents=True)
    line = cli.describe_run(tmp_path / "w", "bfloat16", 12)
    assert "dtype bfloat16" in line and line.endswith("(training workdir, step 12)")
    line = cli.describe_run(tmp_path / "w", "float32", 12, ComputePolicy("xla", "high"))
    assert "; routines xla, precision high, float32; checkpoint " in line, line
    (tmp_path / "c").mkdir()
    assert cli.describe_run(tmp_path / "c", "float32").endswith("(orbax folder)")


def test_unloadable_checkpoint_is_one_line_exit_2(dirs, capsys):
    """A checkpoint the real loader refuses (here not a checkpoint at all) is one error line
    naming it, exit status 2, and nothing is written."""
    ir, vi, out, ckpt = dirs  # ckpt holds a few bytes that are no .pth
    _save(ir / "a.png", _ramp(6, 8))
    _save(vi / "a.png", _ramp(6, 8))
    rc = cli.main(_args(ir, vi, out, ckpt))
    err = capsys.readouterr().err
    assert rc == 2 and f"error: cannot load checkpoint {ckpt}" in err
    assert not any(out.glob("*.png"))


def test_evaluate_json_is_evaluates_format(dirs, use_fuser, capsys):
    """infer.main --json writes what infer.evaluate --json writes (one writer)."""
    from infer import evaluate as ev

    ir, vi, out, ckpt = dirs
    rng = np.random.default_rng(7)
    for name in ("p", "q"):
        _save(ir / f"{name}.png", rng.integers(0, 256, (44, 48), dtype=np.uint8))
        _save(vi / f"{name}.png", rng.integers(0, 256, (44, 48), dtype=np.uint8))
    use_fuser(_fuser_max)
    main_json, eval_json = out.parent / "m.json", out.parent / "e.json"
    assert cli.main(_args(ir, vi, out, ckpt, "--json", str(main_json))) == 0  # implies --evaluate
    assert ev.main(["--ir", str(ir), "--vi", str(vi), "--fused", str(out), "--json", str(eval_json)]) == 0
    import json
    doc = json.loads(main_json.read_text())
    assert sorted(doc) == ["mean", "p", "q"] and doc == json.loads(eval_json.read_text())


def test_bad_json_found_before_any_work(dirs, use_fuser, monkeypatch, capsys):
    from infer import evaluate as ev

    ir, vi, out, ckpt = dirs
    _save(ir / "a.png", _ramp(8, 8))
    _save(vi / "a.png", _ramp(8, 8))
    out.mkdir()
    _save(out / "a.png", _ramp(8, 8))
    monkeypatch.setattr(ev, "evaluate_folders", lambda *a, **k: pytest.fail("evaluated"))
    loaded = use_fuser(_fuser_max)
    a_dir, missing = out.parent, out.parent / "nope" / "m.json"
    for target in (a_dir, missing):
        assert ev.main(["--ir", str(ir), "--vi", str(vi), "--fused", str(out), "--json", str(target)]) == 2
        assert cli.main(_args(ir, vi, out.parent / "o2", ckpt, "--json", str(target))) == 2
    err = capsys.readouterr().err
    assert f"--json {a_dir} is a folder" in err and "does not exist" in err
    assert loaded == [] and not (out.parent / "o2").exists()


def test_unwritable_out_found_before_the_model_loads(dirs, use_fuser, monkeypatch, capsys):
    import infer.common as common

    ir, vi, out, ckpt = dirs
    _save(ir / "a.png", _ramp(4, 4))
    _save(vi / "a.png", _ramp(4, 4))
    loaded = use_fuser(_fuser_max)
    blocker = out.parent / "file"
    blocker.write_text("a file, not a folder")
    assert cli.main(_args(ir, vi, blocker / "sub", ckpt)) == 2  # cannot be created
    assert "cannot create the folder" in capsys.readouterr().err

    real_open = common.os.open

    def refuse_probe(path, *a, **k):  # as a read-only folder would (the tests may run as root)
        if ".smfnet-write-probe" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(common.os, "open", refuse_probe)
    assert cli.main(_args(ir, vi, out, ckpt)) == 2
    assert "cannot write in the folder (Permission denied)" in capsys.readouterr().err
    assert loaded == [] and list(out.iterdir()) == []


def test_rollback_keeps_an_earlier_runs_outputs(dirs, use_fuser, monkeypatch):
    ir, vi, out, ckpt = dirs
    _save(ir / "w.png", _ramp(4, 4))
    _save(vi / "w.png", _ramp(4, 4))
    out.mkdir()
    (out / "w.png").write_bytes(b"earlier run's png")
    use_fuser(_fuser_max)

    def broken_npy(path, array):
        raise OSError("disk full")
    monkeypatch.setattr(cli, "write_npy", broken_npy)
    assert cli.main(_args(ir, vi, out, ckpt, "--save-npy", "--grid")) == 1
    assert [p.name for p in out.iterdir()] == ["w.png"]  # no temporary file left either
    assert (out / "w.png").read_bytes() == b"earlier run's png"


def test_too_large_for_memory_is_tiled_with_a_notice(dirs, use_fuser, monkeypatch, capsys):
    from smfnet_jax.inference import MEMORY_MARGIN, forward_bytes, host_bytes

    ir, vi, out, ckpt = dirs
    h, w = 150, 140
    rng = np.random.default_rng(3)
    _save(ir / "big.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
    _save(vi / "big.png", rng.integers(0, 256, (h, w), dtype=np.uint8))
    calls = []

    def fuser(a, b):
        calls.append(a.shape)
        return _fuser_max(a, b)
    use_fuser(fuser)
    # enough for 128-pixel tiles, not for the whole image
    avail = int((forward_bytes(128, 128) + host_bytes(h, w)) / MEMORY_MARGIN) + 1
    assert forward_bytes(h, w) > avail * MEMORY_MARGIN
    monkeypatch.setattr(cli, "available_memory", lambda: avail)
    assert cli.main(_args(ir, vi, out, ckpt, "--save-npy")) == 0
    assert len(calls) == 4 and set(calls) == {(128, 128)}
    assert "notice: 140x150 needs about" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(out / "big.npy"),  # per-pixel fuser: tiling is exact
                               np.maximum(np.asarray(Image.open(ir / "big.png")),
                                          np.asarray(Image.open(vi / "big.png"))) / np.float32(255),
                               rtol=0, atol=1e-6)


def _png_header_only_zeros(path, h, w):
    """A grey 8-bit PNG of h x w zeros, compressed row by row (no h x w array in memory)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp, row, parts = zlib.compressobj(9), b"\0" * (w + 1), []
    for _ in range(h):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def test_huge_image_refused_from_its_header(dirs, use_fuser, monkeypatch, capsys):
    """A 12000x12000 PNG (~140 KB) is judged by its header, before decoding."""
    ir, vi, out, ckpt = dirs
    _png_header_only_zeros(ir / "huge.png", 12000, 12000)
    _png_header_only_zeros(vi / "huge.png", 12000, 12000)
    _save(ir / "ok.png", _ramp(8, 8))
    _save(vi / "ok.png", _ramp(8, 8))
    assert (ir / "huge.png").stat().st_size < 300_000
    decoded = []
    real_read = cli.read_image
    monkeypatch.setattr(cli, "read_image", lambda p, *a: decoded.append(p.name) or real_read(p, *a))
    use_fuser(_fuser_max)
    # 2 GB: the 8-bit arrays alone (16 bytes per pixel, 2.1 GB) do not fit (with 4 GB the pair
    # is fused in 256-pixel tiles, see test_plan_tile_arithmetic)
    monkeypatch.setattr(cli, "available_memory", lambda: 2 * 2**30)
    assert cli.main(_args(ir, vi, out, ckpt)) == 1
    assert decoded == ["ok.png", "ok.png"] and sorted(p.name for p in out.iterdir()) == ["ok.png"]
    summary = capsys.readouterr().out
    assert "huge: not enough memory: 12000x12000 needs about" in summary
    assert "too large even in tiles" in summary


def test_plan_tile_arithmetic():
    from smfnet_jax.inference import plan_tile

    gb = 2**30
    assert plan_tile(480, 640, None) == 0            # unknown memory: whole
    assert plan_tile(480, 640, 64 * gb) == 0
    assert plan_tile(12000, 12000, 64 * gb) == 512   # ~700 GB whole: tiles
    # 16 bytes per pixel of host arrays (2.1 GB) + a 256-pixel tile's forward (0.8 GB) fit in
    # 80% of 4 GB; a 512-pixel tile's (1.8 GB) does not
    assert plan_tile(12000, 12000, 4 * gb) == 256
    with pytest.raises(MemoryError, match="12000x12000"):
        plan_tile(12000, 12000, 2 * gb)              # the host arrays alone do not fit


def test_16_bit_warning_once_per_file_and_scale16_range(dirs, use_fuser, capsys):
    ir, vi, out, ckpt = dirs
    twelve_bit = (np.arange(16 * 16).reshape(16, 16) * 16).astype(np.uint16)  # 0..4080
    Image.fromarray(twelve_bit).save(ir / "t.png")
    Image.fromarray(twelve_bit).save(ir / "u.png")
    _save(vi / "t.png", _ramp(16, 16))
    _save(vi / "u.png", _ramp(16, 16))
    use_fuser(lambda a, b: a)
    assert cli.main(_args(ir, vi, out, ckpt, "--no-normalize", "--save-npy")) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2 and str(ir / "t.png") in warned[0] and "16 grey levels" in warned[0]
    assert len(np.unique(np.load(out / "t.npy"))) == 16  # OpenCV's high byte, as the reference
    assert cli.main(_args(ir, vi, out, ckpt, "--no-normalize", "--save-npy", "--scale16", "range")) == 0
    assert "warning:" not in capsys.readouterr().err
    raw = np.load(out / "t.npy") * 255
    np.testing.assert_allclose(raw, np.rint(twelve_bit / 4080 * 255), atol=1e-3)


def test_batch_is_capped_by_memory(dirs, use_fuser, monkeypatch):
    from smfnet_jax.inference import MEMORY_MARGIN, forward_bytes, host_bytes

    ir, vi, out, ckpt = dirs
    for name in "abcde":
        _save(ir / f"{name}.png", _ramp(10, 12))
        _save(vi / f"{name}.png", _ramp(10, 12))
    calls = []

    def fuser(a, b):
        calls.append(a.shape)
        return _fuser_max(a, b)
    use_fuser(fuser)
    one = forward_bytes(10, 12, 1) - forward_bytes(0, 0, 1) + host_bytes(10, 12)
    monkeypatch.setattr(cli, "available_memory",  # room for two pairs at once, not three
                        lambda: int((forward_bytes(0, 0, 1) + 2.5 * one) / MEMORY_MARGIN))
    assert cli.main(_args(ir, vi, out, ckpt, "--batch", "4")) == 0
    assert calls == [(2, 10, 12), (2, 10, 12), (10, 12)]


def test_dtype_and_precision_flags_choose_the_fusers_policy(dirs):
    """--dtype / --precision reach load_fuser as one ComputePolicy (nothing at the defaults,
    so the plain call stays `load_fuser(ckpt)`); a bad precision is a usage error."""
    from smfnet_jax.policy import ComputePolicy, resolve
    ir, vi, out, ckpt = dirs
    parse = cli.build_parser().parse_args
    assert cli.policy_choices(parse(_args(ir, vi, out, ckpt))) == {}
    chosen = cli.policy_choices(parse(_args(ir, vi, out, ckpt, "--precision", "default", "--dtype", "bfloat16")))
    assert chosen == {"policy": ComputePolicy(resolve().routines, "default", "bfloat16")}
    with pytest.raises(SystemExit) as e:
        parse(_args(ir, vi, out, ckpt, "--precision", "tf32"))
    assert e.value.code == 2
