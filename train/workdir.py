"""What a training workdir holds besides checkpoints: the lock, the recorded config, the logs.

* `WorkdirLock`: one trainer per workdir. ``WORKDIR/train.lock`` is held with `fcntl.flock`
  (the kernel drops it when its holder dies, even by SIGKILL) and names its holder
  (``{"pid", "host", "started"}``) for the message a second trainer gets.
* `compare_config` / `reconcile_config`: ``WORKDIR/config.json`` records the config of the
  run; a resume compares against it (before anything is restored) and records it only once
  the restore has succeeded (`ConfigChange.record`).
* `truncate_metrics`: a resume drops the ``metrics.jsonl`` rows logged after the restored
  checkpoint, so every step has exactly one row.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from smfnet_jax.fileio import atomic_write, atomic_write_json
from train.configs.validate import as_dict, flatten

LOCK_NAME = "train.lock"
CONFIG_NAME = "config.json"
CONFIG_HISTORY = "config_history"
METRICS_NAME = "metrics.jsonl"

# Keys a resume may change without --allow_config_change: how long to train, and how often to
# log, save, evaluate, profile and show progress; the distributed address, which is per launch; and
# data.patch_size, which only checks the file (a workdir recorded before it existed resumes).
# Everything else changes what the restored state means (data, order, schedule, optimiser, model).
RESUMABLE_KEYS = frozenset({
    "num_epochs", "max_steps", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
    "sample_every_epochs", "progress", "profile_steps", "profile_all_processes",
    "eval_every_epochs", "eval.ir", "eval.vi", "eval.max_pairs",
    "distributed.coordinator_address",
    "distributed.process_id", "distributed.cpu_collectives", "data.patch_size",
})


# A config recorded before the optimiser was optax had torch's Adam's betas as adam_b1/b2/eps
# (now torch_adam's arguments, optimizer_kwargs) and none of the keys added with it; read as
# the config that trains the same way.
RENAMED_KEYS = {"adam_b1": "b1", "adam_b2": "b2", "adam_eps": "eps"}
ADDED_KEYS = {"optimizer": "torch_adam", "schedule": "step", "warmup_epochs": 0.0}


def upgrade_record(record: dict) -> dict:
    """A recorded config in the current keys (`RENAMED_KEYS`, `ADDED_KEYS`): an Adam setting
    at torch_adam's default is dropped, another becomes its optimizer_kwargs entry."""
    if not any(k in record for k in RENAMED_KEYS):
        return record
    import inspect
    from train.optim import torch_adam
    defaults = {n: p.default for n, p in inspect.signature(torch_adam).parameters.items()}
    out = {k: v for k, v in record.items() if k not in RENAMED_KEYS}
    kwargs = dict(out.get("optimizer_kwargs") or {})
    for old, name in RENAMED_KEYS.items():
        if old in record and record[old] != defaults[name]:
            kwargs[name] = record[old]
    out["optimizer_kwargs"] = kwargs
    for key, value in ADDED_KEYS.items():
        out.setdefault(key, value)
    return out


class WorkdirError(RuntimeError):
    """The workdir cannot be used as asked (locked, or recorded with another config)."""


# --------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(started {holder.get('started', '?')})")


