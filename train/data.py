"""Training input pipeline: prepared H5 patches (or synthetic pairs) -> grain iterator.

Sources
-------
`H5PairSource(path)` reads a file written by `python -m train.prepare` (or by the
reference's `dataprocessing.py`: same layout): groups ``ir_patchs`` / ``vis_patchs``, keys
"0", "1", ..., each a (1, H, W) float32 patch. Record ``i`` is the ``i``-th key in natural
(numeric) order. The file is opened lazily, once per process, so the source can be pickled
into grain's worker processes (an h5py handle is never pickled). At open, before any
training step: both groups hold the same keys, every patch has the first one's (1, H, W)
shape and float dtype (metadata only), and `VALUE_SAMPLE` patches spread over the file are
read. Every record read (at open or later) is checked: NaN/inf, or values outside [0, 1] by
more than `VALUE_MARGIN`, raise `BadPatchError` naming the file and the H5 key.

The file is untrusted input; before any pixel is read, from the metadata only: a link that
cannot be followed (a dangling soft or external link, a loop of soft links) is named with its
target; with ``patch_size`` every patch must be ``(1, patch_size, patch_size)`` (the config's
``data.patch_size``); one record (both modalities) must fit the readers' memory budget
(`smfnet_jax.torch_weights.limits.Budget`, as for checkpoints: ``max_bytes``, default 2 GiB,
or $SMFNET_CKPT_MAX_BYTES); and no patch larger than 1 MiB may inflate more than 100 times
its stored bytes (a few kB of compressed chunks, or unwritten chunks, declaring a huge patch).
Every later read checks the patch's declared shape and dtype before reading it, so no read
allocates more than the record the budget admitted.

`SyntheticPairs(n, size, seed)` makes deterministic infrared/visible-like pairs in memory with
the same interface (for the smoke config on a machine without MSRS, and for tests);
`write_synthetic_h5` stores such a set in the prepared H5 format. `CroppedPairs(source, size)`
crops any source's records to a smaller square (seeded per record; the smoke config's option).

Both return records ``{"vi": (H, W, 1) float32, "ir": (H, W, 1) float32}`` (NHWC, values in
[0, 1]); batches are ``{"vi": (b, H, W, 1), "ir": (b, H, W, 1)}``.

Order and sharding contract (multi-host)
----------------------------------------
The data order is a pure function of ``(num_records, global_batch_size, seed, step)``; the
number of processes only decides who reads what:

* epoch ``e`` uses the permutation ``perm_e = np.random.default_rng([seed, e]).permutation(N)``;
* global step ``t`` belongs to epoch ``e = t // S`` with ``S = N // B`` steps per epoch
  (the last ``N % B`` records of each epoch's permutation are dropped);
* the global batch of step ``t`` is ``perm_e[s*B:(s+1)*B]`` with ``s = t % S``;
* with ``P`` shards (JAX processes by default) shard ``p`` reads only the slice
  ``[p*B/P, (p+1)*B/P)`` of that global batch, so the global batch is the concatenation
  over ``p = 0..P-1`` of the local batches, in process order. Each process builds its part
  of the global array from its local batch (e.g. `jax.make_array_from_process_local_data`
  with a batch-sharded `NamedSharding`); the rows land in that order when the mesh lists the
  devices process by process, as `jax.devices()` does. With another device order the global
  batch holds the same records in a different row order, which changes nothing but the
  summation order of batch means.

So a 2-process run sees exactly the global batches of a 1-process run, and the shards of one
step are disjoint. (grain's own `IndexSampler` sharding gives each process a fixed contiguous
part of the records and shuffles within it, which would not have this property.)

Iterator state
--------------
`make_train_iterator` returns a `grain.DatasetIterator`; its ``get_state()`` /
``set_state()`` capture the position exactly. With an orbax ``CheckpointManager``, save it next
to the train state under its own item name::

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(train_iter)))
    ...
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))   # restores train_iter in place

grain writes one ``process_<i>-of-<n>.json`` per JAX process. Because the order is a pure
function of the step, ``make_train_iterator(..., start_step=t)`` gives the same stream without
any saved state (useful when the number of processes changes between runs).
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Protocol

import grain
import h5py
import numpy as np

from smfnet_jax.fileio import atomic_path
from smfnet_jax.imageio import natural_key
from smfnet_jax.torch_weights.limits import Budget

IR_GROUP = "ir_patchs"
VI_GROUP = "vis_patchs"

MSRS_HELP = (
    "Get the MSRS training set from https://github.com/Linfeng-Tang/MSRS (its train split, "
    "folders train/ir and train/vi), then make the patch file with\n"
    "    python -m train.prepare --src MSRS/train --out data/msrs_train.h5\n"
    "and point the config at it (--config.data.h5=data/msrs_train.h5). Without a dataset "
    "the smoke config trains on synthetic pairs.")


# Patches read at open to check their values; and how far outside [0, 1] a value may be
# (float rounding of the luminance sum may pass 1 by an ulp, never by this much).
VALUE_SAMPLE = 16
VALUE_MARGIN = 0.01


class MissingDatasetError(FileNotFoundError):
    """The prepared H5 file does not exist."""


class BadPatchError(ValueError):
    """A stored patch is unusable (non-finite values, wrong shape or dtype, a broken link,
    more memory than the budget allows)."""


class PairSource(Protocol):
    """Random-access source of ``{"vi", "ir"}`` records (what `make_train_iterator` takes)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


