"""Fusion: the memory-lean `SMFNet.fuse` equals phase II, tiles blend without seams, the
compilation cache and the benchmark CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from smfnet_jax.api import Fuser
from smfnet_jax.checkpoint import load_pth_model
from smfnet_jax.inference import blend_ramp, fuse_tiled, tile_starts
from smfnet_jax.runtime import enable_compilation_cache
from helpers import assert_close

ROOT = Path(__file__).resolve().parent.parent
# Tiles see less context than the whole image (channel attention is global), so tiled fusion
# is close to, not equal to, whole-image fusion: 48.1 dB PSNR measured on the fixture pair in
# 32/8 tiles (docs/fusing.md's 50-54 dB are for real weights at 480x640 in 128-256 px tiles).
TILED_PSNR_FLOOR_DB = 45.0


@pytest.fixture(scope="session")
def model(fixture_pth):
    return load_pth_model(fixture_pth).model


@pytest.fixture(scope="session")
def fuser(model):
    return Fuser(model)  # compiled once per shape, shared by the tests


@pytest.fixture(scope="session")
def pair(reference_arrays):
    """The fixture's second sample, HxW (40x56): ir, vi, and the reference's fused output."""
    return tuple(reference_arrays[k][1, 0] for k in ("ir", "vi", "fused"))


# ----------------------------------------------------------------------------- the fusion path
def test_fuse_equals_phase2_in_eval_mode(model, fuser, pair):
    """`fuse` (encoder passes in sequence, running sums, ordered graph) is phase II's
    `fused` in another order of work: equal up to float rounding, on the whole batch."""
    ir, vi, _ = pair
    m = nnx.clone(model)
    m.eval()
    whole = nnx.jit(lambda m, a, b: m.phase2(a, b)["fused"])(m, vi[None, :, :, None], ir[None, :, :, None])
    assert_close("fuse vs phase2", fuser(ir, vi), np.asarray(whole)[0, :, :, 0])


def test_batched_fusion_equals_one_by_one(fuser, reference_arrays):
    ir, vi = reference_arrays["ir"][:, 0], reference_arrays["vi"][:, 0]   # 2 pairs, 40x56
    batched = fuser(ir, vi)
    assert batched.shape == ir.shape
    for i in range(len(ir)):
        assert_close(f"pair {i}", batched[i], fuser(ir[i], vi[i]), rtol=1e-6)
    with pytest.raises(ValueError, match="HxW"):
        fuser(ir, vi[:1])


def test_xla_routines_fuse_like_cpu_routines(model, fuser, pair):
    """`fuse` with XLA's convolutions everywhere (the GPU/TPU path), run on CPU."""
    from smfnet_jax.policy import ComputePolicy
    ir, vi, fused = pair
    xla = Fuser(model, policy=ComputePolicy("xla"))
    assert xla.model.encoder.patch_embed.policy.routines == "xla"
    assert fuser.model.encoder.patch_embed.policy.routines == model.policy.routines  # own copy
    out = xla(ir, vi)
    assert_close("fuse, xla routines", out, fuser(ir, vi))
    assert_close("fuse, xla routines vs reference", out, fused)


def test_fuser_leaves_the_model_in_train_mode(model):
    Fuser(model)
    assert not model.graph.concat_ir.bn.use_running_average and not model.encoder.patch_embed.deterministic
    assert Fuser(model).model.encoder.patch_embed.deterministic


# ----------------------------------------------------------------------------- tiling
def test_tile_larger_than_image_is_untiled_fusion(fuser, pair):
    ir, vi, _ = pair
    np.testing.assert_array_equal(fuse_tiled(fuser, ir, vi, tile=64, overlap=8), fuser(ir, vi))


def test_tiled_model_output(fuser, pair):
    ir, vi, _ = pair  # 40x56 in 32x32 tiles: 2 x 2 tiles, one compile
    out = fuse_tiled(fuser, ir, vi, tile=32, overlap=8)
    whole = fuser(ir, vi)
    assert out.shape == ir.shape and out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    psnr = 10 * np.log10(1.0 / np.mean((out.astype(np.float64) - whole) ** 2))
    assert psnr >= TILED_PSNR_FLOOR_DB, psnr


class PixelFuser:
    """A per-pixel fuser that records the tile shapes it is called with."""

    def __init__(self):
        self.shapes = []

    def __call__(self, ir, vi):
        self.shapes.append(ir.shape)
        return (0.3 * ir + 0.7 * vi * vi).astype(np.float32)


@pytest.mark.parametrize("shape,tile,overlap", [((45, 61), 16, 4), ((45, 61), (7, 13), 3),
                                                ((45, 61), 20, 0), ((10, 61), 16, 5)])
def test_tiling_a_per_pixel_fuser_is_exact(shape, tile, overlap):
    rng = np.random.default_rng(5)
    ir, vi = (rng.random(shape, dtype=np.float32) for _ in range(2))
    f = PixelFuser()
    out = fuse_tiled(f, ir, vi, tile=tile, overlap=overlap)
    np.testing.assert_array_equal(out, (0.3 * ir + 0.7 * vi * vi).astype(np.float32))
    th, tw = (tile, tile) if np.isscalar(tile) else tile
    assert set(f.shapes) == {(min(th, shape[0]), min(tw, shape[1]))}  # one shape: one compile
    ny = len(tile_starts(shape[0], min(th, shape[0]), overlap))
    nx = len(tile_starts(shape[1], min(tw, shape[1]), overlap))
    assert len(f.shapes) == ny * nx


def test_tile_starts_cover_and_end_at_border():
    for length, tile, overlap in [(100, 32, 8), (33, 32, 8), (32, 32, 8), (200, 50, 0)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] == length - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        assert blend_ramp(length, starts[-1], tile, overlap).min() > 0


