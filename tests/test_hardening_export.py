"""Exported models and the smallest fusable size: a `.jaxexport` whose payload is not the fusion
function's signature (1 or 3 arguments, a keyword argument, 2 outputs, float16, a fixed 8x8
shape, tied dimensions) or whose JSON header is nested too deep is refused at load in one line, exit 2; and a
pair under `smfnet_jax.inference.MIN_SIDE` pixels a side (1x1, 1x9, 9x1, 1x5000) is refused by
one rule on every path (checkpoint, `.jaxexport`, batches, tiles, infer.main: named and skipped
with the reason before decoding).

The payloads are tiny jitted functions exported with jax.export and written by
`smfnet_jax.export.save_exported`, so no test here builds or compiles the full model.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from smfnet_jax.export import MAGIC, ExportedFuser, _symbolic_pair_spec, read_exported, save_exported
from smfnet_jax.inference import MIN_SIDE, fuse_tiled
from smfnet_jax.policy import ComputePolicy

# (height, width) of pairs too small to fuse, and the smallest that is not.
TOO_SMALL = [(1, 1), (1, 9), (9, 1), (1, 5000), (5000, 1)]
SMALLEST = (MIN_SIDE, MIN_SIDE)


def _export(path: Path, fn, *specs, **kwspecs) -> Path:
    """`fn` jitted, exported for this backend with `specs`, written in the .jaxexport layout."""
    exported = jax.export.export(jax.jit(fn))(*specs, **kwspecs)
    return save_exported(path, exported, ComputePolicy())


def _mean(ir, vi):
    return (ir + vi) / 2


@pytest.fixture(scope="module")
def good_export(tmp_path_factory) -> Path:
    """A tiny function with the fusion's signature (the spec export_fusion uses)."""
    spec = _symbolic_pair_spec("n, h, w")
    return _export(tmp_path_factory.mktemp("good") / "mean.jaxexport", _mean, spec, spec)


def _pairs(root: Path, sizes: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    """ir/ and vi/ folders with one 8-bit pair per name, of (height, width) `sizes[name]`."""
    rng = np.random.default_rng(0)
    for sub in ("ir", "vi"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name, shape in sizes.items():
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / sub / f"{name}.png")
    return root / "ir", root / "vi"


def _fuse_folder(ckpt: Path, root: Path, sizes, capsys) -> tuple[int, list[str], Path]:
    """infer.main on pairs of `sizes`: (exit status, stderr lines but warnings, --out)."""
    from infer import main as cli

    ir, vi = _pairs(root, sizes)
    out = root / "out"
    rc = cli.main(["--ckpt", str(ckpt), "--ir", str(ir), "--vi", str(vi), "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Warning" not in line]
    return rc, err, out


# ----------------------------------------------------------------------------- payload signature
def _sym(dims="n, h, w", dtype=jnp.float32):
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), dtype)


def _one_sym_as_arg_and_kwarg():
    spec = _sym()  # one symbolic scope for both
    return [spec], {"vi": spec}


WRONG_PAYLOADS = {
    "one argument": (lambda: ((lambda ir: ir), [_sym()], {}), "1 positional argument"),
    "three arguments": (lambda: ((lambda a, b, c: a + b + c), [_sym()] * 3, {}), "3 positional arguments"),
    "a keyword argument": (lambda: ((lambda ir, vi=None: ir + vi), *_one_sym_as_arg_and_kwarg()),
                           "keyword arguments vi"),
    "two outputs": (lambda: ((lambda ir, vi: (ir, vi)), [_sym()] * 2, {}), "returns 2 arrays"),
    "float16": (lambda: (_mean, [_sym(dtype=jnp.float16)] * 2, {}), "float16[n,h,w], float16[n,h,w] -> float16[n,h,w]"),
    "fixed 8x8": (lambda: (_mean, [jax.ShapeDtypeStruct((1, 8, 8), jnp.float32)] * 2, {}),
                  "three symbolic dimensions"),
    "square only": (lambda: (_mean, [_sym("n, h, h")] * 2, {}), "three symbolic dimensions"),
}


