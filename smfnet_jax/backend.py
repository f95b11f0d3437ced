"""The one backend policy: which compute routines the model and the trainer use.

`SMFNET_JAX_IMPL` = `auto` (default) | `cpu` | `xla`, read once per process:

- `cpu`: routines written for XLA:CPU, where they run 3-30x faster than XLA's generic ones:
  depthwise convs as shifted multiply-adds, 1x1 convs as matmuls, dense convs with a
  hand-written backward (`smfnet_jax.layers`); training micro-batched one sample at a time
  by default; the XLA:CPU scheduler flag of `runtime.configure_xla_cpu`.
- `xla`: XLA's native convolution (`lax.conv_general_dilated`) for every dense, grouped and
  depthwise conv, differentiated automatically: cuDNN on GPUs, the convolution units on
  TPUs; whole-batch training steps; no XLA:CPU flags.
- `auto`: `cpu` on JAX's CPU backend, `xla` on GPU and TPU.

Both compute the same function (the tests run the parity fixture on both and compare their
values and gradients on CPU). `use_impl` switches the policy inside a `with` block, for
tests and experiments; code traced before keeps what it was traced with.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

IMPL_ENV = "SMFNET_JAX_IMPL"
IMPLS = ("auto", "cpu", "xla")
IMPL_HELP = (f"Compute routines: ${IMPL_ENV}=auto|cpu|xla (default auto: the XLA:CPU-tuned "
             "routines on CPU, XLA's native convolutions on GPU/TPU).")

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("smfnet_jax_impl", default=None)


def _check(name: str, where: str) -> str:
    name = name.strip().lower()
    if name not in IMPLS:
        raise ValueError(f"{where}={name!r}: expected one of {', '.join(IMPLS)}")
    return name


@functools.cache
def requested() -> str:
    """The setting of $SMFNET_JAX_IMPL (read once), "auto" when unset."""
    return _check(os.environ.get(IMPL_ENV, "auto") or "auto", IMPL_ENV)


def impl() -> str:
    """The routines in force: "cpu" or "xla" (`use_impl` first, then $SMFNET_JAX_IMPL)."""
    name = _override.get() or requested()
    if name == "auto":
        import jax
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return name


@contextlib.contextmanager
def use_impl(name: str):
    """Run the enclosed tracing with the routines `name` ("auto", "cpu" or "xla")."""
    token = _override.set(_check(name, "use_impl"))
    try:
        yield
    finally:
        _override.reset(token)