def test_blended_tiles_have_no_seams():
    """A fuser giving each tile a different constant: blending must spread each jump over
    the overlap, while without overlap the output jumps by the full step (the test can fail)."""
    class StepFuser:
        n = 0

        def __call__(self, ir, vi):
            StepFuser.n += 1
            return np.full(ir.shape, float(StepFuser.n % 2), np.float32)

    ir = np.zeros((64, 96), np.float32)
    blended = fuse_tiled(StepFuser(), ir, ir, tile=32, overlap=16)
    hard = fuse_tiled(StepFuser(), ir, ir, tile=32, overlap=0)
    step = lambda a: max(np.abs(np.diff(a, axis=0)).max(), np.abs(np.diff(a, axis=1)).max())
    assert step(hard) == 1.0
    assert step(blended) <= np.pi / (2 * 16) + 1e-6  # the raised-cosine ramp's steepest slope


def test_fuse_tiled_rejects_bad_arguments():
    ir = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        fuse_tiled(PixelFuser(), ir, ir, tile=4, overlap=4)
    with pytest.raises(ValueError, match="size"):
        fuse_tiled(PixelFuser(), ir, np.zeros((8, 9), np.float32), tile=4, overlap=1)


# ----------------------------------------------------------------------------- cache and CLI
def test_enable_compilation_cache(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("SMFNET_JAX_CACHE", "off")
    assert enable_compilation_cache() is None
    assert jax.config.jax_compilation_cache_dir == before
    try:
        monkeypatch.setenv("SMFNET_JAX_CACHE", str(tmp_path / "xla"))
        path = enable_compilation_cache()
        assert path == tmp_path / "xla" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        # without SMFNET_JAX_CACHE, a user's JAX_COMPILATION_CACHE_DIR is honoured
        monkeypatch.delenv("SMFNET_JAX_CACHE")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "users"))
        assert enable_compilation_cache() == tmp_path / "users"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "users")
    finally:  # do not leave the rest of the session writing into tmp_path
        jax.config.update("jax_compilation_cache_dir", before)
        from jax.experimental.compilation_cache import compilation_cache as cc
        cc.reset_cache()


def test_bench_cli(tmp_path, fixture_pth):
    env = dict(os.environ, SMFNET_JAX_CACHE=str(tmp_path / "xla"))
    help_ = subprocess.run([sys.executable, "-m", "infer.bench", "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "--sizes" in help_.stdout
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "infer.bench", "--ckpt", str(fixture_pth),
                          "--sizes", "16x16", "--repeats", "1", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    first = run.stdout.splitlines()[0]
    assert first.startswith("infer.bench: routines ") and "precision highest, float32" in first, first
    result = json.loads(out.read_text())
    assert set(result) == {"16x16"}
    assert result["16x16"]["precision"] == "highest"
    r = result["16x16"]
    for key in ("compile_s", "seconds_per_pair", "pixels_per_s", "gflops", "peak_rss_mb"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["pixels_per_s"] == pytest.approx(256 / r["seconds_per_pair"])


def test_device_check_quick(tmp_path, shared_dir):
    """`python -m infer.device_check --quick`: the parity fixture, fusion timings and a train
    step with both routine sets, one table, exit 0 (what a GPU/TPU session runs in full)."""
    out = tmp_path / "check.json"
    env = dict(os.environ, SMFNET_SHARED=str(shared_dir))
    run = subprocess.run([sys.executable, "-m", "infer.device_check", "--quick", "--json", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-2000:])
    assert "SMFNet device check on" in run.stdout
    doc = json.loads(out.read_text())
    rows = {(r["check"], r["setting"]): r for r in doc["rows"]}
    parity = [r for (check, _), r in rows.items() if check == "parity"]
    assert len(parity) == 19 and all(r["value"] <= 1e-5 for r in parity)
    for dtype in ("float32", "bfloat16"):
        assert rows["fusion", f"128x128 {dtype}"]["value"] > 0
    for impl in ("cpu", "xla"):
        train = rows["train", f"phase II b2 32x32 {impl}"]
        assert train["value"] > 0 and train["peak_rss_mb"] > 0


def test_fused_rows_finish_top_down_with_a_one_row_accumulator():
    """The streamed rows cover the image once, in order, each block no taller than a tile,
    and assemble to fuse_tiled's result (through `read`, as infer.main's 8-bit pairs)."""
    from smfnet_jax.inference import fuse_tiled_by, fused_rows
    rng = np.random.default_rng(8)
    ir, vi = (rng.random((70, 45), dtype=np.float32) for _ in range(2))
    reads = []

    def read(rows, cols):
        reads.append((rows, cols))
        return ir[rows, cols], vi[rows, cols]

    blocks = list(fused_rows(PixelFuser(), read, ir.shape, tile=16, overlap=5))
    assert [y for y, _ in blocks] == tile_starts(70, 16, 5)
    assert sum(len(r) for _, r in blocks) == 70 and max(len(r) for _, r in blocks) <= 16
    assert all(y + len(r) == y2 for (y, r), (y2, _) in zip(blocks, blocks[1:]))
    assert {(r.stop - r.start, c.stop - c.start) for r, c in reads} == {(16, 16)}
    streamed = fuse_tiled_by(StepLike(), read, ir.shape, tile=16, overlap=5)
    np.testing.assert_array_equal(streamed, fuse_tiled(StepLike(), ir, vi, tile=16, overlap=5))


class StepLike:
    """A fuser whose tiles disagree (so the blend matters): tile k adds k/100."""

    def __init__(self):
        self.k = 0

    def __call__(self, ir, vi):
        self.k += 1
        return (ir * vi + self.k / 100).astype(np.float32)
