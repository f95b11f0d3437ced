"""Read and write PyTorch ``.pth`` checkpoints with numpy alone (no torch import).

A ``.pth`` written by ``torch.save`` (torch >= 1.6) is a zip archive::

    <archive>/data.pkl               pickle (protocol 2) of the saved object
    <archive>/.format_version        b"1"
    <archive>/.storage_alignment     b"64"
    <archive>/byteorder              b"little" | b"big"
    <archive>/data/<key>             raw bytes of one storage, 64-byte aligned in the file
    <archive>/version                b"3\\n"
    <archive>/.data/serialization_id 40 decimal digits

Inside ``data.pkl`` every tensor is a call such as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
whose ``storage`` is a *persistent id* ``("storage", torch.FloatStorage, key, location,
numel)`` pointing at ``data/<key>``.

Why a restricted unpickler: a ``.pth`` is a pickle, and unpickling a pickle can call any
importable function (``os.system``, ``builtins.eval``, ...). ``load_pth`` therefore maps
the few globals a tensor checkpoint needs to local, harmless stand-ins and refuses every
other global, before anything runs, with :class:`UnsafeCheckpointError`. Nothing from
torch is ever imported or called.

Why a memory budget: a few hundred bytes of pickle can declare gigabytes (zero-stride
views, a deflate bomb, a zip header that lies). Every record read and every tensor built is
charged to a :class:`~smfnet_jax.torch_weights.limits.Budget` before it is allocated, and
compressed records are read in bounded chunks after a compression-ratio check; a refusal
(:class:`PthLimitError`) names the limit and how to raise it (``max_bytes=`` or
``$SMFNET_CKPT_MAX_BYTES``).

Public API: :func:`load_pth`, :func:`save_pth`, :data:`ALLOWED_GLOBALS`,
:class:`PthError` (base, a ``ValueError``), :class:`PthFormatError`,
:class:`UnsafeCheckpointError`, :class:`PthLimitError`.
"""
from __future__ import annotations

import collections
import errno
import io
import math
import os
import pickle
import pickletools
import secrets
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from smfnet_jax.fileio import atomic_write
from smfnet_jax.torch_weights.limits import Budget

__all__ = [
    "ALLOWED_GLOBALS",
    "PthError",
    "PthFormatError",
    "PthLimitError",
    "UnsafeCheckpointError",
    "load_pth",
    "save_pth",
]


# --------------------------------------------------------------------------- errors

class PthError(ValueError):
    """A .pth file could not be read or written (base class)."""


class PthFormatError(PthError):
    """The file is not a readable torch zip checkpoint (wrong format, truncated, corrupt)."""


class PthLimitError(PthError):
    """The file declares more memory than the reader's budget allows (see limits.py)."""


class UnsafeCheckpointError(PthError):
    """The checkpoint's pickle references a global outside the allow-list; nothing was run."""


_WHY_UNSAFE = (
    "A .pth file is a Python pickle, and unpickling a pickle can run arbitrary code, so "
    "only the globals a plain tensor checkpoint needs are allowed (collections.OrderedDict, "
    "torch._utils._rebuild_tensor*/_rebuild_parameter*, torch.<X>Storage, torch dtypes). "
    "If you trust the file, load it with torch and re-save only the state_dicts "
    "(torch.save({name: module.state_dict(), ...}, path))."
)


def _refusal(path: str, names: list[str]) -> UnsafeCheckpointError:
    listed = ", ".join(f"'{n}'" for n in names)
    noun = "global" if len(names) == 1 else "globals"
    return UnsafeCheckpointError(
        f"{path}: refused to load this checkpoint: its pickle references the {noun} "
        f"{listed}, which a tensor checkpoint does not need. {_WHY_UNSAFE}")


# --------------------------------------------------------------------------- dtypes

