"""Conv2d's fast paths (shifted-sum depthwise, matmul 1x1, hand-written conv backward, convs of
parts, output slices, projections split into q/k/v per mode) and channel attention, against
XLA's own convolution and the reference's order of operations."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import reference_channel_attention
from smfnet_jax.policy import IMPL_ENV, ComputePolicy, resolve, set_policy
from smfnet_jax.layers import Conv2d, channel_attention, conv_blocks, dense_conv_blocks


def xla_conv(x, kernel, pad, groups=1, dilation=1, reflect=False):
    if reflect:
        x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        pad = 0
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


CASES = [  # cin, cout, k, pad, groups, dilation, pad_mode
    (6, 6, 3, 1, 6, 1, "zeros"),      # depthwise (MDTA, LeFF, cross attention, Sobel)
    (6, 6, 3, 1, 6, 1, "reflect"),    # depthwise with reflection (inverted residual)
    (8, 5, 1, 0, 1, 1, "zeros"),      # 1x1 as a matmul
    (4, 7, 3, 1, 1, 1, "zeros"),      # dense 3x3, hand-written backward
    (4, 5, 3, 4, 1, 4, "zeros"),      # dilated (graph PPM)
    (4, 5, 3, 1, 1, 1, "reflect"),    # dense 3x3 with reflection: padded first, then 'valid'
    (4, 5, 3, 0, 1, 1, "zeros"),      # 'valid' 3x3: input gradient padded by 2 inside the conv
]


@pytest.mark.parametrize("impl,deterministic", [("cpu", False), ("cpu", True), ("xla", False)],
                         ids=["cpu-train", "cpu-eval", "xla"])
@pytest.mark.parametrize("cin,cout,k,pad,groups,dil,mode", CASES)
def test_conv_paths_match_xla(cin, cout, k, pad, groups, dil, mode, impl, deterministic):
    conv = Conv2d(cin, cout, k, padding=pad, groups=groups, dilation=dil, pad_mode=mode,
                  policy=ComputePolicy(impl), rngs=nnx.Rngs(0))
    conv.eval() if deterministic else conv.train()
    assert conv.deterministic is deterministic
    _check_conv_against_xla(conv, cin, pad, groups, dil, mode)


def _check_conv_against_xla(conv, cin, pad, groups, dil, mode):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 11, 9, cin)), jnp.float32)
    kernel, bias = conv.kernel[...], conv.bias[...]

    graphdef, state = nnx.split(conv)

    def ours(x, kernel):
        m = nnx.merge(graphdef, state)
        m.kernel = nnx.Param(kernel)
        return jnp.sum(jnp.sin(m(x)))

    def ref(x, kernel):
        return jnp.sum(jnp.sin(xla_conv(x, kernel, pad, groups, dil, mode == "reflect") + bias))

    np.testing.assert_allclose(conv(x), xla_conv(x, kernel, pad, groups, dil, mode == "reflect") + bias,
                               rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(ours, argnums=(0, 1))(x, kernel)
    g_ref = jax.grad(ref, argnums=(0, 1))(x, kernel)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("k,pad,mode", [(3, 1, "zeros"), (1, 0, "zeros"), (3, 2, "reflect")])
def test_conv_of_parts_and_output_slices(k, pad, mode):
    """A list input is the conv of the concatenation; out=slice computes those channels."""
    rng = np.random.default_rng(2)
    parts = [jnp.asarray(rng.standard_normal((2, 9, 8, c)), jnp.float32) for c in (3, 5, 2)]
    conv = Conv2d(10, 12, k, padding=pad, pad_mode=mode, rngs=nnx.Rngs(1))
    whole = conv(jnp.concatenate(parts, axis=-1))
    np.testing.assert_allclose(conv(parts), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv(parts, out=slice(4, 8)), whole[..., 4:8], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input channels"):
        conv(parts[:2])
    dw = Conv2d(12, 12, 3, padding=1, groups=12, rngs=nnx.Rngs(3))
    np.testing.assert_allclose(dw(whole[..., 4:8], out=slice(4, 8)), dw(whole)[..., 4:8],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["cpu", "xla"])
def test_split_projections_same_in_train_and_eval(impl):
    """conv_blocks / dense_conv_blocks: one conv sliced (train) or one conv per block (eval)
    give the same q, k, v and the same gradients."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 9, 8, 4)), jnp.float32)
    policy = ComputePolicy(impl)
    qkv = Conv2d(4, 12, 1, policy=policy, rngs=nnx.Rngs(7))
    dw = Conv2d(12, 12, 3, padding=1, groups=12, policy=policy, rngs=nnx.Rngs(8))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 12)), jnp.float32)

    (gq, sq), (gd, sd) = nnx.split(qkv), nnx.split(dw)

    def outputs(x, k1, k3, eval_mode):
        q, d = nnx.merge(gq, sq), nnx.merge(gd, sd)
        q.kernel = nnx.Param(k1)
        for m in (q, d):
            m.eval() if eval_mode else m.train()
        return conv_blocks([q, d], x, 3) + dense_conv_blocks(x, k3, 3, policy, padding=1,
                                                            deterministic=eval_mode)

    def loss(x, k1, k3, eval_mode):
        return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outputs(x, k1, k3, eval_mode)))

    k1 = qkv.kernel[...]
    train, evals = outputs(x, k1, kernel, False), outputs(x, k1, kernel, True)
    assert [o.shape for o in train] == [(2, 9, 8, 4)] * 6
    for a, b in zip(train, evals):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    g_train = jax.grad(loss, argnums=(0, 1, 2))(x, k1, kernel, False)
    g_eval = jax.grad(loss, argnums=(0, 1, 2))(x, k1, kernel, True)
    for a, b in zip(g_train, g_eval):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("project", [None, "no bias", "bias"])
