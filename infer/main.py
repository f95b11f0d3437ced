"""Fuse every image pair of two folders with SMFNet.

    python -m infer.main --ckpt (DIR|FILE.pth) --ir DIR --vi DIR --out DIR
                         [--no-normalize] [--save-npy] [--evaluate] [--batch N]

Pairs are matched by file stem (``01.png`` in --ir with ``01.jpg`` in --vi). The first image
(infrared, MRI) is read as the reference's cv2 GRAY, the second (visible, PET, SPECT) as the
Y of its YCrCb; both are divided by 255 and fused. The output follows the reference test
script: the fused image is min-max normalised to [0, 1] (unless --no-normalize), scaled by
255 and stored as cv2.imwrite stores a float image (round half to even, saturate). If the
second image has colour, its Cr/Cb are kept and the result is written as a colour PNG;
if it is grey (one channel, or three equal channels as in TNO) the result is a grey PNG.

A pair that cannot be fused (unreadable or corrupt file, different sizes, a file with no
partner, ...) is reported by name with the reason and nothing is written for it; the other
pairs are still fused and the run ends with a summary and exit status 1.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from smfnet_jax.backend import IMPL_HELP
from smfnet_jax.cli import program_name
from smfnet_jax.imageio import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    float_to_uint8,
    is_grey,
    match_by_stem,
    read_image,
    rgb_to_gray,
    rgb_to_ycrcb,
    write_npy,
    write_png,
    ycrcb_to_rgb,
)

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2


def load_fuser(ckpt, **kwargs):
    """Load the model (seam for tests: they replace this with a tiny numpy fuser).

    Imported lazily so that ``--help`` and argument errors do not pay for importing JAX.
    """
    from smfnet_jax.api import load_fuser as _load_fuser

    return _load_fuser(ckpt, **kwargs)


def tiled(fuser: Callable, tile: int, overlap: int) -> Callable:
    """The fuser applied to overlapping tile x tile tiles, blended (bounded memory)."""
    from smfnet_jax.inference import fuse_tiled

    return lambda ir, vi: fuse_tiled(fuser, ir, vi, tile=tile, overlap=overlap)


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
    pair: Pair
    ir: np.ndarray         # [0, 1] HxW
    vi: np.ndarray         # Y in [0, 1] HxW
    vi_ycrcb: np.ndarray   # 0..255 HxWx3
    grey: bool             # the second image is grey


def load_pair(pair: Pair) -> LoadedPair:
    """Read both images of a pair as the reference does; PairError says why not."""
    try:
        ir_raw = read_image(pair.ir)
        vi_raw = read_image(pair.vi)
    except ImageReadError as e:
        raise PairError(str(e)) from e
    if ir_raw.shape[:2] != vi_raw.shape[:2]:
        raise PairError(f"sizes differ: {pair.ir} is {ir_raw.shape[1]}x{ir_raw.shape[0]}, "
                        f"{pair.vi} is {vi_raw.shape[1]}x{vi_raw.shape[0]} (WxH)")
    # As the reference: GRAY (rounded) for the first image, unrounded Y for the second.
    ir = rgb_to_gray(ir_raw) / np.float32(255.0)
    vi_ycrcb = rgb_to_ycrcb(vi_raw)
    vi = vi_ycrcb[..., 0] / np.float32(255.0)
    return LoadedPair(pair, ir, vi, vi_ycrcb, is_grey(vi_raw))


def postprocess(fused: np.ndarray, normalize: bool) -> np.ndarray:
    """Raw sigmoid output -> float32 image in 0..255 (before rounding), as the reference.

    Min-max normalisation in float32; a constant output (max == min), where the reference
    would divide by zero and write black, is kept as it is instead.
    """
    fused = np.asarray(fused, np.float32)
    if normalize:
        lo, hi = fused.min(), fused.max()
        if hi > lo:
            fused = (fused - lo) / (hi - lo)
    return fused * np.float32(255.0)


def render(fused255: np.ndarray, vi_ycrcb: np.ndarray, grey: bool) -> np.ndarray:
    """uint8 output image: grey HxW, or RGB with the second image's Cr/Cb."""
    if grey:
        return float_to_uint8(fused255)
    return ycrcb_to_rgb(np.stack([fused255, vi_ycrcb[..., 1], vi_ycrcb[..., 2]], axis=-1))