# torch storage class name -> numpy dtype name. Quantized storages are left out on
# purpose: they need torch._utils._rebuild_qtensor, which is not allowed.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
# torch dtype names that may appear as globals (the dtype argument of _rebuild_tensor_v3).
_TORCH_DTYPES = {
    "float64": "float64", "double": "float64",
    "float32": "float32", "float": "float32",
    "float16": "float16", "half": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64", "long": "int64",
    "int32": "int32", "int": "int32",
    "int16": "int16", "short": "int16",
    "int8": "int8",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "bool": "bool",
    "complex64": "complex64", "cfloat": "complex64",
    "complex128": "complex128", "cdouble": "complex128",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz", "float8_e5m2fnuz": "float8_e5m2fnuz",
}
_ML_DTYPES = {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"}


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a dtype name; bfloat16/float8 come from ml_dtypes (a dependency).
    Shared by the .pth and .safetensors readers."""
    if name in _ML_DTYPES:
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


# --------------------------------------------------------------------------- stand-ins
# Objects the restricted unpickler hands out in place of torch's globals. They carry
# data only; nothing in them can be called by the pickle to reach other code.

class _Invalid(Exception):
    """Raised inside unpickling for a malformed tensor record; load_pth adds the path."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` etc. (``dtype_name`` None: untyped bytes)."""
    torch_name: str
    dtype_name: str | None

    def __setstate__(self, state):  # BUILD on a stand-in is never legitimate
        raise _Invalid(f"unexpected state for {self.torch_name}")


@dataclass(frozen=True)
class _TorchDtype:
    """Stand-in for a ``torch.<dtype>`` object (the dtype argument of _rebuild_tensor_v3)."""
    torch_name: str
    dtype_name: str

    def __setstate__(self, state):
        raise _Invalid(f"unexpected state for torch.{self.torch_name}")


class _Storage:
    """One ``data/<key>`` record, read and checked when the pickle first references it."""
    __slots__ = ("key", "stype", "numel", "raw", "big_endian", "budget", "_swapped")

    def __init__(self, key: str, stype: _StorageType, numel: int, raw: bytes,
                 big_endian: bool, budget: Budget):
        self.key, self.stype, self.numel, self.raw = key, stype, numel, raw
        self.big_endian, self.budget = big_endian, budget
        self._swapped: dict[int, bytes] = {}

    def little_endian_bytes(self, dtype: np.dtype) -> bytes:
        """The record's bytes in little-endian order for elements of ``dtype``."""
        # An untyped (v3) storage only learns its element width from the tensor.
        width = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
        if not self.big_endian or width <= 1:
            return self.raw
        if width not in self._swapped:
            self.budget.charge(len(self.raw), f"byte-swapping storage data/{self.key}")
            usable = len(self.raw) - len(self.raw) % width
            self._swapped[width] = np.frombuffer(
                self.raw, dtype=f">u{width}", count=usable // width).astype(f"<u{width}").tobytes()
        return self._swapped[width]

    def __setstate__(self, state):
        raise _Invalid(f"unexpected state for storage {self.key}")


def _check_int(value, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise _Invalid(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise _Invalid(f"{what} must be a tuple of integers, got {value!r}")
    return tuple(_check_int(v, what) for v in value)


def _materialize(storage, offset, size, stride, dtype: np.dtype, metadata=None) -> np.ndarray:
    """C-contiguous copy of the strided view (offset/size/stride in elements of dtype)."""
    if not isinstance(storage, _Storage):
        raise _Invalid(f"tensor storage must be a persistent storage record, got {storage!r}")
    offset = _check_int(offset, "storage offset")
    size = _check_int_tuple(size, "tensor size")
    stride = _check_int_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise _Invalid(f"tensor size {size} and stride {stride} differ in length")
    itemsize = dtype.itemsize
    if len(storage.raw) % itemsize:
        raise _Invalid(f"storage data/{storage.key} holds {len(storage.raw)} bytes, "
                       f"not a whole number of {dtype} elements")
    count = len(storage.raw) // itemsize
    numel = math.prod(size)
    nbytes = numel * itemsize
    what = f"a tensor of size {size} from storage data/{storage.key}"
    # Charged before the copy. Zero strides (expand) legitimately reuse elements, but
    # only a little: they make memory that no byte of the file backs.
    storage.budget.charge_expansion(max(0, nbytes - len(storage.raw)), what)
    storage.budget.charge(nbytes, what)
    if numel == 0:
        out = np.zeros(size, dtype=dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= count:
            raise _Invalid(f"tensor of size {size}, stride {stride}, offset {offset} reaches "
                           f"element {last} of storage data/{storage.key}, which holds only "
                           f"{count} {dtype} elements")
        flat = np.frombuffer(storage.little_endian_bytes(dtype), dtype=dtype,
                             count=last + 1 - offset, offset=offset * itemsize)
        view = np.lib.stride_tricks.as_strided(
            flat, shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
        out = np.array(view, dtype=dtype, order="C", copy=True)
    if metadata:
        if not isinstance(metadata, dict) or not set(metadata) <= {"conj", "neg"}:
            raise _Invalid(f"unsupported tensor metadata {metadata!r}")
        if metadata.get("conj"):  # lazy conjugate bit: storage holds x, the value is conj(x)
            np.conj(out, out=out)
        if metadata.get("neg"):  # lazy negation bit
            np.negative(out, out=out)
    return out


def _check_hooks(backward_hooks):
    if backward_hooks is not None and (not isinstance(backward_hooks, dict) or backward_hooks):
        raise _Invalid("tensors with backward hooks are not supported")


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, _Storage) or storage.stype.dtype_name is None:
        raise _Invalid("_rebuild_tensor needs a typed storage")
    return _materialize(storage, storage_offset, size, stride,
                        numpy_dtype(storage.stype.dtype_name))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or storage.stype.dtype_name is None:
        raise _Invalid("_rebuild_tensor_v2 needs a typed storage (torch.<X>Storage)")
    _check_hooks(backward_hooks)
    return _materialize(storage, storage_offset, size, stride,
                        numpy_dtype(storage.stype.dtype_name), metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    # torch >= 2.1 writes this for dtypes without a legacy storage class (uint16/32/64,
    # float8): the storage is untyped bytes and the element dtype comes separately.
    if not isinstance(dtype, _TorchDtype):
        raise _Invalid(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
    _check_hooks(backward_hooks)
    return _materialize(storage, storage_offset, size, stride,
                        numpy_dtype(dtype.dtype_name), metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, np.ndarray):
        raise _Invalid("_rebuild_parameter needs a tensor")
    _check_hooks(backward_hooks)
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    # The state holds Python attributes set on the Parameter object; a weight needs none.
    parts = state if isinstance(state, tuple) else (state,)
    if any(parts):
        raise _Invalid("parameters carrying extra Python attributes are not supported")
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _build_allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        # torch 2.x spells the bytes-only storage torch.storage.UntypedStorage
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", None),
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
    }
    for name, dtype_name in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype_name)
    for name, dtype_name in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDtype(name, dtype_name)
    return allowed


_ALLOWED = _build_allowed()
#: The "module.name" globals a checkpoint's pickle may reference; any other is refused.
ALLOWED_GLOBALS = frozenset(f"{m}.{n}" for m, n in _ALLOWED)


# --------------------------------------------------------------------------- loading

class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals, to local stand-ins."""

    def __init__(self, data: bytes, path: str, read_record: Callable[[str, int], bytes],
                 big_endian: bool, budget: Budget):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._big_endian = big_endian
        self._budget = budget
        self._read_record = read_record
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        # Every global the pickle names (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) comes
        # through here, before it can be called.
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _refusal(self._path, [f"{module}.{name}"])
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[3], str)):
            raise _Invalid(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid  # location (cpu/cuda:N) is ignored: all -> numpy
        numel = _check_int(numel, f"element count of storage {key}")
        known = self._storages.get(key)
        if known is not None:
            if known.stype != stype:
                raise _Invalid(f"storage data/{key} is referenced as both "
                               f"{known.stype.torch_name} and {stype.torch_name}")
            return known
        itemsize = 1 if stype.dtype_name is None else numpy_dtype(stype.dtype_name).itemsize
        raw = self._read_record(key, numel * itemsize)
        if len(raw) != numel * itemsize:
            what = "bytes" if stype.dtype_name is None else f"{stype.dtype_name} elements"
            raise _Invalid(
                f"storage data/{key} holds {len(raw)} bytes but the pickle declares {numel} "
                f"{what} ({numel * itemsize} bytes): the file is truncated or corrupt")
        storage = _Storage(key, stype, numel, raw, self._big_endian, self._budget)
        self._storages[key] = storage
        return storage


def _prescan(data: bytes, path: str) -> None:
    """Refuse disallowed globals (all of them, named) before the pickle runs at all."""
    refused: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                if (module, name) not in _ALLOWED and f"{module}.{name}" not in refused:
                    refused.append(f"{module}.{name}")
            elif opcode.name in ("EXT1", "EXT2", "EXT4"):
                # The copyreg extension cache could hand out an object without find_class.
                refused.append(f"<copyreg extension code {arg}>")
    except Exception as exc:  # a malformed stream: report it as such
        raise PthFormatError(f"{path}: data.pkl is not a valid pickle ({exc})") from exc
    if refused:
        raise _refusal(path, refused)


def _archive_prefix(names: list[str], path: str) -> str:
    if not names:
        raise PthFormatError(f"{path}: the zip archive is empty, not a torch checkpoint")
    prefix, sep, _ = names[0].partition("/")
    if not sep:
        raise PthFormatError(f"{path}: not a torch zip checkpoint (first record "
                             f"'{names[0]}' is not inside an archive folder)")
    return prefix


def _not_zip_error(path: str, head: bytes) -> PthFormatError:
    if head.startswith(b"PK\x03\x04"):
        return PthFormatError(
            f"{path}: the file starts like a zip archive but its central directory is "
            "missing or damaged: it is probably truncated (an interrupted download or copy); "
            "fetch or save it again")
    if head.startswith(b"\x80"):  # a bare pickle stream: torch's pre-zip format
        return PthFormatError(
            f"{path}: this is PyTorch's legacy (pre-1.6, non-zip) serialization format, which "
            "is not supported. Re-save it with a recent torch: "
            "torch.save(torch.load(OLD, weights_only=True), NEW)")
    return PthFormatError(f"{path}: not a PyTorch checkpoint (not a zip archive)")


def load_pth(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict:
    """Load a ``torch.save`` zip checkpoint as nested dicts of numpy arrays, without torch.

    Returns the saved top-level dict (for SMFNet: five ``OrderedDict`` state_dicts), with
    every tensor as a C-contiguous numpy array of the same dtype and shape (storage offset
    and strides honoured; bfloat16/float8 as ml_dtypes types), in native (little-endian)
    byte order whatever the archive's ``byteorder`` record says. Container types and key
    order are kept, as is a state_dict's ``_metadata`` attribute (so ``save_pth`` can write
    it back).

    ``max_bytes`` is the memory budget (records read plus tensors built; see
    ``smfnet_jax.torch_weights.limits``), default ``$SMFNET_CKPT_MAX_BYTES`` or 2 GiB.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the pickle references a global outside ``ALLOWED_GLOBALS``;
            it is refused before anything in it runs.
        PthFormatError: not a zip checkpoint, legacy format, truncated or corrupt archive,
            missing ``data.pkl`` or storage record, malformed tensor record, or a top-level
            object that is not a dict.
        PthLimitError: the file would need more memory than ``max_bytes``, or holds a
            compressed record that inflates past the ratio cap; refused before allocating.
    """
    path = os.fspath(path)
    budget = Budget(path, PthLimitError, max_bytes)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "checkpoint file not found", path)
    if os.path.isdir(path):
        raise PthFormatError(f"{path}: is a directory, expected a .pth file")
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(0)
        try:
            zf = zipfile.ZipFile(fh)
        except zipfile.BadZipFile:
            raise _not_zip_error(path, head) from None
        with zf:
            return _load_from_zip(zf, path, budget)


_CHUNK = 1 << 20


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget) -> bytearray:
    """A record's bytes, never more than its declared size, in 1 MiB chunks, after the
    budget and compression-ratio checks (so neither a bomb nor a lying header can allocate
    more than the budget)."""
    what = f"record '{info.filename}'"
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise _Invalid(f"{what} is stored uncompressed but declares {info.compress_size} bytes "
                       f"stored and {info.file_size} bytes of data: the file is corrupt")
    budget.check_ratio(info.compress_size, info.file_size, what)
    budget.charge(info.file_size, what)
    buf = bytearray(info.file_size)
    view = memoryview(buf)
    filled = 0
    with zf.open(info) as fh:
        while filled < len(buf):
            n = fh.readinto(view[filled:filled + _CHUNK])
            if not n:
                raise _Invalid(f"{what} ends after {filled} of its declared {len(buf)} bytes: "
                               "the file is truncated or corrupt")
            filled += n
        if fh.read(1):  # zipfile stops at the declared size; a longer stream is corrupt
            raise _Invalid(f"{what} holds more than its declared {len(buf)} bytes")
    return buf


def _load_from_zip(zf: zipfile.ZipFile, path: str, budget: Budget) -> dict:
    names = zf.namelist()
    prefix = _archive_prefix(names, path)
    present = set(names)
    pkl_name = f"{prefix}/data.pkl"
    if pkl_name not in present:
        hint = (" (it looks like a TorchScript archive from torch.jit.save, not a torch.save "
                "checkpoint)" if f"{prefix}/constants.pkl" in present else "")
        raise PthFormatError(f"{path}: the archive has no '{pkl_name}' record, so it is not a "
                             f"torch.save checkpoint{hint}")

    def read(name: str) -> bytearray:
        try:
            return _read_bounded(zf, zf.getinfo(name), budget)
        except KeyError:
            raise _Invalid(f"record '{name}' is missing from the archive") from None
        except PthError:  # a budget refusal: already says what and why
            raise
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as exc:
            raise _Invalid(f"record '{name}' cannot be read ({exc}): the file is truncated "
                           "or corrupt") from exc

    try:
        byteorder = "little"  # torch assumes little-endian when the record is absent
        if f"{prefix}/byteorder" in present:
            byteorder = read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise _Invalid(f"unknown byteorder record {byteorder!r}")
        data = read(pkl_name)
    except _Invalid as exc:
        raise PthFormatError(f"{path}: {exc}") from None

    def read_storage(key: str, expected_nbytes: int) -> bytes:
        name = f"{prefix}/data/{key}"
        try:
            size = zf.getinfo(name).file_size
        except KeyError:
            raise _Invalid(f"record '{name}' is missing from the archive") from None
        if size != expected_nbytes:  # checked before reading: no inflating of a huge record
            raise _Invalid(f"storage data/{key} holds {size} bytes but the pickle declares "
                           f"{expected_nbytes} bytes: the file is truncated or corrupt")
        return read(name)

    unpickler = _RestrictedUnpickler(data, path, read_storage, byteorder == "big", budget)
    try:
        _prescan(data, path)
        obj = unpickler.load()
    except UnsafeCheckpointError as exc:
        if f"{prefix}/constants.pkl" in present:
            raise UnsafeCheckpointError(
                f"{exc} (This is a TorchScript archive from torch.jit.save, not a torch.save "
                "checkpoint of state_dicts.)") from None
        raise
    except PthError:
        raise
    except _Invalid as exc:
        raise PthFormatError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, struct.error) as exc:
        raise PthFormatError(f"{path}: data.pkl could not be read as a checkpoint pickle "
                             f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise PthFormatError(f"{path}: expected the checkpoint to hold a dict (of "
                             f"state_dicts), found {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- saving

# numpy dtype name -> (torch storage class for _rebuild_tensor_v2, or None for v3; torch dtype)
_SAVE_DTYPES = {dt: (st, dt) for st, dt in _STORAGE_DTYPES.items()}
for _dt in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
            "float8_e4m3fnuz", "float8_e5m2fnuz"):
    _SAVE_DTYPES[_dt] = (None, _dt)

_ALIGNMENT = 64  # torch writes every record's data at a multiple of 64 bytes
_FILE_FORMAT_VERSION = b"3\n"  # what torch 2.x writes in <archive>/version


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):  # torch's rule: size-0/1 dims still multiply by max(n, 1)
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


class _PickleWriter:
    """Emits protocol-2 pickle opcodes for a tree of dicts/lists/scalars and arrays.

    Hand-written because pickle.Pickler would import ``torch`` to check the globals
    (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``) that must appear in
    the stream.
    """

    def __init__(self):
        self.out = bytearray(pickle.PROTO + b"\x02")
        self.memo_size = 0
        self.global_memo: dict[tuple[str, str], int] = {}
        self.storages: list[tuple[str, memoryview]] = []
        self.array_keys: dict[int, tuple[str, Any]] = {}  # id(array) -> (key, array)
        self.active: set[int] = set()

    # -- primitives
    def _put(self) -> None:
        idx = self.memo_size
        self.memo_size += 1
        self.out += (pickle.BINPUT + bytes([idx]) if idx < 256
                     else pickle.LONG_BINPUT + struct.pack("<I", idx))

    def _global(self, module: str, name: str) -> None:
        idx = self.global_memo.get((module, name))
        if idx is not None:
            self.out += (pickle.BINGET + bytes([idx]) if idx < 256
                         else pickle.LONG_BINGET + struct.pack("<I", idx))
            return
        self.out += pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii")
        self.global_memo[(module, name)] = self.memo_size
        self._put()

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += pickle.BININT1 + bytes([v])
        elif 0 <= v < 65536:
            self.out += pickle.BININT2 + struct.pack("<H", v)
        elif -(2 ** 31) <= v < 2 ** 31:
            self.out += pickle.BININT + struct.pack("<i", v)
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) >= 256:
                raise TypeError("integer too large for a checkpoint")
            self.out += pickle.LONG1 + bytes([len(raw)]) + raw

    def _str(self, v: str) -> None:
        raw = v.encode("utf-8", "surrogatepass")
        self.out += pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw

    # -- tree
    def save(self, obj, where: str = "obj") -> None:
        if obj is None:
            self.out += pickle.NONE
        elif obj is True or obj is False:
            self.out += pickle.NEWTRUE if obj else pickle.NEWFALSE
        elif type(obj) is int:
            self._int(obj)
        elif type(obj) is float:
            self.out += pickle.BINFLOAT + struct.pack(">d", obj)
        elif type(obj) is str:
            self._str(obj)
        elif isinstance(obj, (np.ndarray, np.generic)) or (
                hasattr(obj, "__array__") and hasattr(obj, "dtype") and hasattr(obj, "shape")):
            self._tensor(obj, where)
        elif isinstance(obj, (dict, list, tuple)):
            if id(obj) in self.active:
                raise TypeError(f"save_pth: {where} contains itself")
            self.active.add(id(obj))
            try:
                if isinstance(obj, dict):
                    self._dict(obj, where)
                elif isinstance(obj, list):
                    self._list(obj, where)
                else:
                    self._tuple(obj, where)
            finally:
                self.active.discard(id(obj))
        else:
            raise TypeError(f"save_pth: cannot store {where} of type {type(obj).__name__} "
                            "(supported: dict/OrderedDict/list/tuple of numpy arrays, "
                            "str, int, float, bool, None)")

    def _tuple(self, obj: tuple, where: str) -> None:
        if not obj:
            self.out += pickle.EMPTY_TUPLE
            return
        if len(obj) > 3:
            self.out += pickle.MARK
        for i, item in enumerate(obj):
            self.save(item, f"{where}[{i}]")
        self.out += {1: pickle.TUPLE1, 2: pickle.TUPLE2, 3: pickle.TUPLE3}.get(len(obj),
                                                                              pickle.TUPLE)

    def _list(self, obj: list, where: str) -> None:
        self.out += pickle.EMPTY_LIST
        for start in range(0, len(obj), 1000):
            self.out += pickle.MARK
            for i, item in enumerate(obj[start:start + 1000], start):
                self.save(item, f"{where}[{i}]")
            self.out += pickle.APPENDS

    def _dict(self, obj: dict, where: str) -> None:
        is_ordered = isinstance(obj, collections.OrderedDict)
        if is_ordered:
            # as pickle writes OrderedDict: OrderedDict() then items, then its __dict__
            self._global("collections", "OrderedDict")
            self.out += pickle.EMPTY_TUPLE + pickle.REDUCE
        else:
            self.out += pickle.EMPTY_DICT
        items = list(obj.items())
        for start in range(0, len(items), 1000):
            self.out += pickle.MARK
            for key, value in items[start:start + 1000]:
                self.save(key, f"{where} key")
                self.save(value, f"{where}[{key!r}]")
            self.out += pickle.SETITEMS
        state = getattr(obj, "__dict__", None) if is_ordered else None
        if state:  # e.g. a state_dict's _metadata (per-module versions used by load_state_dict)
            self.save(dict(state), f"{where}.__dict__")
            self.out += pickle.BUILD

    def _tensor(self, obj, where: str) -> None:
        known = self.array_keys.get(id(obj))
        arr = np.asarray(obj)
        dtype_name = arr.dtype.name if arr.dtype.names is None else None
        spec = _SAVE_DTYPES.get(dtype_name)
        if spec is None:
            raise TypeError(f"save_pth: {where} has dtype {arr.dtype}, which has no torch "
                            "equivalent")
        storage_name, torch_dtype = spec
        if known is None:
            data = np.ascontiguousarray(arr)
            if data.dtype.byteorder == ">":
                data = data.astype(data.dtype.newbyteorder("<"))
            key = str(len(self.storages))
            self.storages.append((key, memoryview(data.reshape(-1).view(np.uint8))))
            self.array_keys[id(obj)] = (key, obj)  # keep obj alive so its id stays unique
        else:
            key = known[0]  # the same array object twice: one shared storage, as torch does
        shape = tuple(int(n) for n in arr.shape)
        self._global("torch._utils",
                     "_rebuild_tensor_v2" if storage_name else "_rebuild_tensor_v3")
        self.out += pickle.MARK
        # persistent id ("storage", storage class, key, location, numel)
        self.out += pickle.MARK
        self._str("storage")
        if storage_name:
            self._global("torch", storage_name)
            numel = arr.size
        else:
            self._global("torch.storage", "UntypedStorage")
            numel = arr.size * arr.dtype.itemsize
        self._str(key)
        self._str("cpu")
        self._int(int(numel))
        self.out += pickle.TUPLE + pickle.BINPERSID
        self._int(0)  # storage offset
        self.save(shape, where)
        self.save(_contiguous_strides(shape), where)
        self.out += pickle.NEWFALSE  # requires_grad
        self._global("collections", "OrderedDict")  # backward hooks: always empty
        self.out += pickle.EMPTY_TUPLE + pickle.REDUCE
        if not storage_name:
            self._global("torch", torch_dtype)
        self.out += pickle.TUPLE + pickle.REDUCE

    def finish(self) -> bytes:
        return bytes(self.out + pickle.STOP)


def _default_archive_name(path: str) -> str:
    # torch names the archive folder after the file name up to its first dot
    name = os.path.basename(path).split(".", 1)[0]
    return name or "archive"


def _write_zip(fh, records: list[tuple[str, Any]]) -> None:
    """Stored (uncompressed) zip with each record's data aligned to 64 bytes, as torch does."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, payload in records:
            payload = memoryview(payload).cast("B")
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            header = 30 + len(name.encode("utf-8"))
            if len(payload) > zipfile.ZIP64_LIMIT:
                header += 20  # zipfile appends a zip64 extra field to the local header
            # padding extra field 'FB' (id 0x4246), the one torch's writer uses
            pad = (-(fh.tell() + header + 4)) % _ALIGNMENT
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            zf.writestr(info, payload)


def save_pth(path: str | os.PathLike, obj: dict, *, archive_name: str | None = None) -> None:
    """Write ``obj`` (a dict of OrderedDicts of numpy arrays) as a ``torch.save`` zip checkpoint.

    The archive has torch's layout (``<archive>/data.pkl`` as a protocol-2 pickle, then
    ``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/0..N``, ``version``,
    ``.data/serialization_id``; data 64-byte aligned) and uses only the globals
    ``torch.load(weights_only=True)`` accepts. Arrays become CPU tensors of the same dtype,
    shape and values (bfloat16/float8 from ml_dtypes included); key order and a
    state_dict's ``_metadata`` attribute are kept. Anything exposing ``__array__``,
    ``shape`` and ``dtype`` (a jax array) is stored as a tensor too.

    The file is written atomically: to a temporary file in the same folder, then
    ``os.replace``. ``archive_name`` defaults to torch's choice, the file name up to its
    first dot.

    Raises:
        TypeError: ``obj`` is not a dict, or holds a value with no torch equivalent.
        OSError: the file cannot be written.
    """
    path = os.fspath(path)
    if not isinstance(obj, dict):
        raise TypeError(f"save_pth: expected a dict of state_dicts, got {type(obj).__name__}")
    archive = archive_name if archive_name is not None else _default_archive_name(path)
    if not archive or "/" in archive or "\\" in archive:
        raise ValueError(f"save_pth: invalid archive name {archive!r}")

    writer = _PickleWriter()
    writer.save(obj)
    records: list[tuple[str, Any]] = [
        (f"{archive}/data.pkl", writer.finish()),
        (f"{archive}/.format_version", b"1"),
        (f"{archive}/.storage_alignment", str(_ALIGNMENT).encode("ascii")),
        (f"{archive}/byteorder", b"little"),
    ]
    records += [(f"{archive}/data/{key}", data) for key, data in writer.storages]
    records += [
        (f"{archive}/version", _FILE_FORMAT_VERSION),
        (f"{archive}/.data/serialization_id",
         "".join(secrets.choice("0123456789") for _ in range(40)).encode("ascii")),
    ]

    atomic_write(path, lambda fh: _write_zip(fh, records))
