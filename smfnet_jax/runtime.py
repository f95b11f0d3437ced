"""Process-wide JAX set-up shared by fusion, training and the benchmarks: the persistent
compilation cache and XLA:CPU flags. Both are opt-in calls, made by the CLIs and by
`smfnet_jax.api.load_fuser`; importing the library changes nothing.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

from smfnet_jax import policy

CACHE_ENV = "SMFNET_JAX_CACHE"
JAX_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_CACHE_OFF = {"", "0", "off", "none", "false", "no"}


# --------------------------------------------------------------------------- compilation cache
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smfnet_jax" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache so a new process does not recompile.

    Location, first found: `path`; $SMFNET_JAX_CACHE; $JAX_COMPILATION_CACHE_DIR (JAX's own
    setting, which is then left as the user set it); ~/.cache/smfnet_jax/xla
    ($XDG_CACHE_HOME respected). SMFNET_JAX_CACHE=off (or 0, none, false, empty) disables it.
    Returns the directory in use, or None when disabled. Call it before the first compile;
    calling it again with another directory switches to that one.
    """
    if path is None:
        env = os.environ.get(CACHE_ENV)
        if env is not None and env.strip().lower() in _CACHE_OFF:
            return None
        path = env or os.environ.get(JAX_CACHE_ENV) or default_cache_dir()
    path = Path(path).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # an unwritable cache must not stop the work
        warnings.warn(f"compilation cache disabled: cannot create {path}: {e}")
        return None
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        from jax.experimental.compilation_cache import compilation_cache as cc
        cc.reset_cache()  # the cache is set up once per process; re-read the new directory
    # Every fusion program compiles in seconds: cache all of them (but not tiny eager ops),
    # unless the user chose JAX's thresholds through its environment variables.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# --------------------------------------------------------------------------- XLA:CPU flags
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def configure_xla_cpu() -> bool:
    """Add the XLA:CPU flags that fusion and training benefit from to $XLA_FLAGS.

    XLA's default CPU scheduler runs independent branches concurrently and keeps all their
    buffers alive together: at 480x640 the fusion needs ~3.3 GB of temporaries with it and
    ~1.6 GB without, at the same speed on a few cores; a training step at batch 2, 64x64
    3.44 GB with it and 1.93 GB without. XLA reads $XLA_FLAGS once, when JAX creates its
    backends, so call this first thing in a process (the CLIs do); called later it only
    reaches subprocesses. Other backends ignore XLA:CPU flags. Flags already in $XLA_FLAGS
    win. Nothing is added when $SMFNET_JAX_IMPL=xla (`smfnet_jax.policy`). Returns whether it
    added a flag.
    """
    if policy.requested_routines() == "xla":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return bool(extra)


# --------------------------------------------------------------------------- measurements
def device_peak_memory_mb() -> float | None:
    """Peak memory in use on the first device since the process started, in MB, from
    `Device.memory_stats()` (GPU/TPU); None where the backend does not report it (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e6


def describe_device() -> dict:
    """The devices JAX computes on: platform, the first one's kind, how many."""
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device": str(dev.device_kind),
            "device_count": jax.device_count()}


def describe_platform() -> dict:
    """What a measurement ran on: `describe_device()` and the routines in force."""
    return {**describe_device(), "impl": policy.resolve().routines}