class H5PairSource:
    """Random access to the patch pairs of a prepared H5 file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, patch_size: int = 0, max_bytes: int | None = None):
        """patch_size: > 0, every patch must be (1, patch_size, patch_size); 0 accepts the
        first patch's size. max_bytes: the memory budget of one record (see the module
        docstring; None: $SMFNET_CKPT_MAX_BYTES or 2 GiB)."""
        self.path = Path(path)
        self.patch_size = int(patch_size)
        if not self.path.is_file():
            raise MissingDatasetError(f"training data file {self.path} does not exist.\n{MSRS_HELP}")
        try:
            budget = Budget(str(self.path), BadPatchError, max_bytes, kind="training data file")
        except ValueError as e:  # a malformed $SMFNET_CKPT_MAX_BYTES
            raise BadPatchError(f"{self.path}: cannot set the read budget: {e}") from None
        try:
            with h5py.File(self.path, "r") as f:
                for group in (IR_GROUP, VI_GROUP):
                    if f.get(group, getlink=True) is None or not isinstance(
                            self._member(f, group), h5py.Group):
                        raise BadPatchError(
                            f"{self.path}: no group '{group}'; expected a file written by "
                            "`python -m train.prepare` (groups ir_patchs/vis_patchs)")
                ir_keys = set(self._member(f, IR_GROUP).keys())
                vi_keys = set(self._member(f, VI_GROUP).keys())
                if ir_keys != vi_keys:
                    only_ir = sorted(ir_keys - vi_keys)[:5]
                    only_vi = sorted(vi_keys - ir_keys)[:5]
                    raise BadPatchError(
                        f"{self.path}: groups {IR_GROUP} and {VI_GROUP} hold different keys "
                        f"(only in {IR_GROUP}: {only_ir}, only in {VI_GROUP}: {only_vi})")
                if not ir_keys:
                    raise BadPatchError(f"{self.path}: the file holds no patches")
                # "0","1",...,"10": numeric order (h5py lists names alphabetically: "0","1",
                # "10","100",...); other names keep plain sorted order, the record numbering
                # such a file has always had.
                self._keys = sorted(ir_keys, key=natural_key if all(k.isdigit() for k in ir_keys)
                                    else None)
                self.patch_shape, self.dtype = self._check_layout(f, budget)
                self._check_values(f)
        except OSError as e:
            raise BadPatchError(f"{self.path}: not a readable HDF5 file ({e})") from e
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def _member(self, parent: h5py.Group, name: str):
        """parent[name], or BadPatchError naming it and why it cannot be reached (a link
        whose target is missing, a loop of soft links, an external file that cannot be
        opened) instead of h5py's KeyError / RuntimeError."""
        try:
            return parent[name]
        except (KeyError, RuntimeError, OSError) as e:
            where = f"{parent.name.strip('/')}/{name}".strip("/")
            try:
                link = parent.get(name, getlink=True)
            except (KeyError, RuntimeError, OSError):
                link = None
            why = str(e.args[0]) if e.args else type(e).__name__
            if isinstance(e, RuntimeError) and isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
                target = (f"'{link.path}'" if isinstance(link, h5py.SoftLink)
                          else f"'{link.path}' in {link.filename}")
                what = f"is a link to {target} in a loop of links that never reaches an object"
            elif isinstance(link, h5py.SoftLink):
                what = f"is a soft link to '{link.path}', which does not exist (a dangling link)"
            elif isinstance(link, h5py.ExternalLink):
                what = (f"is an external link to '{link.path}' in {link.filename}, which cannot "
                        f"be followed ({why})")
            else:
                what = f"cannot be opened ({why})"
            raise BadPatchError(f"{self.path}: '{where}' {what}") from None

    def _dataset(self, f: h5py.File, group: str, key: str) -> h5py.Dataset:
        d = self._member(self._member(f, group), key)
        if not isinstance(d, h5py.Dataset):
            raise BadPatchError(f"{self.path}: '{group}/{key}' is not a dataset")
        return d

    def _check_layout(self, f: h5py.File, budget: Budget) -> tuple[tuple[int, int], np.dtype]:
        """Every patch of both groups (1, H, W) with the first one's H, W and float dtype, of
        the configured size, within the memory budget and not inflating far beyond its stored
        bytes: read from the metadata only (no pixels), so a bad patch is found before
        training and before any large allocation."""
        first_name = f"'{IR_GROUP}/{self._keys[0]}'"
        first = self._dataset(f, IR_GROUP, self._keys[0])
        shape, dtype = first.shape, first.dtype
        if len(shape) != 3 or shape[0] != 1 or min(shape[1:]) < 1:
            raise BadPatchError(f"{self.path}: patch {first_name} has shape "
                                f"{shape}, expected (1, H, W)")
        if not np.issubdtype(dtype, np.floating):
            raise BadPatchError(f"{self.path}: patch {first_name} has dtype "
                                f"{dtype}, expected float32 values in [0, 1]")
        if self.patch_size and shape[1:] != (self.patch_size,) * 2:
            raise BadPatchError(
                f"{self.path}: patch {first_name} is {shape[1]}x{shape[2]}, not the "
                f"{self.patch_size}x{self.patch_size} of the config (data.patch_size="
                f"{self.patch_size}); set data.patch_size to the file's patch size (0: any size)")
        record = 2 * first.size * dtype.itemsize  # what reading one record allocates
        budget.charge(record, f"one record ({first_name} and its '{VI_GROUP}' partner, "
                              f"{shape[1]}x{shape[2]} {dtype} each)")
        for group in (IR_GROUP, VI_GROUP):
            g = self._member(f, group)
            for key in self._keys:
                d = self._member(g, key)
                if not isinstance(d, h5py.Dataset):
                    raise BadPatchError(f"{self.path}: '{group}/{key}' is not a dataset")
                if d.shape != shape or d.dtype != dtype:
                    raise BadPatchError(
                        f"{self.path}: patch '{group}/{key}' is {d.shape} {d.dtype}, unlike the "
                        f"first patch '{IR_GROUP}/{self._keys[0]}' ({shape} {dtype}); all "
                        "patches must share one shape and dtype (re-create the file with "
                        "train.prepare)")
                budget.check_ratio(d.id.get_storage_size(), d.size * dtype.itemsize,
                                   f"patch '{group}/{key}' ({shape[1]}x{shape[2]} {dtype})")
        return tuple(shape[1:]), dtype

    def _check_values(self, f: h5py.File) -> None:
        """Read a few patches spread over the file (both modalities) and refuse values outside
        [0, 1] (by more than VALUE_MARGIN) or non-finite: the losses assume [0, 1] images, and
        a file of 0-255 values would otherwise train on nonsense. Every patch read later is
        checked the same way (`_read`)."""
        n = len(self._keys)
        for i in sorted(set(np.linspace(0, n - 1, min(n, VALUE_SAMPLE)).round().astype(int))):
            for group in (IR_GROUP, VI_GROUP):
                self._read(f, group, self._keys[i])

    # h5py handles must not cross process boundaries: drop on pickle, reopen lazily.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _handle(self) -> h5py.File:
        with self._lock:
            if self._file is None or self._pid != os.getpid():
                self._file = h5py.File(self.path, "r")
                self._pid = os.getpid()
            return self._file

    def close(self) -> None:
        with self._lock:
            if self._file is not None and self._pid == os.getpid():
                self._file.close()
            self._file = None

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, index: int) -> str:
        return self._keys[index]

    def _read(self, f: h5py.File, group: str, key: str) -> np.ndarray:
        d = self._dataset(f, group, key)
        name = f"'{group}/{key}'"
        # declared shape and dtype before reading: the file may have changed since it was
        # opened, and a read must not allocate more than the record the budget admitted
        if d.shape != (1,) + self.patch_shape:
            raise BadPatchError(
                f"{self.path}: patch {name} has shape {d.shape}, expected "
                f"{(1,) + self.patch_shape} like the first patch")
        if d.dtype != self.dtype:
            raise BadPatchError(f"{self.path}: patch {name} has dtype {d.dtype}, expected "
                                f"{self.dtype} like the first patch")
        try:
            arr = np.asarray(d[()])
        except (OSError, RuntimeError) as e:  # a corrupt chunk, a missing filter or raw file
            raise BadPatchError(f"{self.path}: patch {name} cannot be read ({e})") from None
        finite = np.isfinite(arr)
        if not finite.all():
            raise BadPatchError(
                f"{self.path}: patch {name} has {int(arr.size - finite.sum())} non-finite "
                f"value(s) (NaN/inf) out of {arr.size}; re-create the file with train.prepare")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -VALUE_MARGIN or hi > 1 + VALUE_MARGIN:
            hint = " (0-255 values? train.prepare divides by 255)" if hi > 2 else ""
            raise BadPatchError(
                f"{self.path}: patch {name} has values in [{lo:.4g}, {hi:.4g}], expected [0, 1]"
                f"{hint}; re-create the file with train.prepare")
        return arr[0, :, :, None].astype(np.float32, copy=False)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        key = self._keys[index]
        f = self._handle()
        return {"vi": self._read(f, VI_GROUP, key), "ir": self._read(f, IR_GROUP, key)}

    def __repr__(self) -> str:
        return f"H5PairSource({str(self.path)!r}, n={len(self)}, patch={self.patch_shape})"