class WorkdirLock:
    """Exclusive use of a workdir by this process. `acquire()` raises `WorkdirError` naming
    the holder when another trainer has it; `release()` (idempotent) frees it.

    flock alone decides on one host. The holder's record decides what flock cannot see: a
    lock file naming another host whose flock we nevertheless got (a network file system
    without shared locks) is not taken over, since we cannot tell whether that trainer is
    alive; a record naming a dead pid of this host is a crash's leftover, taken over with a
    notice."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_NAME
        self.fd: int | None = None
        self.took_over: dict | None = None  # the stale holder replaced, if any

    def _read_holder(self) -> dict:
        try:
            text = os.pread(self.fd, 4096, 0).decode("utf-8", "replace") if self.fd is not None \
                else self.path.read_text(encoding="utf-8", errors="replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}

    def acquire(self) -> "WorkdirLock":
        if self.fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = self._read_holder()
                raise WorkdirError(
                    f"{self.path.parent} is in use by another trainer: {_describe(holder)}; "
                    "wait for it to finish or use another --workdir") from None
            # The holder before us may have unlinked the file between our open and flock:
            # then we hold a lock on a deleted file; start again on the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        holder = self._read_holder()
        me = socket.gethostname()
        if holder and holder.get("pid") != "?" and holder.get("host") not in (None, me):
            self.fd = None
            os.close(fd)
            raise WorkdirError(
                f"{self.path.parent} is locked by a trainer on another host: {_describe(holder)}; "
                f"if you know it is no longer running, delete {self.path} and start again")
        pid = holder.get("pid")
        if holder and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid) \
                and holder.get("host") == me:
            # flock is ours yet the holder lives: a file system without flock (some FUSE
            # mounts), or the pid was reused. Do not guess: let the user decide.
            self.fd = None
            os.close(fd)
            raise WorkdirError(
                f"{self.path.parent} is locked by {_describe(holder)}, which is still running; "
                f"if it is not a trainer, delete {self.path} and start again")
        if holder:
            self.took_over = holder
        record = {"pid": os.getpid(), "host": me,
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:  # unlink before unlocking: a waiter then sees a fresh file, not our stale record
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def unusable_workdir(workdir: str | os.PathLike, error: OSError) -> WorkdirError:
    """The one-line error for a workdir that cannot be created or written (`error`, from
    making it or its lock file): the path that failed and why."""
    workdir = Path(workdir)
    if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):  # name the blocking component
        for p in (workdir, *workdir.parents):
            if p.is_symlink() and not p.exists():
                return WorkdirError(f"{p}: a symbolic link to nothing, so the workdir {workdir} "
                                    "cannot be made there")
            if p.exists() and not p.is_dir():
                return WorkdirError(f"{p}: not a folder, so the workdir {workdir} cannot be "
                                    "made there")
    where = error.filename or workdir
    return WorkdirError(f"{where}: {error.strerror or error} (the workdir {workdir} must be a "
                        "folder this process can write)")


# --------------------------------------------------------------------------- the config record
def config_record(cfg) -> dict:
    """The config as JSON-able plain data (tuples become lists, as after a JSON round trip)."""
    return json.loads(json.dumps(as_dict(cfg), sort_keys=True, default=str))


def config_differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """[(dotted key, old value, new value)], '(absent)' for a key one side lacks."""
    a, b = flatten(old), flatten(new)
    absent = "(absent)"
    return [(k, a.get(k, absent), b.get(k, absent)) for k in sorted(set(a) | set(b))
            if a.get(k, absent) != b.get(k, absent)]


class ConfigChange:
    """How `cfg` compares with the config recorded in a workdir (`compare_config`), and
    `record(restored_step)` to write it once the run has really started from that step."""

    def __init__(self, workdir: Path, new: dict, old: dict | None, lines: list[str],
                 missing_record: bool):
        self.workdir, self.new, self.old, self.lines = workdir, new, old, lines
        self.missing_record = missing_record  # a resumed workdir without config.json (made before them)

    def record(self, restored_step: int | None, log=None) -> list[str]:
        """Write config.json (and the replaced one to config_history/step_<N>.json when it
        changed); returns the differences as "key: old -> new" lines."""
        log = log or (lambda msg: print(msg, file=sys.stderr))
        path = self.workdir / CONFIG_NAME
        if self.old is None:
            if self.missing_record:
                log(f"note: {self.workdir} has checkpoints but no {CONFIG_NAME} (made before "
                    "configs were recorded); recording the current config")
            atomic_write_json(path, self.new, sort_keys=True)
            return []
        if not self.lines:
            return []
        atomic_write_json(self.workdir / CONFIG_HISTORY / f"step_{restored_step:08d}.json",
                          self.old, sort_keys=True)
        atomic_write_json(path, self.new, sort_keys=True)
        log(f"config changed since the last run (old one kept in {self.workdir / CONFIG_HISTORY}):\n" +
            "\n".join(f"  {x}" for x in self.lines))
        return self.lines


def compare_config(workdir: str | os.PathLike, cfg, latest_step: int | None,
                   allow_change: bool = False) -> ConfigChange:
    """Compare `cfg` with WORKDIR/config.json without writing anything.

    latest_step: the newest checkpoint on disk (None: a fresh start, whose config is simply
    recorded). A resume whose config differs in keys outside `RESUMABLE_KEYS` raises
    `WorkdirError` naming every difference, unless `allow_change`."""
    workdir = Path(workdir)
    path = workdir / CONFIG_NAME
    new = config_record(cfg)
    if latest_step is None or not path.is_file():
        return ConfigChange(workdir, new, None, [], missing_record=latest_step is not None)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path}: unreadable recorded config ({e}); fix or delete it to "
                           "record the current one") from None
    diffs = config_differences(upgrade_record(old), new)
    lines = [f"{k}: {o!r} -> {n!r}" for k, o, n in diffs]
    refused = [line for (k, _, _), line in zip(diffs, lines) if k not in RESUMABLE_KEYS]
    if refused and not allow_change:
        raise WorkdirError(
            f"{workdir} was trained to step {latest_step} with another config; resuming with "
            f"this one would mix the two. Differences:\n" + "\n".join(f"  {x}" for x in refused) +
            "\nUse the recorded values, another --workdir, or --allow_config_change to resume "
            "anyway (the new config is then recorded)")
    return ConfigChange(workdir, new, old, lines, missing_record=False)


def reconcile_config(workdir: str | os.PathLike, cfg, restored_step: int | None,
                     allow_change: bool = False, log=None) -> list[str]:
    """Record `cfg` in WORKDIR/config.json, or compare it with the recorded one on a resume
    (`compare_config`, then `ConfigChange.record`). Any accepted difference is recorded: the
    old config goes to WORKDIR/config_history/step_<N>.json, the new one to config.json.
    Returns the differences as "key: old -> new" lines."""
    return compare_config(workdir, cfg, restored_step, allow_change).record(restored_step, log)


# --------------------------------------------------------------------------- the logs
def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop the rows of a metrics.jsonl with step > `step` (logged after the checkpoint a run
    resumes from, and about to be logged again) and any torn last line; rewritten atomically
    only when something is dropped. Returns the number of lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            keep = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        text = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return dropped


__all__ = ["WorkdirLock", "WorkdirError", "reconcile_config", "compare_config", "ConfigChange",
           "unusable_workdir", "config_differences",
           "config_record", "truncate_metrics", "RESUMABLE_KEYS", "LOCK_NAME", "CONFIG_NAME",
           "CONFIG_HISTORY", "METRICS_NAME", "upgrade_record"]
