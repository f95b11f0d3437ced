"""What the command-line tools share that is not about images or models."""
from __future__ import annotations

import argparse
import os
import sys
import time


def program_name(module: str) -> str:
    """The name to show in a CLI's usage line: the console script when one was invoked
    (`smfnet-fuse`), else the `python -m MODULE` form that works from a checkout.

    `sys.argv[0]` is the script's path for a console script, but the module's file
    (`.../infer/main.py`) under `python -m`, whose basename would read wrong.
    """
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    name = name[:-4] if name.lower().endswith(".exe") else name  # Windows launchers
    return name if name.startswith("smfnet-") else f"python -m {module}"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """An argparse type for fusion sizes: "480x640,1024x1024" -> [(480, 640), (1024, 1024)];
    each side at least `inference.MIN_SIDE`, the smallest image every fuser takes."""
    from smfnet_jax.inference import MIN_SIDE

    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            h, w = (int(v) for v in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: expected HxW, e.g. 480x640") from None
        if h < MIN_SIDE or w < MIN_SIDE:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: both sides must be at least "
                                             f"{MIN_SIDE} (the smallest image SMFNet fuses)")
        sizes.append((h, w))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def overlap_problem(flag: str, outs, sources: dict,
                    hows=("is", "contains", "lies inside")) -> str | None:
    """The refusal when an output would replace or sit among what a command reads, or None.

    outs: the output paths given by (or planned from) `flag`; sources: {path read: how to
    name it, e.g. "the --ir folder", "the input file"}; hows: the overlaps refused.
    Symlinks are resolved (`smfnet_jax.fileio.find_overlap`). Returns "FLAG OUT: is / lies
    inside / contains SOURCE; refusing ..." for the first overlap, for the CLI's
    `error: ` line (exit 2)."""
    from pathlib import Path

    from smfnet_jax.fileio import find_overlap
    names = {Path(k): v for k, v in sources.items()}
    hit = find_overlap(outs, names, hows)
    if hit is None:
        return None
    out, source, how = hit
    named = names[source] if out == source else f"{names[source]} {source}"
    reason = {"is": ("refusing to write among the inputs" if Path(source).is_dir()
                     else "refusing to overwrite an input"),
              "contains": "refusing to replace an input",
              "lies inside": "refusing to write among the inputs"}[how]
    return f"{flag} {out}: {how} {named}; {reason}"


def input_images(*folders) -> dict:
    """{image file: "the input file"} for the `imageio.image_files` of `folders`: what the
    pairing CLIs read, as `sources` for `overlap_problem`."""
    from smfnet_jax.imageio import image_files
    return {p: "the input file" for folder in folders for p in image_files(folder)}


def environment_error() -> str | None:
    """The error line for a bad setting of an environment variable the CLIs read
    ($SMFNET_JAX_IMPL), or None; each CLI prints it and exits 2 before any work."""
    from smfnet_jax.policy import requested_routines
    try:
        requested_routines()
    except ValueError as e:
        return f"error: {e}"
    return None


def exit_on_environment_error() -> None:
    """`environment_error()`, printed to stderr, then exit status 2."""
    msg = environment_error()
    if msg:
        print(msg, file=sys.stderr)
        raise SystemExit(2)


def restore_checkpoint(path, flag: str) -> str | None:
    """A checkpoint path given to a CLI that is missing because a conversion with --force was
    killed mid-swap: put the previous checkpoint back (`checkpoint.restore_interrupted_swap`),
    saying so in one 'note: ...' line on stderr. Returns the error line's text (without
    'error: ') when it cannot, saying where the previous checkpoint is; else None."""
    import glob
    from pathlib import Path
    path = Path(path)
    # Cheap guard first: the checkpoint module imports JAX.
    if path.exists() or path.is_symlink() or not glob.glob(
            os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.old")):
        return None
    from smfnet_jax.checkpoint import CheckpointError, restore_interrupted_swap
    try:
        note = restore_interrupted_swap(path)
    except CheckpointError as e:
        return f"{flag} {e}"
    if note:
        print(f"note: {note}", file=sys.stderr)
    return None


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, CI) plain lines instead of a bar's
    carriage returns: one after the first item, then at most every `every_s` seconds, and
    one after the last.

    `update(n, status)`: n more items done; `status` (e.g. "loss 4.51, phase 2") is shown
    in the bar's postfix or at the end of the plain line. `write(text)`: a message line that
    does not break the bar. `enabled=False` shows no progress at all.
    """

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0,
                 every_s: float = 30.0, file=None, enabled: bool = True):
        from tqdm import tqdm
        self.file = file or sys.stderr
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = initial
        self._start = time.perf_counter()
        self._last = None  # no plain line yet
        self.enabled = enabled  # False: neither bar nor plain lines (write() still prints)
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.file,
                         dynamic_ncols=True, disable=None if enabled else True)  # None: tty only

    @property
    def plain(self) -> bool:
        return bool(self._bar.disable)

    def write(self, text: str) -> None:
        from tqdm import tqdm
        tqdm.write(text, file=self.file)

    def update(self, n: int = 1, status: str = "") -> None:
        now = time.perf_counter()
        self.done += n
        self._bar.update(n)
        if not self.enabled:
            return
        if not self.plain:
            if status:
                self._bar.set_postfix_str(status)
            return
        if self._last is None or now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            tail = f", {status}" if status else ""
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s ({now - self._start:.0f} s)"
                  f"{tail}", file=self.file, flush=True)

    def close(self) -> None:
        self._bar.close()
