"""Fuse every image pair of two folders with SMFNet.

    python -m infer.main --ckpt (DIR|FILE.pth) --ir DIR --vi DIR --out DIR
                         [--no-normalize] [--save-npy] [--grid] [--evaluate [--json OUT]]
                         [--batch N] [--tile SIZE] [--scale16 high|range]

Pairs are matched by file stem (``01.png`` in --ir with ``01.jpg`` in --vi). The first image
(infrared, MRI) is read as the reference's cv2 GRAY, the second (visible, PET, SPECT) as the
Y of its YCrCb; both are divided by 255 and fused. The output follows the reference test
script: the fused image is min-max normalised to [0, 1] (unless --no-normalize), scaled by
255 and stored as cv2.imwrite stores a float image (round half to even, saturate). If the
second image has colour, its Cr/Cb are kept and the result is written as a colour PNG;
if it is grey (one channel, or three equal channels as in TNO) the result is a grey PNG.

A pair that cannot be fused (unreadable or corrupt file, different sizes, under 2x2 pixels,
no partner, ...) is reported by name with the reason and nothing is written for it; the other
pairs are still fused and the run ends with a summary and exit status 1. A pair's outputs
(NAME.png, NAME.npy, NAME_grid.png) appear together or not at all, and a failure never
removes a file an earlier run wrote. Usage problems (missing folder, unwritable --out or
--json, ...) are found before the model loads: one line, exit status 2. Among them: every
output of the run is planned by name first, and one that would replace an input (an image
of --ir or --vi, the --ckpt; or a pair's output in an input folder) or another output
(pair `x`'s NAME_grid.png and pair `x_grid`'s image with --grid, a --json named as a fused
image) is refused, nothing written.

Memory: before a pair is decoded, its size (from the file header) is checked against the
memory available (free device memory, or available RAM on CPU; see
smfnet_jax.inference.plan_tile). A pair too large to fuse whole is fused in tiles, with a
notice; one too large even for tiles is reported and skipped.

Progress: a bar on a terminal; otherwise (a log file, CI) a plain line after the first pair
and then at most every PLAIN_PROGRESS_S seconds (smfnet_jax.cli.Progress). Failures and the
summary are always printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from infer.common import (EXIT_INTERRUPTED, EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, GRID_SUFFIX,
                          add_scale16_argument, json_out_problem, plain_warnings,
                          writable_folder_problem)
from smfnet_jax.policy import DTYPES, IMPL_HELP, PRECISION_HELP, PRECISIONS
from smfnet_jax.cli import (Progress, exit_on_environment_error, input_images, overlap_problem,
                            program_name, restore_checkpoint)
from smfnet_jax import fileio
from smfnet_jax.fileio import write_together
from smfnet_jax.imageio import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    float_to_uint8,
    gray_levels,
    image_size,
    is_grey,
    match_by_stem,
    read_image,
    rgb_to_y,
    rgb_to_ycrcb,
    row_blocks,
    write_npy,
    write_png,
    ycrcb_to_rgb,
)

# Without a terminal (no progress bar): a plain progress line at most this often.
PLAIN_PROGRESS_S = 30.0
# Tile sizes tried, largest first, for a pair too large to fuse whole.
AUTO_TILES = (512, 256, 128)


def load_fuser(ckpt, **kwargs):
    """Load the model (seam for tests: they replace this with a tiny numpy fuser).

    Imported lazily so that ``--help`` and argument errors do not pay for importing JAX.
    """
    from smfnet_jax.api import load_fuser as _load_fuser

    return _load_fuser(ckpt, **kwargs)


def policy_choices(args) -> dict:
    """`load_fuser` keyword arguments for --dtype / --precision (none at the defaults)."""
    if args.dtype == "float32" and args.precision == "highest":
        return {}
    from smfnet_jax.policy import resolve
    return {"policy": resolve(None, precision=args.precision, dtype=args.dtype)}


def available_memory() -> int | None:
    """Bytes a fusion may use now (seam for tests, which pretend to have little memory)."""
    from smfnet_jax.inference import available_bytes

    return available_bytes()


def describe_run(ckpt: Path, dtype: str, step: int | None = None, policy=None) -> str:
    """The first line of a run: device, dtype, the fuser's compute policy (when it has one)
    and checkpoint (path, kind, the step loaded)."""
    from smfnet_jax.checkpoint import checkpoint_kind
    from smfnet_jax.runtime import describe_device

    dev = describe_device()
    kind = checkpoint_kind(ckpt) + ("" if step is None else f", step {step}")
    how = "" if policy is None else f"{policy.describe()}; "
    return (f"device {dev['platform']} ({dev['device']}), {dev['device_count']} visible; dtype {dtype}; "
            f"{how}checkpoint {ckpt} ({kind})")


# ----------------------------------------------------------------------------- pairing

@dataclass(frozen=True)
class Pair:
    name: str
    ir: Path
    vi: Path


@dataclass(frozen=True)
class Failure:
    name: str
    reason: str


def find_pairs(ir_dir: Path, vi_dir: Path) -> tuple[list[Pair], list[Failure]]:
    """Match the two folders by file stem; unmatched or ambiguous names become failures."""
    matches, problems = match_by_stem({"ir": ir_dir, "vi": vi_dir})
    return ([Pair(stem, paths["ir"], paths["vi"]) for stem, paths in matches],
            [Failure(stem, reason) for stem, reason in problems])


# ----------------------------------------------------------------------------- one pair

class PairError(Exception):
    """This pair cannot be fused; the message says why."""


@dataclass
class LoadedPair:
    """A pair kept as 8-bit pixels (1 + 1 or 3 bytes per pixel); the network's float inputs
    and the colour planes are made from them region by region, so that a huge pair fused in
    tiles never has image-sized float copies."""
    pair: Pair
    ir_gray: np.ndarray    # uint8 HxW: the first image's cv2 GRAY levels
    vi_pixels: np.ndarray  # uint8 HxW (grey) or HxWx3 (RGB): the second image
    grey: bool             # the second image is grey
    tile: int = 0          # fuse in tile x tile tiles (0: whole)
    fit: int = 2**31       # how many pairs of this size fit in memory together (for --batch)

    @property
    def shape(self) -> tuple[int, int]:
        return self.ir_gray.shape

    def inputs(self, rows: slice = slice(None), cols: slice = slice(None)):
        """(ir, vi) of a region as the network takes them: GRAY / 255 and the unrounded Y of
        YCrCb / 255, float32 in [0, 1] (as the reference's test script)."""
        ir = self.ir_gray[rows, cols].astype(np.float32) / np.float32(255.0)
        return ir, rgb_to_y(self.vi_pixels[rows, cols]) / np.float32(255.0)

    def vi_ycrcb(self, rows: slice = slice(None)) -> np.ndarray:
        """(Y, Cr, Cb) of the second image's rows, float32 0..255."""
        return rgb_to_ycrcb(self.vi_pixels[rows])


def load_pair(pair: Pair, scale16: str = "high",
              plan: Callable[[int, int], int] | None = None) -> LoadedPair:
    """Read both images of a pair as the reference does; PairError says why not.

    plan(height, width) -> (tile size (0: whole), pairs of this size that fit together) is
    asked with the size from the files' headers, before any pixel is decoded; it raises
    PairError for a pair that cannot fit.
    """
    try:
        ir_size, vi_size = image_size(pair.ir), image_size(pair.vi)
    except ImageReadError as e:
        raise PairError(str(e)) from e
    if ir_size != vi_size:
        raise PairError(f"sizes differ: {pair.ir} is {ir_size[0]}x{ir_size[1]}, "
                        f"{pair.vi} is {vi_size[0]}x{vi_size[1]} (WxH)")
    from smfnet_jax.inference import too_small  # the fusers' own rule, asked before decoding

    problem = too_small(ir_size[1], ir_size[0])
    if problem:
        raise PairError(problem)
    tile, fit = plan(ir_size[1], ir_size[0]) if plan else (0, 2**31)
    try:
        ir_raw = read_image(pair.ir, scale16)
        vi_raw = read_image(pair.vi, scale16)
    except ImageReadError as e:
        raise PairError(str(e)) from e
    if ir_raw.shape[:2] != vi_raw.shape[:2]:  # the headers agreed: a file changed meanwhile
        raise PairError(f"sizes differ: {pair.ir} is {ir_raw.shape[1]}x{ir_raw.shape[0]}, "
                        f"{pair.vi} is {vi_raw.shape[1]}x{vi_raw.shape[0]} (WxH)")
    # As the reference: GRAY (rounded) for the first image, unrounded Y for the second.
    ir_gray = gray_levels(ir_raw)
    del ir_raw
    grey = is_grey(vi_raw)
    if grey and vi_raw.ndim == 3:  # three equal channels: one is the same image
        vi_raw = np.ascontiguousarray(vi_raw[..., 0])
    return LoadedPair(pair, ir_gray, vi_raw, grey, tile, fit)


def memory_plan(available: int | None, tile: int, dtype: str, report: Callable[[str], None]):
    """plan(height, width) for load_pair: the tile size a pair needs in `available` bytes.

    tile: the user's --tile (0: whole images where they fit, else AUTO_TILES with a notice
    through `report`). Also says how many pairs of the size fit in one --batch call.
    Raises PairError, naming --tile, for a pair that fits in no way."""
    from smfnet_jax.inference import forward_bytes, pairs_that_fit, plan_tile

    def plan(height: int, width: int) -> tuple[int, int]:
        try:
            chosen = plan_tile(height, width, available, dtype, sizes=(tile,) if tile else AUTO_TILES)
        except MemoryError as e:
            hint = "try a smaller --tile" if tile else "too large even in tiles"
            raise PairError(f"not enough memory: {e} ({hint})") from e
        if tile:
            return tile, 1
        if chosen:
            gb = 2**30
            report(f"{width}x{height} needs about {forward_bytes(height, width, 1, dtype) / gb:.1f} GB "
                   f"whole, {available / gb:.1f} GB available: fusing in {chosen}-pixel tiles "
                   "(slightly different from whole-image fusion; --tile SIZE sets the tiles)")
            return chosen, 1
        return 0, pairs_that_fit(height, width, available, dtype)
    return plan


def postprocess(fused: np.ndarray, value_range: tuple | None) -> np.ndarray:
    """Raw sigmoid output -> float32 image in 0..255 (before rounding), as the reference.

    value_range: the whole output's (min, max) for min-max normalisation in float32 (the
    reference's), or None (--no-normalize); a constant output (max == min), where the
    reference would divide by zero and write black, is kept as it is instead.
    """
    fused = np.asarray(fused, np.float32)
    if value_range is not None:
        lo, hi = value_range
        if hi > lo:
            fused = (fused - lo) / (hi - lo)
    return fused * np.float32(255.0)


def render(loaded: LoadedPair, fused: np.ndarray, normalize: bool) -> np.ndarray:
    """uint8 output image: grey HxW, or RGB with the second image's Cr/Cb; made by blocks of
    rows (imageio.row_blocks; the result equals converting the whole image at once)."""
    fused = np.asarray(fused, np.float32)
    value_range = (fused.min(), fused.max()) if normalize else None
    image = np.empty(fused.shape + (() if loaded.grey else (3,)), np.uint8)
    for rows in row_blocks(*fused.shape):
        fused255 = postprocess(fused[rows], value_range)
        if loaded.grey:
            image[rows] = float_to_uint8(fused255)
        else:
            ycrcb = loaded.vi_ycrcb(rows)
            ycrcb[..., 0] = fused255
            image[rows] = ycrcb_to_rgb(ycrcb)
    return image


def fuse_batch(fuser: Callable, batch: list[LoadedPair], overlap: int = 32) -> list[np.ndarray | PairError]:
    """Fuse same-size loaded pairs in one call (one pair: `fuser(ir, vi)` on HxW arrays, or
    tile by tile when it has a tile size; more: on NxHxW stacks). Returns per pair its HxW
    float32 output or the PairError saying why not."""
    from smfnet_jax.inference import fuse_tiled_by

    try:
        if len(batch) == 1 and batch[0].tile:
            outputs = [fuse_tiled_by(fuser, batch[0].inputs, batch[0].shape, batch[0].tile, overlap)]
        elif len(batch) == 1:
            outputs = [fuser(*batch[0].inputs())]
        else:
            inputs = [b.inputs() for b in batch]
            outputs = list(fuser(np.stack([ir for ir, _ in inputs]), np.stack([vi for _, vi in inputs])))
    except Exception as e:  # a model failure must not stop the other pairs
        return [PairError(f"fusion failed: {type(e).__name__}: {e}") for _ in batch]
    results = []
    for b, fused in zip(batch, outputs):
        fused = np.asarray(fused, np.float32)
        if fused.shape != b.shape:
            results.append(PairError(f"the model returned shape {fused.shape}, expected {b.shape}"))
        elif not (np.isfinite(fused.min()) and np.isfinite(fused.max())):  # NaN propagates; no temporary
            results.append(PairError("the model returned non-finite values"))
        else:
            results.append(fused)
    return results


def grid_image(loaded: LoadedPair, output: np.ndarray) -> np.ndarray:
    """infrared | visible | fused side by side, each labelled above, 4-pixel gaps (uint8;
    grey when all three are grey, else RGB). Labels use PIL's default font."""
    from PIL import Image, ImageDraw

    ir = loaded.ir_gray
    vi = (float_to_uint8(rgb_to_y(loaded.vi_pixels)) if loaded.grey
          else ycrcb_to_rgb(loaded.vi_ycrcb()))
    panels = [("infrared", ir), ("visible", vi), ("fused", output)]
    colour = any(p.ndim == 3 for _, p in panels)
    gap, label_h = 4, 14
    h, w = loaded.shape
    canvas = Image.new("RGB" if colour else "L", (3 * w + 2 * gap, h + label_h),
                       (255, 255, 255) if colour else 255)
    draw = ImageDraw.Draw(canvas)
    for i, (label, panel) in enumerate(panels):
        x = i * (w + gap)
        if colour and panel.ndim == 2:
            panel = np.repeat(panel[..., None], 3, axis=-1)
        canvas.paste(Image.fromarray(panel), (x, label_h))
        draw.text((x + 2, 1), label, fill=(0, 0, 0) if colour else 0)  # PIL's default font
    return np.asarray(canvas)


def output_paths(name: str, out_dir: Path, save_npy: bool, grid: bool) -> list[tuple[Path, str]]:
    """(path, what) of the files a pair named `name` writes: NAME.png, NAME.npy, NAME_grid.png.
    The one place output names are made; `output_problem` plans a whole run with it."""
    paths = [(out_dir / f"{name}.png", "fused image")]
    if save_npy:
        paths.append((out_dir / f"{name}.npy", "raw output (--save-npy)"))
    if grid:
        paths.append((out_dir / f"{name}{GRID_SUFFIX}.png", "grid (--grid)"))
    return paths


def write_outputs(loaded: LoadedPair, fused: np.ndarray, out_dir: Path, normalize: bool,
                  save_npy: bool, grid: bool = False) -> list[Path]:
    """Write one pair's outputs, all or nothing; raises PairError with none of them written.

    The files are written together (`smfnet_jax.fileio.write_together`: temporary names,
    renamed only when all are complete), so a failure removes only this run's temporary
    files and never an output an earlier run left in `out_dir`."""
    image = render(loaded, fused, normalize)
    writers = {"fused image": lambda p: write_png(p, image),
               "raw output (--save-npy)": lambda p: write_npy(p, fused),
               "grid (--grid)": lambda p: write_png(p, grid_image(loaded, image))}
    targets = [(path, writers[what])
               for path, what in output_paths(loaded.pair.name, out_dir, save_npy, grid)]
    try:
        return write_together(targets)
    except OSError as e:
        raise PairError(f"cannot write output: {e}") from e


def same_size_batches(pairs: Iterable[Pair], size: int, failed: Callable[[Pair, PairError], None],
                      load: Callable[[Pair], LoadedPair] = load_pair):
    """Load `pairs` in order (with `load`) and yield lists of up to `size` consecutive loaded
    pairs of one image size (fewer when fewer fit in memory: LoadedPair.fit); a pair to be
    tiled comes alone; a pair that cannot be loaded goes to `failed` and is left out."""
    batch: list[LoadedPair] = []
    for pair in pairs:
        try:
            loaded = load(pair)
        except PairError as e:
            failed(pair, e)
            continue
        if batch and (len(batch) >= min(size, batch[0].fit) or batch[0].shape != loaded.shape
                      or batch[0].tile or loaded.tile):
            yield batch
            batch = []
        batch.append(loaded)
    if batch:
        yield batch


# ----------------------------------------------------------------------------- CLI


def _fuse_all(pairs, args, fuser, failed, load, fused_names, times, bar, t0) -> None:
    """Fuse and write every pair in same-size batches (appends to fused_names and times)."""
    with plain_warnings():
        for batch in same_size_batches(pairs, 1 if args.tile else args.batch, failed, load):
            done = 0
            for loaded, fused in zip(batch, fuse_batch(fuser, batch, args.overlap)):
                try:
                    if isinstance(fused, PairError):
                        raise fused
                    write_outputs(loaded, fused, args.out, not args.no_normalize, args.save_npy,
                                  args.grid)
                except PairError as e:
                    failed(loaded.pair, e)
                    continue
                fused_names.append(loaded.pair.name)
                done += 1
            dt = (time.perf_counter() - t0) / len(batch)  # loading, fusion and writing, per pair
            times += [dt] * done
            if done:
                bar.update(done, f"last {fused_names[-1]}, {dt:.2f} s/pair")
            t0 = time.perf_counter()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name("infer.main"),
        description="Fuse infrared/visible (or MRI/PET, MRI/SPECT, MRI/CT) image pairs with SMFNet. "
                    "Pairs are matched by file stem; PNG, JPEG, BMP, TIFF and PNM files (8- or 16-bit, "
                    "1 or 3 channels) are read.",
        epilog="Exit status: 0 when every pair was fused, 1 when some pair failed (each is "
               "reported with its reason), 2 for a usage error, 3 when --evaluate found a metric "
               "value undefined (e.g. CC of a constant image; each is named), 130 when "
               "interrupted (Ctrl-C; every output written by then is complete). " + IMPL_HELP)
    p.add_argument("--ckpt", required=True, type=Path,
                   help="orbax checkpoint directory (from convert.main or training) or a released .pth file")
    p.add_argument("--ir", required=True, type=Path,
                   help="folder of first images (infrared / MRI), read as grey")
    p.add_argument("--vi", required=True, type=Path,
                   help="folder of second images (visible / PET / SPECT / CT); the Y of YCrCb is "
                        "fused, colour (Cr/Cb) is kept")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (created if needed; must differ from the input folders)")
    p.add_argument("--no-normalize", action="store_true",
                   help="write the raw sigmoid output * 255 instead of min-max normalising it first")
    p.add_argument("--save-npy", action="store_true",
                   help="also write NAME.npy: the raw sigmoid output (float32, HxW, before normalisation)")
    p.add_argument("--grid", action="store_true",
                   help="also write NAME_grid.png: infrared | visible | fused side by side, labelled")
    p.add_argument("--evaluate", action="store_true",
                   help="after fusing, compute the fusion metrics on the outputs and print a table")
    p.add_argument("--json", type=Path, metavar="OUT",
                   help="write the metrics to this JSON file, the format of infer.evaluate --json "
                        "(implies --evaluate; checked before anything is fused)")
    p.add_argument("--ssim-range", type=float, default=255.0,
                   help="data range given to SSIM by --evaluate (default: 255, as the reference)")
    p.add_argument("--tile", type=int, default=0, metavar="SIZE",
                   help="fuse in overlapping SIZE x SIZE tiles (bounded memory; changes the result "
                        "slightly, see docs/fusing.md); 0 (the default) is off: whole images, and tiles "
                        "(with a notice) only for a pair estimated not to fit in the memory available")
    p.add_argument("--overlap", type=int, default=32, metavar="PX",
                   help="minimum overlap of neighbouring tiles with --tile (default: 32)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype; bfloat16 is meant for GPU/TPU (slow on CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="highest", help=PRECISION_HELP)
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="fuse up to N consecutive same-size pairs in one call (e.g. the 640x480 "
                        "MSRS frames; pays on GPU/TPU); outputs equal N=1 up to float rounding. "
                        "With --tile pairs are fused one by one (default: 1)")
    add_scale16_argument(p)
    return p


