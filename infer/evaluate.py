"""Evaluate fused images with the image-fusion literature's metrics.

    python -m infer.evaluate --ir DIR --vi DIR --fused DIR [--ssim-range 255|2] [--json OUT]
                             [--scale16 high|range]

Images are paired by file stem across the three folders (`smfnet_jax.imageio.match_by_stem`,
the rule fusion and patch preparation use too), read as
the reference evaluator reads them (cv2 GRAY: 0.299 R + 0.587 G + 0.114 B, rounded) and
scored with :func:`smfnet_jax.metrics.evaluate_pair`. Prints one row per image and the
mean row, columns in the papers' order (EN SD SF AG MI SCD VIF Qabf SSIM MSE CC PSNR).
``--json`` writes ``{stem: {metric: value}, "mean": {metric: value}}`` (non-finite
values as null). A missing partner, an ambiguous stem, an unreadable file or images of
different sizes are named on stderr and skipped; the others are still evaluated and the
exit status is then 1. A --json that cannot be written (a folder, a missing or read-only
folder) or that is one of the images read is a usage error found before any work (exit
status 2).

``evaluate_folders`` and ``format_table`` are reused by ``python -m infer.main --evaluate``.
"""
from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from infer.common import (EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, GRID_SUFFIX, add_scale16_argument,
                          json_out_problem, plain_warnings)
from smfnet_jax.cli import Progress, input_images, program_name
from smfnet_jax.fileio import atomic_write_json
from smfnet_jax.imageio import IMAGE_EXTENSIONS, match_by_stem, natural_key, read_gray
from smfnet_jax.metrics import METRIC_NAMES, evaluate_pair

MEAN_KEY = "mean"
Results = Dict[str, Dict[str, float]]


def _sorted_messages(problems: List[Tuple[str, str]]) -> List[str]:
    return [f"{stem}: {reason}" for stem, reason in sorted(problems, key=lambda p: natural_key(p[0]))]


def _match_triplets(ir_dir, vi_dir, fused_dir):
    """(stem, ir, vi, fused) for every stem present once in all three folders, and
    (stem, reason) for every stem found in some folder but not usable (missing from another,
    ambiguous, or the reserved name "mean"), the reason naming the file(s)."""
    matches, problems = match_by_stem({"ir": Path(ir_dir), "vi": Path(vi_dir), "fused": Path(fused_dir)})
    # infer.main --grid writes NAME_grid.png beside NAME.png: ours, not a fused image to score
    stems = {stem for stem, _ in matches}
    problems = [(stem, why) for stem, why in problems
                if not (stem.endswith(GRID_SUFFIX) and stem[:-len(GRID_SUFFIX)] in stems)]
    triplets = []
    for stem, paths in matches:
        if stem == MEAN_KEY:
            problems.append((stem, f"the name '{MEAN_KEY}' is reserved for the mean row, "
                                   f"rename {paths['fused']}"))
        else:
            triplets.append((stem, paths["ir"], paths["vi"], paths["fused"]))
    return triplets, problems


def evaluate_triplet(ir_path: Path, vi_path: Path, fused_path: Path,
                     ssim_range: float = 255.0, scale16: str = "high") -> Dict[str, float]:
    """Read the three files as cv2 GRAY and return the twelve metrics.

    scale16: how 16-bit sources become 8-bit (`smfnet_jax.imageio.reduce16`).
    Raises ValueError (ImageReadError included) with a message naming the file(s).
    """
    ir = read_gray(ir_path, scale16)
    vi = read_gray(vi_path, scale16)
    fused = read_gray(fused_path)
    if not ir.shape == vi.shape == fused.shape:
        size = lambda a: f"{a.shape[1]}x{a.shape[0]}"  # noqa: E731
        raise ValueError(f"sizes differ (WxH): {ir_path} is {size(ir)}, {vi_path} is "
                         f"{size(vi)}, {fused_path} is {size(fused)}")
    try:
        return evaluate_pair(fused, ir, vi, ssim_range=ssim_range)
    except ValueError as e:
        raise ValueError(f"{fused_path}: {e}") from e


def evaluate_folders(ir_dir, vi_dir, fused_dir, ssim_range: float = 255.0, workers: int = 2,
                     progress: bool = True, scale16: str = "high") -> Tuple[Results, List[str]]:
    """Evaluate every stem present in the three folders.

    Returns ``(results, errors)``: results maps stem -> {metric: value} in natural stem
    order (metric names in :data:`METRIC_NAMES` order); errors is a list of messages,
    "stem: reason", for every stem that was skipped. ``workers`` pairs are read and
    scored at once in threads (numpy releases the GIL in its array loops).
    """
    triplets, problems = _match_triplets(ir_dir, vi_dir, fused_dir)
    results: Results = {}
    bar = Progress(len(triplets), "evaluating", "pair", enabled=progress)

    def job(t):
        stem, ir_p, vi_p, fu_p = t
        try:
            return stem, evaluate_triplet(ir_p, vi_p, fu_p, ssim_range, scale16), None
        except ValueError as e:  # ImageReadError, size mismatch, image too small
            return stem, None, str(e)

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for stem, metrics, reason in pool.map(job, triplets):  # map keeps the stem order
            if reason is None:
                results[stem] = metrics
            else:
                problems.append((stem, reason))
                bar.write(f"skipped {stem}: {reason}")
            bar.update(1)
    bar.close()
    return results, _sorted_messages(problems)


