"""Make a per-module case: weights from a seed, one crop of the shared images, and what single
modules of the PyTorch original compute in float32 and float64 (record_modules.py).

Run from the project root in the project's venv; the original runs in its own venv:

    SMFNET_SHARED=../shared python tests/reference/make_module_cases.py NAME --seed 21 \\
        --crop MSRS_sample/ir/00004N.png:MSRS_sample/vi/00004N.png:200:300 --size 10x18 \\
        --window 3:6:6x8 --torch-python /path/to/torch-venv/bin/python     (SMFNET_REF set)

Writes tests/fixtures/modules/NAME.{npz,json} (see module_cases.py for what they hold).
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
sys.path.insert(0, str(HERE.parent))  # tests/, for trajectory_cases and module_cases

import module_cases as mc  # noqa: E402
import trajectory_cases as tc  # noqa: E402


def _hw(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--crop", required=True, help="IR:VI:Y:X, image paths relative to $SMFNET_SHARED/data")
    ap.add_argument("--size", default="10x18", help="HxW of the crop (the graph branch's input size)")
    ap.add_argument("--window", default="3:6:6x8", help="Y:X:HxW of the features the small modules get")
    ap.add_argument("--torch-python", required=True)
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    shared = Path(os.environ["SMFNET_SHARED"]).resolve()
    ir_path, vi_path, cy, cx = args.crop.split(":")
    cy, cx = int(cy), int(cx)
    h, w = _hw(args.size)
    wy, wx, wsize = args.window.split(":")
    wh, ww = _hw(wsize)
    ir = tc._load_grey(shared / "data" / ir_path, "ir")[cy:cy + h, cx:cx + w]
    vi = tc._load_grey(shared / "data" / vi_path, "vi")[cy:cy + h, cx:cx + w]
    if ir.shape != (h, w) or vi.shape != (h, w):
        raise SystemExit(f"crop {args.crop} of {h}x{w} leaves the image")
    vi, ir = vi[None, None], ir[None, None]
    ckpt = tc.random_reference_checkpoint(args.seed)

    from smfnet_jax.torch_weights.pth_io import save_pth
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_pth(tmp / "init.pth", ckpt)
        np.savez(tmp / "images.npz", vi=vi, ir=ir)
        subprocess.run([args.torch_python, str(HERE / "record_modules.py"), str(tmp / "init.pth"),
                        str(tmp / "images.npz"), wy, wx, str(wh), str(ww), str(tmp / "rec.npz")],
                       check=True)
        with np.load(tmp / "rec.npz") as z:
            rec = {k: z[k] for k in z.files}

    stored, modules = {}, {}
    for key in sorted(rec):
        module, kind, item = key.split("/")
        entry = modules.setdefault(module, {"inputs": {}, "outputs": {}, "gradients": {}})
        if kind == "in":
            stored[key] = rec[key]
            entry["inputs"][item] = list(rec[key].shape)
        elif kind in ("out64", "grad64"):
            f32 = rec[key.replace("64/", "32/")]
            short = "out" if kind == "out64" else "grad"
            stored[f"{module}/{short}/{item}.hi"], stored[f"{module}/{short}/{item}.lo"] = mc.encode(rec[key])
            check = mc.decode(*mc.encode(rec[key]))
            if np.max(np.abs(check - rec[key]) / np.maximum(np.abs(rec[key]), 1e-30)) > 2.0 ** -31:
                raise SystemExit(f"{key}: hi/lo encoding loses more than 2**-31")
            entry["outputs" if short == "out" else "gradients"][item] = {
                "shape": list(rec[key].shape),
                "max_abs": float(np.max(np.abs(rec[key]))),
                "torch_float32_error": mc.scaled_error(f32, rec[key])}
    out = mc.FIXTURES
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"{args.name}.npz", **stored)
    meta = {
        "seed": args.seed, "crop": {"ir": ir_path, "vi": vi_path, "y": cy, "x": cx, "h": h, "w": w},
        "window": {"y": int(wy), "x": int(wx), "h": wh, "w": ww}, "note": args.note,
        "checkpoint_sha256": tc.checkpoint_digest(ckpt), "data_sha256": tc.data_digest(vi, ir),
        "arrays_sha256": mc.arrays_digest(stored), "modules": modules,
    }
    (out / f"{args.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (out / f"{args.name}.npz").stat().st_size
    print(f"{args.name}: wrote {out / args.name}.npz ({size / 1e3:.0f} kB)")
    for module, entry in modules.items():
        for group in ("outputs", "gradients"):
            for item, e in entry[group].items():
                print(f"  {module:16s} {group[:-1]:8s} {item:6s} torch float32 vs float64 "
                      f"{e['torch_float32_error']:.2e} (max |ref| {e['max_abs']:.3g})")


if __name__ == "__main__":
    main()
