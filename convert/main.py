"""Convert SMFNet checkpoints between the reference `.pth`, `.safetensors` and orbax, without torch.

  python -m convert.main --pth models/model_VIF.pth --out ckpt/smfnet_vif          # -> orbax dir
  python -m convert.main --pth models/model_VIF.pth --out model_VIF.safetensors    # -> safetensors
  python -m convert.main --ckpt ckpt/smfnet_vif --to-pth model_VIF_roundtrip.pth   # -> .pth
  python -m convert.main --ckpt WORKDIR --out model.safetensors                     # trained here

--out writes a `.safetensors` file when its name ends in `.safetensors`, else an orbax
directory. `--ckpt` takes anything the loader reads: an orbax directory, a training workdir
(its latest step, or --step), a `.safetensors` or a `.pth`. The safetensors file holds the
reference's tensors named `<sub-model>/<state_dict key>` (e.g.
`DIDF_Encoder/module.patch_embed.proj.weight`), unused weights included, so PyTorch loads it
per sub-model with `safetensors.torch.load_file`.

The `.pth` is read by a restricted unpickler that refuses, before running anything, any
pickle global a tensor checkpoint does not need, within a memory budget (raise it with
SMFNET_CKPT_MAX_BYTES=8G for a larger trusted file). Non-finite weights and dtypes other
than float32/float16/bfloat16/float64 are refused, naming the tensor.
Refused before any work, even with --force (one line): an output that is, contains or lies
inside the checkpoint being read (after resolving symlinks), and an existing --out folder
that is not a converted checkpoint (a training workdir, a folder of other files); --force
replaces only a converted checkpoint or a file. If a run with --force was killed while
swapping the new checkpoint in, the next run (or any reader) puts the previous one back.
Exit status: 0 done, 2 bad arguments or an unusable checkpoint (one-line error).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smfnet_jax.cli import exit_on_environment_error, program_name, restore_checkpoint
from smfnet_jax.fileio import overlap


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=program_name("convert.main"),
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pth", type=Path, help="reference checkpoint to read (torch zip format)")
    src.add_argument("--ckpt", type=Path,
                     help="checkpoint to export: orbax dir, training workdir, .safetensors or .pth")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--out", type=Path,
                     help="output: FILE.safetensors, or else an orbax directory")
    dst.add_argument("--to-pth", type=Path, help="output: .pth file (the reference's format)")
    p.add_argument("--step", type=int, default=None,
                   help="with a training workdir: step to export (default: latest)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (written beside it, then swapped in)")
    return p


def output_problem(source: Path, source_flag: str, out: Path, out_flag: str, to_orbax: bool) -> str | None:
    """Why `out` must never be written, whatever --force says (the error line's text), or None.

    An output that is, contains or lies inside the checkpoint being read would destroy or
    corrupt it; an orbax output replaces only a converted checkpoint of ours (or an empty
    folder); a file output is never a folder."""
    how = overlap(out, source)
    if how:
        why = {"is": "", "contains": ", which replacing it would delete",
               "lies inside": ", which writing there would alter"}[how]
        return (f"{out_flag} {out}: {how} the checkpoint being read ({source_flag} {source}){why}: "
                "write the output elsewhere (--force never replaces an input)")
    if to_orbax:
        from smfnet_jax.checkpoint import replace_problem
        problem = replace_problem(out)
        if problem and out.is_dir():
            return (f"{out_flag} {out}: {problem}: refusing to replace it, even with --force; "
                    "give a new or an empty folder")
        if problem:
            return (f"{out_flag} {out}: {problem}: refusing to replace it with one (--out "
                    "NAME.safetensors writes a file, --to-pth a .pth)")
    elif out.is_dir():
        return f"{out_flag} {out}: is a folder: give the path of the file to write"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    exit_on_environment_error()
    source, source_flag = (args.pth, "--pth") if args.pth is not None else (args.ckpt, "--ckpt")
    out, out_flag = (args.out, "--out") if args.out is not None else (args.to_pth, "--to-pth")
    to_safetensors = args.out is not None and args.out.suffix == ".safetensors"
    to_orbax = args.out is not None and not to_safetensors
    problem = (restore_checkpoint(source, source_flag)
               or (restore_checkpoint(out, out_flag) if to_orbax else None)
               or output_problem(source, source_flag, out, out_flag, to_orbax))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if out.exists() and not args.force and (
            not to_orbax or not out.is_dir() or any(out.iterdir())):
        parser.error(f"{out} exists{' and is not empty' if to_orbax else ''}; "
                     "pass --force to replace it")

    from smfnet_jax.checkpoint import (load_checkpoint, save_converted,
                                       save_safetensors_checkpoint)
    from smfnet_jax.torch_weights.mapping import export_reference_weights
    from smfnet_jax.torch_weights.pth_io import save_pth

    try:
        loaded = load_checkpoint(source, step=args.step)
        origin = str(source.resolve())
        if to_orbax:
            save_converted(out, loaded.model, loaded.extras,
                           {"source": origin, "format": "smfnet-jax/converted"},
                           overwrite=args.force)
        elif to_safetensors:
            save_safetensors_checkpoint(out, loaded.model, loaded.extras, origin)
        else:
            save_pth(out, export_reference_weights(loaded.model, loaded.extras))
    except (ValueError, OSError) as e:  # the checkpoint errors are all ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = f" step {loaded.step}" if loaded.step is not None else ""
    if loaded.extras:
        note = f"; {len(loaded.extras)} unused reference weights kept"
    else:
        note = "; unused reference weights written as neutral placeholders" if not to_orbax else ""
    print(f"wrote {out} (from {source}{step}{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
