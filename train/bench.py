"""Training-step benchmark: steps/s, samples/s and peak memory (not a test).

  python -m train.bench                      # phase II, batch 6, 128x128 (the reference recipe)
  python -m train.bench --phase 1 --batch 2 --size 128 --steps 5 --json out.json
  python -m train.bench --microbatches 1     # whole-batch gradient (the auto default on CPU
                                             # is one sample per micro-batch)
  python -m train.bench --compare-dtypes     # bfloat16 vs float32: loss terms, gradient norms
  python -m train.bench --logging            # what logging one row costs (metrics.jsonl, TensorBoard)

Each measurement runs in this process on synthetic data; peak memory is the process's
peak resident set size (ru_maxrss), compilation included, and on GPU/TPU also the device's
peak memory in use (`memory_stats()`).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

def _synthetic_batch(batch: int, size: int):
    import numpy as np
    from train.data import SyntheticPairs
    src = SyntheticPairs(batch, size, seed=0)
    return {k: np.stack([src[i][k] for i in range(batch)]) for k in ("vi", "ir")}


def measure_train_step(phase: int = 2, batch: int = 6, size: int = 128, steps: int = 2,
                       microbatches: int = 0, dtype: str = "float32", precision: str = "highest",
                       conv_sums: str = "auto") -> dict:
    """Time the jitted train step (one warm-up step with compilation, then `steps` timed)."""
    import jax
    import numpy as np
    from smfnet_jax.model import create_model
    from smfnet_jax.runtime import describe_platform, device_peak_memory_mb
    from train.configs import msrs
    from train.optim import make_optimizer
    from train.step import init_train_state, jit_train_step, resolve_microbatches, train_policy
    from train.trainer import _global_batch, _replicate, make_mesh

    cfg = msrs.get_config()
    cfg.compute_dtype, cfg.precision, cfg.conv_sums = dtype, precision, conv_sums
    cfg.microbatches = resolve_microbatches(microbatches, batch, train_policy(cfg).routines)
    mesh = make_mesh()
    tx = make_optimizer(cfg, 1, phase)  # the epoch's length only moves the schedule's steps
    graphdef, state = init_train_state(create_model(0), cfg, tx=tx)
    state = _replicate(state, mesh)
    step_fn = jit_train_step(graphdef, phase, cfg, mesh, tx=tx)
    vi, ir = _global_batch(_synthetic_batch(batch, size), mesh)

    t0 = time.perf_counter()
    state, metrics = step_fn(state, vi, ir)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, vi, ir)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    device_mb = device_peak_memory_mb()
    return {"phase": phase, "batch": batch, "microbatches": cfg.microbatches, "size": size,
            "dtype": dtype, "precision": precision, **describe_platform(),
            "first_step_s": round(first, 2), "seconds_per_step": round(sec, 3),
            "steps_per_s": round(1 / sec, 4), "samples_per_s": round(batch / sec, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_device_mb": None if device_mb is None else round(device_mb, 1),
            "loss": float(metrics["loss"])}


def precision_report(batch: int = 2, size: int = 128) -> list[dict]:
    """bfloat16 compute (float32 master weights, statistics, losses) against float32: each
    phase's loss terms and per-sub-model gradient norms on one synthetic batch, with their
    relative deviation."""
    import jax
    import optax
    from smfnet_jax.model import create_model
    from train.configs import msrs
    from smfnet_jax.policy import set_policy
    from train.phases import PHASES
    from train.step import make_value_and_grad, split_model, train_policy

    data = _synthetic_batch(batch, size)
    rows = []
    for phase in (1, 2):
        values = {}
        for dtype in ("float32", "bfloat16"):
            cfg = msrs.get_config()
            cfg.compute_dtype = dtype
            graphdef, params, stats = split_model(set_policy(create_model(0), train_policy(cfg)))
            fn = jax.jit(make_value_and_grad(graphdef, phase, cfg))
            (_, (terms, _)), grads = fn(params, stats, data["vi"], data["ir"])
            values[dtype] = {**{k: float(v) for k, v in terms.items()},
                             **{f"grad_norm/{s}": float(optax.global_norm(grads[s]))
                                for s in PHASES[phase].submodels}}
        for name, ref in values["float32"].items():
            low = values["bfloat16"][name]
            rows.append({"phase": phase, "name": name, "float32": ref, "bfloat16": low,
                         "rel_dev": abs(low - ref) / abs(ref) if ref else abs(low)})
    return rows


def format_precision(rows: list[dict]) -> str:
    lines = [f"{'phase':>5} {'term':<26} {'float32':>12} {'bfloat16':>12} {'rel. dev.':>10}"]
    lines += [f"{r['phase']:>5} {r['name']:<26} {r['float32']:>12.6g} {r['bfloat16']:>12.6g} "
              f"{r['rel_dev']:>10.2e}" for r in rows]
    return "\n".join(lines)


def logging_cost(rows: int = 500) -> dict:
    """Seconds per logged row of what the trainer writes (a JSON line and TensorBoard scalars
    of a phase-II row: 35 values), without and with the throughput figures (`RunClock`)."""
    import tempfile
    from pathlib import Path
    from train.trainer import MetricsLogger, RunClock
    row = {f"value_{i}": 1.0 + i for i in range(32)} | {"epoch": 3, "phase": 2}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, figures in (("without_s", False), ("with_s", True)):
            logger, clock = MetricsLogger(Path(d) / name, enabled=True), RunClock(6, 1, 1e12)
            t0 = time.perf_counter()
            for i in range(rows):
                values = dict(row, step=i + 1)
                if figures:
                    with clock.timing("data"):
                        pass
                    clock.steps += 1
                    values.update(clock.window(1e9))
                logger.log(values)
            out[name] = (time.perf_counter() - t0) / rows
            logger.close()
    return out


def main(argv: list[str] | None = None) -> int:
    from smfnet_jax.cli import exit_on_environment_error
    from smfnet_jax.policy import CONV_SUMS_CHOICES, DTYPES, IMPL_HELP, PRECISION_HELP, PRECISIONS
    from smfnet_jax.runtime import configure_xla_cpu
    exit_on_environment_error()
    configure_xla_cpu()  # memory-optimised XLA:CPU scheduler; must precede any JAX work
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__, epilog=IMPL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", type=int, choices=(1, 2), default=2)
    p.add_argument("--batch", type=int, default=6, help="global batch size")
    p.add_argument("--size", type=int, default=128, help="patch size (square)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--microbatches", type=int, default=0,
                   help="exact gradient over this many slices of each device's batch (less "
                        "memory); 0: auto (one sample per slice on CPU, 1 on GPU/TPU)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--precision", choices=PRECISIONS, default="highest", help=PRECISION_HELP)
    p.add_argument("--conv-sums", choices=CONV_SUMS_CHOICES, default="auto",
                   help="what the 3x3 convs sum in (config conv_sums; auto: float64 with the CPU "
                        "routines, as training runs by default)")
    p.add_argument("--compare-dtypes", action="store_true",
                   help="instead of timing: bfloat16 vs float32 loss terms and gradient norms of "
                        "both phases on one synthetic batch (--batch, --size; e.g. --batch 2)")
    p.add_argument("--logging", action="store_true",
                   help="instead of timing steps: seconds per logged row (metrics.jsonl and "
                        "TensorBoard) without and with the throughput figures")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.logging:
        out = logging_cost()
        print(f"per logged row: {out['without_s'] * 1e3:.2f} ms without the throughput figures, "
              f"{out['with_s'] * 1e3:.2f} ms with them")
        return 0

    if args.compare_dtypes:
        rows = precision_report(args.batch, args.size)
        print(format_precision(rows))
        out = rows
    else:
        from smfnet_jax.policy import resolve
        from train.step import resolve_microbatches
        policy = resolve(None, precision=args.precision, dtype=args.dtype, conv_sums=args.conv_sums)
        try:
            k = resolve_microbatches(args.microbatches, args.batch, policy.routines)
        except ValueError as e:
            p.error(str(e))
        print(f"train.bench: {policy.describe()}; phase {args.phase}, batch {args.batch} in {k} "
              f"micro-batch(es), {args.size}x{args.size}", flush=True)
        out = measure_train_step(args.phase, args.batch, args.size, args.steps,
                                 args.microbatches, args.dtype, args.precision, args.conv_sums)
        for k, v in out.items():
            print(f"{k:>16}: {v}")
    if args.json:
        from smfnet_jax.fileio import atomic_write_json
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
