"""Tiled fusion: images of any size in bounded memory.

    from smfnet_jax.api import load_fuser
    from smfnet_jax.inference import fuse_tiled
    fuser = load_fuser("models/model_VIF.pth")
    fused = fuse_tiled(fuser, ir, vi, tile=512, overlap=32)   # any size, bounded memory

`fuse_tiled` fuses overlapping tiles and blends them. SMFNet has global channel attention
(every attention layer normalises over the whole image), so a tiled result is close to,
but not equal to, the whole-image one; see docs/fusing.md ("Any size: tiles") for the measured deviation.

Smallest size: `MIN_SIDE` (2) pixels a side; `too_small(h, w)` says why a pair is smaller,
the one rule of every fusion path (checkpoint, exported files, batches, tiles, infer.main).

Memory estimate: `forward_bytes(h, w)` (whole-image fusion), `available_bytes()` (free
device memory or available RAM) and `plan_tile(h, w, available)` (0: fuse whole, else a
tile size) let a caller decide before compiling or decoding an image; infer.main uses them.
`fuse_tiled_by` takes a function that returns the tiles' inputs instead of whole arrays, and
`fused_rows` yields the finished rows as they come: with them, what grows with the image is
only what the caller keeps (infer.main: the 8-bit pixels and the fused float32 output).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


# --------------------------------------------------------------------------- size
# The smallest height and width SMFNet fuses: the invertible blocks pad a 3x3 depthwise conv
# by reflection, one pixel a side, which needs two rows and two columns (the PyTorch
# reference's ReflectionPad2d refuses fewer; jnp.pad would quietly repeat the one pixel). The
# exported files carry it as their symbolic H, W >= MIN_SIDE.
MIN_SIDE = 2


def too_small(height: int, width: int) -> str | None:
    """Why an HxW pair cannot be fused (a side under MIN_SIDE), or None. Every fusion path
    (checkpoint, exported file, batches, tiles, infer.main before decoding) asks this."""
    if min(height, width) < MIN_SIDE:
        return (f"{width}x{height} (WxH) is too small: SMFNet needs at least {MIN_SIDE} pixels a "
                f"side (the reflection padding of its invertible blocks)")
    return None


# --------------------------------------------------------------------------- tiling
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), consecutive tiles overlapping
    by at least `overlap`; the last tile is shifted to end exactly at the border."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_ramp(length: int, start: int, tile: int, overlap: int) -> np.ndarray:
    """1-D blending weight of one tile: a raised-cosine ramp over `overlap` pixels at each
    side that borders another tile, 1 elsewhere (and at image borders). Never zero, so
    every pixel has a positive total weight."""
    w = np.ones(tile, np.float64)
    if overlap > 0:
        t = (np.arange(overlap) + 0.5) / overlap
        ramp = 0.5 - 0.5 * np.cos(np.pi * t)  # smooth: zero slope at both ends
        if start > 0:
            w[:overlap] = ramp
        if start + tile < length:
            w[tile - overlap:] = np.minimum(w[tile - overlap:], ramp[::-1])
    return w


def fuse_tiled(fuser: Callable[[np.ndarray, np.ndarray], np.ndarray], ir: np.ndarray,
               vi: np.ndarray, tile: int | tuple[int, int] = 512, overlap: int = 32,
               progress: bool = False) -> np.ndarray:
    """Fuse an (ir, vi) pair of any size tile by tile; returns the HxW float32 fusion.

    `fuser(ir_tile, vi_tile) -> fused_tile` is any HxW -> HxW fuser (e.g. `load_fuser(...)`).
    Tiles are `tile` x `tile` (or (th, tw)) and overlap by at least `overlap` pixels; the
    last row/column of tiles is shifted to end at the border, so every tile has the same
    shape and the jitted fuser compiles once. Along an axis shorter than the tile, the tile
    spans the whole axis; an image no larger than one tile is fused whole, exactly as
    `fuser(ir, vi)`. Overlaps are blended with raised-cosine weights, so there are no seams.
    Memory: the fuser's working set for one tile, the output and one row of tiles.
    """
    ir = np.asarray(ir, np.float32)
    vi = np.asarray(vi, np.float32)
    if ir.ndim != 2 or ir.shape != vi.shape:
        raise ValueError(f"expected two HxW arrays of one size, got {ir.shape} and {vi.shape}")
    return fuse_tiled_by(fuser, lambda rows, cols: (ir[rows, cols], vi[rows, cols]), ir.shape,
                         tile, overlap, progress)


def fuse_tiled_by(fuser: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  read: Callable[[slice, slice], tuple[np.ndarray, np.ndarray]],
                  shape: tuple[int, int], tile: int | tuple[int, int] = 512, overlap: int = 32,
                  progress: bool = False) -> np.ndarray:
    """`fuse_tiled` of the HxW pair whose tiles `read(rows, cols) -> (ir, vi)` returns (float32
    slices of the inputs), so that the inputs need not exist as float arrays: infer.main
    keeps a huge pair as its decoded 8-bit pixels and converts one tile at a time."""
    out = np.empty(shape, np.float32)
    for y, rows in fused_rows(fuser, read, shape, tile, overlap, progress):
        out[y:y + rows.shape[0]] = rows
    return out


def fused_rows(fuser, read, shape, tile=512, overlap=32, progress=False):
    """Yield (y, rows): the finished float32 rows of the tiled fusion (see `fuse_tiled_by`)
    from row y on, top to bottom, as soon as no later tile touches them. The float64
    accumulator spans one row of tiles, not the image."""
    h, w = shape
    problem = too_small(h, w)
    if problem:
        raise ValueError(problem)
    th, tw = (tile, tile) if np.isscalar(tile) else tuple(tile)
    th, tw = int(th), int(tw)
    if th < MIN_SIDE or tw < MIN_SIDE:  # every tile is fused as an image of its own
        raise ValueError(f"tile must be at least {MIN_SIDE} a side, got {tile}")
    if overlap < 0 or overlap >= min(th, tw):
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} for tile={tile}")
    th, tw = min(th, h), min(tw, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(ys) == 1 and len(xs) == 1:
        yield 0, np.asarray(fuser(*read(slice(0, h), slice(0, w))), np.float32)
        return

    wy = [blend_ramp(h, y, th, min(overlap, th)) for y in ys]
    wx = [blend_ramp(w, x, tw, min(overlap, tw)) for x in xs]
    # The tile grid is a product, so the total weight is separable: (sum_i wy_i) x (sum_j wx_j).
    norm_y, norm_x = np.zeros(h), np.zeros(w)
    for y, wgt in zip(ys, wy):
        norm_y[y:y + th] += wgt
    for x, wgt in zip(xs, wx):
        norm_x[x:x + tw] += wgt
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(ys) * len(xs), desc="tiles", unit="tile", leave=False, disable=None)
    acc = np.zeros((th, w), np.float64)  # rows ys[i] .. ys[i] + th of the blended sum
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            out = np.asarray(fuser(*read(slice(y, y + th), slice(x, x + tw))), np.float64)
            if out.shape != (th, tw):
                raise ValueError(f"fuser returned shape {out.shape} for a {th}x{tw} tile")
            acc[:, x:x + tw] += out * wy[i][:, None] * wx[j][None, :]
            if bar is not None:
                bar.update(1)
        done = (ys[i + 1] if i + 1 < len(ys) else h) - y  # rows no later tile touches
        rows = acc[:done] / norm_y[y:y + done, None]
        rows /= norm_x[None, :]
        yield y, rows.astype(np.float32)
        carry = np.zeros_like(acc)
        carry[:th - done] = acc[done:]
        acc = carry
    if bar is not None:
        bar.close()


# --------------------------------------------------------------------------- memory estimate
# Working set of the untiled forward (`Fuser`, float32), per pixel of the image, and the
# fixed part (parameters, program, runtime): from XLA's memory_analysis() of the compiled
# fusion at 64x64, 128x128 and 128x256, checked against infer.bench's peak RSS at 480x640
# (figures in docs/fusing.md, "Memory check before each pair").
FORWARD_BYTES_PER_PIXEL = 5300
FORWARD_FIXED_BYTES = 512 * 2**20
# Host-side arrays per pixel while infer.main reads, fuses (in tiles) and writes a pair: the
# 8-bit inputs (1 + 3), the fused float32 output (4), the 8-bit RGB output (3) and the
# block-wise temporaries; `python -m infer.bench_memory` measured 12.4 at 12000x12000.
# (Whole-image fusion's float inputs are counted in forward_bytes, as XLA's arguments.)
HOST_BYTES_PER_PIXEL = 16
# Share of the available memory a plan may use (the estimate is not exact).
MEMORY_MARGIN = 0.8


def forward_bytes(height: int, width: int, batch: int = 1, dtype="float32") -> int:
    """Estimated peak memory of fusing `batch` HxW pairs whole (no tiles)."""
    itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    return int(FORWARD_FIXED_BYTES + FORWARD_BYTES_PER_PIXEL * itemsize / 4 * height * width * batch)


def host_bytes(height: int, width: int) -> int:
    """Estimated host memory of one pair's arrays outside the model (tiled or not)."""
    return HOST_BYTES_PER_PIXEL * height * width


