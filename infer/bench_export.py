"""Export, load and fusion times of the exported formats against the checkpoint path.

    python -m infer.bench_export --ckpt CKPT [--formats jaxexport,onnx] [--size 480x640]

Exports CKPT with `infer.export` (each in its own process, timed whole), then for the
checkpoint and each file: `load_fuser`, a first fusion of a random pair of the size (with
compilation; the persistent cache is off) and a second one, and the largest difference from
the checkpoint path's output. `.onnx` needs the [onnx] extra.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from smfnet_jax.cli import program_name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program_name("infer.bench_export"), description=__doc__.split("\n\n")[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path, help="the checkpoint to export (.pth, orbax, workdir)")
    p.add_argument("--formats", default="jaxexport,onnx", help="comma-separated: jaxexport, onnx")
    p.add_argument("--size", default="480x640", metavar="HxW", help="fusion size (default 480x640)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pair")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"error: --size {args.size}: expected HxW", file=sys.stderr)
        return 2
    from smfnet_jax.api import load_fuser

    rng = np.random.default_rng(args.seed)
    ir, vi = rng.random((2, h, w), dtype=np.float32)
    paths = {"checkpoint": args.ckpt}
    with tempfile.TemporaryDirectory(prefix="smfnet-bench-export-") as tmp:
        for fmt in (f.strip() for f in args.formats.split(",") if f.strip()):
            out = Path(tmp) / f"smfnet.{fmt}"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "infer.export", "--ckpt", str(args.ckpt), "--out", str(out)],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{fmt}: export failed: {r.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            print(f"{fmt}: export {time.perf_counter() - t0:.1f} s (whole CLI), {out.stat().st_size / 2**20:.1f} MB")
            paths[fmt] = out
        reference = None
        for name, path in paths.items():
            t0 = time.perf_counter()
            fuser = load_fuser(path, cache=False)
            t1 = time.perf_counter()
            first = fuser(ir, vi)
            t2 = time.perf_counter()
            fuser(ir, vi)
            t3 = time.perf_counter()
            reference = first if reference is None else reference
            print(f"{name}: load {t1 - t0:.2f} s, first fusion {h}x{w} (compiling) {t2 - t1:.1f} s, "
                  f"second {t3 - t2:.1f} s, max abs vs the checkpoint {np.abs(first - reference).max():.2e}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
