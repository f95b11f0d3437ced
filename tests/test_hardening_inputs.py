"""Bad inputs to evaluation and training, each built here: metric values that are undefined
(an all-black fused image, a fused image equal to a source) are named, left out of the mean
with its count shown, and given their own exit status (infer.evaluate, infer.main
--evaluate); training H5 files with dangling external links, soft-link loops, patches of
another size than the config's, or a few kB declaring huge compressed patches are refused in
one line naming the file and the key, before any patch is read (train.data, train.main)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from smfnet_jax import metrics as M
from smfnet_jax.imageio import read_gray

SIDE = 48  # >= metrics.MIN_IMAGE_SIDE


# --------------------------------------------------------------------------- undefined metrics
def _noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)


def _triplets(root, fused_of: dict) -> dict:
    """ir/vi/fused folders; fused_of maps stem -> (ir, vi) -> fused image."""
    dirs = {k: root / k for k in ("ir", "vi", "fused")}
    for d in dirs.values():
        d.mkdir()
    for i, (stem, make) in enumerate(fused_of.items()):
        ir, vi = _noise(2 * i), _noise(2 * i + 1)
        for k, img in (("ir", ir), ("vi", vi), ("fused", make(ir, vi))):
            Image.fromarray(img).save(dirs[k] / f"{stem}.png")
    return dirs


def _mean_fused(ir, vi):
    return ((ir.astype(np.int32) + vi) // 2).astype(np.uint8)


def test_evaluate_names_undefined_values_and_means_over_the_defined(tmp_path, capsys):
    from infer import evaluate as ev
    dirs = _triplets(tmp_path, {"good": _mean_fused,
                                "black": lambda ir, vi: np.zeros_like(ir),
                                "same": lambda ir, vi: ir.copy()})
    out = tmp_path / "m.json"
    rc = ev.main(["--ir", str(dirs["ir"]), "--vi", str(dirs["vi"]), "--fused", str(dirs["fused"]),
                  "--json", str(out), "--workers", "1"])
    captured = capsys.readouterr()
    assert rc == ev.EXIT_UNDEFINED == 3  # not 0 (all fine), 1 (skipped) nor 2 (usage)
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: black: CC undefined: zero variance: the fused image is constant, so a "
        "correlation is 0/0; left out of the mean",
        "warning: black: PSNR undefined: the fused image is all black: the peak max(F) is 0; "
        "left out of the mean",
        "warning: same: SCD undefined: zero variance: the fused image minus ir is constant, so "
        "a correlation is 0/0; left out of the mean",
    ]
    assert "3 value(s) undefined" in captured.err and "Traceback" not in captured.err

    # the means are over the images where each metric is defined, computed independently
    values = {stem: M.evaluate_pair(*(read_gray(dirs[k] / f"{stem}.png") for k in ("fused", "ir", "vi")))
              for stem in ("good", "black", "same")}
    assert math.isnan(values["black"]["CC"]) and values["black"]["PSNR"] == -math.inf
    assert math.isnan(values["same"]["SCD"])  # the library keeps the reference's numbers
    doc = json.loads(out.read_text())
    assert doc["black"]["CC"] is None and doc["black"]["PSNR"] is None and doc["same"]["SCD"] is None
    for name, stems in (("CC", ["good", "same"]), ("PSNR", ["good", "same"]),
                        ("SCD", ["good", "black"]), ("SSIM", ["good", "black", "same"])):
        assert doc["mean"][name] == pytest.approx(np.mean([values[s][name] for s in stems]), rel=1e-12)

    mean_row = captured.out.splitlines()[-1].split("  ")
    cells = [c.strip() for c in mean_row if c.strip()]
    assert cells[0] == "mean (3)"
    by_name = dict(zip(M.METRIC_NAMES, cells[1:]))
    assert by_name["CC"] == f"{doc['mean']['CC']:.4f} (2 of 3)"
    assert by_name["PSNR"] == f"{doc['mean']['PSNR']:.4f} (2 of 3)"
    assert by_name["SSIM"] == f"{doc['mean']['SSIM']:.4f}"  # defined everywhere: no count
    black_row = next(line for line in captured.out.splitlines() if line.startswith("black"))
    assert black_row.split()[1 + M.METRIC_NAMES.index("CC")] == "n/a"


def test_evaluate_exit_status_when_all_defined_or_some_skipped(tmp_path, capsys):
    from infer import evaluate as ev
    dirs = _triplets(tmp_path, {"good": _mean_fused})
    args = ["--ir", str(dirs["ir"]), "--vi", str(dirs["vi"]), "--fused", str(dirs["fused"])]
    assert ev.main(args) == 0
    assert "warning" not in capsys.readouterr().err
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(dirs["fused"] / "black.png")
    for k in ("ir", "vi"):
        Image.fromarray(_noise(7)).save(dirs[k] / "black.png")
    (dirs["fused"] / "lonely.png").write_bytes(b"")  # no partner: skipped
    assert ev.main(args) == 1  # a skipped image outranks an undefined value
    assert "warning: black: CC undefined" in capsys.readouterr().err


def test_undefined_reasons_for_identical_and_flat_images():
    img = _noise(3).astype(np.float64)
    same = M.evaluate_pair(img, img, img)
    assert same["PSNR"] == math.inf
    why = M.undefined_reasons(same, img, img, img)
    assert why["PSNR"] == "MSE is 0 (the fused image equals both sources): PSNR is infinite"
    assert why["SCD"].startswith("zero variance: the fused image minus source B and the fused "
                                 "image minus source A are constant")
    zeros = np.zeros((SIDE, SIDE))
    flat = M.evaluate_pair(zeros, zeros, zeros)
    why = M.undefined_reasons(flat, zeros, zeros, zeros, ("F", "A", "B"))
    assert set(why) == {k for k, v in flat.items() if not math.isfinite(v)} >= {"CC", "PSNR", "Qabf"}
    assert why["CC"].startswith("zero variance: F and A and B are constant")
    assert why["PSNR"] == "F is all black: the peak max(F) is 0 and so is the MSE (0/0)"
    assert why["Qabf"].startswith("no edges: A and B have zero Sobel gradient everywhere")
    other = _noise(4).astype(np.float64)
    mixed = np.round((img + other) / 2)
    assert M.undefined_reasons(M.evaluate_pair(mixed, img, other), mixed, img, other) == {}


def test_infer_main_evaluate_reports_undefined_values(tmp_path, monkeypatch, capsys):
    from infer import main as cli
    ir, vi, out = tmp_path / "ir", tmp_path / "vi", tmp_path / "out"
    ir.mkdir()
    vi.mkdir()
    for stem, seed in (("x", 1), ("y", 2)):
        a = _noise(seed)
        a.flat[0], a.flat[1] = 0, 255  # min-max normalisation leaves it unchanged
        Image.fromarray(a).save(ir / f"{stem}.png")
        Image.fromarray(_noise(seed + 10)).save(vi / f"{stem}.png")
    monkeypatch.setattr(cli, "load_fuser", lambda ckpt, **kw: lambda a, b: a)  # fused == ir
    monkeypatch.setattr(cli, "available_memory", lambda: None)
    ckpt = tmp_path / "m.pth"
    ckpt.write_bytes(b"unused")
    rc = cli.main(["--ckpt", str(ckpt), "--ir", str(ir), "--vi", str(vi), "--out", str(out),
                   "--json", str(tmp_path / "m.json")])
    captured = capsys.readouterr()
    assert rc == 3, captured.err
    assert [line for line in captured.err.splitlines() if line.startswith("warning:")] == [
        f"warning: {s}: SCD undefined: zero variance: the fused image minus ir is constant, so "
        "a correlation is 0/0; left out of the mean" for s in ("x", "y")]
    assert "n/a (0 of 2)" in captured.out.splitlines()[-1]
    assert json.loads((tmp_path / "m.json").read_text())["mean"]["SCD"] is None
