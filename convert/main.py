"""Convert SMFNet checkpoints between the reference `.pth` and orbax, without torch.

  python -m convert.main --pth models/model_VIF.pth --out ckpt/smfnet_vif
  python -m convert.main --ckpt ckpt/smfnet_vif --to-pth model_VIF_roundtrip.pth

The `.pth` is read by a restricted unpickler that refuses, before running anything, any
pickle global a tensor checkpoint does not need. `--ckpt` also takes a training workdir
(its latest step), so a model trained here can be handed to the original PyTorch code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smfnet_jax.cli import program_name


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name("convert.main"),
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pth", type=Path, help="reference checkpoint to read (torch zip format)")
    src.add_argument("--ckpt", type=Path, help="orbax checkpoint dir or training workdir to export")
    p.add_argument("--out", type=Path, help="with --pth: orbax directory to write")
    p.add_argument("--to-pth", type=Path, help="with --ckpt: .pth file to write")
    p.add_argument("--step", type=int, default=None, help="with --ckpt: step to export (default: latest)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from smfnet_jax.torch_weights.mapping import KeyMapError, export_reference_weights
    from smfnet_jax.torch_weights.pth_io import PthError, save_pth
    from smfnet_jax.checkpoint import CheckpointError, load_checkpoint, load_pth_model, save_converted

    try:
        if args.pth is not None:
            if args.out is None:
                raise SystemExit("--pth needs --out DIR")
            if args.out.exists() and any(args.out.iterdir()) and not args.force:
                raise SystemExit(f"{args.out} exists and is not empty; pass --force to overwrite")
            loaded = load_pth_model(args.pth)
            save_converted(args.out, loaded.model, loaded.extras,
                           {"source": str(args.pth.resolve()), "format": "smfnet-jax/converted"})
            n_unused = len(loaded.extras or {})
            print(f"wrote {args.out} (from {args.pth}; {n_unused} unused reference weights kept aside)")
        else:
            if args.to_pth is None:
                raise SystemExit("--ckpt needs --to-pth FILE")
            if args.to_pth.exists() and not args.force:
                raise SystemExit(f"{args.to_pth} exists; pass --force to overwrite")
            loaded = load_checkpoint(args.ckpt, step=args.step)
            save_pth(args.to_pth, export_reference_weights(loaded.model, loaded.extras))
            note = "" if loaded.extras else " (unused reference weights written as neutral placeholders)"
            print(f"wrote {args.to_pth} from {args.ckpt} step {loaded.step}{note}")
    except (PthError, KeyMapError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
