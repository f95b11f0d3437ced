"""What `precision=default` would cost on GPUs and TPUs, measured on this CPU by emulation.

    SMFNET_SHARED=../shared python tests/emulate_precision.py [--json OUT] [--skip-msrs]

Every conv and dot of the model and the losses gets its operands rounded to TF32 (10-bit
mantissa, NVIDIA tensor cores at DEFAULT/HIGH) or bfloat16 (7 bits, one TPU MXU pass at
DEFAULT), accumulating in float32 (`helpers.emulate_matrix_units`), with XLA's routines
(every conv a convolution, as on the accelerators). Against the same model in float64 it
prints the fused image's max error on the parity fixture (2 TNO crops, 40x56) and on the
640x480 MSRS sample pair 00004N, and both phases' loss terms and per-sub-model gradient
norms at batch 2 (the parity fixture's pair, whole batch). `highest` (no rounding) is the
float32 floor. The weights are the parity fixture's (random, perturbed), not trained ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)  # before any array: the float64 reference

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers import emulate_matrix_units  # noqa: E402
from smfnet_jax.checkpoint import load_checkpoint  # noqa: E402
from smfnet_jax.imageio import read_gray, read_ycrcb  # noqa: E402
from smfnet_jax.layers import cast_floats  # noqa: E402
from smfnet_jax.policy import ComputePolicy, set_policy  # noqa: E402

MODES = ("highest", "tf32", "bf16")


def _rounding(mode):
    import contextlib
    return contextlib.nullcontext() if mode == "highest" else emulate_matrix_units(mode)


def fusion_errors(model, vi, ir) -> dict:
    """max |fused - fused_float64| per mode, vi/ir NHWC float32."""
    model = nnx.clone(model)
    model.eval()
    graphdef, state = nnx.split(model)

    def fuse():  # a new function each time: jit caches traces per function, and the
        return jax.jit(lambda state, vi, ir: nnx.merge(graphdef, state).fuse(vi, ir))  # rounding is trace-time

    ref = np.asarray(fuse()(cast_floats(state, jnp.float64), vi.astype(np.float64), ir.astype(np.float64)))
    out = {}
    for mode in MODES:
        with _rounding(mode):
            got = np.asarray(fuse()(state, vi, ir), np.float64)  # traced anew inside
        out[mode] = float(np.abs(got - ref).max())
    return out


def training_deviations(model, vi, ir) -> dict:
    """Per phase, per loss term and gradient norm: relative deviation from float64."""
    from train.configs import msrs
    from train.phases import PHASES
    from train.step import make_value_and_grad, split_model
    cfg = msrs.get_config()
    cfg.microbatches = 1
    graphdef, params, stats = split_model(model)
    out = {}
    for phase in (1, 2):
        def measure(p, s, a, b):
            (_, (terms, _)), grads = jax.jit(make_value_and_grad(graphdef, phase, cfg))(p, s, a, b)
            vals = {k: float(v) for k, v in terms.items()}
            vals.update({f"grad_norm/{sub}": float(optax.global_norm(grads[sub])) for sub in PHASES[phase].submodels})
            return vals
        ref = measure(cast_floats(params, jnp.float64), cast_floats(stats, jnp.float64),
                      vi.astype(np.float64), ir.astype(np.float64))
        for mode in MODES:
            with _rounding(mode):
                got = measure(params, stats, vi, ir)
            out[phase, mode] = {k: abs(got[k] - r) / abs(r) if r else abs(got[k]) for k, r in ref.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--skip-msrs", action="store_true", help="leave out the 640x480 pair (the slow part)")
    args = p.parse_args(argv)
    shared = os.environ.get("SMFNET_SHARED")
    if not shared:
        p.error("set SMFNET_SHARED to the shared data folder")
    shared = Path(shared)
    t0 = time.perf_counter()
    model = set_policy(load_checkpoint(shared / "fixtures/parity/smfnet_random_init.pth").model,
                       ComputePolicy("xla", "highest", "float32"))
    with np.load(shared / "fixtures/parity/reference.npz") as z:
        vi, ir = (z[k].transpose(0, 2, 3, 1).astype(np.float32) for k in ("vi", "ir"))
    report = {"fusion": {"parity fixture 2x40x56": fusion_errors(model, vi, ir)}}
    if not args.skip_msrs:
        d = shared / "data/MSRS_sample"
        ir_m = read_gray(d / "ir/00004N.png")[None, ..., None] / np.float32(255)
        vi_m = read_ycrcb(d / "vi/00004N.png")[None, ..., :1] / np.float32(255)
        report["fusion"]["MSRS 00004N 480x640"] = fusion_errors(model, vi_m.astype(np.float32), ir_m.astype(np.float32))
    dev = training_deviations(model, vi, ir)

    print("fused image, max |error| against float64:")
    print(f"  {'input':<24}" + "".join(f"{m:>10}" for m in MODES))
    for name, row in report["fusion"].items():
        print(f"  {name:<24}" + "".join(f"{row[m]:>10.2e}" for m in MODES))
    print("training at batch 2 (parity pair), relative deviation from float64:")
    for phase in (1, 2):
        names = list(dev[phase, "highest"])
        print(f"  phase {phase}: {'quantity':<26}" + "".join(f"{m:>10}" for m in MODES))
        for n in names:
            print(f"           {n:<26}" + "".join(f"{dev[phase, m][n]:>10.2e}" for m in MODES))
        worst = {m: max(dev[phase, m].values()) for m in MODES}
        print(f"           {'worst':<26}" + "".join(f"{worst[m]:>10.2e}" for m in MODES))
    report["training"] = {f"phase{ph}/{m}": v for (ph, m), v in dev.items()}
    print(f"({time.perf_counter() - t0:.0f} s, jax {jax.__version__}, {jax.devices()[0].platform})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