def fuse_batch(fuser: Callable, batch: list[LoadedPair]) -> list[np.ndarray | PairError]:
    """Fuse same-size loaded pairs in one call (one pair: `fuser(ir, vi)` on HxW arrays; more:
    on NxHxW stacks). Returns per pair its HxW float32 output or the PairError saying why not."""
    try:
        if len(batch) == 1:
            outputs = [fuser(batch[0].ir, batch[0].vi)]
        else:
            outputs = list(fuser(np.stack([b.ir for b in batch]), np.stack([b.vi for b in batch])))
    except Exception as e:  # a model failure must not stop the other pairs
        return [PairError(f"fusion failed: {type(e).__name__}: {e}") for _ in batch]
    results = []
    for b, fused in zip(batch, outputs):
        fused = np.asarray(fused, np.float32)
        if fused.shape != b.ir.shape:
            results.append(PairError(f"the model returned shape {fused.shape}, expected {b.ir.shape}"))
        elif not np.all(np.isfinite(fused)):
            results.append(PairError("the model returned non-finite values"))
        else:
            results.append(fused)
    return results


def write_outputs(loaded: LoadedPair, fused: np.ndarray, out_dir: Path, normalize: bool,
                  save_npy: bool) -> list[Path]:
    """Write one pair's outputs; raises PairError with nothing left on disk."""
    image = render(postprocess(fused, normalize), loaded.vi_ycrcb, loaded.grey)
    name = loaded.pair.name
    targets = [(out_dir / f"{name}.png", lambda p: write_png(p, image))]
    if save_npy:
        targets.append((out_dir / f"{name}.npy", lambda p: write_npy(p, fused)))
    written = []
    try:
        for path, write in targets:
            write(path)  # atomic: temp file in out_dir + os.replace
            written.append(path)
    except OSError as e:
        for path in written:  # all or nothing for this pair
            path.unlink(missing_ok=True)
        raise PairError(f"cannot write output: {e}") from e
    return written


