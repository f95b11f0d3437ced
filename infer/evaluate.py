"""Evaluate fused images with the image-fusion literature's metrics.

    python -m infer.evaluate --ir DIR --vi DIR --fused DIR [--ssim-range 255|2] [--json OUT]
                             [--scale16 high|range]

Images are paired by file stem across the three folders (`smfnet_jax.imageio.match_by_stem`,
the rule fusion and patch preparation use too), read as
the reference evaluator reads them (cv2 GRAY: 0.299 R + 0.587 G + 0.114 B, rounded) and
scored with :func:`smfnet_jax.metrics.evaluate_pair`. Prints one row per image and the
mean row, columns in the papers' order (EN SD SF AG MI SCD VIF Qabf SSIM MSE CC PSNR).
``--json`` writes ``{stem: {metric: value}, "mean": {metric: value}}`` (undefined values
as null). A missing partner, an ambiguous stem, an unreadable file or images of
different sizes are named on stderr and skipped; the others are still evaluated and the
exit status is then 1. A --json that cannot be written (a folder, a missing or read-only
folder) or that is one of the images read is a usage error found before any work (exit
status 2).

Undefined values: some metrics have no value for some images (CC and SCD of a constant
image, PSNR of an all-black fused image or of one equal to both sources, ...; see
`smfnet_jax.metrics.undefined_reasons`). Such a value shows as ``n/a`` in its row and null
in the JSON, is named on stderr with the reason (``warning: STEM: CC undefined: ...``), and
is left out of the mean: a mean over fewer images than the table holds shows its count,
``0.6123 (2 of 3)``. The exit status is then 3 (when nothing was skipped: 1 wins).

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

from infer.common import (EXIT_OK, EXIT_SOME_FAILED, EXIT_UNDEFINED, EXIT_USAGE, GRID_SUFFIX,
                          add_scale16_argument, json_out_problem, plain_warnings)
from smfnet_jax.cli import Progress, input_images, program_name
from smfnet_jax.fileio import atomic_write_json
from smfnet_jax.imageio import IMAGE_EXTENSIONS, match_by_stem, natural_key, read_gray
from smfnet_jax.metrics import METRIC_NAMES, evaluate_pair, undefined_reasons

MEAN_KEY = "mean"
NOT_AVAILABLE = "n/a"  # an undefined value's cell in the table


class Results(Dict[str, Dict[str, float]]):
    """stem -> {metric: value}; ``undefined`` maps stem -> {metric: why} for every value that
    is NaN or infinite (kept as computed, the reference's number)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.undefined: Dict[str, Dict[str, str]] = {}


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
    return _score_triplet(ir_path, vi_path, fused_path, ssim_range, scale16)[0]


def _score_triplet(ir_path, vi_path, fused_path, ssim_range, scale16):
    """evaluate_triplet's metrics, and why each undefined one is undefined."""
    ir = read_gray(ir_path, scale16)
    vi = read_gray(vi_path, scale16)
    fused = read_gray(fused_path)
    if not ir.shape == vi.shape == fused.shape:
        size = lambda a: f"{a.shape[1]}x{a.shape[0]}"  # noqa: E731
        raise ValueError(f"sizes differ (WxH): {ir_path} is {size(ir)}, {vi_path} is "
                         f"{size(vi)}, {fused_path} is {size(fused)}")
    try:
        metrics = evaluate_pair(fused, ir, vi, ssim_range=ssim_range)
    except ValueError as e:
        raise ValueError(f"{fused_path}: {e}") from e
    return metrics, undefined_reasons(metrics, fused, ir, vi, ("the fused image", "ir", "vi"))


def evaluate_folders(ir_dir, vi_dir, fused_dir, ssim_range: float = 255.0, workers: int = 2,
                     progress: bool = True, scale16: str = "high") -> Tuple[Results, List[str]]:
    """Evaluate every stem present in the three folders.

    Returns ``(results, errors)``: results maps stem -> {metric: value} in natural stem
    order (metric names in :data:`METRIC_NAMES` order), a :class:`Results` whose
    ``undefined`` says why each NaN / infinite value is undefined; errors is a list of
    messages, "stem: reason", for every stem that was skipped. ``workers`` pairs are read and
    scored at once in threads (numpy releases the GIL in its array loops).
    """
    triplets, problems = _match_triplets(ir_dir, vi_dir, fused_dir)
    results = Results()
    bar = Progress(len(triplets), "evaluating", "pair", enabled=progress)

    def job(t):
        stem, ir_p, vi_p, fu_p = t
        try:
            return stem, _score_triplet(ir_p, vi_p, fu_p, ssim_range, scale16), None
        except ValueError as e:  # ImageReadError, size mismatch, image too small
            return stem, None, str(e)

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for stem, scored, reason in pool.map(job, triplets):  # map keeps the stem order
            if reason is None:
                results[stem], undefined = scored
                if undefined:
                    results.undefined[stem] = undefined
            else:
                problems.append((stem, reason))
                bar.write(f"skipped {stem}: {reason}")
            bar.update(1)
    bar.close()
    return results, _sorted_messages(problems)


def defined_counts(results: Dict[str, Dict[str, float]]) -> Dict[str, int]:
    """For each metric, how many images have a defined (finite) value."""
    return {name: sum(math.isfinite(r[name]) for r in results.values()) for name in METRIC_NAMES}


def mean_metrics(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Mean of each metric over the images where it is defined (finite); NaN when it is
    defined for none."""
    out = {}
    for name in METRIC_NAMES:
        values = [r[name] for r in results.values() if math.isfinite(r[name])]
        out[name] = float(np.mean(values)) if values else float("nan")
    return out


def undefined_values(results: Dict[str, Dict[str, float]]) -> List[Tuple[str, str, str]]:
    """(stem, metric, why) for every undefined value, in table order. The reasons come from
    a :class:`Results`; a plain dict gets a generic one."""
    known = getattr(results, "undefined", {})
    return [(stem, name, known.get(stem, {}).get(name, f"not a finite number ({m[name]})"))
            for stem, m in results.items() for name in METRIC_NAMES
            if not math.isfinite(m[name])]


def undefined_lines(results: Dict[str, Dict[str, float]]) -> List[str]:
    """One line per undefined value, naming the image, the metric and why."""
    return [f"{stem}: {name} undefined: {why}; left out of the mean"
            for stem, name, why in undefined_values(results)]


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else NOT_AVAILABLE


def format_table(results: Dict[str, Dict[str, float]]) -> str:
    """Per-image rows and the mean row, 4 decimals, columns in the papers' order. An
    undefined value shows as n/a; a mean over fewer images than the rows shows its count."""
    header = ["image"] + list(METRIC_NAMES)
    rows = [[stem] + [_fmt(m[name]) for name in METRIC_NAMES] for stem, m in results.items()]
    mean_row = []
    if results:
        mean, counts, n = mean_metrics(results), defined_counts(results), len(results)
        mean_row = [f"{MEAN_KEY} ({n})"] + [
            _fmt(mean[name]) + ("" if counts[name] == n else f" ({counts[name]} of {n})")
            for name in METRIC_NAMES]
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


def results_to_json(results: Dict[str, Dict[str, float]]) -> dict:
    """``{stem: {metric: value}, "mean": {metric: value}}``, undefined (non-finite) values as
    None; each mean is over the images where the metric is defined."""
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
               "of the CDDFuse tables. An undefined value (e.g. CC of a constant image) shows "
               "as n/a, is named on stderr with the reason and left out of the mean, whose "
               "count is then shown. Exit status: 0 all evaluated, 1 some skipped, 2 usage, "
               "3 all evaluated but some value undefined.")
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
    undefined = undefined_lines(results)
    for line in undefined:
        print(f"warning: {line}", file=sys.stderr)
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
          f"(SSIM data range {args.ssim_range:g})"
          + (f"; {len(undefined)} value(s) undefined" if undefined else ""), file=sys.stderr)
    return exit_status(results, errors)


def exit_status(results: Dict[str, Dict[str, float]], errors: Sequence[str]) -> int:
    """1 when an image was skipped (or none evaluated), else 3 when a value is undefined,
    else 0: the status of infer.evaluate, and of infer.main --evaluate's scoring."""
    if errors or not results:
        return EXIT_SOME_FAILED
    return EXIT_UNDEFINED if undefined_values(results) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
