"""The sample pairs in samples/ are the shared TNO pairs, stored losslessly as 1-channel PNGs."""
from pathlib import Path

import numpy as np
import pytest

from smfnet_jax.imageio import read_gray, read_ycrcb

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "TNO"


@pytest.mark.parametrize("stem", ["07", "19", "20"])
def test_samples_read_as_the_original_tno_files(shared_dir, stem):
    for modality in ("ir", "vi"):
        ours, orig = SAMPLES / modality / f"{stem}.png", shared_dir / f"data/TNO/{modality}/{stem}.png"
        np.testing.assert_array_equal(read_gray(ours), read_gray(orig))
        np.testing.assert_array_equal(read_ycrcb(ours), read_ycrcb(orig))


def test_samples_are_small_and_licensed():
    files = sorted(SAMPLES.glob("*/*.png"))
    assert len(files) == 6 and sum(f.stat().st_size for f in files) < 1_000_000
    note = (SAMPLES.parent / "README.md").read_text()
    assert "CC BY 4.0" in note and "10.6084/m9.figshare.1008029" in note
