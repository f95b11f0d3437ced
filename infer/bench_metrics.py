"""Benchmark: seconds per image pair to compute all twelve fusion metrics.

    python -m infer.bench_metrics --data DATA/TNO [--fused DIR] [--repeat 3] [--json OUT]

Reads every (ir, vi) pair of ``DATA/ir`` and ``DATA/vi`` (or ``--ir``/``--vi``) once,
then times :func:`smfnet_jax.metrics.evaluate_pair` on each: with the images of
``--fused`` if given, otherwise with the pixel-wise maximum of the two sources as the
fused image. File reading is not timed. Reported: the mean, median, min and max seconds
per pair over one pass (the fastest of ``--repeat`` passes for each pair), and the
wall-clock seconds per pair of ``infer.evaluate``'s threaded folder loop (reading
included) with ``--workers`` threads when ``--folder-workers`` is given.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from infer.common import json_out_problem
from infer.evaluate import write_json_atomic
from smfnet_jax.cli import input_images
from smfnet_jax.imageio import match_by_stem, read_gray
from smfnet_jax.metrics import evaluate_pair


def load_pairs(ir_dir: Path, vi_dir: Path, fused_dir: Path | None):
    folders = {"ir": ir_dir, "vi": vi_dir} | ({"fused": fused_dir} if fused_dir is not None else {})
    pairs = []
    for stem, paths in match_by_stem(folders)[0]:
        a, b = read_gray(paths["ir"]), read_gray(paths["vi"])
        f = read_gray(paths["fused"]) if fused_dir is not None else np.maximum(a, b)
        pairs.append((stem, f, a, b))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m infer.bench_metrics",
        description="Time all twelve fusion metrics (EN ... PSNR) per image pair.")
    p.add_argument("--data", type=Path, help="folder holding ir/ and vi/ (e.g. the TNO test set)")
    p.add_argument("--ir", type=Path, help="infrared folder (instead of --data)")
    p.add_argument("--vi", type=Path, help="visible folder (instead of --data)")
    p.add_argument("--fused", type=Path,
                   help="fused images (default: max(ir, vi) computed on the fly)")
    p.add_argument("--ssim-range", type=float, default=255.0, help="SSIM data range (default 255)")
    p.add_argument("--repeat", type=int, default=3,
                   help="passes over the pairs; each pair's fastest pass counts (default 3)")
    p.add_argument("--folder-workers", type=int, default=0, metavar="N",
                   help="also time infer.evaluate's folder loop with N threads (needs --fused)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the timings to this JSON file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ir_dir = args.ir or (args.data / "ir" if args.data else None)
    vi_dir = args.vi or (args.data / "vi" if args.data else None)
    if ir_dir is None or vi_dir is None:
        print("error: give --data DIR (with ir/ and vi/) or both --ir and --vi", file=sys.stderr)
        return 2
    for folder in (ir_dir, vi_dir, args.fused):
        if folder is not None and not folder.is_dir():
            print(f"error: {folder}: not a folder", file=sys.stderr)
            return 2
    problem = args.json is not None and json_out_problem(
        args.json, inputs=input_images(*(f for f in (ir_dir, vi_dir, args.fused) if f is not None)))
    if problem:  # before any work: a bad --json must not cost the timings
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.folder_workers and args.fused is None:
        print("error: --folder-workers needs --fused (the folder loop reads fused files)",
              file=sys.stderr)
        return 2

    pairs = load_pairs(ir_dir, vi_dir, args.fused)
    if not pairs:
        print("error: no image pairs found", file=sys.stderr)
        return 1
    evaluate_pair(*pairs[0][1:], ssim_range=args.ssim_range)  # warm-up (imports, caches)

    best = {stem: float("inf") for stem, *_ in pairs}
    for _ in tqdm(range(max(1, args.repeat)), desc="passes", file=sys.stderr, disable=None):
        for stem, f, a, b in pairs:
            t0 = time.perf_counter()
            evaluate_pair(f, a, b, ssim_range=args.ssim_range)
            best[stem] = min(best[stem], time.perf_counter() - t0)
    times = list(best.values())
    pixels = [f.size for _, f, _, _ in pairs]
    report = {
        "pairs": len(pairs),
        "fused": str(args.fused) if args.fused else "max(ir, vi)",
        "mean_pixels": float(np.mean(pixels)),
        "seconds_per_pair_mean": statistics.fmean(times),
        "seconds_per_pair_median": statistics.median(times),
        "seconds_per_pair_min": min(times),
        "seconds_per_pair_max": max(times),
        "repeat": args.repeat,
        "per_pair": best,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "numpy": np.__version__,
    }
    print(f"{len(pairs)} pairs, mean {report['mean_pixels'] / 1e3:.0f} kpixels: "
          f"{report['seconds_per_pair_mean']:.3f} s per pair for all 12 metrics "
          f"(median {report['seconds_per_pair_median']:.3f}, min {min(times):.3f}, "
          f"max {max(times):.3f}; best of {args.repeat} passes, single thread, reading excluded)")

    if args.folder_workers:
        from infer.evaluate import evaluate_folders

        t0 = time.perf_counter()
        results, errors = evaluate_folders(ir_dir, vi_dir, args.fused, args.ssim_range,
                                           workers=args.folder_workers, progress=False)
        wall = time.perf_counter() - t0
        n = max(1, len(results))
        report["folder_workers"] = args.folder_workers
        report["folder_seconds_per_pair"] = wall / n
        print(f"infer.evaluate folder loop, {args.folder_workers} threads, reading included: "
              f"{wall / n:.3f} s per pair ({len(results)} pairs, {len(errors)} skipped)")

    if args.json is not None:
        write_json_atomic(args.json, report)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
