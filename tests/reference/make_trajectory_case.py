"""Make a trajectory case: weights from a seed, crops of the shared images, and what the
PyTorch original computes on them in float32 and float64 (record_trajectory.py).

Run from the project root in the project's venv; the original runs in its own venv:

    SMFNET_SHARED=../shared python tests/reference/make_trajectory_case.py NAME --seed 11 \\
        --crop MSRS_sample/ir/00004N.png:MSRS_sample/vi/00004N.png:200:300 --crop ... \\
        --torch-python /path/to/torch-venv/bin/python      (KORNIA020, SMFNET_REF set)

Writes tests/fixtures/trajectory/NAME/{case.json, step1_float64.npz} (see trajectory_cases.py).

    SMFNET_SHARED=../shared python tests/reference/make_trajectory_case.py NAME --recount \
        --torch-python /path/to/torch-venv/bin/python

reruns the original's step 1 of an existing case on this machine (float64 once, float32 at the
five input roundings) and appends the counts to case.json's `float32_step1.reruns`: which
elements the float32 original gets more than 1e-4 wrong depends on the CPU it runs on
(oneDNN's kernels), so the count the step-1 test bounds is pooled over every machine recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for trajectory_cases

import trajectory_cases as tc  # noqa: E402


def _run_reference(python: str, pth: Path, h5: Path, run: dict, float64: bool, step1: Path,
                   dump: str | None, epochs: int | None = None, scale: float = 1.0) -> list[dict]:
    cmd = [python, str(HERE / "record_trajectory.py"), str(pth), str(h5), "--input-scale", repr(scale),
           "--epochs", str(epochs or run["epochs"]), "--phase1-epochs", str(run["phase1_epochs"]),
           "--lr", str(run["lr"]), "--step-epochs", str(run["lr_step_epochs"]), "--step1", str(step1)]
    if float64:
        cmd.append("--float64")
    if dump:
        cmd += ["--dump-params", os.path.join(dump, "float64" if float64 else "float32")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _off(p32: dict, p64: dict) -> int:
    """Elements of a float32 step-1 state more than 1e-4 from the float64 one."""
    return int(sum((np.abs(p32[k].astype(np.float64) - p64[k]) > 1e-4).sum() for k in p64))


def _cpu() -> str:
    """This machine's CPU, as far as oneDNN's choice of kernels goes: model and vector ISA."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'}; {os.cpu_count()} cores)"


