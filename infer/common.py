"""What the fusion and evaluation CLIs share: exit statuses, checks of output paths before
any work, the 16-bit option, and how warnings are shown (one plain line each)."""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
import warnings
from pathlib import Path

from smfnet_jax.cli import overlap_problem
from smfnet_jax.imageio import SCALE16_MODES, HighByteWarning


GRID_SUFFIX = "_grid"  # infer.main --grid writes NAME_grid.png beside NAME.png

# Exit statuses of infer.main and infer.evaluate.
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_UNDEFINED = 3  # every image scored, but some metric value is undefined (NaN / inf)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


def writable_folder_problem(folder: Path, flag: str, create: bool) -> str | None:
    """None when `folder` is (or, with `create`, could be made) a folder this process can
    write in, checked by creating and removing a probe file; else the reason, naming `flag`."""
    if folder.exists() and not folder.is_dir():
        return f"{flag} {folder} exists and is not a folder"
    if not folder.exists():
        if not create:
            return f"{flag}: folder {folder} does not exist"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"{flag} {folder}: cannot create the folder ({e.strerror or e})"
    probe = folder / f".smfnet-write-probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as e:
        return f"{flag} {folder}: cannot write in the folder ({e.strerror or e})"
    return None


def json_out_problem(path: Path, flag: str = "--json", inputs: dict | None = None) -> str | None:
    """None when a JSON file can be written at `path` (not a folder, its folder exists and is
    writable, not one of `inputs`, {path read: how to name it}; it may lie in an input
    folder); else the reason. Checked before any work is done."""
    if path.is_dir():
        return f"{flag} {path} is a folder; give a file name, e.g. {path / 'metrics.json'}"
    if not path.parent.is_dir():
        return f"{flag} {path}: folder {path.parent} does not exist"
    return (writable_folder_problem(path.parent, f"{flag} {path}: folder", create=False)
            or overlap_problem(flag, [path], inputs or {}, hows=("is", "contains")))


def add_scale16_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scale16", choices=SCALE16_MODES, default="high",
        help="16-bit grey images: 'high' keeps the high byte as OpenCV and the reference do "
             "(default; a warning names a file left with fewer than 64 grey levels), 'range' "
             "scales each image's own min..max to 0..255")


@contextlib.contextmanager
def plain_warnings():
    """Show the 16-bit warning as one 'warning: ...' line on stderr (no source location)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", HighByteWarning)  # imageio already says each file once
        warnings.showwarning = show
        yield
