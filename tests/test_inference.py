"""Inference speed-ups and tiling: exact rewrites keep the output, tiles blend without seams.

The rewrites of `fold_for_inference` are checked piece by piece against the layers they
replace (independent implementations in smfnet_jax.layers), and as a whole against the
PyTorch reference's `fused` (fixtures/parity/reference.npz) with the parity tolerance.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smfnet_jax.api import Fuser
from smfnet_jax.checkpoint import load_pth_model
from smfnet_jax.inference import (attention_projected, blend_ramp, enable_compilation_cache,
                                  fold_dense_qkv, fold_for_inference, fuse_tiled, tile_starts)
from smfnet_jax.layers import Conv2d
from smfnet_jax.model import DenseAttention
from helpers import assert_close, reference_channel_attention

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def reference(shared_dir):
    with np.load(shared_dir / "fixtures/parity/reference.npz") as z:
        return {k: z[k] for k in ("ir", "vi", "fused")}


@pytest.fixture(scope="session")
def fixture_pth(shared_dir):
    return shared_dir / "fixtures/parity/smfnet_random_init.pth"


@pytest.fixture(scope="session")
def model(fixture_pth):
    return load_pth_model(fixture_pth).model


@pytest.fixture(scope="session")
def fuser(model):
    return Fuser(model)  # folded (the default); compiled once per shape, shared by the tests


@pytest.fixture(scope="session")
def pair(reference):
    """The fixture's second sample, HxW (40x56): ir, vi, and the reference's fused output."""
    return reference["ir"][1, 0], reference["vi"][1, 0], reference["fused"][1, 0]


# ----------------------------------------------------------------------------- rewrites, piecewise
def _conv(x, k, pad, groups=1, dil=1):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((pad, pad), (pad, pad)), rhs_dilation=(dil, dil),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


def test_fold_dense_qkv_is_the_composition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 11, 8)).astype(np.float32)
    w1 = rng.standard_normal((1, 1, 8, 12)).astype(np.float32)
    w2 = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    ref = _conv(_conv(x, w1, 0), w2, 1)
    folded = _conv(x, fold_dense_qkv(w1, w2).astype(np.float32), 1)
    assert_close("folded qkv", folded, ref)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_projected_matches_reference_attention(bias):
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 7, 16)), jnp.float32) for _ in range(3))
    temperature = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    proj = Conv2d(16, 16, 1, bias=bias, rngs=nnx.Rngs(4))
    ref = proj(jnp.asarray(reference_channel_attention(q, k, v, temperature, 4), jnp.float32))
    assert_close("attention", attention_projected(q, k, v, temperature, 4, proj), ref)


def test_fold_for_inference_leaves_the_model_alone(model):
    folded = fold_for_inference(model)
    dense = [m for _, m in nnx.iter_modules(model) if isinstance(m, DenseAttention)]
    assert dense and all(m.qkv_folded is None for m in dense)
    assert all(type(m) is DenseAttention for m in dense)
    assert any(m.qkv_folded is not None for _, m in nnx.iter_modules(folded)
               if isinstance(m, DenseAttention))


# ----------------------------------------------------------------------------- whole model
def test_folded_fuser_matches_reference(fuser, pair):
    ir, vi, fused = pair
    assert_close("fused[1] (folded)", fuser(ir, vi), fused)


def test_folded_equals_unfolded(model, fuser, pair):
    ir, vi, _ = pair
    assert_close("folded vs unfolded", fuser(ir, vi), Fuser(model, fold=False)(ir, vi))


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
    assert np.corrcoef(out.ravel(), whole.ravel())[0, 1] > 0.9


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
    monkeypatch.setenv("SMFNET_JAX_CACHE", str(tmp_path / "xla"))
    try:
        path = enable_compilation_cache()
        assert path == tmp_path / "xla" and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
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
    result = json.loads(out.read_text())
    assert set(result) == {"16x16"}
    r = result["16x16"]
    for key in ("compile_s", "seconds_per_pair", "pixels_per_s", "gflops", "peak_rss_mb"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["pixels_per_s"] == pytest.approx(256 / r["seconds_per_pair"])