def test_channel_attention_matches_reference_order(project):
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 7, 16)), jnp.float32) for _ in range(3))
    temperature = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    ref = jnp.asarray(reference_channel_attention(q, k, v, temperature, 4), jnp.float32)
    proj = None
    if project is not None:  # merged into the attention matrix: v @ (B @ P)
        proj = Conv2d(16, 16, 1, bias=project == "bias", rngs=nnx.Rngs(4))
        ref = proj(ref)
    np.testing.assert_allclose(channel_attention(q, k, v, temperature, 4, proj,
                                                 precision=jax.lax.Precision.HIGHEST), ref,
                               rtol=1e-5, atol=1e-5)


def test_policy_names_bad_settings(monkeypatch):
    with pytest.raises(ValueError, match="ComputePolicy routines='gpu'"):
        ComputePolicy("gpu")
    with pytest.raises(ValueError, match="precision='tf32': expected one of highest, high, default"):
        resolve(precision="tf32")
    monkeypatch.setenv(IMPL_ENV, "fast")
    with pytest.raises(ValueError, match=f"{IMPL_ENV}='fast': expected one of auto, cpu, xla"):
        resolve()
    monkeypatch.setenv(IMPL_ENV, "xla")
    assert resolve().routines == "xla"          # the variable chooses the routines ...
    assert resolve("cpu").routines == "cpu"     # ... unless they are asked for by name
    monkeypatch.delenv(IMPL_ENV)
    assert resolve().routines == ("cpu" if jax.default_backend() == "cpu" else "xla")
    assert resolve(platform="tpu").routines == "xla"
    with pytest.raises(TypeError, match="expected a ComputePolicy"):
        set_policy(Conv2d(2, 2, rngs=nnx.Rngs(0)), "xla")


def test_policy_is_static_and_part_of_the_graphdef():
    """Two policies give two graphdefs (two jit cache entries), and set_policy reaches every
    module that computes."""
    conv = Conv2d(3, 4, 3, padding=1, rngs=nnx.Rngs(0))
    a = nnx.split(set_policy(conv, ComputePolicy("cpu")))[0]
    b = nnx.split(set_policy(conv, ComputePolicy("cpu", "default")))[0]
    assert a != b and hash(a) != hash(b)
    assert a == nnx.split(set_policy(conv, ComputePolicy("cpu")))[0]


