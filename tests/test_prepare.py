"""train.prepare: patch extraction as the reference's dataprocessing.py, bad input, atomic output.

Expected values are computed here independently, with plain loops over the reference's
definitions (per-patch np.percentile, literal (p90 - p10) / p90 < 0.1), from the pixel arrays
the test itself wrote (PNG is lossless).
"""

import h5py
import numpy as np
import pytest
from PIL import Image

from train import prepare as P

PATCH, STRIDE = 16, 12
H, W = 40, 58  # corners: rows 0, 12, 24; columns 0, 12, 24, 36 -> 12 patches per pair


def _ref_low_contrast(patch):
    lo, hi = np.percentile(patch, [10, 90])
    with np.errstate(divide="ignore", invalid="ignore"):
        return bool((hi - lo) / hi < 0.1)


def _ref_patches(ir, vi, patch=PATCH, stride=STRIDE):
    """(ir, vi) float32 (H, W) -> kept (ir, vi) patches in the reference's order."""
    kept = []
    for r in range(0, ir.shape[0] - patch + 1, stride):
        for c in range(0, ir.shape[1] - patch + 1, stride):
            a, b = ir[r:r + patch, c:c + patch], vi[r:r + patch, c:c + patch]
            if not (_ref_low_contrast(a) or _ref_low_contrast(b)):
                kept.append((a, b))
    return kept


def _y(rgb8):
    x = rgb8.astype(np.float32) / 255
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


