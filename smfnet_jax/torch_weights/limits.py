"""The memory budget of the checkpoint readers (`.pth` and `.safetensors`), also used by the
training-patch reader (`train.data.H5PairSource`).

A checkpoint is untrusted input: a file of a few hundred bytes can declare tensors of many
gigabytes (zero-stride views, a deflate bomb, a lying zip header). The readers therefore
charge every allocation to a `Budget` *before* making it and refuse the file once the
total would pass the limit:

- `max_bytes` (default 2 GiB; the released SMFNet checkpoint holds ~13 MB): the sum of
  every record read (decompressed), every tensor materialised and every header parsed;
- `max_bytes // EXPANSION_DIVISOR` (64 MiB by default): what views that repeat their
  storage's elements (zero strides, `expand`) may add beyond the storage itself, in all,
  so that a tiny file cannot declare a huge tensor that is backed by no data;
- `MAX_COMPRESSION_RATIO`: a compressed zip record larger than `RATIO_FLOOR` bytes may not
  inflate more than this many times its compressed size.

Raise the limit with the `max_bytes=` keyword of `load_pth` / `load_safetensors` or with the
environment variable `SMFNET_CKPT_MAX_BYTES` (bytes, or with a K/M/G suffix: `8G`), which
every loader and CLI honours.
"""
from __future__ import annotations

import os

ENV_VAR = "SMFNET_CKPT_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
EXPANSION_DIVISOR = 32
MAX_COMPRESSION_RATIO = 100  # deflate tops out near 1030:1; float weights compress ~1.1:1
RATIO_FLOOR = 1 << 20  # small records (zeros, counters) may compress as well as they like

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SUFFIXES and t[-1:] else ""
    number = t[:-1] if unit else t
    try:
        value = int(float(number) * _SUFFIXES[unit])
    except ValueError:
        raise ValueError(f"${ENV_VAR}={text!r} is not a byte count (e.g. 4294967296 or 4G)") from None
    if value <= 0:
        raise ValueError(f"${ENV_VAR}={text!r} must be positive")
    return value


def resolve_max_bytes(max_bytes: int | None = None) -> int:
    """The keyword if given, else $SMFNET_CKPT_MAX_BYTES, else DEFAULT_MAX_BYTES."""
    if max_bytes is not None:
        if type(max_bytes) is not int or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        return max_bytes
    env = os.environ.get(ENV_VAR)
    return _parse_bytes(env) if env else DEFAULT_MAX_BYTES


def how_to_raise(limit: int) -> str:
    return (f"the limit is {_human(limit)}; if you trust this file, raise it with "
            f"{ENV_VAR}=<bytes> (e.g. {ENV_VAR}=8G) or the max_bytes= argument")


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


class Budget:
    """Running total of the bytes a reader has allocated for one file.

    `error` is the exception class raised on refusal (the reader's own); messages name the
    file (a `kind` of file: "checkpoint", "training data file"), the limit passed and how to
    raise it.
    """

    def __init__(self, path: str, error: type[Exception], max_bytes: int | None = None,
                 kind: str = "checkpoint"):
        self.path, self.error, self.kind = path, error, kind
        self.limit = resolve_max_bytes(max_bytes)
        self.expansion_limit = self.limit // EXPANSION_DIVISOR
        self.used = 0
        self.expanded = 0

    def charge(self, nbytes: int, what: str) -> None:
        """Account for `nbytes` about to be allocated for `what`, or refuse the file."""
        if self.used + nbytes > self.limit:
            raise self.error(
                f"{self.path}: refused: {what} needs {_human(nbytes)}, which would bring this "
                f"{self.kind}'s memory to {_human(self.used + nbytes)}, over the reader's "
                f"budget; {how_to_raise(self.limit)}")
        self.used += nbytes

    def charge_expansion(self, nbytes: int, what: str) -> None:
        """Bytes a view materialises beyond its storage's own size (repeated elements)."""
        if self.expanded + nbytes > self.expansion_limit:
            raise self.error(
                f"{self.path}: refused: {what} repeats storage elements into "
                f"{_human(nbytes)} more than the storage holds (zero strides); such expansion "
                f"may add at most {_human(self.expansion_limit)} per file (1/{EXPANSION_DIVISOR} "
                f"of the budget); {how_to_raise(self.limit)}")
        self.expanded += nbytes

    def check_ratio(self, compressed: int, uncompressed: int, what: str) -> None:
        """Refuse a compressed record that would inflate too far (a deflate bomb)."""
        if uncompressed > RATIO_FLOOR and uncompressed > MAX_COMPRESSION_RATIO * max(compressed, 1):
            raise self.error(
                f"{self.path}: refused: {what} inflates {compressed} compressed bytes to "
                f"{_human(uncompressed)} (ratio {uncompressed / max(compressed, 1):.0f}:1, the "
                f"cap is {MAX_COMPRESSION_RATIO}:1 for records over {_human(RATIO_FLOOR)}): "
                "a decompression bomb or a corrupt file")
