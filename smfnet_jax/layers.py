"""Building blocks shared by every SMFNet part, NHWC throughout.

These reproduce the PyTorch reference's numerics, not a textbook's: its LayerNorm is over
channels with the biased variance and eps 1e-5, its GELU is the exact (erf) one, its
`F.normalize` clamps the norm at 1e-12, and its BatchNorm updates running statistics with
momentum 0.1 and the *unbiased* batch variance while normalising with the biased one.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smfnet_jax import kernels
from smfnet_jax.policy import ComputePolicy, resolve

Array = jax.Array


def _host_rng(key) -> np.random.Generator | None:
    """A numpy generator seeded from a concrete JAX key; None while tracing.

    Drawing initial weights with jax.random compiles one program per distinct shape, which
    made building the model take ~20 s on CPU; numpy draws them in milliseconds.
    """
    if isinstance(key, jax.core.Tracer):
        return None
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return np.random.default_rng(np.asarray(data).ravel().tolist())


def torch_uniform(bound: float) -> Callable:
    """PyTorch's default Conv2d init draws weight and bias from U(-1/sqrt(fan_in), +)."""
    def init(key, shape, dtype=jnp.float32):
        rng = _host_rng(key)
        if rng is None:
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        return jnp.asarray(rng.uniform(-bound, bound, shape), dtype)
    return init