# --------------------------------------------------------------------------- kinks as PyTorch
def test_activations_have_torch_derivatives_at_the_kinks():
    """torch: LeakyReLU' (0) = slope, ReLU6' (0) = ReLU6' (6) = 0, |x|' (0) = 0 (flat image
    regions put many values exactly there); jax.nn.leaky_relu, jnp.clip and jnp.abs
    differ at exactly these points."""
    from smfnet_jax.layers import leaky_relu, relu6, torch_abs
    x = jnp.array([-1.0, 0.0, 1e-30, 3.0, 6.0, 7.0])
    np.testing.assert_array_equal(jax.vmap(jax.grad(lambda v: leaky_relu(v, 0.2)))(x),
                                  np.float32([0.2, 0.2, 1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(jax.vmap(jax.grad(relu6))(x), [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(jax.vmap(jax.grad(torch_abs))(x), [-1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(leaky_relu(x, 0.2), np.float32([-0.2, 0, 1e-30, 3, 6, 7]))
    np.testing.assert_array_equal(relu6(x), np.float32([0, 0, 1e-30, 3, 6, 6]))


def test_sobel_branch_passes_no_gradient_through_a_flat_region():
    """The GRDB's Sobel |gx| + |gy| on a constant input: with kernels summing to 0 the responses
    are exactly 0 away from the border, and torch's |x|' = 0 there passes nothing back."""
    from smfnet_jax.model import Sobel
    sobel = Sobel(2, rngs=nnx.Rngs(0))  # kernels initialised to Sobel: each sums to 0
    x = jnp.full((1, 6, 6, 2), 0.5)
    w = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, x.shape), jnp.float32)
    g = np.asarray(jax.grad(lambda v: jnp.sum(w * sobel(v)))(x))
    assert np.all(np.asarray(sobel(x))[0, 1:-1, 1:-1] == 0)
    # interior pixels reach border responses (which are not 0) only through the kernel's
    # taps; the centre 2x2 is 2 pixels from every border response
    assert np.all(g[0, 2:4, 2:4] == 0), g[0, :, :, 0]


def test_batch_norm_training_is_as_exact_as_float64_allows():
    """BatchNorm with batch statistics, float32 against the same layer in float64, on channels
    whose mean is up to ~40 standard deviations from zero (as after a conv with a bias):
    output and all three gradients. Autodiff of the folded form x a + (b - mean a) forms the
    weight gradient as sum(g x) - mean sum(g), which cancels (1.1e-6 relative rms here);
    PyTorch's backward, which `batch_norm_train` uses, gives 1.6e-7."""
    from smfnet_jax.layers import batch_norm_train
    rng = np.random.default_rng(1)
    c = 64
    x = rng.standard_normal((2, 32, 32, c)) * rng.uniform(0.05, 1, c) + rng.standard_normal(c) * 2
    g = rng.standard_normal(x.shape)
    scale, bias = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)

    def run(dtype):
        args = [jnp.asarray(a, dtype) for a in (x, scale, bias)]
        (y, mean, var), vjp = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5), *args)
        grads = vjp((jnp.asarray(g, dtype), jnp.zeros_like(mean), jnp.zeros_like(var)))
        return [np.asarray(t, np.float64) for t in (y, *grads)]

    with jax.enable_x64(True):
        exact = run(jnp.float64)
    ours = run(jnp.float32)
    errors = {name: float(np.sqrt(np.mean(np.square(a - r))) / np.mean(np.abs(r)))
              for name, a, r in zip(("y", "dx", "dscale", "dbias"), ours, exact)}
    print("relative rms error against float64:", errors)  # shown with -rP
    assert max(errors.values()) < 5e-7, errors
    # the statistics it returns are the batch's (biased variance)
    with jax.enable_x64(True):
        _, mean, var = batch_norm_train(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 1e-5)
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-12)


@pytest.mark.parametrize("impl", ["cpu", "xla"])
@pytest.mark.parametrize("k,pad,dil", [(3, 1, 1), (3, 4, 4)], ids=["3x3", "dilated"])
def test_float64_conv_sums_round_each_output_once(impl, k, pad, dil):
    """conv_sums="float64": a 3x3 conv's outputs are their exact values rounded to float32
    (all but a near-halfway few bit-equal to the float64 conv's, rounded), where float32 sums
    are several ulps off; the gradients are the float32 path's."""
    from smfnet_jax import kernels
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 12, 10, 64)).astype(np.float32)
    kernel = (rng.standard_normal((k, k, 64, 8)) * 0.05).astype(np.float32)
    exact = _float64_conv(x, kernel, pad, dil)
    rounded = exact.astype(np.float32)
    outs = {}
    for sums in ("float32", "float64"):
        policy = ComputePolicy(impl, conv_sums=sums)
        f = jax.jit(lambda x, w, p=policy: kernels.dense_conv(x, w, p, padding=pad, dilation=dil))
        outs[sums] = np.asarray(f(x, kernel))
        assert outs[sums].dtype == np.float32
    assert np.mean(outs["float64"] == rounded) > 0.999
    ulp = np.spacing(np.abs(rounded))
    assert np.max(np.abs(outs["float64"] - exact) / ulp) <= 0.5 + 1e-6
    assert np.max(np.abs(outs["float32"] - exact) / ulp) > 1  # what the float64 sums are for

    def loss(x, w, sums):
        return jnp.sum(jnp.sin(kernels.dense_conv(x, w, ComputePolicy(impl, conv_sums=sums),
                                                  padding=pad, dilation=dil)))
    g32, g64 = (jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, kernel, s)
                for s in ("float32", "float64"))
    for a, b in zip(g32, g64):
        assert b.dtype == jnp.float32
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def _float64_conv(x, kernel, pad, dil):
    """The exact conv (float64 products and sums) in numpy: one tap at a time."""
    k = kernel.shape[0]
    xp = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = xp.shape[1] - dil * (k - 1), xp.shape[2] - dil * (k - 1)
    out = np.zeros((x.shape[0], h, w, kernel.shape[3]))
    for i in range(k):
        for j in range(k):
            out += xp[:, i * dil:i * dil + h, j * dil:j * dil + w, :] @ kernel[i, j].astype(np.float64)
    return out
