"""Fusion metrics against the literature's evaluator, and the infer.evaluate CLI.

Reference values: ``fixtures/metrics/TNO/metrics_reference.json``, computed by the
CDDFuse/SMFNet ``Evaluator.py`` (scipy, scikit-image, scikit-learn on float32 images) for
two fusions (mean, max) of TNO pairs 01-05. Every metric must agree within 1e-4 relative.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infer import evaluate as ev
from smfnet_jax import metrics as M
from smfnet_jax.imageio import read_gray, write_png

STEMS = ("01", "02", "03", "04", "05")
FUSIONS = ("mean", "max")
KEYS = [f"{fusion}/{stem}" for fusion in FUSIONS for stem in STEMS]
REL = 1e-4


@pytest.fixture(scope="session")
def tno(shared_dir):
    """(reference json, {"mean/01": (fused, ir, vi)}, fixture folder)."""
    folder = shared_dir / "fixtures" / "metrics" / "TNO"
    ref = json.loads((folder / "metrics_reference.json").read_text())
    images = {}
    for stem in STEMS:
        ir = read_gray(shared_dir / "data" / "TNO" / "ir" / f"{stem}.png")
        vi = read_gray(shared_dir / "data" / "TNO" / "vi" / f"{stem}.png")
        for fusion in FUSIONS:
            images[f"{fusion}/{stem}"] = (read_gray(folder / fusion / f"{stem}.png"), ir, vi)
    return ref, images, folder


def _assert_close(got: dict, want: dict, ssim_key: str = "SSIM"):
    bad = {name: (got[name], want[ssim_key if name == "SSIM" else name])
           for name in M.METRIC_NAMES
           if not got[name] == pytest.approx(want[ssim_key if name == "SSIM" else name], rel=REL)}
    assert not bad, f"metrics off by more than {REL} relative (got, reference): {bad}"


# ----------------------------------------------------------------------------- reference values

@pytest.mark.parametrize("key", KEYS)
def test_evaluate_pair_matches_reference_evaluator(tno, key):
    ref, images, _ = tno
    fused, ir, vi = images[key]
    got = M.evaluate_pair(fused, ir, vi)
    assert tuple(got) == M.METRIC_NAMES
    _assert_close(got, ref[key])
    # the CDDFuse tables' SSIM convention (scikit-image <= 0.19's data_range=2 for floats)
    assert M.ssim(fused, ir, vi, data_range=2) == pytest.approx(ref[key]["SSIM_range2"], rel=REL)


def test_evaluate_pair_ssim_range_2(tno):
    ref, images, _ = tno
    got = M.evaluate_pair(*images["max/05"], ssim_range=2)
    _assert_close(got, ref["max/05"], ssim_key="SSIM_range2")


def test_single_metric_functions_agree_with_evaluate_pair(tno):
    fused, ir, vi = (x[100:196, 200:328] for x in tno[1]["mean/01"])
    both = M.evaluate_pair(fused, ir, vi)
    single = {
        "EN": M.entropy(fused), "SD": M.standard_deviation(fused),
        "SF": M.spatial_frequency(fused), "AG": M.average_gradient(fused),
        "MI": M.mutual_information(fused, ir, vi),
        "SCD": M.sum_of_correlation_differences(fused, ir, vi),
        "VIF": M.visual_information_fidelity(fused, ir, vi), "Qabf": M.qabf(fused, ir, vi),
        "SSIM": M.ssim(fused, ir, vi), "MSE": M.mse(fused, ir, vi),
        "CC": M.correlation_coefficient(fused, ir, vi), "PSNR": M.psnr(fused, ir, vi),
    }
    for name in M.METRIC_NAMES:
        assert single[name] == pytest.approx(both[name], rel=1e-12), name


# ----------------------------------------------------------------------------- definitions

def _texture(h=64, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.float32)


def test_entropy_of_uniform_histogram_is_8_bits():
    img = np.arange(256 * 20).reshape(64, 80) % 256
    assert M.entropy(img) == pytest.approx(8.0, abs=1e-12)
    assert M.entropy(np.full((50, 50), 7.0)) == 0.0


def test_identical_images():
    img = _texture()
    m = M.evaluate_pair(img, img, img)
    # MI of a variable with itself is its entropy, in nats here (EN is in bits)
    assert m["MI"] == pytest.approx(2 * m["EN"] * math.log(2), rel=1e-12)
    assert m["SSIM"] == pytest.approx(2.0, abs=1e-12)
    assert m["CC"] == pytest.approx(1.0, abs=1e-12)
    assert m["MSE"] == 0.0 and m["PSNR"] == math.inf
    assert math.isnan(m["SCD"])  # corr with an all-zero difference image: 0/0, as the reference


def test_vif_of_flat_sources_is_one_each():
    # sigma_ref^2 = 0 everywhere: 0 / 0 in the reference, which it maps to 1.0
    flat = np.full((64, 64), 90.0)
    assert M.visual_information_fidelity(_texture(64, 64), flat, flat + 10) == 2.0


def test_qabf_equal_gradient_quirk():
    # F = A = B with strong gradients everywhere: the strength ratio is set to gF (not 1)
    # where gradients are equal, Qg = Tg / (1 + exp(-15 (gF - 0.5))) = Tg, and the angle
    # difference is 0, so Qa = Ta / (1 + exp(-22 * 0.2)).
    ramp = np.tile(np.arange(0, 240, 3, dtype=np.float64), (60, 1))
    expected = 0.9994 * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert M.qabf(ramp, ramp, ramp) == pytest.approx(expected, rel=1e-7)


def test_mutual_information_treats_values_as_labels():
    f, a, b = _texture(seed=1), _texture(seed=2), _texture(seed=3)
    f = np.minimum(f, np.maximum(a, b))  # some dependence
    base = M.mutual_information(f, a, b)
    assert base > 0
    # relabelled (non-integer, out of 0..255) values: same partition, same MI
    assert M.mutual_information(f + 0.5, a * 2.0, b - 300.0) == pytest.approx(base, rel=1e-12)


def test_bad_inputs_raise():
    img = _texture()
    with pytest.raises(ValueError, match="shapes differ"):
        M.evaluate_pair(img, img[:-1], img)
    with pytest.raises(ValueError, match="too small"):
        M.evaluate_pair(img[:40], img[:40], img[:40])
    with pytest.raises(ValueError, match="2-D"):
        M.evaluate_pair(np.stack([img] * 3, -1), img, img)
    bad = img.copy()
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.evaluate_pair(bad, img, img)
    with pytest.raises(ValueError, match="data range"):
        M.evaluate_pair(img, img, img, ssim_range=0)


# ----------------------------------------------------------------------------- CLI

def _link_triplets(tmp_path: Path, shared_dir: Path, folder: Path, stems, fusion="max"):
    dirs = {role: tmp_path / role for role in ("ir", "vi", "fused")}
    for d in dirs.values():
        d.mkdir()
    for stem in stems:
        (dirs["ir"] / f"{stem}.png").symlink_to(shared_dir / "data/TNO/ir" / f"{stem}.png")
        (dirs["vi"] / f"{stem}.png").symlink_to(shared_dir / "data/TNO/vi" / f"{stem}.png")
        (dirs["fused"] / f"{stem}.png").symlink_to(folder / fusion / f"{stem}.png")
    return dirs


def _cli_args(dirs, *extra):
    return ["--ir", str(dirs["ir"]), "--vi", str(dirs["vi"]), "--fused", str(dirs["fused"]),
            *extra]


def test_cli_json_matches_reference(tno, shared_dir, tmp_path, capsys):
    ref, _, folder = tno
    stems = ("01", "05")
    dirs = _link_triplets(tmp_path, shared_dir, folder, stems)
    out = tmp_path / "metrics.json"
    assert ev.main(_cli_args(dirs, "--ssim-range", "2", "--json", str(out))) == 0
    doc = json.loads(out.read_text())
    assert list(doc) == [*stems, "mean"]
    for stem in stems:
        assert list(doc[stem]) == list(M.METRIC_NAMES)
        _assert_close(doc[stem], ref[f"max/{stem}"], ssim_key="SSIM_range2")
    for name in M.METRIC_NAMES:
        assert doc["mean"][name] == pytest.approx(np.mean([doc[s][name] for s in stems]), rel=1e-12)
    table = capsys.readouterr().out
    header = table.splitlines()[0].split()
    assert header == ["image", *M.METRIC_NAMES]
    assert table.splitlines()[-1].startswith("mean (2)")


def _write_crop_triplets(tmp_path, stems, size=(48, 56)):
    dirs = {role: tmp_path / role for role in ("ir", "vi", "fused")}
    for d in dirs.values():
        d.mkdir()
    for i, stem in enumerate(stems):
        ir = _texture(*size, seed=10 + i).astype(np.uint8)
        vi = _texture(*size, seed=20 + i).astype(np.uint8)
        write_png(dirs["ir"] / f"{stem}.png", ir)
        write_png(dirs["vi"] / f"{stem}.png", vi)
        write_png(dirs["fused"] / f"{stem}.png", np.maximum(ir, vi))
    return dirs


def test_cli_skips_missing_unreadable_mismatched_and_ambiguous(tmp_path, capsys):
    dirs = _write_crop_triplets(tmp_path, ["a", "b", "c", "d", "e", "f"])
    (dirs["vi"] / "c.png").unlink()                          # missing partner
    (dirs["fused"] / "f.bmp").write_bytes(b"")               # two fused files named f
    (dirs["fused"] / "d.png").write_bytes(b"not a png")      # unreadable
    write_png(dirs["fused"] / "e.png", np.zeros((50, 56), np.uint8))  # wrong size
    out = tmp_path / "m.json"
    assert ev.main(_cli_args(dirs, "--json", str(out))) == 1
    err = capsys.readouterr().err
    assert f"c: no file in the vi folder {dirs['vi']}" in err
    assert str(dirs["fused"] / "d.png") in err
    assert "sizes differ" in err and str(dirs["fused"] / "e.png") in err
    assert f"f: several files share this name in {dirs['fused']}: f.bmp, f.png" in err
    doc = json.loads(out.read_text())
    assert list(doc) == ["a", "b", "mean"]  # the others were still evaluated
    want = M.evaluate_pair(read_gray(dirs["fused"] / "a.png"), read_gray(dirs["ir"] / "a.png"),
                           read_gray(dirs["vi"] / "a.png"))
    assert doc["a"] == pytest.approx(want, rel=1e-12)


def test_evaluate_folders_api_and_module_entry_point(tmp_path):
    dirs = _write_crop_triplets(tmp_path, ["1", "10", "2"])
    results, errors = ev.evaluate_folders(dirs["ir"], dirs["vi"], dirs["fused"], progress=False)
    assert errors == [] and list(results) == ["1", "2", "10"]  # natural order
    assert "mean (3)" in ev.format_table(results)
    proc = subprocess.run([sys.executable, "-m", "infer.evaluate", *_cli_args(dirs)],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["image", *M.METRIC_NAMES]