@pytest.fixture()
def pair_folder(tmp_path):
    """ir/ + vi/ with: grey IR (a), RGB IR (b), 16-bit IR and flat/black regions (c),
    a corrupt IR (d), a visible image with no partner (e)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "ir").mkdir(parents=True)
    (src / "vi").mkdir()
    expected = {}  # stem -> (ir float32, vi float32)

    def rgb():
        return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)

    ir_a, vi_a = rng.integers(0, 256, (H, W), dtype=np.uint8), rgb()
    Image.fromarray(ir_a).save(src / "ir" / "a.png")
    Image.fromarray(vi_a).save(src / "vi" / "a.png")
    expected["a"] = (ir_a.astype(np.float32) / 255, _y(vi_a))

    ir_b, vi_b = rgb(), rgb()  # channels differ: only the first one may be used
    Image.fromarray(ir_b).save(src / "ir" / "b.png")
    Image.fromarray(vi_b).save(src / "vi" / "b.png")
    expected["b"] = (ir_b[..., 0].astype(np.float32) / 255, _y(vi_b))

    ir_c = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    ir_c[:16, :16] = 0                    # p90 == 0 in IR: the reference keeps such a patch
    vi_c = rgb()
    vi_c[24:, 36:] = 128                  # flat visible corner: low contrast, dropped
    vi_c[24:, 36:, 1] += rng.integers(0, 3, (H - 24, W - 36), dtype=np.uint8)
    Image.fromarray(ir_c).save(src / "ir" / "c.png")  # 16-bit grey PNG
    Image.fromarray(vi_c).save(src / "vi" / "c.png")
    expected["c"] = (ir_c.astype(np.float32) / 65535, _y(vi_c))

    (src / "ir" / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(rgb()).save(src / "vi" / "d.png")
    Image.fromarray(rgb()).save(src / "vi" / "e.png")
    return src, expected


def _read_h5(path):
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"ir_patchs", "vis_patchs"}
        keys = list(f["ir_patchs"].keys())
        assert sorted(keys) == sorted(f["vis_patchs"].keys())
        ir = {k: f["ir_patchs"][k][()] for k in keys}
        vi = {k: f["vis_patchs"][k][()] for k in keys}
    return ir, vi


def test_patches_match_independent_computation(pair_folder, tmp_path):
    src, expected = pair_folder
    out = tmp_path / "out" / "p.h5"
    report = P.prepare(src, out, PATCH, STRIDE, progress=False)
    want = [p for stem in sorted(expected) for p in _ref_patches(*expected[stem])]
    ir, vi = _read_h5(out)
    assert sorted(ir, key=int) == [str(i) for i in range(len(want))]
    for i, (a, b) in enumerate(want):
        assert ir[str(i)].dtype == np.float32 and ir[str(i)].shape == (1, PATCH, PATCH)
        np.testing.assert_array_equal(ir[str(i)][0], a)
        np.testing.assert_array_equal(vi[str(i)][0], b)
    assert report.pairs_found == 4 and report.pairs_used == 3
    assert report.patches_total == 3 * 12
    assert report.patches_written == len(want)
    assert report.patches_low_contrast == 36 - len(want) >= 1
    # the all-black IR patch (p90 == 0) is kept, as in the reference
    assert any(not ir[k].any() for k in ir)


def test_low_contrast_rule_matches_reference_definition():
    rng = np.random.default_rng(1)
    patches = [rng.random((8, 8), dtype=np.float32) for _ in range(20)]
    patches.append(np.zeros((8, 8), np.float32))                 # p90 == 0 -> kept
    patches.append(np.full((8, 8), 0.5, np.float32))             # flat, non-zero -> dropped
    narrow = 0.5 + 0.01 * rng.random((8, 8), dtype=np.float32)   # low contrast -> dropped
    patches.append(narrow.astype(np.float32))
    mask = P.low_contrast_mask(np.stack(patches))
    assert mask.tolist() == [_ref_low_contrast(p) for p in patches]
    assert mask[-3:].tolist() == [False, True, True]


def test_grid_order_rows_outer():
    img = np.arange(7 * 9, dtype=np.float32).reshape(7, 9)
    got = P.extract_patches(img, 3, 2)
    corners = [(r, c) for r in range(0, 5, 2) for c in range(0, 7, 2)]
    assert len(got) == len(corners) == 12
    for p, (r, c) in zip(got, corners):
        np.testing.assert_array_equal(p, img[r:r + 3, c:c + 3])
    assert P.extract_patches(img, 8, 2).shape == (0, 8, 8)


def test_skip_report_and_exit_codes(pair_folder, tmp_path, capsys):
    src, _ = pair_folder
    out = tmp_path / "m.h5"
    assert P.main(["--src", str(src), "--out", str(out), "--patch", str(PATCH),
                   "--stride", str(STRIDE), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2" in err
    assert "d.png" in err and "cannot read image" in err      # corrupt infrared image
    assert "e.png" in err and "no file in the ir folder" in err  # visible image with no partner
    assert out.is_file()
    assert P.main(["--src", str(src), "--out", str(out), "--patch", str(PATCH),
                   "--stride", str(STRIDE), "--quiet", "--strict"]) == 1


def test_bad_layout_and_nothing_usable(tmp_path, capsys):
    assert P.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "x.h5")]) == 2  # usage
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "s" / "ir").mkdir(parents=True)
    assert P.main(["--src", str(tmp_path / "s"), "--out", str(tmp_path / "x.h5")]) == 2
    assert "no 'vi/' subfolder" in capsys.readouterr().err
    # images smaller than the patch: no patches -> error, and no file left behind
    (tmp_path / "s" / "vi").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "s" / "ir" / "x.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "s" / "vi" / "x.png")
    assert P.main(["--src", str(tmp_path / "s"), "--out", str(tmp_path / "x.h5"), "--quiet"]) == 1
    assert "no patches written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_interrupted_run_leaves_no_partial_file(pair_folder, tmp_path, monkeypatch):
    src, _ = pair_folder
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    out = out_dir / "m.h5"
    out.write_bytes(b"previous file")
    calls = {"n": 0}
    real = P.extract_patches

    def interrupt_on_second_pair(img, patch, stride):
        calls["n"] += 1
        if calls["n"] == 3:  # two calls (ir, vi) per pair
            raise KeyboardInterrupt
        return real(img, patch, stride)

    monkeypatch.setattr(P, "extract_patches", interrupt_on_second_pair)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(src, out, PATCH, STRIDE, progress=False)
    assert out.read_bytes() == b"previous file"      # untouched
    assert [p.name for p in out_dir.iterdir()] == ["m.h5"]  # no temporary left


def test_msrs_sample_large_stride(shared_dir, tmp_path):
    """Real pairs: key count equals an independent count (pillow + per-patch rule)."""
    src = shared_dir / "data" / "MSRS_sample"
    patch, stride = 128, 300
    out = tmp_path / "msrs.h5"
    report = P.prepare(src, out, patch, stride, progress=False)

    count, unreadable = 0, set()
    for ir_path in sorted((src / "ir").iterdir()):
        try:
            ir = np.asarray(Image.open(ir_path)).astype(np.float32) / 255
            vi = np.asarray(Image.open(src / "vi" / ir_path.name)).astype(np.float32) / 255
        except OSError:
            unreadable.add(ir_path.stem)
            continue
        ir = ir[..., 0] if ir.ndim == 3 else ir
        vi = vi[..., 0] * 0.299 + vi[..., 1] * 0.587 + vi[..., 2] * 0.114
        count += len(_ref_patches(ir, vi, patch, stride))
    assert {name for name, _ in report.skipped} == unreadable
    ir_h5, vi_h5 = _read_h5(out)
    assert len(ir_h5) == report.patches_written == count > 0
    assert all(v.shape == (1, patch, patch) and v.dtype == np.float32 for v in vi_h5.values())

    from train.data import H5PairSource  # the pipeline reads what prepare writes
    source = H5PairSource(out)
    assert len(source) == count
    rec = source[count - 1]
    np.testing.assert_array_equal(rec["ir"][..., 0], ir_h5[str(count - 1)][0])
    assert rec["vi"].shape == (patch, patch, 1)
