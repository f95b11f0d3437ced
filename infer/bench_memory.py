"""Peak memory of fusing one huge pair with infer.main (automatically tiled).

    python -m infer.bench_memory [--size 12000x12000] [--ckpt CKPT [--model-tiles N]] [--grey] [--tile SIZE]

Writes a synthetic pair of the size (a grey first image, an RGB second image unless --grey)
to a temporary folder, fuses it with `infer.main` in a child process and prints the child's
peak RSS, its RSS before the fusion and the growth per pixel.

Without --ckpt the child fuses with a stand-in (a per-pixel maximum, no model): the figure
is then the host side alone, i.e. everything that grows with the image (decoded pixels, the
tile accumulator, the fused float output, the rendered 8-bit output, the PNG encoder); add
the model's working set for one tile (`python -m infer.bench --sizes 512x512` peak RSS) for
the whole. With --ckpt the real model fuses every tile: on a 2-core CPU a 12000x12000 pair is
625 tiles of ~15 s, about two and a half hours. `--model-tiles N` has the model fuse only the
last N tiles (the stand-in the others), in ~N x 15 s: the same peak as a whole run, since one
tile's working set does not grow from tile to tile (freed between tiles) and by the last
tiles every image-sized array is present (inputs, the fused output nearly filled, then the
rendered output and the PNG encoder).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from smfnet_jax.cli import program_name


def synthetic_pair(folder: Path, height: int, width: int, colour: bool = True) -> tuple[Path, Path]:
    """Write ir/pair.png (grey) and vi/pair.png (RGB, or grey) of the size, smooth structures
    with some texture (compresses well, so the files stay small), built block by block."""
    from smfnet_jax.imageio import write_png

    ir = np.empty((height, width), np.uint8)
    vi = np.empty((height, width, 3) if colour else (height, width), np.uint8)
    x = np.arange(width, dtype=np.float32)
    for y0 in range(0, height, 512):
        y = np.arange(y0, min(y0 + 512, height), dtype=np.float32)[:, None]
        wave = np.sin(x / 97.0) * np.cos(y / 61.0)
        ir[y0:y0 + len(y)] = (127.5 + 120 * wave * np.sin((x + y) / 13.0)).astype(np.uint8)
        if colour:
            vi[y0:y0 + len(y), :, 0] = (127.5 + 100 * wave).astype(np.uint8)
            vi[y0:y0 + len(y), :, 1] = ((x + 2 * y) % 256).astype(np.uint8)
            vi[y0:y0 + len(y), :, 2] = (127.5 - 90 * np.cos((x - y) / 41.0)).astype(np.uint8)
        else:
            vi[y0:y0 + len(y)] = ((x + 2 * y) % 256).astype(np.uint8)
    paths = folder / "ir" / "pair.png", folder / "vi" / "pair.png"
    for path, pixels in zip(paths, (ir, vi)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(path, pixels)
    return paths


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def stand_in(ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """A per-pixel fuser in place of the model (costs nothing, holds nothing)."""
    return np.maximum(ir, vi)


class LastTilesByModel:
    """Fuse tiles with the stand-in, except the last `model_tiles` of `tiles`, with `model`."""

    def __init__(self, model, tiles: int, model_tiles: int):
        self.model, self.first_model_tile, self.calls = model, tiles - model_tiles, 0
        self.step, self.policy = getattr(model, "step", None), getattr(model, "policy", None)

    def __call__(self, ir, vi):
        self.calls += 1
        return (self.model if self.calls > self.first_model_tile else stand_in)(ir, vi)


def child(folder: Path, ckpt: str | None, tile: int, model_tiles: int = 0) -> dict:
    """Fuse folder/ir with folder/vi into folder/out with infer.main; the figures as a dict."""
    from smfnet_jax.runtime import configure_xla_cpu

    configure_xla_cpu()  # as infer.main does: before JAX makes its backend (halves the forward's memory)
    import jax  # infer.main's own imports, before the baseline

    from infer import main as infer_main

    jax.devices()
    argv = ["--ckpt", ckpt or str(folder), "--ir", str(folder / "ir"),
            "--vi", str(folder / "vi"), "--out", str(folder / "out")]
    if tile:
        argv += ["--tile", str(tile)]
    args = infer_main.build_parser().parse_args(argv)
    if ckpt:
        fuser = infer_main.load_fuser(Path(ckpt))
        if model_tiles:
            from smfnet_jax.imageio import image_size
            from smfnet_jax.inference import tile_starts
            w, h = image_size(folder / "ir" / "pair.png")
            starts = [tile_starts(n, min(tile, n), args.overlap) for n in (h, w)]
            tiles = len(starts[0]) * len(starts[1])
            fuser = LastTilesByModel(fuser, tiles, min(model_tiles, tiles))
    else:
        fuser = stand_in
        infer_main.describe_run = lambda *a, **k: "stand-in fuser (no model): host-side memory only"
    before = rss_bytes()
    t0 = time.perf_counter()
    rc = infer_main.run(args, fuser=fuser)
    return {"rc": rc, "seconds": time.perf_counter() - t0, "rss_before": before,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=program_name("infer.bench_memory"), description=__doc__.split("\n\n")[2],
                                epilog="\n\n".join(__doc__.split("\n\n")[3:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="12000x12000", metavar="HxW", help="pair size (default: 12000x12000)")
    p.add_argument("--ckpt", help="fuse with this checkpoint (default: a stand-in, the host side alone)")
    p.add_argument("--model-tiles", type=int, default=0, metavar="N",
                   help="with --ckpt: the model fuses only the last N tiles, the stand-in the others "
                        "(the same peak in a fraction of the time; needs --tile, default 512 then)")
    p.add_argument("--grey", action="store_true", help="a grey second image (default: RGB)")
    p.add_argument("--tile", type=int, default=0, metavar="SIZE",
                   help="--tile for infer.main (default: 0, its automatic choice)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the figures to this JSON file")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: the measured process
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.model_tiles and not args.ckpt:
        print("error: --model-tiles needs --ckpt", file=sys.stderr)
        return 2
    if args.model_tiles and not args.tile:
        args.tile = 512
    if args.json is not None and not args.child:
        from infer.common import json_out_problem
        problem = json_out_problem(
            args.json, inputs={Path(args.ckpt): "the --ckpt checkpoint"} if args.ckpt else None)
        if problem:  # before any work: a bad --json must not cost the measurement
            print(f"error: {problem}", file=sys.stderr)
            return 2
    if args.child:
        print(json.dumps(child(args.child, args.ckpt, args.tile, args.model_tiles)))
        return 0
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        print(f"error: --size {args.size}: expected HxW, e.g. 12000x12000", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="smfnet-bench-memory-") as tmp:
        t0 = time.perf_counter()
        synthetic_pair(Path(tmp), h, w, colour=not args.grey)
        print(f"wrote a {h}x{w} {'grey' if args.grey else 'RGB'} pair in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "infer.bench_memory", "--child", tmp, "--tile", str(args.tile)]
        if args.ckpt:
            cmd += ["--ckpt", args.ckpt, "--model-tiles", str(args.model_tiles)]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if r.returncode != 0:
            print(f"error: the fusion process exited with {r.returncode}", file=sys.stderr)
            return 1
        fig = json.loads(r.stdout.strip().splitlines()[-1])
    model = ("stand-in (host side only)" if not args.ckpt else f"checkpoint {args.ckpt}"
             + (f", the last {args.model_tiles} tiles" if args.model_tiles else ""))
    fig.update(size=f"{h}x{w}", model=model,
               bytes_per_pixel=(fig["peak_rss"] - fig["rss_before"]) / (h * w))
    gb = 2**30
    print(f"{h}x{w} ({fig['model']}): peak RSS {fig['peak_rss'] / gb:.2f} GB, "
          f"{fig['rss_before'] / gb:.2f} GB before fusing, {fig['bytes_per_pixel']:.1f} bytes per pixel "
          f"more; fused in {fig['seconds']:.0f} s, infer.main exit {fig['rc']}")
    if args.json:
        from smfnet_jax.fileio import atomic_write_json
        atomic_write_json(args.json, fig)
    return 0 if fig["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
