"""The convolution and matmul routines behind the compute policy (`smfnet_jax.policy`).

Every convolution and every dot of the model and the losses goes through `conv_op`,
`einsum` or `matmul` here, with the policy's precision: one place that says what runs on
the accelerator's matrix units (and the one place a test rounds operands to emulate TF32
or bfloat16, `tests/helpers.py`).

`policy.routines == "xla"` (GPU/TPU): XLA's native convolution for every conv, automatic
differentiation. `"cpu"`: routines written for XLA:CPU, 3-30x faster there, computing the
same function: 1x1 convs as matmuls over flattened pixels (`pointwise`), depthwise convs as
shifted multiply-adds (`depthwise_valid`), other dense convs XLA's forward convolution with
a hand-written backward (`conv_zero_padded`).

`policy.conv_sums == "float64"`: the forward of every dense convolution with a spatial
kernel runs on float64 copies of its float32 operands (their products are exact there) and
is rounded once (`summed_in`), whatever the routines; backward passes stay in the compute
dtype.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


# --------------------------------------------------------------------------- the primitives
def conv_op(x: Array, kernel: Array, *, precision, padding=((0, 0), (0, 0)), dilation: int = 1,
            groups: int = 1) -> Array:
    """Stride-1 NHWC x HWIO convolution (XLA's), zero padding `padding` inside it."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding=padding, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=precision)


def einsum(spec: str, a: Array, b: Array, *, precision, preferred_element_type=None) -> Array:
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=preferred_element_type)


def matmul(a: Array, b: Array, *, precision, preferred_element_type=None) -> Array:
    return jnp.matmul(a, b, precision=precision, preferred_element_type=preferred_element_type)


# --------------------------------------------------------------------------- padding
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "edge": "edge"}  # ours -> jnp.pad's


def pad_hw(x: Array, padding: int, mode: str = "zeros") -> Array:
    """Pad the two spatial axes of NHWC `x` by `padding`: "zeros", "reflect" (the border
    pixel not repeated, torch's "reflect") or "edge" (it repeated, torch's "replicate")."""
    if not padding:
        return x
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                   mode=_PAD_MODES[mode])


def xla_conv(x: Array, kernel: Array, *, precision, dilation: int = 1, padding: int = 0,
             pad_mode: str = "zeros", groups: int = 1) -> Array:
    """XLA's convolution; zero padding inside it (no padded copy), reflection padded first."""
    if pad_mode != "zeros":
        x, padding = pad_hw(x, padding, pad_mode), 0
    return conv_op(x, kernel, precision=precision, padding=((padding, padding), (padding, padding)),
                   dilation=dilation, groups=groups)


def summed_in(sums: str, conv, x: Array, kernel: Array) -> Array:
    """`conv(x, kernel)` with its sums in `sums` (a policy's `conv_sums`). "float32": just
    `conv(x, kernel)`. "float64": on float64 copies, rounded once to x's dtype: float32 (or
    bfloat16) products are exact in float64 and a few thousand of them sum there to ~1e-16,
    so each output is its exact value rounded (XLA:CPU's float32 accumulation: ~4e-7 off at
    3x3x64). Scoped float64 (`jax.enable_x64`): nothing outside this call changes."""
    if sums != "float64":
        return conv(x, kernel)
    with jax.enable_x64(True):
        y = conv(x.astype(jnp.float64), kernel.astype(jnp.float64))
    return y.astype(x.dtype)


# --------------------------------------------------------------------------- XLA:CPU routines
@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_zero_padded(x: Array, kernel: Array, padding: int, dilation: int, precision,
                     sums: str = "float32") -> Array:
    """Dense stride-1 convolution with zero padding, and a hand-written backward pass.

    XLA:CPU differentiates a convolution into another convolution whose kernel-gradient form
    is slower than one matmul per tap. Written out: the input gradient is a forward
    convolution of the cotangent with the flipped, transposed kernel, zero padded by
    dilation * (k - 1) - padding inside XLA's convolution (no padded copy, no crop: a cropped
    'full' convolution ran ~25% slower); the kernel gradient one (C, pixels) @ (pixels, O)
    matmul per tap over the padded input's shifted windows. `sums` "float64": the forward
    in float64 (`summed_in`); the backward as ever.
    """
    return _conv_fwd(x, kernel, padding, dilation, precision, sums)[0]


def _conv_fwd(x, kernel, padding, dilation, precision, sums):
    def conv(a, b):
        return xla_conv(a, b, precision=precision, dilation=dilation, padding=padding)
    return summed_in(sums, conv, x, kernel), (x, kernel)


def _conv_bwd(padding, dilation, precision, sums, residuals, g):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    back = dilation * (kh - 1) - padding, dilation * (kw - 1) - padding
    dx = conv_op(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), precision=precision,
                 padding=((back[0], back[0]), (back[1], back[1])), dilation=dilation)
    xp = pad_hw(x, padding)
    n, h, w, o = g.shape
    g2 = g.reshape(n * h * w, o)
    # Each tap a two-dimensional x_tap^T @ g over flattened pixels: as a contraction over
    # (n, h, w) XLA:CPU adds transposed copies and runs ~1.8x slower (measured).
    taps = [[matmul(xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :]
                    .reshape(n * h * w, x.shape[3]).T, g2,
                    precision=precision, preferred_element_type=jnp.float32)
             for j in range(kw)] for i in range(kh)]
    dk = jnp.stack([jnp.stack(row) for row in taps])
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv_zero_padded.defvjp(_conv_fwd, _conv_bwd)


