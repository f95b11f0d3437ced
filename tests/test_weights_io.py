"""safetensors reading/writing, the dtype and finiteness policy, convert --force, quiet orbax.

The cross-checks use the `safetensors` package (the [test] extra) as the reference
implementation: our files must load there and its files here.
"""
import json
import logging
import struct
from collections import OrderedDict

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from smfnet_jax.checkpoint import CheckpointError, load_checkpoint, save_converted
from smfnet_jax.torch_weights.mapping import KeyMapError, flatten_reference
from smfnet_jax.torch_weights.pth_io import load_pth, save_pth
from smfnet_jax.torch_weights.safetensors_io import (SafetensorsError, load_safetensors,
                                                     save_safetensors)


def _flat_state(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_model(a, b):
    fa, fb = _flat_state(a), _flat_state(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype and fa[path].tobytes() == fb[path].tobytes(), path


@pytest.fixture(scope="module")
def converted(fixture_pth, tmp_path_factory):
    """The fixture converted by the CLI to .safetensors and to an orbax directory."""
    from convert.main import main
    root = tmp_path_factory.mktemp("converted")
    st, orbax = root / "m.safetensors", root / "orbax"
    assert main(["--pth", str(fixture_pth), "--out", str(st)]) == 0
    assert main(["--pth", str(fixture_pth), "--out", str(orbax)]) == 0
    return {"st": st, "orbax": orbax}


@pytest.fixture(scope="module")
def pth_model(fixture_pth):
    return load_checkpoint(fixture_pth)


# ------------------------------------------------------------------ safetensors

def test_safetensors_same_model_and_back_to_pth(converted, pth_model, fixture_ckpt, tmp_path):
    loaded = load_checkpoint(converted["st"])
    _assert_same_model(loaded.model, pth_model.model)
    assert loaded.meta["format"] == "smfnet-reference-state-dicts" and loaded.meta["version"] == "1"
    from convert.main import main
    back = tmp_path / "back.pth"
    assert main(["--ckpt", str(converted["st"]), "--to-pth", str(back)]) == 0
    again = load_pth(back)
    for sub, sd in fixture_ckpt.items():
        assert list(again[sub]) == list(sd)
        for key, arr in sd.items():
            assert again[sub][key].dtype == arr.dtype and again[sub][key].shape == arr.shape
            assert again[sub][key].tobytes() == arr.tobytes(), key


def test_reference_implementation_reads_ours(converted, fixture_ckpt):
    theirs = safetensors.numpy.load_file(converted["st"])
    ours = flatten_reference(fixture_ckpt)
    assert theirs.keys() == ours.keys()  # every tensor, the 40 unused ones included
    for name, arr in ours.items():
        assert theirs[name].dtype == arr.dtype and theirs[name].shape == arr.shape
        assert theirs[name].tobytes() == arr.tobytes(), name
    assert "DIDF_Encoder/module.baseFeature.reduce_channel.weight" in theirs
    from safetensors import safe_open
    with safe_open(converted["st"], "np") as f:
        meta = f.metadata()
    assert meta["source"].endswith("smfnet_random_init.pth") and meta["version"] == "1"


def test_we_read_reference_implementations_files(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32),
               "b.half": rng.standard_normal(5).astype(np.float16),
               "c": np.arange(6, dtype=np.int64).reshape(2, 3),
               "d": np.array(7, np.int32), "e": np.zeros((0, 2), np.float64),
               "f": np.array([True, False])}
    path = tmp_path / "theirs.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"k": "v"})
    got, meta = load_safetensors(path)
    assert meta == {"k": "v"} and got.keys() == tensors.keys()
    for k, arr in tensors.items():
        assert got[k].dtype == arr.dtype and got[k].shape == arr.shape
        assert got[k].tobytes() == arr.tobytes(), k


def test_bfloat16_round_trip(tmp_path):
    import ml_dtypes
    arr = np.array([1.5, -2.25, 3e38], dtype=ml_dtypes.bfloat16)
    save_safetensors(tmp_path / "b.safetensors", {"x": arr})
    got, _ = load_safetensors(tmp_path / "b.safetensors")
    assert got["x"].dtype == arr.dtype and got["x"].tobytes() == arr.tobytes()


def _valid_bytes():
    header = {"__metadata__": {"format": "t"},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}
    return header, bytes(16)


def _file(path, header, data, length=None):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _mutate(kind):
    header, data = _valid_bytes()
    length = None
    if kind == "huge header":
        length, match = 2 ** 40, "exceeds"
    elif kind == "header past end":
        length, match = 10_000, "past the end"
    elif kind == "bad json":
        header, match = b"{not json", "not UTF-8 JSON"
    elif kind == "not object":
        header, match = b"[1, 2]", "not a JSON object"
    elif kind == "deep":  # json.loads would raise RecursionError
        header, match = b"[" * 100000 + b"]" * 100000, "not a valid safetensors file: .*nested too deeply"
    elif kind == "dtype":
        header["a"]["dtype"], match = "F128", "unknown dtype"
    elif kind == "span":
        header["a"]["shape"], match = [3], "needs 12 bytes"
    elif kind == "beyond":
        header["b"]["data_offsets"], match = [8, 24], "past the data region"
    elif kind == "overlap":
        header["b"]["data_offsets"], data, match = [4, 12], bytes(12), "overlapping"
    elif kind == "hole":
        header["b"]["data_offsets"], data, match = [12, 20], bytes(20), "hole"
    elif kind == "trailing":
        data, match = bytes(24), "data region holds 24"
    elif kind == "metadata":
        header["__metadata__"], match = {"k": 1}, "strings to strings"
    elif kind == "keys":
        header["a"]["extra"], match = 1, "expected the keys"
    else:
        raise AssertionError(kind)
    return header, data, length, match


@pytest.mark.parametrize("kind", ["huge header", "header past end", "bad json", "not object", "deep",
                                  "dtype", "span", "beyond", "overlap", "hole", "trailing",
                                  "metadata", "keys"])
def test_hostile_safetensors_refused(tmp_path, kind):
    header, data, length, match = _mutate(kind)
    path = _file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(SafetensorsError, match=match) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)


