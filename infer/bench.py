"""Benchmark SMFNet fusion: compile time, speed, FLOP rate and peak memory per image size.

    python -m infer.bench --ckpt FILE.pth|DIR [--sizes 128x128,256x256,480x640] [--repeats 3]
                          [--dtype float32|bfloat16] [--precision P] [--json OUT] [--tile T --overlap P]

Sizes are HxW. Every size runs in a fresh subprocess, so each peak RSS is that size's own
(it includes importing JAX and compiling). Per size:

- compile_s: tracing + XLA compilation of the fusion for that shape (with the persistent
  compilation cache on, a second run of the benchmark loads it instead: see cache_dir);
- seconds_per_pair: median wall time of --repeats fusions after one warm-up run, numpy in,
  numpy out (cpu_s_per_pair: the process's CPU time for the same, summed over threads);
- pixels_per_s: H*W / seconds_per_pair;
- gflop_per_pair and gflops (achieved GFLOP/s): FLOPs from XLA's cost analysis of the
  compiled fusion (`flops_source`); with --tile, per-tile FLOPs times the number of tiles;
- peak_rss_mb: the subprocess's maximum resident set size (ru_maxrss); on GPU/TPU also
  peak_device_mb, the device's peak memory in use (`memory_stats()`).

Inputs are seeded uniform noise; the model's speed does not depend on the values. With
--tile, the pair is fused by `smfnet_jax.inference.fuse_tiled` (bounded memory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from infer.common import json_out_problem
from smfnet_jax.policy import DTYPES, IMPL_ENV, IMPL_HELP, PRECISION_HELP, PRECISIONS, resolve
from smfnet_jax.cli import exit_on_environment_error, parse_sizes
from smfnet_jax.fileio import atomic_write_json

KEYS = ("compile_s", "seconds_per_pair", "pixels_per_s", "gflops", "peak_rss_mb")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m infer.bench",
        description="Time SMFNet fusion per image size (each size in a fresh subprocess).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python -m infer.bench --ckpt models/model_VIF.pth "
               "--sizes 128x128,480x640 --json bench.json. " + IMPL_HELP)
    p.add_argument("--ckpt", required=True, type=Path,
                   help="reference .pth file, converted orbax directory or training workdir")
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("128x128,256x256,480x640"),
                   help="comma-separated HxW sizes (default: 128x128,256x256,480x640)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per size after one warm-up run; the median is reported (default 3)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype (bfloat16 is meant for GPU/TPU; output is float32)")
    p.add_argument("--precision", choices=PRECISIONS, default="highest", help=PRECISION_HELP)
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    p.add_argument("--tile", type=int, default=None,
                   help="fuse by tiles of this size (smfnet_jax.inference.fuse_tiled)")
    p.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels (default 32)")
    p.add_argument("--no-cache", action="store_true",
                   help="disable the persistent compilation cache (measures a cold compile)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input pair")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one size, in-process
    return p


def _rss_peak_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def run_one(args, h: int, w: int) -> dict:
    """Measure one size in this process (the worker side)."""
    import numpy as np

    t_start = time.perf_counter()
    from smfnet_jax.inference import fuse_tiled, tile_starts
    from smfnet_jax.runtime import (configure_xla_cpu, describe_platform, device_peak_memory_mb,
                                    enable_compilation_cache)
    configure_xla_cpu()
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from smfnet_jax.api import load_fuser

    cache_dir = None if args.no_cache else enable_compilation_cache()
    if args.no_cache:
        jax.config.update("jax_enable_compilation_cache", False)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    fuser = load_fuser(args.ckpt, cache=False,
                       policy=resolve(None, precision=args.precision, dtype=args.dtype))
    load_s = time.perf_counter() - t_start
    rss_loaded = _rss_peak_mb()

    if args.tile:
        th, tw = min(args.tile, h), min(args.tile, w)
        n_tiles = len(tile_starts(h, th, args.overlap)) * len(tile_starts(w, tw, args.overlap))
    else:
        th, tw, n_tiles = h, w, 1
    t0 = time.perf_counter()
    fn = fuser.compile(th, tw)
    compile_s = time.perf_counter() - t0
    flops = _flops(fn.compiled)
    # `SMFNet.fuse` runs the shared encoder in a 2-step loop, and XLA's cost analysis counts
    # a loop body once: add one more encoder pass, costed on its own.
    gd, st = nnx.split(fuser.model.encoder)
    enc = jax.jit(lambda st, x: nnx.merge(gd, st)(x)).lower(
        st, jax.ShapeDtypeStruct((1, th, tw, 1), dtype)).compile()
    flops += _flops(enc)
    flops *= n_tiles

    rng = np.random.default_rng(args.seed)
    ir = rng.random((h, w), dtype=np.float32)
    vi = rng.random((h, w), dtype=np.float32)
    if args.tile:
        def fuse():
            return fuse_tiled(fn, ir, vi, tile=args.tile, overlap=args.overlap)
    else:
        def fuse():
            return fn(ir, vi)

    t0 = time.perf_counter()
    out = fuse()
    first_s = time.perf_counter() - t0
    if out.shape != (h, w) or not np.all(np.isfinite(out)):
        raise RuntimeError(f"fusion of a {h}x{w} pair gave shape {out.shape} or non-finite values")
    times, cpus = [], []
    for _ in range(max(1, args.repeats)):
        c0, t0 = _cpu_s(), time.perf_counter()
        fuse()
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu_s() - c0)
    sec = float(np.median(times))
    return {
        "compile_s": compile_s,
        "seconds_per_pair": sec,
        "pixels_per_s": h * w / sec,
        "gflops": flops / sec / 1e9,
        "gflop_per_pair": flops / 1e9,
        "flops_source": "xla_cost_analysis (+1 encoder pass for the loop)"
                        + (" x tiles" if args.tile else ""),
        "peak_rss_mb": _rss_peak_mb(),
        "rss_after_load_mb": rss_loaded,
        "first_run_s": first_s,
        "times_s": times,
        "cpu_s_per_pair": float(np.median(cpus)),
        "load_s": load_s,
        "repeats": len(times),
        "dtype": args.dtype,
        "precision": args.precision,
        "tile": args.tile, "overlap": args.overlap if args.tile else None, "n_tiles": n_tiles,
        "cache_dir": str(cache_dir) if cache_dir else None,
        **describe_platform(),
        "peak_device_mb": device_peak_memory_mb(),
        "cpu_count": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _worker_argv(args, size: str) -> list[str]:
    argv = [sys.executable, "-m", "infer.bench", "--ckpt", str(args.ckpt), "--sizes", size,
            "--repeats", str(args.repeats), "--dtype", args.dtype, "--precision", args.precision,
            "--seed", str(args.seed),
            "--overlap", str(args.overlap), "--worker", size]
    if args.tile:
        argv += ["--tile", str(args.tile)]
    if args.no_cache:
        argv.append("--no-cache")
    return argv


def format_table(results: dict) -> str:
    head = (f"{'size':>11} {'compile s':>9} {'s/pair':>8} {'Mpix/s':>7} {'GFLOP/pair':>10} "
            f"{'GFLOP/s':>8} {'peak RSS MB':>11} {'device MB':>9}")
    rows = [head, "-" * len(head)]
    for size, r in results.items():
        if "error" in r:
            rows.append(f"{size:>11}  error: {r['error']}")
            continue
        rows.append(f"{size:>11} {r['compile_s']:9.2f} {r['seconds_per_pair']:8.3f} "
                    f"{r['pixels_per_s'] / 1e6:7.3f} {r['gflop_per_pair']:10.1f} {r['gflops']:8.1f} "
                    f"{r['peak_rss_mb']:11.0f} {_mb(r.get('peak_device_mb')):>9}")
    return "\n".join(rows)


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_environment_error()
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    if args.tile is not None and (args.tile < 1 or not 0 <= args.overlap < args.tile):
        print("error: need --tile >= 1 and 0 <= --overlap < --tile", file=sys.stderr)
        return 2
    if not args.ckpt.exists():
        print(f"error: checkpoint {args.ckpt}: no such file or directory", file=sys.stderr)
        return 2
    problem = args.json is not None and json_out_problem(
        args.json, inputs={args.ckpt: "the --ckpt checkpoint"})
    if problem:  # before any work: a bad --json must not cost the whole benchmark
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.worker:
        h, w = parse_sizes(args.worker)[0]
        print("BENCH_RESULT " + json.dumps(run_one(args, h, w)), flush=True)
        return 0

    from tqdm import tqdm
    print(f"infer.bench: {resolve(None, precision=args.precision, dtype=args.dtype).describe()}; "
          f"checkpoint {args.ckpt}", flush=True)
    results = {}
    failed = False
    for h, w in tqdm(args.sizes, desc="sizes", unit="size", disable=None):  # bar on a tty only
        size = f"{h}x{w}"
        proc = subprocess.run(_worker_argv(args, size), capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            results[size] = {"error": f"worker exited with {proc.returncode}: {tail[0]}"}
            failed = True
        else:
            results[size] = json.loads(line[len("BENCH_RESULT "):])
    print(format_table(results))
    if results and not failed:
        r0 = next(iter(results.values()))
        print(f"device: {r0['device']} ({r0['platform']}, {r0['cpu_count']} CPUs), routines "
              f"{r0['impl']} ({IMPL_ENV}), dtype {r0['dtype']}, precision {r0['precision']}, "
              f"FLOPs from {r0['flops_source']}, cache {r0['cache_dir']}")
    if args.json:
        atomic_write_json(args.json, results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