def recount(name: str, torch_python: str, shared: Path) -> None:
    case = tc.load_case(name)
    run = case["run"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pth, h5 = tc.materialise(name, shared, tmp)
        _run_reference(torch_python, pth, h5, run, True, tmp / "f64.npz", None, epochs=1)
        with np.load(tmp / "f64.npz") as z:
            p64 = {k: z[k] for k in z.files}
        counts = {}
        for scale in tc.INPUT_SCALES:
            _run_reference(torch_python, pth, h5, run, False, tmp / "f32.npz", None, epochs=1, scale=scale)
            with np.load(tmp / "f32.npz") as z:
                counts[repr(scale)] = _off({k: z[k] for k in z.files}, p64)
    import datetime
    rerun = {"date": datetime.date.today().isoformat(), "cpu": _cpu(), "off_1e-4_by_input_scale": counts}
    case["float32_step1"].setdefault("reruns", []).append(rerun)
    (tc.FIXTURES / name / "case.json").write_text(json.dumps(case, indent=1) + "\n")
    print(f"{name}: the float32 original on this machine ({rerun['cpu']}): {list(counts.values())}; "
          f"every recorded draw now {tc.original_step1_draws(case)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--crop", action="append",
                    help="IR:VI:Y:X, image paths relative to $SMFNET_SHARED/data")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--torch-python", required=True)
    ap.add_argument("--dump-params", help="also keep every step's parameters here (diagnosis)")
    ap.add_argument("--note", default="")
    ap.add_argument("--recount", action="store_true",
                    help="rerun an existing case's step-1 counts on this machine (see above)")
    args = ap.parse_args()

    if not os.environ.get("SMFNET_SHARED"):
        ap.error("set SMFNET_SHARED to the shared folder (its data/ holds the images the crops come from)")
    shared = Path(os.environ["SMFNET_SHARED"]).resolve()
    if args.recount:
        return recount(args.name, args.torch_python, shared)
    if args.seed is None or not args.crop:
        ap.error("a new case needs --seed and at least one --crop (or --recount for an existing one)")
    crops = []
    for spec in args.crop:
        ir, vi, y, x = spec.split(":")
        crops.append({"ir": ir, "vi": vi, "y": int(y), "x": int(x)})
    run = {"epochs": 10, "phase1_epochs": 5, "lr": 1e-3, "lr_step_epochs": 2, "lr_gamma": 0.5,
           "lr_min": 1e-6, "clip_norm": 0.01, "batch_size": len(crops)}
    ckpt = tc.random_reference_checkpoint(args.seed)
    vi, ir = tc.crop_pairs(shared, crops, args.size)

    from smfnet_jax.torch_weights.pth_io import save_pth
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_pth(tmp / "init.pth", ckpt)
        tc.write_h5(tmp / "data.h5", vi, ir)
        steps = {}
        for label, f64 in (("float32", False), ("float64", True)):
            steps[label] = _run_reference(args.torch_python, tmp / "init.pth", tmp / "data.h5", run,
                                          f64, tmp / f"step1_{label}.npz", args.dump_params)
        with np.load(tmp / "step1_float64.npz") as z64:
            p64 = {k: z64[k] for k in z64.files}
        p32 = {}
        for scale in tc.INPUT_SCALES:  # float32 step 1 in other roundings
            out = tmp / f"step1_float32_{scale!r}.npz"
            if scale == 1.0:
                out = tmp / "step1_float32.npz"
            else:
                _run_reference(args.torch_python, tmp / "init.pth", tmp / "data.h5", run, False, out,
                               None, epochs=1, scale=scale)
            with np.load(out) as z:
                p32[scale] = {k: z[k] for k in z.files}

    def initial(key):
        sub, k = key.split("/", 1)
        return ckpt[sub][k].astype(np.float64)

    lr = run["lr"]
    deltas = {k: (v - initial(k)) / lr for k, v in p64.items()}
    worst = max(float(np.abs(d).max()) for d in deltas.values())
    if worst > 1.0 + 1e-9:
        raise SystemExit(f"a step-1 update of {worst} lr: not Adam's first step?")
    quantised = {k: np.round(d * tc.DELTA_SCALE).astype(np.int8) for k, d in deltas.items()}
    counts = {repr(scale): _off(p, p64) for scale, p in p32.items()}
    f32_off = {k: np.abs(p32[1.0][k].astype(np.float64) - p64[k]) > 1e-4 for k in p64}
    opposite = sum(int((f32_off[k] & (np.sign(p32[1.0][k] - initial(k)) != np.sign(p64[k] - initial(k)))).sum())
                   for k in p64)
    case = {
        "seed": args.seed, "size": args.size, "crops": crops, "run": run, "note": args.note,
        "checkpoint_sha256": tc.checkpoint_digest(ckpt), "data_sha256": tc.data_digest(vi, ir),
        "reference": steps,
        "float32_step1": {"elements": int(sum(d.size for d in deltas.values())),
                          "tensors": len(deltas),
                          "off_1e-4": counts[repr(1.0)],
                          "off_1e-4_by_input_scale": counts,
                          "opposite_direction": opposite},
    }
    out = tc.FIXTURES / args.name
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "step1_float64.npz", **quantised)
    (out / "case.json").write_text(json.dumps(case, indent=1) + "\n")
    drift = max(abs(a["loss"] - b["loss"]) / abs(b["loss"])
                for a, b in zip(steps["float32"], steps["float64"]))
    print(f"{args.name}: float32 original drifts {drift:.2e} from float64; after step 1 "
          f"{case['float32_step1']['off_1e-4']} of {case['float32_step1']['elements']} elements "
          f"> 1e-4 off ({opposite} opposite; over input roundings {sorted(counts.values())}); wrote {out}")


if __name__ == "__main__":
    main()
