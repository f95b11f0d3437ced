"""Tests for smfnet_jax.torch_weights.pth_io: torch-free reading/writing of .pth checkpoints.

Reference values never come from pth_io itself: tensors are checked against the raw
storage records read with zipfile + np.frombuffer, and small archives are assembled
here opcode by opcode (as torch.save lays them out) with the expected arrays computed
directly with numpy.
"""
import collections
import os
import pickle
import pickletools
import struct
import zipfile

import numpy as np
import pytest

from smfnet_jax.torch_weights.pth_io import (ALLOWED_GLOBALS, PthError, PthFormatError, PthLimitError,
                            UnsafeCheckpointError,
                            load_pth, save_pth)

SUBMODELS = {"DIDF_Encoder": 168, "DIDF_Decoder": 17, "GraphModel": 94,
             "BaseFuseLayer": 15, "DetailFuseLayer": 40}


# ------------------------------------------------------------------ helpers

def _write_archive(path, pkl: bytes, storages=None, byteorder=b"little", prefix="archive",
                   skip_pkl=False):
    """A torch-style zip archive (record alignment does not matter to a reader)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        if not skip_pkl:
            zf.writestr(f"{prefix}/data.pkl", pkl)
        zf.writestr(f"{prefix}/.format_version", b"1")
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


def _s(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _i(v: int) -> bytes:
    return pickle.BININT + struct.pack("<i", v)


def _tup(items) -> bytes:
    return pickle.MARK + b"".join(_i(v) for v in items) + pickle.TUPLE


def _tensor_ops(key, storage_global, numel, offset, shape, stride, v3_dtype=None) -> bytes:
    """Opcodes of one tensor exactly as torch pickles it (see module docstring of pth_io)."""
    rebuild = b"_rebuild_tensor_v3" if v3_dtype else b"_rebuild_tensor_v2"
    ops = pickle.GLOBAL + b"torch._utils\n" + rebuild + b"\n" + pickle.MARK
    ops += (pickle.MARK + _s("storage") + pickle.GLOBAL + storage_global + _s(key) + _s("cpu")
            + _i(numel) + pickle.TUPLE + pickle.BINPERSID)
    ops += _i(offset) + _tup(shape) + _tup(stride) + pickle.NEWFALSE
    ops += pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
    if v3_dtype:
        ops += pickle.GLOBAL + b"torch\n" + v3_dtype + b"\n"
    return ops + pickle.TUPLE + pickle.REDUCE


def _dict_pickle(entries) -> bytes:
    """Protocol-2 pickle of {name: <ops>} (an OrderedDict, as a state_dict)."""
    body = pickle.PROTO + b"\x02" + pickle.GLOBAL + b"collections\nOrderedDict\n"
    body += pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.MARK
    for name, ops in entries:
        body += _s(name) + ops
    return body + pickle.SETITEMS + pickle.STOP


def _strided_reference(storage: np.ndarray, offset, shape, stride) -> np.ndarray:
    out = np.empty(shape, dtype=storage.dtype)
    for index in np.ndindex(*shape):
        out[index] = storage[offset + sum(i * s for i, s in zip(index, stride))]
    return out


# ------------------------------------------------------------------ (a) the fixture

def test_fixture_structure(fixture_ckpt):
    assert list(fixture_ckpt) == list(SUBMODELS)
    for name, count in SUBMODELS.items():
        sd = fixture_ckpt[name]
        assert isinstance(sd, collections.OrderedDict)
        assert len(sd) == count, name
        assert all(k.startswith("module.") for k in sd)
        for key, arr in sd.items():
            assert isinstance(arr, np.ndarray) and arr.flags.c_contiguous
            if key.endswith("num_batches_tracked"):
                assert arr.dtype == np.int64 and arr.shape == ()
            else:
                assert arr.dtype == np.float32, key
    enc, graph = fixture_ckpt["DIDF_Encoder"], fixture_ckpt["GraphModel"]
    # Shapes from the reference architecture: 1-channel input, dim 64, 3x3 patch embed.
    assert enc["module.patch_embed.proj.weight"].shape == (64, 1, 3, 3)
    assert enc["module.encoder_level1.0.norm1.body.weight"].shape == (64,)
    assert graph["module.graph.graph.ppm_rgb.convs.0.0.weight"].shape == (64, 64, 3, 3)
    assert fixture_ckpt["BaseFuseLayer"]["module.reduce_channel.weight"].shape == (64, 128, 1, 1)
    assert sum(k.endswith("num_batches_tracked") for k in graph) == 12
    # per-module versions that load_state_dict reads are kept
    assert graph._metadata[""] == {"version": 1}


def test_fixture_values_match_raw_records(fixture_pth, fixture_ckpt):
    # torch.save numbers storages in order of first use and this state_dict shares
    # none, so the i-th tensor is record data/i, offset 0, contiguous.
    tensors = [arr for sd in fixture_ckpt.values() for arr in sd.values()]
    with zipfile.ZipFile(fixture_pth) as zf:
        prefix = zf.namelist()[0].split("/")[0]
        assert zf.read(f"{prefix}/byteorder") == b"little"
        for i, arr in enumerate(tensors):
            raw = zf.read(f"{prefix}/data/{i}")
            expected = np.frombuffer(raw, dtype=arr.dtype.newbyteorder("<")).reshape(arr.shape)
            assert np.array_equal(arr, expected, equal_nan=arr.dtype.kind == "f"), i
        assert f"{prefix}/data/{len(tensors)}" not in zf.namelist()


# ------------------------------------------------------------------ (b) round trip

def test_round_trip_bit_for_bit(fixture_ckpt, tmp_path):
    out = tmp_path / "smfnet_copy.pth"
    save_pth(out, fixture_ckpt)
    again = load_pth(out)
    assert list(again) == list(fixture_ckpt)
    for name, sd in fixture_ckpt.items():
        assert list(again[name]) == list(sd)
        assert again[name]._metadata == sd._metadata
        for key, arr in sd.items():
            got = again[name][key]
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert got.tobytes() == arr.tobytes(), key
    assert os.listdir(tmp_path) == ["smfnet_copy.pth"]  # no temp file left behind


def test_saved_archive_has_torch_layout(fixture_ckpt, tmp_path):
    out = tmp_path / "model.v1.pth"
    save_pth(out, {"DIDF_Decoder": fixture_ckpt["DIDF_Decoder"]})
    raw = out.read_bytes()
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        n = len(fixture_ckpt["DIDF_Decoder"])
        assert names == (["model/data.pkl", "model/.format_version", "model/.storage_alignment",
                          "model/byteorder"] + [f"model/data/{i}" for i in range(n)]
                         + ["model/version", "model/.data/serialization_id"])
        assert zf.read("model/byteorder") == b"little"
        assert zf.read("model/.storage_alignment") == b"64"
        assert zf.read("model/version") == b"3\n"
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                           info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        pkl = zf.read("model/data.pkl")
    assert pkl[:2] == b"\x80\x02"  # protocol 2, as torch writes
    globals_used = {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(pkl)
                    if op.name == "GLOBAL"}
    # exactly what torch.save writes for a float32 state_dict; all weights_only-loadable
    assert globals_used == {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                            "torch.FloatStorage"}


def test_round_trip_dtypes_and_layouts(tmp_path):
    import ml_dtypes  # ships with jax

    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    sd = collections.OrderedDict([
        ("f16", np.linspace(-2, 2, 7).astype(np.float16)),
        ("bf16", np.array([1.5, -3.25, 1e30], dtype=ml_dtypes.bfloat16)),
        ("f64", np.array([np.pi, -0.0, np.inf])),
        ("i8", np.array([-128, 0, 127], dtype=np.int8)),
        ("u8", np.array([0, 255], dtype=np.uint8)),
        ("u16", np.array([1, 65535], dtype=np.uint16)),
        ("bool", np.array([[True, False]])),
        ("c64", np.array([1 + 2j, -3j], dtype=np.complex64)),
        ("scalar", np.array(7, dtype=np.int64)),
        ("empty", np.zeros((0, 3), dtype=np.float32)),
        ("fortran", np.asfortranarray(base)),
        ("view", base[1:, ::2]),
        ("big_endian", base.astype(">f4")),
    ])
    out = tmp_path / "dtypes.pth"
    save_pth(out, {"sd": sd})
    got = load_pth(out)["sd"]
    assert list(got) == list(sd)
    for key, arr in sd.items():
        assert got[key].shape == arr.shape, key
        assert got[key].dtype == arr.dtype.newbyteorder("="), key
        assert np.array_equal(got[key], arr), key
    with zipfile.ZipFile(out) as zf:
        pkl = zf.read("dtypes/data.pkl")
    names = {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}
    # torch writes dtypes without a legacy storage class this way
    assert {"torch._utils _rebuild_tensor_v3", "torch.storage UntypedStorage",
            "torch uint16", "torch BFloat16Storage"} <= names


def test_save_failure_leaves_nothing(tmp_path):
    out = tmp_path / "bad.pth"
    with pytest.raises(TypeError, match="object"):
        save_pth(out, {"sd": {"w": np.array([object()], dtype=object)}})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ hand-built archives

def test_strides_offsets_and_dtypes_from_hand_built_archive(tmp_path):
    storage = (np.arange(30, dtype=np.float32) * 1.5 - 7).astype(np.float32)
    longs = np.array([-3, 2 ** 40, 5, 9], dtype=np.int64)
    u16 = np.array([1, 2, 60000, 4], dtype=np.uint16)
    pkl = _dict_pickle([
        ("transposed", _tensor_ops("0", b"torch\nFloatStorage\n", 30, 5, (3, 4), (1, 6))),
        ("sliced", _tensor_ops("0", b"torch\nFloatStorage\n", 30, 7, (2, 3), (10, 2))),
        ("broadcast", _tensor_ops("0", b"torch\nFloatStorage\n", 30, 29, (2, 2), (0, 0))),
        ("long_scalar", _tensor_ops("1", b"torch\nLongStorage\n", 4, 1, (), ())),
        ("u16", _tensor_ops("2", b"torch.storage\nUntypedStorage\n", 8, 1, (2,), (2,),
                            v3_dtype=b"uint16")),
    ])
    for order, fmt in ((b"little", "<"), (b"big", ">")):
        path = _write_archive(tmp_path / f"hand_{order.decode()}.pth", pkl, {
            "0": storage.astype(fmt + "f4").tobytes(), "1": longs.astype(fmt + "i8").tobytes(),
            "2": u16.astype(fmt + "u2").tobytes()}, byteorder=order)
        sd = load_pth(path)
        assert list(sd) == ["transposed", "sliced", "broadcast", "long_scalar", "u16"]
        for key, offset, shape, stride in (("transposed", 5, (3, 4), (1, 6)),
                                           ("sliced", 7, (2, 3), (10, 2)),
                                           ("broadcast", 29, (2, 2), (0, 0))):
            assert sd[key].flags.c_contiguous and sd[key].dtype == np.float32
            np.testing.assert_array_equal(
                sd[key], _strided_reference(storage, offset, shape, stride))
        assert sd["long_scalar"].dtype == np.int64 and sd["long_scalar"].shape == ()
        assert int(sd["long_scalar"]) == 2 ** 40
        assert sd["u16"].dtype == np.uint16 and sd["u16"].tolist() == [2, 4]


# ------------------------------------------------------------------ (c) refusal

class _EvalPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


class _SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("payload_cls,protocol", [(_EvalPayload, 2), (_SystemPayload, 2),
                                                  (_EvalPayload, 4), (_SystemPayload, 4)])
def test_malicious_pickle_refused_unrun(tmp_path, payload_cls, protocol):
    marker = tmp_path / "pwned"
    # a real tensor first, so refusal must not depend on the payload being first
    legit = np.arange(4, dtype=np.float32)
    pkl = pickle.dumps(collections.OrderedDict(w=payload_cls(marker)), protocol=protocol)
    path = _write_archive(tmp_path / "evil.pth", pkl, {"0": legit.tobytes()})
    with pytest.raises(UnsafeCheckpointError) as err:
        load_pth(path)
    message = str(err.value)
    assert "refused" in message and str(path) in message and "pickle" in message
    assert "run arbitrary code" in message
    func = payload_cls.__reduce__(payload_cls(marker))[0]
    assert f"{func.__module__}.{func.__name__}" in message or "__builtin__.eval" in message
    assert not marker.exists()
    assert isinstance(err.value, ValueError) and isinstance(err.value, PthError)


def test_eval_payload_is_live(tmp_path):
    # control: the same bytes really run code under a plain unpickler
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_EvalPayload(marker), protocol=2))
    assert marker.exists()


@pytest.mark.parametrize("pkl,expected", [
    (pickle.dumps(collections.defaultdict(int), protocol=2), "collections.defaultdict"),
    # what pickling an nn.Module instance starts with (NEWOBJ on the class)
    (b"\x80\x02ctorch.nn.modules.module\nModule\nq\x00)\x81q\x01.",
     "torch.nn.modules.module.Module"),
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00.", "numpy.core.multiarray._reconstruct"),
])
def test_other_globals_refused(tmp_path, pkl, expected):
    path = _write_archive(tmp_path / "other.pth", pkl)
    with pytest.raises(UnsafeCheckpointError, match="refused") as err:
        load_pth(path)
    assert expected in str(err.value)


def test_allow_list_is_tensor_only():
    assert "collections.OrderedDict" in ALLOWED_GLOBALS
    assert "torch.FloatStorage" in ALLOWED_GLOBALS and "torch.LongStorage" in ALLOWED_GLOBALS
    assert "torch._utils._rebuild_tensor_v2" in ALLOWED_GLOBALS
    for bad in ("builtins.eval", "os.system", "torch.load", "collections.defaultdict",
                "torch._utils._rebuild_qtensor", "torch.nn.Module", "builtins.getattr"):
        assert bad not in ALLOWED_GLOBALS


# ------------------------------------------------------------------ (d) clear errors

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pth(tmp_path / "nope.pth")


def test_not_a_zip(tmp_path):
    path = tmp_path / "text.pth"
    path.write_text("hello, not a checkpoint")
    with pytest.raises(PthFormatError, match="not a zip") as err:
        load_pth(path)
    assert str(path) in str(err.value)


def test_legacy_format(tmp_path):
    # torch's legacy format opens with a pickled magic number (0x1950a86a20f9469cfc6c)
    path = tmp_path / "legacy.pth"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\x80\x02}q\x00.")
    with pytest.raises(PthFormatError, match="legacy") as err:
        load_pth(path)
    assert "re-save" in str(err.value).lower()


def test_truncated_file(fixture_pth, tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(fixture_pth.read_bytes()[:200_000])
    with pytest.raises(PthFormatError, match="truncated") as err:
        load_pth(path)
    assert str(path) in str(err.value)


def test_truncated_storage_record(tmp_path):
    pkl = _dict_pickle([("w", _tensor_ops("0", b"torch\nFloatStorage\n", 10, 0, (10,), (1,)))])
    path = _write_archive(tmp_path / "short.pth", pkl, {"0": np.zeros(7, np.float32).tobytes()})
    with pytest.raises(PthFormatError, match="truncated or corrupt") as err:
        load_pth(path)
    assert "data/0" in str(err.value)


def test_tensor_outside_storage(tmp_path):
    pkl = _dict_pickle([("w", _tensor_ops("0", b"torch\nFloatStorage\n", 10, 4, (3, 3), (3, 1)))])
    path = _write_archive(tmp_path / "oob.pth", pkl, {"0": np.zeros(10, np.float32).tobytes()})
    with pytest.raises(PthFormatError, match="holds only 10"):
        load_pth(path)


def test_missing_records(tmp_path):
    path = _write_archive(tmp_path / "nopkl.pth", b"", skip_pkl=True)
    with pytest.raises(PthFormatError, match="data.pkl"):
        load_pth(path)
    pkl = _dict_pickle([("w", _tensor_ops("0", b"torch\nFloatStorage\n", 2, 0, (2,), (1,)))])
    path = _write_archive(tmp_path / "nostorage.pth", pkl)
    with pytest.raises(PthFormatError, match="data/0"):
        load_pth(path)


def test_corrupt_pickle(tmp_path):
    path = _write_archive(tmp_path / "junk.pth", b"\x80\x02}q\x00(X\x01\x00")
    with pytest.raises(PthFormatError, match="pickle"):
        load_pth(path)


# ------------------------------------------------------------------ (e) the memory budget
# Hostile files: a few hundred bytes to a megabyte that declare gigabytes.

_FLOAT = b"torch\nFloatStorage\n"


def _zero_stride_file(path, count=3, numel=2 ** 28):
    """`count` tensors of `numel` float32 (1 GiB each) viewing one 1-element storage."""
    entries = [(f"w{i}", _tensor_ops("0", _FLOAT, 1, 0, (numel,), (0,))) for i in range(count)]
    return _write_archive(path, _dict_pickle(entries), {"0": np.ones(1, np.float32).tobytes()})


def _deflated_archive(path, bomb_name: str, head: bytes, zeros: int, pkl: bytes | None = None):
    """An archive whose record `bomb_name` is `head` + `zeros` zero bytes, deflated
    (streamed, so building it needs no memory); other records stored."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        if pkl is not None:
            zf.writestr("archive/data.pkl", pkl)
        info = zipfile.ZipInfo(bomb_name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as fh:
            fh.write(head)
            block = bytes(1 << 22)
            for _ in range(zeros // len(block)):
                fh.write(block)
        zf.writestr("archive/version", b"3\n")
    return path


def _storage_bomb(path, numel=2 ** 28):
    pkl = _dict_pickle([("w", _tensor_ops("0", _FLOAT, numel, 0, (numel,), (1,)))])
    return _deflated_archive(path, "archive/data/0", b"", numel * 4, pkl)


def _pickle_bomb(path, zeros=2 ** 28):
    return _deflated_archive(path, "archive/data.pkl", b"\x80\x02}q\x00.", zeros)


@pytest.mark.parametrize("build, limit", [
    (lambda p: _zero_stride_file(p), "zero strides"),
    (lambda p: _zero_stride_file(p, count=1, numel=2 ** 30), "zero strides"),  # one 4 GiB expand
    (lambda p: _storage_bomb(p, numel=2 ** 25), "ratio"),
    (lambda p: _pickle_bomb(p, zeros=2 ** 27), "ratio"),
])
def test_hostile_sizes_refused(tmp_path, build, limit):
    path = build(tmp_path / "hostile.pth")
    with pytest.raises(PthLimitError, match=limit) as err:
        load_pth(path)
    assert str(path) in str(err.value) and "refused" in str(err.value)


def test_budget_keyword_and_environment(fixture_pth, monkeypatch):
    size = sum(a.nbytes for sd in load_pth(fixture_pth).values() for a in sd.values())
    with pytest.raises(PthLimitError, match="SMFNET_CKPT_MAX_BYTES") as err:
        load_pth(fixture_pth, max_bytes=size)  # records + tensors need about twice that
    assert str(fixture_pth) in str(err.value)
    assert load_pth(fixture_pth, max_bytes=3 * size)  # and the keyword raises it
    monkeypatch.setenv("SMFNET_CKPT_MAX_BYTES", "1M")
    with pytest.raises(PthLimitError, match="1.0 MiB"):
        load_pth(fixture_pth)
    monkeypatch.setenv("SMFNET_CKPT_MAX_BYTES", "1G")
    assert load_pth(fixture_pth)


def test_zero_stride_within_budget_still_loads(tmp_path):
    # a modest expand is legitimate (torch.save keeps expand()'s zero strides)
    path = _zero_stride_file(tmp_path / "expand.pth", count=2, numel=1000)
    out = load_pth(path)
    assert out["w0"].shape == (1000,) and (out["w1"] == 1).all()


def test_refusing_hostile_files_stays_small(tmp_path):
    """Peak RSS of a child that refuses the 3 x 1 GiB zero-stride file and a ~1 MB deflate
    bomb (1 GiB inflated), each of which allocated gigabytes before the budget."""
    import subprocess
    import sys
    zero = _zero_stride_file(tmp_path / "zero.pth")
    bomb = _storage_bomb(tmp_path / "bomb.pth")
    assert zero.stat().st_size < 2_000 and bomb.stat().st_size < 2_000_000
    script = (
        "import resource, sys\n"
        "from smfnet_jax.torch_weights.pth_io import PthLimitError, load_pth\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        load_pth(p)\n"
        "    except PthLimitError:\n"
        "        pass\n"
        "    else:\n"
        "        sys.exit('not refused: ' + p)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")  # KiB on Linux
    # Linux carries the high-water RSS of the process that forked across exec, so the
    # child measured is started by a small launcher, not by this (large) pytest process.
    launcher = ("import subprocess, sys\n"
                "sys.exit(subprocess.run([sys.executable, '-c'] + sys.argv[1:]).returncode)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("SMFNET_CKPT_MAX_BYTES", None)
    done = subprocess.run([sys.executable, "-c", launcher, script, str(zero), str(bomb)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    peak_mb = int(done.stdout.split()[-1]) / 1024
    print(f"peak RSS refusing the hostile files: {peak_mb:.0f} MB")
    assert peak_mb < 500
