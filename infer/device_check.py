"""Check and time SMFNet on whatever backend JAX has (CPU, GPU, TPU), in one command.

    python -m infer.device_check [--quick] [--json OUT] [--fixtures DIR]

Prints one table:
- parity: the fixture checkpoint's eval outputs against the PyTorch reference's (max error
  per output, relative to max(1, |reference|); the tests hold each to 1e-5), with the
  routines in force ($SMFNET_JAX_IMPL);
- fusion: seconds per pair at 128x128, 480x640 and 1024x1024, float32 and bfloat16;
- train: the phase-II step at batch 6, 128x128 (samples/s, peak host and device memory), once
  with each of the two routine sets (`cpu`, `xla`), each in its own process.
--quick: fusion at 128x128 only and the train step at batch 2, 32x32 (a few minutes on a
2-core CPU; CI runs it). The fixtures come from --fixtures or $SMFNET_SHARED/fixtures/parity;
without them the parity rows are skipped and timing uses a freshly initialised model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smfnet_jax.policy import IMPL_ENV, IMPL_HELP

ROOT = Path(__file__).resolve().parent.parent


FIXTURE_FILES = ("reference.npz", "smfnet_random_init.pth")


def _fixtures(arg: Path | None) -> Path | None:
    if arg is not None:
        return arg
    shared = os.environ.get("SMFNET_SHARED")
    return Path(shared) / "fixtures" / "parity" if shared else None


def parity_rows(folder: Path) -> list[dict]:
    import numpy as np
    from flax import nnx
    from smfnet_jax.checkpoint import load_pth_model
    from smfnet_jax.parity import REFERENCE_PHASE1, REFERENCE_PHASE2, nhwc, relative_error
    from smfnet_jax.runtime import describe_platform

    with np.load(folder / "reference.npz") as z:
        ref = {k: z[k] for k in z.files}
    model = load_pth_model(folder / "smfnet_random_init.pth").model
    model.eval()
    vi, ir = nhwc(ref["vi"]), nhwc(ref["ir"])
    outputs = {2: nnx.jit(lambda m, a, b: m.phase2(a, b))(model, vi, ir),
               1: nnx.jit(lambda m, a, b: m.phase1(a, b))(model, vi, ir)}
    impl = describe_platform()["impl"]
    rows = []
    for phase, table in ((2, REFERENCE_PHASE2), (1, REFERENCE_PHASE1)):
        for name, key in table.items():
            rows.append({"check": "parity", "setting": f"{name} ({impl})",
                         "value": relative_error(outputs[phase][key], nhwc(ref[name])),
                         "unit": "max rel. error"})
    return rows


def fusion_rows(model, sizes, dtypes, repeats: int) -> list[dict]:
    import jax.numpy as jnp
    import numpy as np
    from smfnet_jax.api import Fuser

    rows = []
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        fuser = Fuser(model, dtype=jnp.dtype(dtype))
        for h, w in sizes:
            t0 = time.perf_counter()
            fn = fuser.compile(h, w)
            compile_s = time.perf_counter() - t0
            ir, vi = (rng.random((h, w), dtype=np.float32) for _ in range(2))
            fn(ir, vi)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(ir, vi)
                times.append(time.perf_counter() - t0)
            rows.append({"check": "fusion", "setting": f"{h}x{w} {dtype}",
                         "value": float(np.median(times)), "unit": "s/pair",
                         "compile_s": compile_s})
    return rows


def train_rows(batch: int, size: int, steps: int) -> list[dict]:
    rows = []
    for impl in ("cpu", "xla"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "train.json"
            cmd = [sys.executable, "-m", "train.bench", "--phase", "2", "--batch", str(batch),
                   "--size", str(size), "--steps", str(steps), "--json", str(out)]
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                               env={**os.environ, IMPL_ENV: impl})
            setting = f"phase II b{batch} {size}x{size} {impl}"
            if r.returncode != 0 or not out.exists():
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                rows.append({"check": "train", "setting": setting, "value": None,
                             "unit": "samples/s", "error": tail[0]})
                continue
            m = json.loads(out.read_text())
        rows.append({"check": "train", "setting": setting, "value": m["samples_per_s"],
                     "unit": "samples/s", "peak_rss_mb": m["peak_rss_mb"],
                     "peak_device_mb": m["peak_device_mb"], "microbatches": m["microbatches"]})
    return rows


def format_rows(rows: list[dict], header: str) -> str:
    lines = [header, f"{'check':<7} {'setting':<34} {'value':>12}  unit / notes", "-" * 78]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        notes = [r["unit"]]
        if r.get("compile_s") is not None:
            notes.append(f"compile {r['compile_s']:.1f} s")
        if r.get("peak_rss_mb") is not None:
            notes.append(f"peak RSS {r['peak_rss_mb']:.0f} MB")
        if r.get("peak_device_mb") is not None:
            notes.append(f"peak device {r['peak_device_mb']:.0f} MB")
        if r.get("microbatches") is not None:
            notes.append(f"{r['microbatches']} micro-batch(es)")
        if r.get("error"):
            notes.append(f"error: {r['error']}")
        lines.append(f"{r['check']:<7} {r['setting']:<34} {value:>12}  {', '.join(notes)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.device_check", description=__doc__,
                                epilog=IMPL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes only (CI)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--fixtures", type=Path, default=None,
                   help="folder with smfnet_random_init.pth and reference.npz "
                        "(default: $SMFNET_SHARED/fixtures/parity)")
    args = p.parse_args(argv)
    folder = _fixtures(args.fixtures)
    if args.json is not None:
        from infer.common import json_out_problem
        inputs = {} if folder is None else {folder / n: "the fixture" for n in FIXTURE_FILES}
        problem = json_out_problem(args.json, inputs=inputs)
        if problem:  # before any work: a bad --json must not cost the whole check
            print(f"error: {problem}", file=sys.stderr)
            return 2

    from smfnet_jax.cli import exit_on_environment_error
    from smfnet_jax.runtime import configure_xla_cpu, enable_compilation_cache
    exit_on_environment_error()
    configure_xla_cpu()
    enable_compilation_cache()
    import jax
    from smfnet_jax.checkpoint import load_pth_model
    from smfnet_jax.model import create_model
    from smfnet_jax.runtime import describe_platform

    t_start = time.perf_counter()
    have_fixtures = folder is not None and (folder / "reference.npz").is_file()
    rows = []
    if have_fixtures:
        rows += parity_rows(folder)
        model = load_pth_model(folder / "smfnet_random_init.pth").model
    else:
        print("no parity fixtures (--fixtures or $SMFNET_SHARED): parity rows skipped",
              file=sys.stderr)
        model = create_model(0)
    sizes = [(128, 128)] if args.quick else [(128, 128), (480, 640), (1024, 1024)]
    rows += fusion_rows(model, sizes, ("float32", "bfloat16"), 1 if args.quick else 3)
    rows += train_rows(2, 32, 1) if args.quick else train_rows(6, 128, 3)

    info = describe_platform()
    header = (f"SMFNet device check on {info['device']} ({info['platform']}, {info['device_count']} "
              f"device(s)), jax {jax.__version__}, routines {info['impl']} (${IMPL_ENV}), "
              f"{time.perf_counter() - t_start:.0f} s")
    print(format_rows(rows, header))
    if args.json:
        from smfnet_jax.fileio import atomic_write_json
        atomic_write_json(args.json, {"platform": info, "jax": jax.__version__,
                                      "quick": args.quick, "rows": rows})
    from smfnet_jax.parity import PARITY_RTOL
    bad = [r for r in rows if r["check"] == "parity" and r["value"] > PARITY_RTOL]
    failed = [r for r in rows if r.get("error")]
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
