"""Conv2d's fast paths (shifted-sum depthwise, matmul 1x1, hand-written conv backward)
against XLA's own convolution, values and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import reference_channel_attention
from smfnet_jax.layers import Conv2d, channel_attention


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
]


@pytest.mark.parametrize("cin,cout,k,pad,groups,dil,mode", CASES)
def test_conv_paths_match_xla(cin, cout, k, pad, groups, dil, mode):
    conv = Conv2d(cin, cout, k, padding=pad, groups=groups, dilation=dil, pad_mode=mode,
                  rngs=nnx.Rngs(0))
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


def test_channel_attention_matches_reference_order():
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 6, 7, 16)), jnp.float32) for _ in range(3))
    temperature = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    ours = channel_attention(q, k, v, temperature, 4)
    np.testing.assert_allclose(ours, reference_channel_attention(q, k, v, temperature, 4),
                               rtol=1e-5, atol=1e-6)
