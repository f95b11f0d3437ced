"""The fusion CLI end to end with the real model and the parity checkpoint.

The parity fixture's inputs are the centre 40x56 crops of TNO pairs 01 and 02 (IR read as
cv2 GRAY, visible as the Y of cv2 YCrCb). Cropping the real PNGs the same way and running
`infer.main --save-npy` must give the reference's fused output: file reading, colour
conversion, checkpoint loading and the jitted model all in one check.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from infer.main import main

H, W = 40, 56


def _crop(src, dst):
    img = np.asarray(Image.open(src))
    y0, x0 = (img.shape[0] - H) // 2, (img.shape[1] - W) // 2
    Image.fromarray(img[y0:y0 + H, x0:x0 + W]).save(dst)


def test_cli_fuses_like_the_reference(shared_dir, fixture_pth, reference_arrays, tmp_path, capsys):
    ir_dir, vi_dir, out = tmp_path / "ir", tmp_path / "vi", tmp_path / "out"
    ir_dir.mkdir()
    vi_dir.mkdir()
    for stem in ("01", "02"):
        _crop(shared_dir / f"data/TNO/ir/{stem}.png", ir_dir / f"{stem}.png")
        _crop(shared_dir / f"data/TNO/vi/{stem}.png", vi_dir / f"{stem}.png")
    rc = main(["--ckpt", str(fixture_pth), "--ir", str(ir_dir), "--vi", str(vi_dir),
               "--out", str(out), "--save-npy", "--grid"])
    assert rc == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("device ") and f"checkpoint {fixture_pth} (.pth file)" in first
    ref = reference_arrays["fused"][:, 0]
    for i, stem in enumerate(("01", "02")):
        raw = np.load(out / f"{stem}.npy")
        assert raw.dtype == np.float32 and raw.shape == (H, W)
        err = np.abs(raw - ref[i]).max()
        assert err <= 1e-5 * max(1.0, np.abs(ref[i]).max()), f"{stem}: {err}"
        png = np.asarray(Image.open(out / f"{stem}.png"))
        assert png.shape == (H, W)  # TNO's visible images are grey stored as RGB: grey output
        # min-max normalised as the reference's test script does
        norm = (raw - raw.min()) / (raw.max() - raw.min()) * 255
        assert np.abs(png.astype(np.float64) - norm).max() <= 0.5 + 1e-3
        grid = np.asarray(Image.open(out / f"{stem}_grid.png"))
        np.testing.assert_array_equal(grid[-H:, -W:], png)  # the fused panel, bottom right