def check_folders(args) -> str | None:
    """A usage problem with the folders and flags, or None; creates nothing."""
    for flag, folder in (("--ir", args.ir), ("--vi", args.vi)):
        if not folder.is_dir():
            return f"{flag} {folder} is not a folder"
    if args.out.exists() and not args.out.is_dir():
        return f"--out {args.out} exists and is not a folder"
    # The outputs are written into --out: it may hold the input folders, not be or lie in one.
    problem = overlap_problem("--out", [args.out], input_folders(args), hows=("is", "lies inside"))
    if problem:
        return problem
    problem = restore_checkpoint(args.ckpt, "--ckpt")  # one an interrupted convert --force set aside
    if problem:
        return problem
    if not (args.ckpt.is_dir() or args.ckpt.is_file()):
        return f"--ckpt {args.ckpt} does not exist"
    if args.tile and (args.tile < 16 or not 0 <= args.overlap < args.tile // 2):
        return f"--tile {args.tile} --overlap {args.overlap}: need tile >= 16 and 0 <= overlap < tile/2"
    if args.batch < 1:
        return f"--batch {args.batch}: must be at least 1"
    # A --json in the --out folder this run creates is checked once that folder exists (run).
    if args.json is not None and fileio.overlap(args.json.parent, args.out) != "is":
        return json_out_problem(args.json)
    return None


def input_folders(args) -> dict:
    return {args.ir: "the --ir folder", args.vi: "the --vi folder"}


def output_problem(args, pairs: list[Pair]) -> str | None:
    """A usage problem with the files this run would write, or None. Every output is planned
    by name before any work (`output_paths` of each pair, and --json); refused: one that is
    an input file (an image of --ir or --vi, the --ckpt), a pair's output that lies in an
    input folder, and two outputs that are one file (pairs `x` and `x_grid` with --grid),
    all after resolving symlinks. Refused rather than renamed: each output keeps its pair's
    stem, by which infer.evaluate matches it with its sources."""
    inputs = input_images(args.ir, args.vi)
    inputs[args.ckpt] = "the --ckpt checkpoint"  # a folder the outputs may lie in (a workdir)
    planned = [(path, f"pair {pair.name}'s {what}") for pair in pairs
               for path, what in output_paths(pair.name, args.out, args.save_npy, args.grid)]
    paths = [path for path, _ in planned]
    problem = (overlap_problem("--out", paths, inputs, hows=("is", "contains"))
               or overlap_problem("--out", paths, input_folders(args)))
    if args.json is not None:
        problem = problem or overlap_problem("--json", [args.json], inputs, hows=("is", "contains"))
        planned.append((args.json, "--json"))
    if problem:
        return problem
    seen: dict[str, str] = {}
    for path, who in planned:
        key = os.path.realpath(path)
        if key in seen:
            hint = "choose another --json" if who == "--json" else "rename one of the pairs' files"
            return f"{path}: {seen[key]} and {who} would both be written to this file; {hint}"
        seen[key] = who
    return None


def run(args, fuser: Callable | None = None) -> int:
    problem = check_folders(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    args.evaluate = args.evaluate or args.json is not None
    pairs, failures = find_pairs(args.ir, args.vi)
    # Last, so that a usage error creates nothing; before the model loads.
    problem = (output_problem(args, pairs) or writable_folder_problem(args.out, "--out", create=True)
               or (args.json is not None and json_out_problem(args.json)))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not pairs and not failures:
        print(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.ir} or {args.vi}",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    load_s = None
    if pairs and fuser is None:
        t0 = time.perf_counter()
        try:
            fuser = load_fuser(args.ckpt, **policy_choices(args))
        except (ValueError, OSError) as e:  # every checkpoint error is a ValueError
            print(f"error: cannot load checkpoint {args.ckpt}: {e}", file=sys.stderr)
            return EXIT_USAGE
        load_s = time.perf_counter() - t0
    if pairs:
        print(describe_run(args.ckpt, args.dtype, getattr(fuser, "step", None),
                           getattr(fuser, "policy", None)), file=sys.stderr)
        if load_s is not None:
            print(f"loaded in {load_s:.1f} s", file=sys.stderr)
    for f in failures:
        print(f"skipped {f.name}: {f.reason}", file=sys.stderr)

    fused_names, times = [], []
    bar = Progress(len(pairs), "fusing", "pair", every_s=PLAIN_PROGRESS_S)
    plan = memory_plan(available_memory() if pairs else None, args.tile, args.dtype,
                       lambda text: bar.write(f"notice: {text}"))

    def failed(pair: Pair, e: PairError) -> None:
        failures.append(Failure(pair.name, str(e)))
        bar.write(f"failed {pair.name}: {e}")
        bar.update(1, f"last {pair.name}")

    def load(pair: Pair) -> LoadedPair:
        return load_pair(pair, args.scale16, plan)

    t0 = time.perf_counter()
    try:
        _fuse_all(pairs, args, fuser, failed, load, fused_names, times, bar, t0)
    except KeyboardInterrupt:  # every output written so far is complete (atomic writes)
        bar.close()
        print(f"interrupted: {len(fused_names)} of {len(pairs)} pairs written to {args.out}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    bar.close()

    total = len({p.name for p in pairs} | {f.name for f in failures})
    print(summary(fused_names, failures, times, total, args.out))

    if args.evaluate and fused_names:
        from infer.evaluate import (evaluate_folders, exit_status, format_table,  # lazy: only
                                    undefined_lines)                              # when asked

        with plain_warnings():
            results, errors = evaluate_folders(args.ir, args.vi, args.out, args.ssim_range,
                                               scale16=args.scale16)
        print(format_table(results))
        for line in undefined_lines(results):
            print(f"warning: {line}", file=sys.stderr)
        for err in errors or ():
            print(f"evaluation: {err}", file=sys.stderr)
        if args.json is not None:
            from infer.evaluate import results_to_json, write_json_atomic  # the one JSON format
            try:
                write_json_atomic(args.json, results_to_json(results))
            except OSError as e:
                print(f"error: cannot write --json {args.json}: {e}", file=sys.stderr)
                return EXIT_SOME_FAILED
            print(f"wrote {args.json}", file=sys.stderr)
        if not failures:
            return exit_status(results, errors)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def summary(fused: list[str], failures: Iterable[Failure], times: list[float], total: int,
            out: Path) -> str:
    failures = sorted(failures, key=lambda f: f.name)
    lines = [f"fused {len(fused)} of {total} pairs into {out}"]
    if times:
        lines[0] += (f" ({sum(times):.1f} s, median {np.median(times):.2f} s per pair; the first "
                     "pair of each size includes compilation)")
    if failures:
        lines.append(f"{len(failures)} failed, nothing written for them:")
        lines += [f"  {f.name}: {f.reason}" for f in failures]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_environment_error()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