def normal_init(std: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        rng = _host_rng(key)
        if rng is None:
            return std * jax.random.normal(key, shape, dtype)
        return jnp.asarray(rng.normal(0.0, std, shape), dtype)
    return init


def split_outputs(apply: Callable[[slice | None], Array], channels: int, n: int,
                  per_block: bool) -> list[Array]:
    """A projection's output split into n equal channel blocks (q, k and v of a qkv
    projection); `apply(s)` computes output channels `s` (None: all of them).

    In train mode (`per_block=False`), all channels at once, then sliced: the backward is one
    pass over all channels instead of n narrower ones, each with its own copies of the
    input's shifted windows (the projections' gradients ran 1.3-2x faster on XLA:CPU). In
    eval mode (`per_block=True`), one call per block: the all-blocks tensor and its slices
    never coexist, which keeps large-image inference smaller. Equal up to float rounding.
    """
    c = channels // n
    blocks = [slice(i * c, (i + 1) * c) for i in range(n)]
    if per_block:
        return [apply(s) for s in blocks]
    y = apply(None)
    return [y[..., s] for s in blocks]


def dense_conv_blocks(x: Array, kernel: Array, n: int, policy: ComputePolicy, *, padding: int = 0,
                      dilation: int = 1, pad_mode: str = "zeros",
                      deterministic: bool = False) -> list[Array]:
    """`kernels.dense_conv(x, kernel)` split into its n equal output-channel blocks
    (`split_outputs`; `deterministic`: eval mode)."""
    def apply(s):
        return kernels.dense_conv(x, kernel if s is None else kernel[..., s], policy,
                                  padding=padding, dilation=dilation, pad_mode=pad_mode)
    return split_outputs(apply, kernel.shape[3], n, per_block=deterministic)


class Conv2d(nnx.Module):
    """2-D convolution, NHWC input, HWIO kernel (PyTorch OIHW is converted at the edges).

    `pad_mode="reflect"` pads by `padding` with reflection first and convolves unpadded,
    as `nn.ReflectionPad2d` + `nn.Conv2d(padding=0)` does in the reference.

    Two exact shortcuts save copies that the reference makes:
    - the input may be a list of arrays standing for their concatenation along channels:
      the conv is then summed over the parts with the matching rows of the kernel, and the
      concatenated tensor is never built;
    - `out=slice(...)` computes only those output channels (in eval mode, q, k and v of a
      qkv projection each from their own kernel slice: `conv_blocks`); for a depthwise conv
      the input then holds just those channels.
    `deterministic` is NNX's eval-mode flag (set by `model.eval()` / `model.train()`); it
    picks how `conv_blocks` computes a split projection (`split_outputs`), never the result.
    `policy` (static, `smfnet_jax.policy`): the routines and precision it computes with;
    default `resolve()`, and a model sets its own on every module (`set_policy`).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, *, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True,
                 pad_mode: str = "zeros", kernel_init: Callable | None = None,
                 policy: ComputePolicy | None = None, rngs: nnx.Rngs):
        if in_ch % groups or out_ch % groups:
            raise ValueError(f"channels {in_ch}->{out_ch} not divisible by groups={groups}")
        fan_in = (in_ch // groups) * kernel_size * kernel_size
        init = kernel_init or torch_uniform(1.0 / math.sqrt(fan_in))
        shape = (kernel_size, kernel_size, in_ch // groups, out_ch)
        self.kernel = nnx.Param(init(rngs.params(), shape))
        self.bias = (nnx.Param(torch_uniform(1.0 / math.sqrt(fan_in))(rngs.params(), (out_ch,)))
                     if bias else None)
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.pad_mode = pad_mode
        self.deterministic = False
        self.policy = policy or resolve()

    def __call__(self, x: Array | Sequence[Array], out: slice | None = None) -> Array:
        parts = list(x) if isinstance(x, (list, tuple)) else [x]
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        if out is not None:
            kernel = kernel[..., out]
            bias = None if bias is None else bias[out]
        kernel = kernel.astype(parts[0].dtype)
        depthwise = len(parts) == 1 and kernel.shape[2] == 1 and kernel.shape[3] == parts[0].shape[-1]
        if self.groups == 1:
            y = self._dense_of_parts(parts, kernel)
        elif not (depthwise or (len(parts) == 1 and out is None)):
            raise ValueError("a grouped conv takes one input, and output slices only when depthwise")
        else:
            y = kernels.grouped_conv(parts[0], kernel, self.policy,
                                     groups=kernel.shape[3] if depthwise else self.groups,
                                     padding=self.padding, dilation=self.dilation,
                                     pad_mode=self.pad_mode)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y

    def _dense_of_parts(self, parts: list[Array], kernel: Array) -> Array:
        sizes = [p.shape[-1] for p in parts]
        if sum(sizes) != kernel.shape[2]:
            raise ValueError(f"conv with {kernel.shape[2]} input channels got parts of {sizes}")
        y, start = None, 0
        for part, c in zip(parts, sizes):
            t = kernels.dense_conv(part, kernel[:, :, start:start + c] if len(parts) > 1 else kernel,
                                   self.policy, padding=self.padding, dilation=self.dilation,
                                   pad_mode=self.pad_mode)
            y = t if y is None else y + t
            start += c
        return y


def conv_blocks(convs: Sequence[Conv2d], x: Array | Sequence[Array], n: int) -> list[Array]:
    """`convs` applied in turn (a dense conv, then any depthwise ones), split into n equal
    output-channel blocks by `split_outputs`, per block in eval mode."""
    def chain(s):
        y = x
        for conv in convs:
            y = conv(y, out=s)
        return y
    return split_outputs(chain, convs[0].kernel.shape[3], n, per_block=convs[0].deterministic)


class LayerNorm(nnx.Module):
    """The reference's channel LayerNorm ('WithBias' / 'BiasFree'): biased variance, eps 1e-5.

    'BiasFree' divides x itself (not x - mean) by the standard deviation, as the reference does.
    """

    def __init__(self, dim: int, with_bias: bool = True):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32)) if with_bias else None

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in >= float32
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        inv = jax.lax.rsqrt(var + 1e-5)
        w = self.weight[...]
        if self.bias is None:
            return (xf * inv * w).astype(x.dtype)
        return ((xf - mu) * inv * w + self.bias[...]).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, Array, Array]:
    """BatchNorm over (N, H, W) with the batch's own statistics: (y, mean, biased var).

    The backward is PyTorch's formula, a * (g - mean(g) - (x - mean) * dot / (n * var_eps)) with
    dot = sum(g * (x - mean)), rather than autodiff's, which forms that dot as
    sum(g * x) - mean * sum(g): a float32 cancellation of the size |mean| / std, which left
    whole channels' weight gradients wrong where they are small (PyTorch sums these in float64
    on the CPU). The batch mean is refined by a second pass (mean + mean(x - mean)): a float32
    mean of thousands of values is off by ~eps * |mean|, magnified by 1 / std in the output.
    """
    return _batch_norm_fwd(x, scale, bias, eps)[0]


def _batch_moments(x: Array) -> tuple[Array, Array]:
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    rough = jnp.mean(xf, axis=(0, 1, 2))
    mean = rough + jnp.mean(xf - rough, axis=(0, 1, 2))
    return mean, jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))


def _batch_norm_fwd(x, scale, bias, eps):
    mean, var = _batch_moments(x)
    invstd = jax.lax.rsqrt(var + eps)
    a = invstd * scale
    y = (x - mean.astype(x.dtype)) * a.astype(x.dtype) + bias.astype(x.dtype)
    return (y, mean, var), (x, mean, invstd, scale)


def _batch_norm_bwd(eps, residuals, cotangents):
    x, mean, invstd, scale = residuals
    g, g_mean, g_var = cotangents
    xc = x.astype(mean.dtype) - mean
    g = g.astype(mean.dtype)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    sum_g = jnp.sum(g, axis=(0, 1, 2))
    dot = jnp.sum(g * xc, axis=(0, 1, 2))
    gx = (invstd * scale) * (g - sum_g / n - xc * (dot * jnp.square(invstd) / n))
    gx = gx + g_mean / n + xc * (2 * g_var / n)   # the statistics' own cotangents (0 in training)
    return gx.astype(x.dtype), (dot * invstd).astype(scale.dtype), sum_g.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm2d(nnx.Module):
    """PyTorch BatchNorm2d semantics over NHWC.

    Eval (`use_running_average=True`, set by `model.eval()`): running statistics, folded into
    one scale and shift. Train: batch statistics (biased variance; `batch_norm_train`, with
    PyTorch's backward) and a running-stat update with momentum 0.1 using the unbiased
    variance; `num_batches_tracked` is counted so the export is faithful.
    """

    def __init__(self, dim: int, *, momentum: float = 0.1, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.momentum = momentum
        self.eps = eps
        self.use_running_average = False

    def __call__(self, x: Array) -> Array:
        if self.use_running_average:
            inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
            shift = self.bias[...] - self.mean[...] * inv
            return x * inv.astype(x.dtype) + shift.astype(x.dtype)
        y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.eps)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean).astype(self.mean.dtype)
        self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased).astype(self.var.dtype)
        self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return y


def cast_floats(tree, dtype):
    """Every floating-point leaf of `tree` cast to `dtype` (integer leaves, e.g. counters, kept)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def gelu(x: Array) -> Array:
    """PyTorch's default GELU is the exact erf form; the tanh form misses parity by 1e-4."""
    return jax.nn.gelu(x, approximate=False)


# Derivatives at the kinks as PyTorch has them: flat image regions put many values exactly
# there, so the convention changes gradients, not a measure-zero corner.
def leaky_relu(x: Array, slope: float) -> Array:
    """torch's LeakyReLU: the slope (not 1) is the derivative at x == 0 (jax.nn's is 1)."""
    return jnp.where(x > 0, x, slope * x)


def relu6(x: Array) -> Array:
    """torch's ReLU6 (hardtanh(0, 6)): derivative 0 at x == 0 and x == 6 (jnp.clip's is 1/2)."""
    return jax.nn.relu6(x)


@jax.custom_jvp
def torch_abs(x: Array) -> Array:
    """|x| with torch's derivative sign(x), 0 at x == 0 (jnp.abs's is 1 there)."""
    return jnp.abs(x)


@torch_abs.defjvp
def _torch_abs_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * t


def channel_attention_matrix(q: Array, k: Array, temperature: Array, heads: int, *,
                             precision) -> Array:
    """The (N, C, C) matrix B with channel_attention(q, k, v) = v @ B (pixels flattened).

    Restormer's transposed attention: per head, softmax over channels of the q/k
    correlations, q and k L2-normalised along the pixels, scaled by a per-head temperature.
    Computed without moving channels in front of pixels (XLA:CPU spent more time on those
    transposes than on the attention): one (C x C) Gram matrix q^T k per image, whose
    per-head diagonal blocks are the logits; the L2 norms are applied to the logits
    (1 / max(|q|, eps) factors out of the dot); B = blockdiag over heads of attn^T.
    Equal to the reference's order of operations up to float rounding. Float32 inside
    (float64 in a float64 run);
    `precision`: the policy's, for every dot.
    """
    n, h, w, c = q.shape
    ch = c // heads
    f = jnp.promote_types(q.dtype, jnp.float32)  # float32 for bf16 activations, float64 kept
    q, k = (t.reshape(n, h * w, c) for t in (q, k))
    inv_q = 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(q.astype(f)), axis=1)), 1e-12)
    inv_k = 1.0 / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(k.astype(f)), axis=1)), 1e-12)
    gram = kernels.einsum("nsc,nsd->ncd", q, k, precision=precision, preferred_element_type=f)
    blocks = gram.reshape(n, heads, ch, heads, ch)
    logits = jnp.stack([blocks[:, i, :, i, :] for i in range(heads)], axis=1)  # (n, heads, ch, ch)
    logits = (logits * inv_q.reshape(n, heads, ch, 1) * inv_k.reshape(n, heads, 1, ch)
              * temperature.astype(f).reshape(1, heads, 1, 1))
    attn = jax.nn.softmax(logits, axis=-1)                        # attn[n, h, c, d]
    # out[s, (h, c)] = sum_d attn[h, c, d] v[s, (h, d)] = v @ B, B[(h, d), (h, c)] = attn[h, c, d]
    return kernels.einsum("nhcd,hg->nhdgc", attn, jnp.eye(heads, dtype=attn.dtype),
                          precision=precision).reshape(n, c, c)


def channel_attention(q: Array, k: Array, v: Array, temperature: Array, heads: int,
                      project: Conv2d | None = None, *, precision) -> Array:
    """Transposed (channel) attention of Restormer's MDTA on NHWC q/k/v, followed by the
    1x1 output projection `project` (if given).

    The projection is merged into the attention matrix: with B from
    `channel_attention_matrix` and P the projection's kernel, the output is v @ (B @ P) per
    image, one pixels x C @ C x C' matmul instead of two. Equal up to float rounding.
    """
    n, h, w, c = v.shape
    b = channel_attention_matrix(q, k, temperature, heads, precision=precision)  # >= float32
    if project is not None:
        if project.kernel.shape[:2] != (1, 1) or project.groups != 1:
            raise ValueError("channel_attention: the projection must be a dense 1x1 conv")
        b = kernels.einsum("ncd,de->nce", b, project.kernel[...][0, 0].astype(b.dtype),
                           precision=precision)
    y = kernels.einsum("nsc,nce->nse", v.reshape(n, h * w, c), b.astype(v.dtype), precision=precision)
    if project is not None and project.bias is not None:
        y = y + project.bias[...].astype(y.dtype)
    return y.reshape(n, h, w, -1)
