"""Cut infrared/visible image pairs into training patches stored in one H5 file.

    python -m train.prepare --src MSRS/train --out data/msrs_train.h5 [--patch 128 --stride 200]

Same processing and file layout as the reference's ``dataprocessing.py``, so the files are
interchangeable with the reference's:

* pairs: ``SRC/ir/<stem>.*`` with ``SRC/vi/<stem>.*`` (top level of each folder), processed in
  sorted stem order;
* visible -> luminance ``Y = 0.299 R + 0.587 G + 0.114 B`` on float32 values in [0, 1]
  (8-bit values / 255, no rounding; a grey visible image is used as R = G = B);
  infrared -> its first channel / 255 (a grey infrared image is used as is);
  16-bit grey images (read as uint16) are scaled by / 65535 instead (the reference would
  divide by 255 and get values up to 257); 16-bit colour files arrive from
  `smfnet_jax.imageio.read_image` as 8-bit (their high byte) and are divided by 255;
* patches of ``patch`` x ``patch`` at top-left corners ``(r, c)``, ``r`` in
  ``0, stride, ... <= H - patch`` and ``c`` likewise for the width, rows outer, columns inner
  (the reference's ``Im2Patch`` numbering);
* a patch is dropped when either modality is low-contrast: with ``p10``/``p90`` its 10th/90th
  percentiles (numpy, linear interpolation), ``(p90 - p10) / p90 < 0.1``. When ``p90 == 0``
  (a patch that is at least 90% black) the reference computes ``0/0 = nan`` and ``nan < 0.1``
  is False, so it KEEPS the patch; we do the same, without the division warning;
* groups ``ir_patchs`` and ``vis_patchs``, keys ``"0", "1", ...`` in processing order, each a
  (1, patch, patch) float32 dataset.

Images that cannot be read, stems present in only one folder, and pairs whose two images differ
in size are reported by name and skipped; the run still succeeds (exit 0, with a warning
summary) unless no patch at all could be written (exit 1) or ``--strict`` is given (exit 1
when anything was skipped; the H5 is still written). Usage errors are one line, exit status
2, before any work: a --patch or --stride below 1, a --src without ir/ and vi/, an --out
that is a folder or one of the input images. The H5 is written under a temporary name
in the output folder and renamed at the end, so an interrupted run never leaves a partial file
under the final name.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from smfnet_jax.fileio import atomic_path
from smfnet_jax.cli import Progress, input_images, overlap_problem, program_name
from smfnet_jax.imageio import ImageReadError, match_by_stem, read_image

IR_GROUP = "ir_patchs"
VI_GROUP = "vis_patchs"
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class PrepareError(RuntimeError):
    """Nothing usable could be prepared (no pairs, no patches; exit status 1)."""


class PrepareUsageError(PrepareError):
    """The arguments cannot work (a bad --patch or --stride, --src without ir/ and vi/, an
    --out that is a folder or an input image); found before any work, exit status 2."""


@dataclasses.dataclass
class PrepareReport:
    out: Path
    pairs_found: int = 0          # stems present in both folders
    pairs_used: int = 0           # pairs that were read and cut into patches
    patches_total: int = 0        # candidate patches of the used pairs
    patches_low_contrast: int = 0  # dropped by the low-contrast rule
    patches_written: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, reason)


# ---------------------------------------------------------------------------------------------
# Pixel processing (pure functions; the tests check them against independent numpy code).

def to_unit_float(img: np.ndarray, name: str = "image") -> np.ndarray:
    """uint8 -> /255, uint16 -> /65535, as float32 (the reference: ``astype(float32) / 255``)."""
    if img.dtype == np.uint8:
        scale = 255
    elif img.dtype == np.uint16:
        scale = 65535
    else:
        raise ValueError(f"{name}: unsupported pixel type {img.dtype} (expected 8- or 16-bit)")
    return img.astype(np.float32) / np.float32(scale)


def visible_to_y(img: np.ndarray, name: str = "visible image") -> np.ndarray:
    """(H, W[, C]) integer image -> (H, W) float32 luminance in [0, 1]."""
    x = to_unit_float(img, name)
    if x.ndim == 2:
        r = g = b = x
    elif x.ndim == 3 and x.shape[2] >= 3:  # RGB or RGBA (alpha ignored)
        r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    elif x.ndim == 3 and x.shape[2] in (1, 2):  # grey, grey + alpha
        r = g = b = x[:, :, 0]
    else:
        raise ValueError(f"{name}: unsupported image shape {img.shape}")
    wr, wg, wb = (np.float32(w) for w in LUMA_WEIGHTS)
    # float32 throughout, summed in this order, as the reference does.
    return r * wr + g * wg + b * wb


def infrared_to_gray(img: np.ndarray, name: str = "infrared image") -> np.ndarray:
    """(H, W[, C]) integer image -> (H, W) float32: its first channel in [0, 1]."""
    x = to_unit_float(img, name)
    if x.ndim == 2:
        return x
    if x.ndim == 3 and x.shape[2] >= 1:
        return x[:, :, 0]
    raise ValueError(f"{name}: unsupported image shape {img.shape}")


def patch_corners(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners in the reference's order (rows outer, columns inner)."""
    return [(r, c) for r in range(0, height - patch + 1, stride)
            for c in range(0, width - patch + 1, stride)]


