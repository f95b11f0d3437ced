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