def test_safetensors_valid_base_and_budget(tmp_path, monkeypatch):
    header, data = _valid_bytes()
    path = _file(tmp_path / "ok.safetensors", header, data)
    got, meta = load_safetensors(path)  # the unmutated file is fine
    assert got["a"].shape == (2,) and got["b"].dtype == np.int64 and meta == {"format": "t"}
    with pytest.raises(SafetensorsError, match="budget"):
        load_safetensors(path, max_bytes=64)
    monkeypatch.setenv("SMFNET_CKPT_MAX_BYTES", "64")
    with pytest.raises(SafetensorsError, match="SMFNET_CKPT_MAX_BYTES"):
        load_safetensors(path)


def test_short_file_refused(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x00")
    with pytest.raises(SafetensorsError, match="shorter than"):
        load_checkpoint(path)


# ------------------------------------------------------------------ dtype and finite policy

def _with(ckpt, sub, key, value):
    out = {s: OrderedDict(sd) for s, sd in ckpt.items()}
    out[sub][key] = value
    return out


def test_non_finite_refused_in_every_format(fixture_ckpt, pth_model, tmp_path):
    key = "module.output.4.weight"
    bad_value = fixture_ckpt["DIDF_Decoder"][key].copy()
    bad_value.flat[3] = np.nan
    bad = _with(fixture_ckpt, "DIDF_Decoder", key, bad_value)
    name = r"DIDF_Decoder/module\.output\.4\.weight"
    save_pth(tmp_path / "nan.pth", bad)
    save_safetensors(tmp_path / "nan.safetensors", flatten_reference(bad))
    for path in (tmp_path / "nan.pth", tmp_path / "nan.safetensors"):
        with pytest.raises(KeyMapError, match=name) as err:
            load_checkpoint(path)
        assert str(path) in str(err.value) and "non-finite" in str(err.value)
    # orbax: a model that holds an inf (bypassing the loaders' checks)
    from smfnet_jax.torch_weights.keymap import KEY_MAP, SUBMODEL_KEYS
    model = nnx.clone(pth_model.model)
    row = next(r for r in KEY_MAP if r.submodel == "DIDF_Decoder" and r.full_key == key)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    kernel = flat[(SUBMODEL_KEYS[row.submodel],) + row.path]
    value = np.array(kernel.get_value())
    value.flat[0] = np.inf
    kernel.set_value(value)
    save_converted(tmp_path / "inf_orbax", model, pth_model.extras, {})
    with pytest.raises(KeyMapError, match=name) as err:
        load_checkpoint(tmp_path / "inf_orbax")
    assert "inf_orbax" in str(err.value)
    # float64 beyond float32's range becomes inf: refused too
    big = fixture_ckpt["DIDF_Decoder"][key].astype(np.float64)
    big.flat[0] = 1e300
    save_pth(tmp_path / "big.pth", _with(fixture_ckpt, "DIDF_Decoder", key, big))
    with pytest.raises(KeyMapError, match=name):
        load_checkpoint(tmp_path / "big.pth")


def test_dtype_policy(fixture_ckpt, pth_model, tmp_path):
    import ml_dtypes
    from smfnet_jax.torch_weights.mapping import load_reference_weights
    from smfnet_jax.model import create_model
    # bfloat16 and float16 checkpoints load, as their values cast to float32
    for dtype in (ml_dtypes.bfloat16, np.float16):
        low = {s: OrderedDict((k, a.astype(dtype) if a.dtype == np.float32 else a)
                              for k, a in sd.items()) for s, sd in fixture_ckpt.items()}
        model = create_model(1)
        load_reference_weights(model, low, source="low.pth")
        want = create_model(1)
        load_reference_weights(want, {s: OrderedDict((k, np.asarray(a).astype(np.float32)
                                                      if a.dtype == dtype else a)
                                                     for k, a in sd.items())
                                      for s, sd in low.items()})
        _assert_same_model(model, want)
    # an integer weight is refused, naming the key and the accepted dtypes
    key = "module.output.4.weight"
    bad = _with(fixture_ckpt, "DIDF_Decoder", key,
                fixture_ckpt["DIDF_Decoder"][key].astype(np.int32))
    save_pth(tmp_path / "int.pth", bad)
    with pytest.raises(KeyMapError, match="float32, float16, bfloat16, float64") as err:
        load_checkpoint(tmp_path / "int.pth")
    assert key in str(err.value) and "int.pth" in str(err.value)


# ------------------------------------------------------------------ convert --force, orbax

def test_force_replaces_atomically(fixture_pth, converted, tmp_path, monkeypatch, capsys):
    import orbax.checkpoint as ocp
    from convert.main import main
    out = tmp_path / "ck"
    assert main(["--pth", str(fixture_pth), "--out", str(out)]) == 0
    with pytest.raises(SystemExit) as err:  # no --force: refused, status 2, old kept
        main(["--pth", str(converted["st"]), "--out", str(out)])
    assert err.value.code == 2 and "--force" in capsys.readouterr().err
    assert main(["--pth", str(converted["st"]), "--out", str(out), "--force"]) == 0
    assert load_checkpoint(out).meta["source"] == str(converted["st"].resolve())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def boom(self, *a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ocp.CheckpointManager, "save", boom)
    assert main(["--pth", str(fixture_pth), "--out", str(out), "--force"]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no debris
    assert load_checkpoint(out).meta["source"] == str(converted["st"].resolve())  # old intact


def test_loading_converted_dir_and_workdir_logs_no_warnings(converted, pth_model, tmp_path, caplog):
    import orbax.checkpoint as ocp
    from smfnet_jax.checkpoint import model_state
    # a training workdir: checkpoints/<step>/ with items we do not restore (opt, data)
    workdir = tmp_path / "run"
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        mngr.save(3, args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_state(pth_model.model)),
            opt=ocp.args.StandardSave({"count": np.zeros((), np.int32)})))
        mngr.wait_until_finished()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        a = load_checkpoint(converted["orbax"])
        b = load_checkpoint(workdir)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert a.step == 0 and len(a.extras) == 40 and b.step == 3 and b.extras is None
    _assert_same_model(a.model, pth_model.model)
    _assert_same_model(b.model, pth_model.model)
    with pytest.raises(CheckpointError, match="no step 7"):
        load_checkpoint(workdir, step=7)
