"""Atomic file writing, the one implementation every file the project writes whole goes
through (images, .npy, JSON, H5, .pth, .safetensors, a workdir's config and log rewrites).
Not through it: orbax checkpoint folders (orbax's own, staged and renamed into place by
`smfnet_jax.checkpoint.save_converted`) and what a training run appends to (metrics.jsonl,
TensorBoard events).

A file is written under a temporary name in its target folder and renamed over the target
only once complete (fsync'd), so a crash or an error leaves the old file or no file, never
a partial one. The temporary file is created with mode 0o666 and O_EXCL (the umask decides
the final mode; tempfile.mkstemp's 0600 would stick to the output). `write_together` does
the same for several files at once: none is renamed before all are written.

What the target already is decides where the bytes go, the same for every writer: a
symbolic link is followed (its target is replaced, the link stays); a character device or a
FIFO (`/dev/null`, `/dev/stdout`, a named pipe) is written through, never replaced by a
regular file (a rename would destroy the device node); a folder or a socket is refused.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence


def _resolve_target(path: Path) -> tuple[Path, bool]:
    """(where to write, whether to write through instead of renaming); see the module doc."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))  # a dangling link: create its target
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return path, False
    if stat.S_ISREG(mode):
        return path, False
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return path, True
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a folder: cannot write a file there")
    raise OSError(f"{path} is not a regular file, a device or a FIFO: cannot write a file there")


def _exclusive_temp(path: Path) -> tuple[int, Path]:
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                           0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a writer that wants a file name (h5py);
    on success it replaces `path`, on any error it is removed."""
    path, through = _resolve_target(Path(path))
    if through:
        raise OSError(f"{path} is not a regular file: this writer needs one")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _exclusive_temp(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(binary_file)` on a temporary file, then rename it over `path` (through a
    character device or FIFO, followed through a symlink: see the module doc)."""
    path, through = _resolve_target(Path(path))
    if through:
        with open(path, "wb") as f:
            write(f)
            f.flush()
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _exclusive_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, doc, **dump_kwargs) -> Path:
    import json
    text = json.dumps(doc, **{"indent": 2, **dump_kwargs}) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_together(targets: Sequence[tuple[Path, Callable[[Path], object]]]) -> list[Path]:
    """Write several files all or nothing: each `write(temp)` writes its file (atomically)
    under a temporary name beside its target, and only when all are complete are they
    renamed to their targets. An error removes this call's temporary files and re-raises,
    leaving every target as it was. Returns the targets."""
    token = secrets.token_hex(4)
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in targets:
            temp = path.with_name(f".{path.name}.{token}.pending")
            staged.append((temp, path))
            write(temp)
        for temp, path in staged:
            os.replace(temp, path)  # same folder: renames do not fail for want of space
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    return [path for _, path in staged]


def overlap(out: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """How an output path and a path the command reads overlap, after resolving symlinks
    (also of not-yet-existing tails): "is", "contains" (`out` is a folder above `source`, so
    replacing it would destroy the source) or "lies inside" (`source` is a folder holding
    `out`); None when they are apart. The CLIs refuse an overlapping output before any work,
    whatever `--force` says: an output that is or contains an input would destroy it."""
    hit = find_overlap([out], [source])
    return hit[2] if hit else None


def find_overlap(outs: Iterable[str | os.PathLike], sources: Iterable[str | os.PathLike],
                 hows: Sequence[str] = ("is", "contains", "lies inside")) -> tuple[Path, Path, str] | None:
    """`overlap` of many outputs with many sources: the first (out, source, how) that
    overlap in one of the ways `hows` (an output folder that files are written into may
    contain an input: leave out "contains"), in the order of `outs`, or None. Each path is
    resolved once and looked up in sets, so checking every output of a run against every
    file it reads stays linear."""
    resolved: dict[Path, Path] = {}
    for s in sources:
        resolved.setdefault(Path(os.path.realpath(s)), Path(s))
    above: dict[Path, Path] = {}  # each folder above a source -> that source
    for real, s in resolved.items():
        for parent in real.parents:
            above.setdefault(parent, s)
    for o in outs:
        real = Path(os.path.realpath(o))
        if real in resolved and "is" in hows:
            return Path(o), resolved[real], "is"
        if real in above and "contains" in hows:
            return Path(o), above[real], "contains"
        inside = next((p for p in real.parents if p in resolved), None)
        if inside is not None and "lies inside" in hows:
            return Path(o), resolved[inside], "lies inside"
    return None