def extract_patches(img: np.ndarray, patch: int, stride: int) -> np.ndarray:
    """(H, W) -> (N, patch, patch) copies, in `patch_corners` order (N may be 0)."""
    h, w = img.shape
    if h < patch or w < patch:
        return np.zeros((0, patch, patch), img.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(img, (patch, patch))[::stride, ::stride]
    return np.ascontiguousarray(windows).reshape(-1, patch, patch)


def low_contrast_mask(patches: np.ndarray, fraction: float = 0.1,
                      lower_percentile: float = 10, upper_percentile: float = 90) -> np.ndarray:
    """(N, h, w) -> (N,) bool: ``(p_hi - p_lo) / p_hi < fraction``, False where ``p_hi == 0``."""
    if len(patches) == 0:
        return np.zeros((0,), bool)
    flat = patches.reshape(len(patches), -1)
    lo, hi = np.percentile(flat, [lower_percentile, upper_percentile], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (hi - lo) / hi  # p_hi == 0 -> nan (or inf), never < fraction: kept, as the reference
    return ratio < fraction


# ---------------------------------------------------------------------------------------------
# Folder handling.

def source_folders(src) -> dict[str, Path]:
    """{"ir": SRC/ir, "vi": SRC/vi}; PrepareUsageError when `src` does not hold both."""
    src = Path(src)
    if not src.is_dir():
        raise PrepareUsageError(f"--src {src}: not a folder")
    folders = {sub: src / sub for sub in ("ir", "vi")}
    for sub, folder in folders.items():
        if not folder.is_dir():
            raise PrepareUsageError(f"--src {src}: has no '{sub}/' subfolder "
                                    f"(expected {src}/ir and {src}/vi)")
    return folders


def find_pairs(src: Path) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, str]]]:
    """(stem, ir_path, vi_path) pairs of `src` in sorted stem order, and (stem, reason) for
    the files that have no partner or share their stem (`imageio.match_by_stem`)."""
    folders = source_folders(src)
    matches, problems = match_by_stem(folders)
    # plain sorted order, as the reference's sorted() file lists: the same patch numbering
    return sorted((stem, paths["ir"], paths["vi"]) for stem, paths in matches), problems


