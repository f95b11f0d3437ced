"""The compute policy: which routines, at which matmul/conv precision, in which dtype.

A `ComputePolicy` lives on the model as a static attribute of every module that computes
(set at build or load time: `SMFNet(..., policy=...)`, `load_fuser(..., policy=...)`,
`set_policy(model, policy)`), so it is part of the graphdef and of every jit cache key: a
function traced under one policy can never be reused under another, and two models in one
process may differ. Environment variables and flags only *choose* a policy (`resolve`).

- `routines`: `cpu`, the routines written for XLA:CPU (`smfnet_jax.kernels`: depthwise convs
  as shifted multiply-adds, 1x1 convs as matmuls, dense convs with a hand-written backward;
  training micro-batched one sample at a time by default; the XLA:CPU scheduler flag of
  `runtime.configure_xla_cpu`), 3-30x faster there than XLA's generic ones; or `xla`, XLA's
  native convolution for every conv, differentiated automatically (cuDNN on GPUs, the
  convolution units of TPUs; whole-batch training steps). Both compute the same function.
- `precision`: what every convolution, einsum and dot of the model and the losses asks for.
  `highest` (the default everywhere) is full float32; on GPUs `default`/`high` allow TF32
  (10-bit mantissa) and on TPUs one or three bfloat16 passes, ~1e-3 from the original
  instead of ~1e-7. On CPU all three are full float32.
- `dtype`: the compute dtype of activations and of the parameters as used (`bfloat16`:
  float32 master weights and optimiser, bf16 compute; meant for GPU/TPU). Outputs and losses
  stay float32.
- `conv_sums`: what the dense convolutions with a spatial kernel (the 3x3 ones) sum in.
  `float32` is XLA's own accumulation: a 3x3x64 output is ~4e-7 (relative) from its exact
  value, and some land on the wrong side of a ReLU/LeakyReLU kink that a value sits next to
  (issue #19). `float64` sums the same float32 products exactly and rounds once: every output
  as exact as float32 holds it (~6e-8). Training on CPU uses it (config `conv_sums`, "auto"):
  the step is ~18% slower and follows the float64 reference's trajectory; inference keeps
  `float32` unless asked (+50% time on CPU).
"""
from __future__ import annotations

import dataclasses
import os

IMPL_ENV = "SMFNET_JAX_IMPL"
ROUTINES = ("cpu", "xla")
PRECISIONS = ("highest", "high", "default")
DTYPES = ("float32", "bfloat16")
CONV_SUMS = ("float32", "float64")
# what a config or flag may ask for: auto picks by the routines (`resolve`)
CONV_SUMS_CHOICES = ("auto", *CONV_SUMS)
IMPL_HELP = (f"Compute routines: ${IMPL_ENV}=auto|cpu|xla (default auto: the XLA:CPU-tuned "
             "routines on CPU, XLA's native convolutions on GPU/TPU).")
PRECISION_HELP = ("matmul/conv precision: highest (default: full float32 on every backend), "
                  "high or default (TF32 on GPUs, bfloat16 passes on TPUs; the same as highest on CPU)")


@dataclasses.dataclass(frozen=True)
class ComputePolicy:
    """How the model computes; hashable, so a static part of the graphdef (see module doc)."""
    routines: str = "xla"
    precision: str = "highest"
    dtype: str = "float32"
    conv_sums: str = "float32"

    def __post_init__(self):
        for name, allowed in (("routines", ROUTINES), ("precision", PRECISIONS), ("dtype", DTYPES),
                              ("conv_sums", CONV_SUMS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"ComputePolicy {name}={value!r}: expected one of {', '.join(allowed)}")

    @property
    def lax_precision(self):
        """The `jax.lax.Precision` every conv and dot passes."""
        return lax_precision(self.precision)

    @property
    def compute_dtype(self):
        import jax.numpy as jnp
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "ComputePolicy":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One phrase for the first line of a run: "routines cpu, precision highest, float32"."""
        sums = ", float64 conv sums" if self.conv_sums == "float64" else ""
        return f"routines {self.routines}, precision {self.precision}, {self.dtype}{sums}"


def lax_precision(name: str):
    """"highest" | "high" | "default" -> `jax.lax.Precision` (a Precision passes through)."""
    from jax import lax
    if isinstance(name, lax.Precision):
        return name
    return {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH,
            "default": lax.Precision.DEFAULT}[_choice(name, PRECISIONS, "precision")]


def _choice(value: str, allowed: tuple[str, ...], where: str) -> str:
    name = str(value).strip().lower()
    if name not in allowed:
        raise ValueError(f"{where}={value!r}: expected one of {', '.join(allowed)}")
    return name


def requested_routines() -> str:
    """$SMFNET_JAX_IMPL as set ("auto" when unset); a bad value raises ValueError naming it."""
    return _choice(os.environ.get(IMPL_ENV, "") or "auto", ("auto", *ROUTINES), IMPL_ENV)


def resolve(routines: str | None = None, precision: str = "highest", dtype: str = "float32",
            *, platform: str | None = None, conv_sums: str = "float32") -> ComputePolicy:
    """The policy for these choices. `routines` None/"auto": $SMFNET_JAX_IMPL, and where that
    is auto too, `cpu` on the CPU platform, `xla` on GPU/TPU (`platform`, default JAX's
    default backend: pass the target's to build for a machine you compile for). `conv_sums`
    "auto": float64 with the `cpu` routines, float32 with `xla` (training's default)."""
    name = requested_routines() if routines in (None, "auto") else _choice(routines, ("auto", *ROUTINES), "routines")
    if name == "auto":
        if platform is None:
            import jax
            platform = jax.default_backend()
        name = "cpu" if platform == "cpu" else "xla"
    sums = _choice(conv_sums, CONV_SUMS_CHOICES, "conv_sums")
    if sums == "auto":
        sums = "float64" if name == "cpu" else "float32"
    return ComputePolicy(name, _choice(precision, PRECISIONS, "precision"), _choice(dtype, DTYPES, "dtype"),
                         sums)


def set_policy(model, policy: ComputePolicy):
    """Set `policy` on every module of `model` that holds one (in place); returns `model`.

    Call it before `nnx.split` / `jit`: the policy is static, so traced functions of the old
    graphdef keep their own (they are different cache entries, never silently reused)."""
    from flax import nnx
    if not isinstance(policy, ComputePolicy):
        raise TypeError(f"set_policy: expected a ComputePolicy, got {type(policy).__name__}")
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "policy"):
            node.policy = policy
    return model
