"""Export SMFNet fusion as a portable file: serialized StableHLO (`.jaxexport`) or ONNX.

  python -m infer.export --ckpt models/model_VIF.pth --out smfnet.jaxexport
  python -m infer.export --ckpt ckpt/smfnet_vif --out smfnet.jaxexport --platforms cpu,cuda,tpu
  python -m infer.export --ckpt models/model_VIF.pth --out smfnet.onnx     # needs the [onnx] extra
  python -m infer.main --ckpt smfnet.jaxexport --ir DIR --vi DIR --out DIR    # fuse with it

The file holds the fusion function with the weights baked in (one self-contained file; see
smfnet_jax/export.py for why), symbolic batch, height and width (any size >= 2x2), for the
platforms given (lowering for cuda/tpu needs no GPU/TPU here). Inputs: ir, vi as N x H x W
float32 in [0, 1]; output: the N x H x W fused image before any 8-bit normalisation (what
`infer.main --no-normalize` writes, divided by 255). The compute policy (routines, precision,
dtype) is fixed at export. Without smfnet-jax: the bytes after the first two lines are
`jax.export.Exported.serialize()`:

  data = open("smfnet.jaxexport", "rb").read().split(b"\\n", 2)[2]
  fused = jax.export.deserialize(bytearray(data)).call(ir, vi)

`.onnx` (jax2onnx, opset 23; onnxruntime runs it, with nothing of smfnet-jax): inputs `ir`
and `vi`, output `fused`, dynamic B, H, W, the weights inside the one file; it is made from
XLA's convolutions (routines xla) in float32, and the runtime chooses its own precision.

An exported file is not a checkpoint here (--ckpt FILE.jaxexport is refused: pass the checkpoint
it was exported from), and a platform named twice in --platforms is refused.
Exit status: 0 written, 2 bad arguments or an unusable checkpoint (one line).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from smfnet_jax.cli import exit_on_environment_error, program_name, restore_checkpoint
from smfnet_jax.fileio import overlap
from smfnet_jax.policy import DTYPES, PRECISION_HELP, PRECISIONS

FORMATS = (".jaxexport", ".onnx")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program_name("infer.export"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, type=Path,
                   help="checkpoint: the released .pth, a .safetensors, an orbax folder or a training workdir")
    p.add_argument("--out", required=True, type=Path,
                   help="output file; its extension chooses the format: .jaxexport or .onnx")
    p.add_argument("--platforms", default="cpu",
                   help="comma-separated targets among cpu, cuda, rocm, tpu (default: cpu; "
                        ".jaxexport only: an ONNX file runs wherever its runtime does)")
    p.add_argument("--routines", choices=("auto", "cpu", "xla"), default="auto",
                   help="compute routines baked in: cpu (tuned for XLA:CPU), xla (XLA's convolutions); "
                        "default auto: cpu when cpu is the only platform, else xla; .onnx: xla")
    p.add_argument("--precision", choices=PRECISIONS, default="highest", help=PRECISION_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute dtype baked in (inputs and output stay float32)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    exit_on_environment_error()
    if args.out.suffix not in FORMATS:
        parser.error(f"--out {args.out}: the extension chooses the format; expected one of {', '.join(FORMATS)}")
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    from smfnet_jax.export import platforms_problem
    problem = platforms_problem(platforms)
    if problem:
        parser.error(f"--platforms {args.platforms}: {problem}")
    if args.ckpt.suffix in FORMATS:  # what load_fuser takes for an exported model
        parser.error(f"--ckpt {args.ckpt}: is an exported model, which cannot be exported again "
                     "(its weights and compute policy are baked in): pass the checkpoint it was "
                     "exported from (.pth, .safetensors, orbax folder or training workdir)")
    problem = restore_checkpoint(args.ckpt, "--ckpt")  # one an interrupted convert --force set aside
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    how = overlap(args.out, args.ckpt)
    if how:
        parser.error(f"--out {args.out}: {how} the checkpoint being read (--ckpt {args.ckpt}): "
                     "write the output elsewhere")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder")
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to replace it")
    if not args.ckpt.exists():
        parser.error(f"--ckpt {args.ckpt} does not exist")
    onnx = args.out.suffix == ".onnx"
    if onnx and (args.routines == "cpu" or args.dtype != "float32"):
        parser.error("--out .onnx is made from the xla routines in float32 "
                     "(--routines cpu and --dtype bfloat16 are for .jaxexport)")
    if onnx:
        import importlib.util
        if importlib.util.find_spec("jax2onnx") is None:
            from smfnet_jax.export import ONNX_EXTRA
            print(f"error: {ONNX_EXTRA}", file=sys.stderr)
            return 2

    from smfnet_jax.api import load_fuser
    from smfnet_jax.export import ExportError, export_fusion, export_onnx, save_exported
    from smfnet_jax.policy import resolve

    routines = args.routines
    if routines == "auto":
        routines = "cpu" if platforms == ("cpu",) and not onnx else "xla"
    policy = resolve(routines, args.precision, args.dtype)
    t0 = time.perf_counter()
    try:
        fuser = load_fuser(args.ckpt, policy=policy)
    except (ValueError, OSError) as e:  # every checkpoint error is a ValueError
        print(f"error: cannot load checkpoint {args.ckpt}: {e}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    try:
        if onnx:
            export_onnx(fuser, args.out)
            what = f"ONNX opset 23, dynamic B x H x W; {policy.describe()}"
        else:
            save_exported(args.out, export_fusion(fuser, platforms), policy)
            what = f"platforms {', '.join(platforms)}; {policy.describe()}; symbolic N x H x W, H, W >= 2"
    except OSError as e:
        print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t2 = time.perf_counter()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MB; {what}) from {args.ckpt}: "
          f"loaded in {t1 - t0:.1f} s, exported in {t2 - t1:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