def load_pair(ir_path: Path, vi_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ir, vi) as (H, W) float32 in [0, 1]; ValueError (incl. ImageReadError) on bad input."""
    ir = infrared_to_gray(read_image(ir_path), str(ir_path))
    vi = visible_to_y(read_image(vi_path), str(vi_path))
    if ir.shape != vi.shape:
        raise ValueError(f"infrared {ir_path.name} is {ir.shape[1]}x{ir.shape[0]} but visible "
                         f"{vi_path.name} is {vi.shape[1]}x{vi.shape[0]} (width x height)")
    return ir, vi


def prepare(src: str | os.PathLike, out: str | os.PathLike, patch: int = 128, stride: int = 200,
            *, progress: bool = True, log=None) -> PrepareReport:
    """Write the patch H5 for the pairs in `src` to `out`; see the module docstring."""
    for flag, value in (("--patch", patch), ("--stride", stride)):
        if value < 1:
            raise PrepareUsageError(f"{flag} {value}: must be at least 1 (pixels)")
    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))  # above a progress bar
    out = Path(out)
    if out.is_dir():  # refused before any work (the atomic rename would fail only at the end)
        raise PrepareUsageError(f"--out {out} is a folder: give the path of the H5 file to write")
    report = PrepareReport(out=out)
    pairs, problems = find_pairs(Path(src))
    problem = overlap_problem("--out", [out], input_images(*source_folders(src).values()),
                              hows=("is", "contains"))
    if problem:
        raise PrepareUsageError(problem)
    report.pairs_found = len(pairs)
    for name, reason in problems:
        log(f"skipping {name}: {reason}")
    report.skipped.extend(problems)
    if not pairs:
        raise PrepareError(f"no infrared/visible pairs (same file name) found in {src}/ir and {src}/vi")

    with atomic_path(out) as tmp_name:  # an interrupted run leaves no file under `out`
        with h5py.File(tmp_name, "w") as f:
            g_ir, g_vi = f.create_group(IR_GROUP), f.create_group(VI_GROUP)

            def add_pair(stem, ir_path, vi_path) -> None:
                try:
                    ir, vi = load_pair(ir_path, vi_path)
                except (ImageReadError, ValueError) as e:  # unreadable file, bad shape or type
                    log(f"skipping pair {stem}: {e}")
                    report.skipped.append((stem, str(e)))
                    return
                ir_p, vi_p = extract_patches(ir, patch, stride), extract_patches(vi, patch, stride)
                keep = ~(low_contrast_mask(ir_p) | low_contrast_mask(vi_p))
                report.pairs_used += 1
                report.patches_total += len(keep)
                report.patches_low_contrast += int((~keep).sum())
                for i in np.flatnonzero(keep):
                    key = str(report.patches_written)
                    g_ir.create_dataset(key, data=ir_p[i][None])
                    g_vi.create_dataset(key, data=vi_p[i][None])
                    report.patches_written += 1

            bar = Progress(len(pairs), "pairs", "pair", enabled=progress)  # plain lines in a log
            for stem, ir_path, vi_path in pairs:
                add_pair(stem, ir_path, vi_path)
                bar.update(1, f"last {stem}")
            bar.close()
        if report.patches_written == 0:
            raise PrepareError(
                f"no patches written: {report.pairs_used} usable pair(s) of {report.pairs_found}, "
                f"{report.patches_total} candidate patch(es) of {patch}x{patch} at stride {stride}, "
                f"{report.patches_low_contrast} dropped as low-contrast")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=program_name("train.prepare"),
        description="Cut infrared/visible pairs (SRC/ir, SRC/vi, matched by file name) into "
                    "training patches in one H5 file (groups ir_patchs/vis_patchs), as the "
                    "SMFNet reference's dataprocessing.py.")
    parser.add_argument("--src", required=True, help="folder holding ir/ and vi/ subfolders")
    parser.add_argument("--out", required=True, help="output H5 file (written atomically)")
    parser.add_argument("--patch", type=int, default=128, help="patch size in pixels (default 128)")
    parser.add_argument("--stride", type=int, default=200,
                        help="distance between patch corners (default 200, as the reference's MSRS file)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when any image was skipped (the H5 is still written)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = prepare(args.src, args.out, args.patch, args.stride, progress=not args.quiet)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, PrepareUsageError) else 1
    print(f"wrote {report.patches_written} patch pairs to {report.out} "
          f"({report.pairs_used} of {report.pairs_found} pairs used; "
          f"{report.patches_low_contrast} of {report.patches_total} patches dropped as low-contrast)")
    if report.skipped:
        print(f"warning: skipped {len(report.skipped)} file(s)/pair(s):", file=sys.stderr)
        for name, reason in report.skipped:
            print(f"  {name}: {reason}", file=sys.stderr)
        if args.strict:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
