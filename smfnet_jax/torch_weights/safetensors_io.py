"""Read and write `.safetensors` files with numpy alone (no `safetensors` package needed).

The format (github.com/huggingface/safetensors)::

    8 bytes   N, little-endian uint64: the header's length
    N bytes   UTF-8 JSON {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                          "__metadata__": {str: str}}   (padded with spaces to 8-byte alignment)
    rest      the tensors' raw little-endian C-order bytes; offsets count from here

A safetensors file holds no code, but it is still untrusted input, so the reader checks
everything before it allocates: the header length (bounded), the JSON, every entry's keys,
dtype and shape, that shape x itemsize equals the byte span, that the spans lie inside the
file and tile the data region exactly (contiguous, no overlap, no hole, as the reference
implementation requires), and that the total fits the reader's memory budget
(`smfnet_jax.torch_weights.limits`). Each refusal is a `SafetensorsError` naming the file and
the reason.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import numpy as np

from smfnet_jax.fileio import atomic_write
from smfnet_jax.torch_weights.limits import Budget
from smfnet_jax.torch_weights.pth_io import numpy_dtype

__all__ = ["SafetensorsError", "load_safetensors", "save_safetensors", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's own bound
_METADATA = "__metadata__"
_ALIGN = 8

# safetensors dtype name <-> numpy dtype name (bfloat16/float8 from ml_dtypes, a jax dependency)
_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A .safetensors file that cannot be read (or a tree that cannot be written)."""


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (name -> array) atomically; `metadata` goes to `__metadata__`.

    Tensors are laid out widest dtype first (then in the given order), so that every one
    starts at a multiple of its item size, as the reference writer does."""
    arrays = []
    for name, value in tensors.items():
        if not isinstance(name, str) or name == _METADATA:
            raise SafetensorsError(f"{path}: invalid tensor name {name!r}")
        arr = np.asarray(value, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        code = _NAMES.get(arr.dtype.name)
        if code is None:
            raise SafetensorsError(f"{path}: {name} has dtype {arr.dtype}, which safetensors "
                                   f"cannot store (known: {', '.join(_NAMES)})")
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arrays.append((name, code, arr))
    order = sorted(range(len(arrays)), key=lambda i: -arrays[i][2].dtype.itemsize)
    header: dict = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise SafetensorsError(f"{path}: metadata must map str to str; bad keys {bad}")
        header[_METADATA] = dict(metadata)
    offset = 0
    for i in order:
        name, code, arr = arrays[i]
        header[name] = {"dtype": code, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % _ALIGN)

    def write(fh):
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for i in order:
            fh.write(arrays[i][2].reshape(-1).view(np.uint8).data)  # bytes view: any dtype

    atomic_write(path, write)


def load_safetensors(path: str | os.PathLike, *, max_bytes: int | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; tensors in the header's order, each a
    C-contiguous numpy array in native byte order. `max_bytes`: the memory budget (see
    `smfnet_jax.torch_weights.limits`). Raises SafetensorsError, FileNotFoundError."""
    path = os.fspath(path)
    budget = Budget(path, SafetensorsError, max_bytes)

    def bad(reason: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: not a valid safetensors file: {reason}")

    if os.path.isdir(path):
        raise SafetensorsError(f"{path}: is a directory, expected a .safetensors file")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES:
            raise bad(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte bound")
        if n > size - 8:
            raise bad(f"header length {n} runs past the end of the file ({size} bytes): "
                      "truncated or not a safetensors file")
        budget.charge(n, "the JSON header")
        raw_header = fh.read(n)
        try:
            header = json.loads(raw_header.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"the header is not UTF-8 JSON ({exc})") from None
        except RecursionError:  # e.g. 100000 nested '[': no real header nests like that
            raise bad("the header's JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise bad("the header is not a JSON object")
        metadata = header.pop(_METADATA, None) or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise bad("__metadata__ must map strings to strings")
        data_size = size - 8 - n
        entries = []
        for name, entry in header.items():
            entries.append((name, *_check_entry(name, entry, data_size, bad)))
        # The spans must tile [0, data_size) exactly: no overlap, no hole, nothing after.
        end = 0
        for name, dtype, shape, begin, stop in sorted(entries, key=lambda e: (e[3], e[4])):
            if begin != end:
                raise bad(f"tensor {name} starts at byte {begin} but the previous one ends at "
                          f"{end} ({'overlapping' if begin < end else 'a hole between'} data)")
            end = stop
        if end != data_size:
            raise bad(f"the tensors' data ends at byte {end} but the data region holds "
                      f"{data_size} bytes")
        budget.charge(data_size, "the tensor data")
        tensors: dict[str, np.ndarray] = {}
        start = 8 + n
        for name, dtype, shape, begin, stop in entries:
            fh.seek(start + begin)
            buf = fh.read(stop - begin)
            if len(buf) != stop - begin:
                raise bad(f"tensor {name}: the file ends early (truncated)")
            # astype copies: a writable array in native byte order, not a view of buf
            tensors[name] = np.frombuffer(buf, dtype=dtype.newbyteorder("<")).reshape(shape).astype(dtype)
    return tensors, dict(metadata)


def _check_entry(name, entry, data_size, bad):
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"tensor {name!r}: expected the keys dtype, shape, data_offsets, got "
                  f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in _DTYPES:
        raise bad(f"tensor {name}: unknown dtype {code!r} (known: {', '.join(_DTYPES)})")
    dtype = numpy_dtype(_DTYPES[code])
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
        raise bad(f"tensor {name}: data_offsets {offsets!r} is not [begin, end] with "
                  "0 <= begin <= end")
    begin, stop = offsets
    if stop > data_size:
        raise bad(f"tensor {name}: data_offsets {offsets} reach past the data region "
                  f"({data_size} bytes)")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != stop - begin:
        raise bad(f"tensor {name}: shape {shape} of {code} needs {nbytes} bytes but its "
                  f"data_offsets span {stop - begin}")
    return dtype, tuple(shape), begin, stop