def available_bytes(device=None) -> int | None:
    """Memory a fusion may use now: free device memory on an accelerator (from
    `device.memory_stats()`), available RAM on CPU (/proc/meminfo MemAvailable, else
    os.sysconf); None when unknown."""
    import jax  # lazily: the estimate's arithmetic does not need JAX

    device = device or jax.devices()[0]
    if device.platform != "cpu":
        try:
            stats = device.memory_stats() or {}
        except Exception:  # some runtimes do not report memory
            stats = {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    return available_ram()


def available_ram() -> int | None:
    """Available host RAM in bytes (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def plan_tile(height: int, width: int, available: int | None, dtype="float32",
              sizes=(512, 256, 128)) -> int:
    """0 when an HxW pair fits whole in `available` bytes (or when that is unknown), else the
    largest tile size in `sizes` whose forward fits; raises MemoryError when not even the
    smallest tile (or the host-side arrays) fits."""
    if available is None:
        return 0
    budget = available * MEMORY_MARGIN
    gb = 2**30
    if forward_bytes(height, width, 1, dtype) <= budget and host_bytes(height, width) <= budget:
        return 0
    for size in sizes:
        need = forward_bytes(min(size, height), min(size, width), 1, dtype) + host_bytes(height, width)
        if need <= budget:
            return size
    raise MemoryError(
        f"{width}x{height} needs about {forward_bytes(height, width, 1, dtype) / gb:.1f} GB whole "
        f"and {(forward_bytes(sizes[-1], sizes[-1], 1, dtype) + host_bytes(height, width)) / gb:.1f} GB "
        f"in {sizes[-1]}-pixel tiles; {available / gb:.1f} GB available")


def pairs_that_fit(height: int, width: int, available: int | None, dtype="float32") -> int:
    """How many HxW pairs may be fused whole in one call (>= 1; large when memory is unknown)."""
    if available is None:
        return 2**31
    one = forward_bytes(height, width, 1, dtype) - FORWARD_FIXED_BYTES + host_bytes(height, width)
    return max(1, int((available * MEMORY_MARGIN - FORWARD_FIXED_BYTES) // max(one, 1)))