@pytest.mark.parametrize("case", list(WRONG_PAYLOADS))
def test_a_payload_without_the_fusion_signature_is_refused_at_load(case, tmp_path, capsys):
    make, expected = WRONG_PAYLOADS[case]
    fn, specs, kwspecs = make()
    bad = _export(tmp_path / "bad.jaxexport", fn, *specs, **kwspecs)
    with pytest.raises(ValueError, match="not an SMFNet fusion model") as e:
        read_exported(bad)
    assert expected in str(e.value) and str(bad) in str(e.value)

    rc, err, out = _fuse_folder(bad, tmp_path, {"p": (8, 8)}, capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot load checkpoint {bad}: {bad}: not an SMFNet fusion model ("), err
    assert expected in err[0], err
    assert list(out.iterdir()) == []


def test_the_fusion_signature_loads_and_fuses(good_export, tmp_path, capsys):
    header, exported = read_exported(good_export)
    assert header["bytes"] > 0 and len(exported.in_avals) == 2
    rc, err, out = _fuse_folder(good_export, tmp_path, {"p": (8, 8)}, capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["p.png"]


# ----------------------------------------------------------------------------- header
@pytest.mark.parametrize("nesting", [b"[" * 100_000, b'{"a": ' * 100_000])
def test_a_deeply_nested_header_is_one_line_exit_2(nesting, good_export, tmp_path, capsys):
    data = good_export.read_bytes()
    payload = data[data.index(b"\n", len(MAGIC)) + 1:]
    bad = tmp_path / "nested.jaxexport"
    bad.write_bytes(MAGIC + nesting + b"\n" + payload)
    with pytest.raises(ValueError, match="unreadable header"):
        read_exported(bad)
    rc, err, out = _fuse_folder(bad, tmp_path, {"p": (8, 8)}, capsys)
    assert rc == 2 and err == [f"error: cannot load checkpoint {bad}: {bad}: corrupt exported model "
                               "(unreadable header)"], err
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- smallest size
def _pixel_fuser(ir, vi):
    return (0.3 * ir + 0.7 * vi).astype(np.float32)


@pytest.fixture(scope="module")
def model_fuser():
    """The checkpoint path's fuser (`api.Fuser`) on a freshly initialised model; nothing here
    compiles it (each size is refused before the model runs)."""
    from flax import nnx

    from smfnet_jax.api import Fuser
    from smfnet_jax.model import SMFNet

    return Fuser(SMFNet(rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("shape", TOO_SMALL)
def test_a_pair_too_small_is_refused_by_the_model_fuser(shape, model_fuser):
    h, w = shape
    a = np.zeros(shape, np.float32)
    message = f"{w}x{h} \\(WxH\\) is too small: SMFNet needs at least {MIN_SIDE} pixels a side"
    with pytest.raises(ValueError, match=message):
        model_fuser(a, a)
    with pytest.raises(ValueError, match=message):  # batched
        model_fuser(np.stack([a, a]), np.stack([a, a]))
    with pytest.raises(ValueError, match=message):  # ahead of time
        model_fuser.compile(h, w)


@pytest.mark.parametrize("shape", TOO_SMALL)
def test_a_pair_too_small_is_refused_by_an_exported_file(shape, good_export):
    h, w = shape
    a = np.zeros(shape, np.float32)
    fuser = ExportedFuser(good_export)
    message = f"{w}x{h} \\(WxH\\) is too small"
    with pytest.raises(ValueError, match=message):
        fuser(a, a)
    with pytest.raises(ValueError, match=message):
        fuser(np.stack([a, a]), np.stack([a, a]))


def test_the_smallest_size_fuses_on_an_exported_file(good_export):
    rng = np.random.default_rng(1)
    ir, vi = (rng.random(SMALLEST, dtype=np.float32) for _ in range(2))
    np.testing.assert_allclose(ExportedFuser(good_export)(ir, vi), (ir + vi) / 2, rtol=1e-6)


@pytest.mark.parametrize("shape", TOO_SMALL)
def test_a_pair_too_small_is_refused_in_tiles(shape):
    a = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="too small"):
        fuse_tiled(_pixel_fuser, a, a, tile=16, overlap=4)


def test_a_tile_under_the_smallest_size_is_refused():
    a = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match=f"tile must be at least {MIN_SIDE}"):
        fuse_tiled(_pixel_fuser, a, a, tile=(1, 4), overlap=0)
    np.testing.assert_array_equal(fuse_tiled(_pixel_fuser, a, a, tile=SMALLEST, overlap=0), a)


@pytest.mark.parametrize("path", ["model seam", "jaxexport"])
def test_infer_main_names_and_skips_pairs_too_small(path, good_export, tmp_path, monkeypatch, capsys):
    from infer import main as cli

    if path == "model seam":  # the CLI's own check, whatever the fuser would accept
        monkeypatch.setattr(cli, "load_fuser", lambda ckpt, **kwargs: _pixel_fuser)
    sizes = {f"s{h}x{w}": (h, w) for h, w in TOO_SMALL} | {"least": SMALLEST, "ok": (8, 8)}
    rc, err, out = _fuse_folder(good_export, tmp_path, sizes, capsys)
    assert rc == 1, err
    for h, w in TOO_SMALL:
        line = f"failed s{h}x{w}: {w}x{h} (WxH) is too small: SMFNet needs at least {MIN_SIDE} pixels a side"
        assert any(e.startswith(line) for e in err), (line, err)
    assert not any("refining" in e or "fusion failed" in e for e in err), err
    assert sorted(p.name for p in out.iterdir()) == ["least.png", "ok.png"]


@pytest.mark.parametrize("sizes", ["1x9", "480x640,9x1", "1x1"])
def test_benchmark_sizes_under_the_smallest_are_a_usage_error(sizes, capsys):
    from infer import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--ckpt", "unused.pth", "--sizes", sizes])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"both sides must be at least {MIN_SIDE}" in err[-1], err