# ---------------------------------------------------------------------------------------------
# Synthetic infrared/visible-like pairs.

def _smooth_field(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, terms: int) -> np.ndarray:
    """Sum of a few random low-frequency cosines, roughly in [-1, 1]."""
    out = np.zeros_like(yy)
    for _ in range(terms):
        fy, fx = rng.uniform(-2.0, 2.0, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        out += np.cos(2 * np.pi * (fy * yy + fx * xx) + phase)
    return out / terms


def synthetic_pair(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (vi, ir) pair of (size, size) float32 images in [0, 1].

    IR: a dim smooth background with a few bright, blurry "warm objects" (ellipses).
    VI: brighter smooth illumination, rectangles with sharp edges and fine stripe texture;
    the warm objects are only faintly visible in it (they are what IR adds to the fusion).
    """
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    ir = 0.25 + 0.1 * _smooth_field(rng, yy, xx, 3)
    vi = 0.45 + 0.15 * _smooth_field(rng, yy, xx, 3)
    for _ in range(rng.integers(2, 5)):  # sharp-edged textured structures, visible only
        y0, x0 = rng.uniform(0, 0.8, size=2)
        h, w = rng.uniform(0.1, 0.4, size=2)
        inside = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        freq, angle = rng.uniform(8, 24), rng.uniform(0, np.pi)
        stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * yy + np.sin(angle) * xx))
        vi = np.where(inside, rng.uniform(0.1, 0.9) + 0.08 * stripes, vi)
        ir = np.where(inside, ir + rng.uniform(-0.05, 0.05), ir)
    for _ in range(rng.integers(1, 4)):  # warm objects: bright in IR, faint in VI
        cy, cx = rng.uniform(0.15, 0.85, size=2)
        ry, rx = rng.uniform(0.04, 0.15, size=2)
        blob = np.exp(-0.5 * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) ** 2)
        ir = ir + rng.uniform(0.5, 0.75) * blob
        vi = vi - 0.1 * blob
    ir = ir + rng.normal(0.0, 0.01, ir.shape)
    vi = vi + rng.normal(0.0, 0.02, vi.shape)
    return (np.clip(vi, 0.0, 1.0).astype(np.float32), np.clip(ir, 0.0, 1.0).astype(np.float32))


class SyntheticPairs:
    """Deterministic synthetic source: record ``i`` depends only on ``(seed, i)``."""

    def __init__(self, n: int, size: int = 128, seed: int = 0):
        if n <= 0 or size <= 0:
            raise ValueError(f"SyntheticPairs needs n > 0 and size > 0, got n={n}, size={size}")
        self.n, self.size, self.seed = int(n), int(size), int(seed)
        self.patch_shape = (self.size, self.size)

    def __len__(self) -> int:
        return self.n

    def key(self, index: int) -> str:
        return str(index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"SyntheticPairs index {index} out of range [0, {self.n})")
        vi, ir = synthetic_pair(self.size, np.random.default_rng([self.seed, index]))
        return {"vi": vi[:, :, None], "ir": ir[:, :, None]}

    def __repr__(self) -> str:
        return f"SyntheticPairs(n={self.n}, size={self.size}, seed={self.seed})"


class CroppedPairs:
    """Square crops of another source's records: record ``i`` is cropped to ``size`` x ``size``
    at an offset that depends only on ``(seed, i)``, the same for both modalities.

    For quick runs on full-size patches (the smoke config); the reference trains on whole
    128x128 patches. A crop as large as the patch is the patch itself.
    """

    def __init__(self, source: PairSource, size: int, seed: int = 0):
        if size <= 0:
            raise ValueError(f"crop size must be positive, got {size}")
        self.source, self.size, self.seed = source, int(size), int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def key(self, index: int) -> str:
        return self.source.key(index)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rec = self.source[index]
        h, w = rec["vi"].shape[:2]
        if self.size > min(h, w):
            raise ValueError(f"crop size {self.size} is larger than record {self.key(index)} "
                             f"of {self}, which is {h}x{w}")
        rng = np.random.default_rng([self.seed, int(index), 0x63726F70])  # "crop"
        y, x = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
        return {k: v[y:y + self.size, x:x + self.size] for k, v in rec.items()}

    def __repr__(self) -> str:
        return f"CroppedPairs({self.source!r}, size={self.size}, seed={self.seed})"


def write_pairs_h5(path: str | os.PathLike, source: PairSource) -> Path:
    """Write all records of `source` to `path` in the prepared format (atomically)."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        g_ir, g_vi = f.create_group(IR_GROUP), f.create_group(VI_GROUP)
        for i in range(len(source)):
            rec = source[i]
            g_ir.create_dataset(str(i), data=np.asarray(rec["ir"], np.float32)[None, :, :, 0])
            g_vi.create_dataset(str(i), data=np.asarray(rec["vi"], np.float32)[None, :, :, 0])
    return path


def write_synthetic_h5(path: str | os.PathLike, n: int, size: int = 128, seed: int = 0) -> Path:
    """Write `SyntheticPairs(n, size, seed)` to `path` in the prepared H5 format."""
    return write_pairs_h5(path, SyntheticPairs(n, size, seed))


# ---------------------------------------------------------------------------------------------
# Order, sharding, batching.

def _as_source(data: str | os.PathLike | PairSource) -> PairSource:
    if isinstance(data, (str, os.PathLike)):
        return H5PairSource(data)
    return data


def steps_per_epoch(data: str | os.PathLike | PairSource | int, global_batch_size: int) -> int:
    """Global steps per epoch, ``N // global_batch_size`` (the remainder is dropped)."""
    n = data if isinstance(data, (int, np.integer)) else len(_as_source(data))
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    return int(n) // global_batch_size


class GlobalOrder:
    """Element ``j`` of shard ``shard_index``'s record stream -> record index.

    Implements the order contract of the module docstring; also usable on its own
    (`global_batch(step)`) to state which records a step uses.
    """

    def __init__(self, num_records: int, global_batch_size: int, seed: int,
                 shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None):
        if shard_count <= 0 or not 0 <= shard_index < shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
        if global_batch_size <= 0 or global_batch_size % shard_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} must be a positive multiple of the "
                f"number of shards (processes) {shard_count}")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        self.num_records = int(num_records)
        self.global_batch_size = int(global_batch_size)
        self.steps_per_epoch = steps_per_epoch(self.num_records, self.global_batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the dataset has {self.num_records} records, fewer than one global batch "
                f"({self.global_batch_size})")
        self.seed = int(seed)
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.local_batch_size = self.global_batch_size // self.shard_count
        self.num_epochs = num_epochs
        if num_epochs is None:  # "infinite": as long as a Python sequence may be
            self._len = (sys.maxsize // self.local_batch_size) * self.local_batch_size
        else:
            self._len = num_epochs * self.steps_per_epoch * self.local_batch_size
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        cached = self._cache  # one read: safe against grain's reader threads
        if cached is not None and cached[0] == epoch:
            return cached[1]
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
        self._cache = (epoch, perm)
        return perm

    def global_batch(self, step: int) -> np.ndarray:
        """Record indices of global step `step` (all shards, in shard order)."""
        epoch, s = divmod(int(step), self.steps_per_epoch)
        b = self.global_batch_size
        return self.permutation(epoch)[s * b:(s + 1) * b]

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j: int) -> int:
        j = int(j)
        if not 0 <= j < self._len:
            raise IndexError(f"element {j} out of range [0, {self._len})")
        step, pos = divmod(j, self.local_batch_size)
        epoch, s = divmod(step, self.steps_per_epoch)
        g = s * self.global_batch_size + self.shard_index * self.local_batch_size + pos
        return int(self.permutation(epoch)[g])

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}