def mean_metrics(results: Results) -> Dict[str, float]:
    """Mean of each metric over the evaluated images (NaN when there are none)."""
    return {name: (float(np.mean([r[name] for r in results.values()])) if results
                   else float("nan")) for name in METRIC_NAMES}


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def format_table(results: Results) -> str:
    """Per-image rows and the mean row, 4 decimals, columns in the papers' order."""
    header = ["image"] + list(METRIC_NAMES)
    rows = [[stem] + [_fmt(m[name]) for name in METRIC_NAMES] for stem, m in results.items()]
    mean_row = []
    if results:
        mean = mean_metrics(results)
        mean_row = [f"{MEAN_KEY} ({len(results)})"] + [_fmt(mean[name]) for name in METRIC_NAMES]
    widths = [max(len(r[i]) for r in [header, *rows] + ([mean_row] if mean_row else []))
              for i in range(len(header))]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])

    out = [line(header)] + [line(r) for r in rows]
    if mean_row:
        out += ["-" * len(out[0]), line(mean_row)]
    return "\n".join(out)


def _json_value(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None


def results_to_json(results: Results) -> dict:
    """``{stem: {metric: value}, "mean": {metric: value}}``, non-finite values as None."""
    doc = {stem: {k: _json_value(v) for k, v in m.items()} for stem, m in results.items()}
    doc[MEAN_KEY] = {k: _json_value(v) for k, v in mean_metrics(results).items()}
    return doc


def write_json_atomic(path, doc: dict) -> Path:
    """Write the metrics JSON atomically (NaN written as null by results_to_json)."""
    return atomic_write_json(path, doc, allow_nan=False)


def _ssim_range(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name("infer.evaluate"),
        description="Score fused images with EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, MSE, "
                    "CC and PSNR exactly as the CDDFuse/SMFNet Evaluator.py defines them. "
                    "Images are matched by file name stem across the three folders.",
        epilog="SSIM is ssim(F, ir) + ssim(F, vi). --ssim-range 255 (default) is correct for "
               "0..255 grey levels and matches SMFNet's metrics.py; --ssim-range 2 reproduces "
               "what scikit-image <= 0.19 used silently for float images, i.e. the SSIM column "
               "of the CDDFuse tables. Exit status: 0 all evaluated, 1 some skipped, 2 usage.")
    p.add_argument("--ir", required=True, type=Path, help="folder of infrared (first source) images")
    p.add_argument("--vi", required=True, type=Path, help="folder of visible (second source) images")
    p.add_argument("--fused", required=True, type=Path, help="folder of fused images")
    p.add_argument("--ssim-range", type=_ssim_range, default=255.0, metavar="R",
                   help="SSIM data range: 255 (default) or 2 (CDDFuse tables' convention)")
    p.add_argument("--json", type=Path, metavar="OUT",
                   help="also write the per-image and mean values to this JSON file")
    p.add_argument("--workers", type=int, default=2,
                   help="pairs evaluated at once in threads (default: 2)")
    add_scale16_argument(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("ir", "vi", "fused"):
        folder = getattr(args, flag)
        if not folder.is_dir():
            print(f"error: --{flag} {folder}: not a folder", file=sys.stderr)
            return EXIT_USAGE
    problem = args.json is not None and json_out_problem(
        args.json, inputs=input_images(args.ir, args.vi, args.fused))
    if problem:  # before any work: a bad --json must not cost a whole evaluation
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return EXIT_USAGE

    with plain_warnings():
        results, errors = evaluate_folders(args.ir, args.vi, args.fused, args.ssim_range,
                                           workers=args.workers, scale16=args.scale16)
    if results:
        print(format_table(results))
    if args.json is not None:
        try:
            write_json_atomic(args.json, results_to_json(results))
        except OSError as e:  # e.g. the folder went away during the evaluation
            print(f"error: cannot write --json {args.json}: {e}", file=sys.stderr)
            return EXIT_SOME_FAILED
        print(f"wrote {args.json}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} skipped:", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
    if not results and not errors:
        print(f"error: no images ({', '.join(IMAGE_EXTENSIONS)}) in {args.fused}", file=sys.stderr)
        return EXIT_SOME_FAILED
    print(f"evaluated {len(results)} of {len(results) + len(errors)} images "
          f"(SSIM data range {args.ssim_range:g})", file=sys.stderr)
    return EXIT_SOME_FAILED if errors or not results else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
