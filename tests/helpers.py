"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""
import numpy as np

from smfnet_jax.parity import PARITY_RTOL, relative_error


def assert_close(name: str, ours, ref, rtol: float = PARITY_RTOL) -> None:
    """max |ours - ref| <= rtol * max(1, max |ref|)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != {ref.shape}"
    err = relative_error(ours, ref)
    assert err <= rtol, f"{name}: max |ours - ref| / max(1, max |ref|) = {err:.3g} > {rtol:.3g}"


def reference_channel_attention(q, k, v, temperature, heads):
    """Restormer's order in float64: rearrange to (heads, ch, pixels), F.normalize, q k^T,
    temperature, softmax, attn @ v, rearrange back."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    n, h, w, c = q.shape

    def heads_first(t):
        return t.reshape(n, h * w, heads, c // heads).transpose(0, 2, 3, 1)

    def normalize(t):
        return t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)

    qh, kh, vh = normalize(heads_first(q)), normalize(heads_first(k)), heads_first(v)
    logits = qh @ kh.transpose(0, 1, 3, 2) * np.asarray(temperature, np.float64).reshape(1, heads, 1, 1)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return (attn @ vh).transpose(0, 3, 1, 2).reshape(n, h, w, c)


# --------------------------------------------------------------------------- accelerator emulation
EMULATED_MANTISSA_BITS = {"tf32": 10, "bf16": 7}


def emulate_matrix_units(kind: str):
    """A context in which every conv and dot of the model and the losses (the three
    primitives of `smfnet_jax.kernels`) rounds its two operands to TF32 (10-bit mantissa:
    NVIDIA tensor cores at DEFAULT/HIGH precision) or bfloat16 (7 bits: one TPU MXU pass at
    DEFAULT), accumulating in float32, as the accelerators do. Only for functions traced
    inside it: jit a *new* function there (jax caches traces per function object, so a
    function traced before keeps its unrounded trace); depthwise shift-sums (elementwise) are not rounded, so emulate with the
    `xla` routines, where every conv is a conv_op."""
    import contextlib

    import jax
    import jax.numpy as jnp
    from smfnet_jax import kernels

    bits = EMULATED_MANTISSA_BITS[kind]

    def rnd(x):
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=bits) \
            if jnp.issubdtype(x.dtype, jnp.floating) else x

    conv_op, einsum, matmul = kernels.conv_op, kernels.einsum, kernels.matmul

    @contextlib.contextmanager
    def ctx():
        kernels.conv_op = lambda x, k, **kw: conv_op(rnd(x), rnd(k), **kw)
        kernels.einsum = lambda spec, a, b, **kw: einsum(spec, rnd(a), rnd(b), **kw)
        kernels.matmul = lambda a, b, **kw: matmul(rnd(a), rnd(b), **kw)
        try:
            yield
        finally:
            kernels.conv_op, kernels.einsum, kernels.matmul = conv_op, einsum, matmul

    return ctx()