class _ReadRecord:
    """Picklable ``record index -> record`` map (carries the source into grain workers)."""

    def __init__(self, source: PairSource):
        self.source = source

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return self.source[index]


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None and shard_count is None:
        import jax  # only needed for the multi-host default
        return jax.process_index(), jax.process_count()
    if shard_index is None or shard_count is None:
        raise ValueError("give both shard_index and shard_count, or neither (= JAX processes)")
    return shard_index, shard_count


def make_train_dataset(
    data: str | os.PathLike | PairSource,
    *,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    start_step: int = 0,
    read_threads: int = 2,
    prefetch_buffer_size: int = 4,
    worker_buffer_size: int = 2,
) -> grain.IterDataset:
    """The grain dataset behind `make_train_iterator` (same arguments)."""
    source = _as_source(data)
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    order = GlobalOrder(len(source), global_batch_size, seed, shard_index, shard_count, num_epochs)
    ds = (grain.MapDataset.source(order)
          .map(_ReadRecord(source))
          .batch(order.local_batch_size, drop_remainder=True))
    if start_step:
        if start_step < 0 or start_step > len(ds):
            raise ValueError(f"start_step {start_step} outside [0, {len(ds)}]")
        ds = ds[start_step:]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        # grain 0.2.18 reads an absl flag when starting workers and fails in programs that do
        # not parse absl flags (google/grain#1355); defaults are what we want.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
    return iter_ds


