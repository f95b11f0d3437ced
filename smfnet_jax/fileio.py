"""Atomic file writing, the one implementation every output of the project goes through.

A file is written under a temporary name in its target folder and renamed over the target
only once complete (fsync'd), so a crash or an error leaves the old file or no file, never
a partial one. The temporary file is created with mode 0o666 and O_EXCL (the umask decides
the final mode; tempfile.mkstemp's 0600 would stick to the output).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


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
    path = Path(path)
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
    """Call `write(binary_file)` on a temporary file, then rename it over `path`."""
    path = Path(path)
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