def same_size_batches(pairs: Iterable[Pair], size: int, failed: Callable[[Pair, PairError], None]):
    """Load `pairs` in order and yield lists of up to `size` consecutive loaded pairs of one
    image size; a pair that cannot be loaded goes to `failed` and is left out."""
    batch: list[LoadedPair] = []
    for pair in pairs:
        try:
            loaded = load_pair(pair)
        except PairError as e:
            failed(pair, e)
            continue
        if batch and (len(batch) == size or batch[0].ir.shape != loaded.ir.shape):
            yield batch
            batch = []
        batch.append(loaded)
    if batch:
        yield batch


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name("infer.main"),
        description="Fuse infrared/visible (or MRI/PET, MRI/SPECT, MRI/CT) image pairs with SMFNet. "
                    "Pairs are matched by file stem; PNG, JPEG, BMP, TIFF and PNM files (8- or 16-bit, "
                    "1 or 3 channels) are read.",
        epilog="Exit status: 0 when every pair was fused, 1 when some pair failed (each is "
               "reported with its reason), 2 for a usage error. " + IMPL_HELP)
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
    p.add_argument("--evaluate", action="store_true",
                   help="after fusing, compute the fusion metrics on the outputs and print a table")
    p.add_argument("--ssim-range", type=float, default=255.0,
                   help="data range given to SSIM by --evaluate (default: 255, as the reference)")
    p.add_argument("--tile", type=int, default=0, metavar="SIZE",
                   help="fuse in overlapping SIZE x SIZE tiles (images larger than memory allows; "
                        "changes the result slightly, see the README); default: whole images")
    p.add_argument("--overlap", type=int, default=32, metavar="PX",
                   help="minimum overlap of neighbouring tiles with --tile (default: 32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; bfloat16 is meant for GPU/TPU (slow on CPU)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="fuse up to N consecutive same-size pairs in one call (e.g. the 640x480 "
                        "MSRS frames; pays on GPU/TPU); outputs equal N=1 up to float rounding. "
                        "With --tile pairs are fused one by one (default: 1)")
    return p


def check_folders(args) -> str | None:
    """A usage problem with the folders, or None."""
    for flag, folder in (("--ir", args.ir), ("--vi", args.vi)):
        if not folder.is_dir():
            return f"{flag} {folder} is not a folder"
    if args.out.exists() and not args.out.is_dir():
        return f"--out {args.out} exists and is not a folder"
    out = args.out.resolve()
    for flag, folder in (("--ir", args.ir), ("--vi", args.vi)):
        if out == folder.resolve():
            return f"--out is the same folder as {flag} ({folder}): refusing to write among the inputs"
    if not (args.ckpt.is_dir() or args.ckpt.is_file()):
        return f"--ckpt {args.ckpt} does not exist"
    if args.tile and (args.tile < 16 or not 0 <= args.overlap < args.tile // 2):
        return f"--tile {args.tile} --overlap {args.overlap}: need tile >= 16 and 0 <= overlap < tile/2"
    if args.batch < 1:
        return f"--batch {args.batch}: must be at least 1"
    return None


def run(args, fuser: Callable | None = None) -> int:
    problem = check_folders(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    pairs, failures = find_pairs(args.ir, args.vi)
    for f in failures:
        print(f"skipped {f.name}: {f.reason}", file=sys.stderr)
    if not pairs and not failures:
        print(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.ir} or {args.vi}",
              file=sys.stderr)
        return EXIT_SOME_FAILED
    args.out.mkdir(parents=True, exist_ok=True)

    if pairs and fuser is None:
        t0 = time.perf_counter()
        fuser = load_fuser(args.ckpt) if args.dtype == "float32" else load_fuser(args.ckpt, dtype=args.dtype)
        print(f"loaded {args.ckpt} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if pairs and args.tile:
        fuser = tiled(fuser, args.tile, args.overlap)

    fused_names, times = [], []
    bar = tqdm(total=len(pairs), desc="fusing", unit="pair", file=sys.stderr, dynamic_ncols=True)

    def failed(pair: Pair, e: PairError) -> None:
        failures.append(Failure(pair.name, str(e)))
        tqdm.write(f"failed {pair.name}: {e}", file=sys.stderr)
        bar.update(1)

    t0 = time.perf_counter()
    for batch in same_size_batches(pairs, 1 if args.tile else args.batch, failed):
        done = 0
        for loaded, fused in zip(batch, fuse_batch(fuser, batch)):
            try:
                if isinstance(fused, PairError):
                    raise fused
                write_outputs(loaded, fused, args.out, not args.no_normalize, args.save_npy)
            except PairError as e:
                failed(loaded.pair, e)
                continue
            fused_names.append(loaded.pair.name)
            done += 1
            bar.update(1)
        dt = (time.perf_counter() - t0) / len(batch)  # loading, fusion and writing, per pair
        times += [dt] * done
        bar.set_postfix_str(f"{batch[-1].pair.name}: {dt:.2f} s/pair")
        t0 = time.perf_counter()
    bar.close()

    total = len({p.name for p in pairs} | {f.name for f in failures})
    print(summary(fused_names, failures, times, total, args.out))

    if args.evaluate and fused_names:
        from infer.evaluate import evaluate_folders, format_table  # lazy: only when asked

        results, errors = evaluate_folders(args.ir, args.vi, args.out, args.ssim_range)
        print(format_table(results))
        for err in errors or ():
            print(f"evaluation: {err}", file=sys.stderr)
        if errors:
            return EXIT_SOME_FAILED
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
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