def make_train_iterator(
    data: str | os.PathLike | PairSource,
    *,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    start_step: int = 0,
    read_threads: int = 2,
    prefetch_buffer_size: int = 4,
    worker_buffer_size: int = 2,
) -> grain.DatasetIterator:
    """Iterator over this process's local batches ``{"vi", "ir"}: (B/P, H, W, 1) float32``.

    data: path of a prepared H5 file, or a source (`H5PairSource`, `SyntheticPairs`, ...).
    global_batch_size: B, summed over all shards; must be divisible by the shard count P.
    seed: order seed (non-negative int). num_epochs: None repeats forever.
    worker_count: grain worker processes (0: read in this process, with `read_threads`).
    shard_index/shard_count: default `jax.process_index()` / `jax.process_count()`.
    start_step: skip the first `start_step` global steps (same stream as iterating past them).
    The order across steps and shards is described in the module docstring. The iterator has
    ``get_state()``/``set_state()`` and works with `grain.checkpoint.CheckpointSave/Restore`;
    a state only restores into an iterator built with the same arguments (worker_count included).
    """
    return iter(make_train_dataset(
        data, global_batch_size=global_batch_size, seed=seed, num_epochs=num_epochs,
        worker_count=worker_count, shard_index=shard_index, shard_count=shard_count,
        start_step=start_step, read_threads=read_threads,
        prefetch_buffer_size=prefetch_buffer_size, worker_buffer_size=worker_buffer_size))


__all__ = [
    "IR_GROUP", "VI_GROUP", "MSRS_HELP", "MissingDatasetError", "BadPatchError", "PairSource",
    "H5PairSource", "SyntheticPairs", "CroppedPairs", "synthetic_pair", "write_pairs_h5", "write_synthetic_h5",
    "steps_per_epoch", "GlobalOrder", "make_train_dataset", "make_train_iterator",
]