def pointwise(x: Array, kernel: Array, *, precision) -> Array:
    """A 1x1 convolution of NHWC `x` with a (C, D) kernel, as one (pixels, C) @ (C, D) matmul.

    Pixels are flattened first so that the kernel gradient is a plain two-dimensional
    x^T g; written as a contraction over (n, h, w), XLA:CPU transposes the cotangent into a
    fused copy that reads its inputs a cache line per element (3x slower, measured).
    """
    n, h, w, c = x.shape
    return matmul(x.reshape(n * h * w, c), kernel, precision=precision).reshape(n, h, w, kernel.shape[1])


def _shift_sum(xp: Array, k: Array, dilation: int) -> Array:
    """sum_{i,j} xp[:, i*d : i*d + h, j*d : j*d + w, :] * k[i, j]: a 'valid' depthwise conv."""
    kh, kw, _ = k.shape
    h = xp.shape[1] - dilation * (kh - 1)
    w = xp.shape[2] - dilation * (kw - 1)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :] * k[i, j]
            out = term if out is None else out + term
    return out


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_valid(xp: Array, k: Array, dilation: int = 1) -> Array:
    """Depthwise 'valid' convolution (k: (kh, kw, C)) as a sum of shifted, scaled copies.

    XLA:CPU lowers feature_group_count == channels convolutions to a slow generic loop
    (7x slower forward, 3x backward, measured); the shifted form fuses into one pass. Its
    automatic derivative would materialise one padded buffer per tap, so the backward is
    written out: the input gradient is the same shifted sum over the padded cotangent with
    the flipped kernel, the kernel gradient nine fused reductions. Elementwise products and
    sums only: no matrix unit, so no precision to choose.
    """
    return _shift_sum(xp, k, dilation)


def _depthwise_fwd(xp, k, dilation):
    return _shift_sum(xp, k, dilation), (xp, k)


def _depthwise_bwd(dilation, residuals, g):
    xp, k = residuals
    kh, kw, _ = k.shape
    ph, pw = dilation * (kh - 1), dilation * (kw - 1)
    gp = jnp.pad(g, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    dxp = _shift_sum(gp, k[::-1, ::-1], dilation)
    h, w = g.shape[1], g.shape[2]
    dk = jnp.stack([
        jnp.stack([jnp.sum(xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w, :] * g,
                           axis=(0, 1, 2)) for j in range(kw)])
        for i in range(kh)])
    return dxp.astype(xp.dtype), dk.astype(k.dtype)


depthwise_valid.defvjp(_depthwise_fwd, _depthwise_bwd)


# --------------------------------------------------------------------------- by policy
def dense_conv(x: Array, kernel: Array, policy, *, padding: int = 0, dilation: int = 1,
               pad_mode: str = "zeros") -> Array:
    """Stride-1 dense convolution of NHWC `x` with an HWIO kernel, by the policy's routines.

    "xla": XLA's convolution, zero padding inside it, automatic differentiation. "cpu": a
    1x1 conv is a matmul over flattened pixels (`pointwise`: ~3x faster than a 1x1
    convolution, forward and backward); any other is XLA's convolution with the hand-written
    backward of `conv_zero_padded`. Both pad by reflection first when asked to. A kernel
    wider than 1x1 sums in float64 where `policy.conv_sums` says so (`summed_in`).
    """
    precision = policy.lax_precision
    sums = "float32" if kernel.shape[:2] == (1, 1) else policy.conv_sums
    if policy.routines == "cpu":
        if kernel.shape[:2] == (1, 1) and not padding:
            return pointwise(x, kernel[0, 0], precision=precision)
        if pad_mode != "zeros":
            x, padding = pad_hw(x, padding, pad_mode), 0
        return conv_zero_padded(x, kernel, padding, dilation, precision, sums)

    def conv(a, b):
        return xla_conv(a, b, precision=precision, dilation=dilation, padding=padding, pad_mode=pad_mode)
    return summed_in(sums, conv, x, kernel)


def grouped_conv(x: Array, kernel: Array, policy, *, groups: int, padding: int = 0,
                 dilation: int = 1, pad_mode: str = "zeros") -> Array:
    """A grouped convolution (HWIO kernel, I = channels per group). Depthwise ones (one
    channel per group) with the "cpu" routines are shifted multiply-adds: XLA:CPU's grouped
    conv is 3-7x slower."""
    if policy.routines == "cpu" and kernel.shape[2] == 1 and groups == x.shape[-1]:
        return depthwise_valid(pad_hw(x, padding, pad_mode), kernel[:, :, 0, :], dilation)
    return xla_conv(x, kernel, precision=policy.lax_precision, dilation=dilation, padding=padding,
                    pad_mode=pad_mode, groups=groups)
