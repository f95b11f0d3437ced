"""Training-step benchmark: steps/s, samples/s and peak memory (not a test).

  python -m train.bench                      # phase II, batch 6, 128x128 (the reference recipe)
  python -m train.bench --phase 1 --batch 2 --size 128 --steps 5 --json out.json
  python -m train.bench --microbatches 1     # whole-batch gradient (the auto default on CPU
                                             # is one sample per micro-batch)

Each measurement runs in this process on synthetic data; peak memory is the process's
peak resident set size (ru_maxrss), compilation included.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from smfnet_jax.runtime import configure_xla_cpu
    configure_xla_cpu()  # memory-optimised XLA:CPU scheduler; must precede any JAX work
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", type=int, choices=(1, 2), default=2)
    p.add_argument("--batch", type=int, default=6, help="global batch size")
    p.add_argument("--size", type=int, default=128, help="patch size (square)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--microbatches", type=int, default=0,
                   help="exact gradient over this many slices of each device's batch (less "
                        "memory); 0: auto (one sample per slice on CPU, 1 on GPU/TPU)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from train.configs import msrs
    from train.data import SyntheticPairs
    from train.step import init_train_state, jit_train_step, learning_rates
    from train.trainer import _global_batch, _replicate, make_mesh
    from smfnet_jax.model import create_model

    cfg = msrs.get_config()
    cfg.compute_dtype = args.dtype
    from train.step import resolve_microbatches
    try:
        cfg.microbatches = resolve_microbatches(args.microbatches, args.batch)
    except ValueError as e:
        p.error(str(e))
    mesh = make_mesh()
    graphdef, state = init_train_state(create_model(0), cfg)
    state = _replicate(state, mesh)
    step_fn = jit_train_step(graphdef, args.phase, cfg, mesh)
    src = SyntheticPairs(args.batch, args.size, seed=0)
    local = {k: np.stack([src[i][k] for i in range(args.batch)]) for k in ("vi", "ir")}
    vi, ir = _global_batch(local, mesh)
    lrs = {k: np.float32(v) for k, v in learning_rates(0 if args.phase == 1 else cfg.phase1_epochs, cfg).items()}

    t0 = time.perf_counter()
    state, metrics = step_fn(state, vi, ir, lrs)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, vi, ir, lrs)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"phase": args.phase, "batch": args.batch, "microbatches": cfg.microbatches,
           "size": args.size, "dtype": args.dtype,
           "devices": jax.device_count(), "platform": jax.devices()[0].platform,
           "first_step_s": round(first, 2), "seconds_per_step": round(sec, 3),
           "steps_per_s": round(1 / sec, 4), "samples_per_s": round(args.batch / sec, 3),
           "peak_rss_mb": round(peak_mb, 1), "loss": float(metrics["loss"])}
    for k, v in out.items():
        print(f"{k:>16}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
