"""SMFNet in Flax NNX, NHWC throughout.

Parts, named after the paper (reference class names in brackets):

- `Encoder` [Restormer_Encoder], shared by both modalities: patch embedding, one Restormer
  block, then three branches: BFE (base features) [SwinIR_Encoder], GRDB + CAI (cross
  attention + invertible detail node) [GRDB_module + DetailFeatureExtraction_Encoder].
- `GR` [CGR_backbone]: graph reasoning between the two modalities' level-1 features
  (PPM nodes, cross-modal edge gating, a graph model updated by a ConvGRU).
- Fusion layers: `BaseFuseLayer` [BaseFeatureExtraction] and `DetailFuseLayer`
  [DetailFeatureExtraction] (GRDB + two affine invertible blocks).
- `Decoder` [Restormer_Decoder].

`SMFNet` holds the five sub-models under the same split as the reference checkpoint
(`encoder`, `decoder`, `graph`, `base_fuse`, `detail_fuse`), because training optimises
and clips each of them separately.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smfnet_jax.layers import (BatchNorm2d, Conv2d, LayerNorm, channel_attention, conv_nhwc, gelu,
                               leaky_relu, normal_init, relu6)

Array = jax.Array


# --------------------------------------------------------------------------- transformer parts
class MDTA(nnx.Module):
    """Multi-Dconv-head Transposed Attention [Attention]: 1x1 qkv, depthwise 3x3, channel attention."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.temperature = nnx.Param(jnp.ones((heads,), jnp.float32))
        self.qkv = Conv2d(dim, 3 * dim, 1, bias=False, rngs=rngs)
        self.qkv_dw = Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=False, rngs=rngs)
        self.project_out = Conv2d(dim, dim, 1, bias=False, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        q, k, v = jnp.split(self.qkv_dw(self.qkv(x)), 3, axis=-1)
        return self.project_out(channel_attention(q, k, v, self.temperature[...], self.heads))


class DenseAttention(nnx.Module):
    """TransformerBase's attention [AttentionBase]: 1x1 then a dense 3x3 qkv projection.

    Both convs are bias-free with zero padding, so they compose exactly into one 3x3 conv
    with fewer input channels; `folded()` is used for inference (see `fold_for_inference`).
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.scale = nnx.Param(jnp.ones((heads,), jnp.float32))
        self.qkv1 = Conv2d(dim, 3 * dim, 1, bias=False, rngs=rngs)
        self.qkv2 = Conv2d(3 * dim, 3 * dim, 3, padding=1, bias=False, rngs=rngs)
        self.proj = Conv2d(dim, dim, 1, bias=False, rngs=rngs)
        self.qkv_folded = None  # set by fold_for_inference; then qkv1/qkv2 are bypassed

    def __call__(self, x: Array) -> Array:
        if self.qkv_folded is not None:
            qkv = self.qkv_folded(x)
        else:
            # qkv2(qkv1(x)) as one 3x3 conv with the composed kernel: exact algebra (no bias,
            # zero padding) at a third of the FLOPs, and differentiable in both weights.
            k = jnp.einsum("io,hwom->hwim", self.qkv1.kernel[...][0, 0], self.qkv2.kernel[...])
            qkv = conv_nhwc(x, k.astype(x.dtype), padding=1)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        return self.proj(channel_attention(q, k, v, self.scale[...], self.heads))


class LeFF(nnx.Module):
    """Locally-enhanced feed-forward: 1x1, depthwise 3x3, 1x1, each followed by GELU, + input."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.linear1 = Conv2d(dim, hidden, 1, rngs=rngs)
        self.dwconv = Conv2d(hidden, hidden, 3, padding=1, groups=hidden, rngs=rngs)
        self.linear2 = Conv2d(hidden, dim, 1, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        y = gelu(self.linear1(x))
        y = gelu(self.dwconv(y))
        return gelu(self.linear2(y)) + x


class FeedForward(nnx.Module):
    """TransformerBase's MLP: 1x1 expand, GELU, 1x1 project (no bias)."""

    def __init__(self, dim: int, factor: float, *, rngs: nnx.Rngs):
        hidden = int(dim * factor)
        self.project_in = Conv2d(dim, hidden, 1, bias=False, rngs=rngs)
        self.project_out = Conv2d(hidden, dim, 1, bias=False, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.project_out(gelu(self.project_in(x)))


class RestormerBlock(nnx.Module):
    """[TransformerBlock]: LayerNorm + MDTA, LayerNorm + LeFF, both residual."""

    def __init__(self, dim: int = 64, heads: int = 8, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim)
        self.attn = MDTA(dim, heads, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.ffn = LeFF(dim, 64, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class BaseTransformer(nnx.Module):
    """[TransformerBase]: LayerNorm + dense-qkv attention, LayerNorm + GELU MLP, both residual."""

    def __init__(self, dim: int = 64, heads: int = 8, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim)
        self.attn = DenseAttention(dim, heads, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.mlp = FeedForward(dim, 2.0, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ThreeConvResidual(nnx.Module):
    """The '3conv' residual tail: 3x3 dim->dim/4, LReLU .2, 1x1, LReLU .2, 3x3 dim/4->dim."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.conv0 = Conv2d(dim, dim // 4, 3, padding=1, rngs=rngs)
        self.conv2 = Conv2d(dim // 4, dim // 4, 1, rngs=rngs)
        self.conv4 = Conv2d(dim // 4, dim, 3, padding=1, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        y = leaky_relu(self.conv0(x), 0.2)
        y = leaky_relu(self.conv2(y), 0.2)
        return self.conv4(y)


class BFEBlock(nnx.Module):
    """[Block]: `depth` x (RestormerBlock, BaseTransformer), a 3-conv tail, a residual."""

    def __init__(self, dim: int = 64, heads: int = 8, depth: int = 2, *, rngs: nnx.Rngs):
        self.layers = nnx.List([
            nnx.List([RestormerBlock(dim, heads, rngs=rngs), BaseTransformer(dim, heads, rngs=rngs)])
            for _ in range(depth)])
        self.conv = ThreeConvResidual(dim, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        y = x
        for restormer, base in self.layers:
            y = base(restormer(y))
        return self.conv(y) + x


class BFE(nnx.Module):
    """Base feature extraction branch [SwinIR_Encoder]: a 3x3 conv then two BFE blocks.

    The reference also builds `reduce_channel`, `norm` and `conv_after_body` here but never
    calls them; the converter keeps those weights aside.
    """

    def __init__(self, dim: int = 64, heads: int = 8, *, rngs: nnx.Rngs):
        self.conv_first = Conv2d(dim, dim, 3, padding=1, rngs=rngs)
        self.blocks = nnx.List([BFEBlock(dim, heads, 2, rngs=rngs) for _ in range(2)])

    def __call__(self, x: Array) -> Array:
        x = self.conv_first(x)
        for block in self.blocks:
            x = block(x)
        return x


# --------------------------------------------------------------------------- GRDB
class Sobel(nnx.Module):
    """Depthwise Sobel |gx| + |gy|; trainable kernels initialised to Sobel, as in the reference."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        sx = jnp.array([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]], jnp.float32)
        def tiled(k):
            return lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(k[:, :, None, None], shape).astype(dtype)
        self.convx = Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False,
                            kernel_init=tiled(sx), rngs=rngs)
        self.convy = Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False,
                            kernel_init=tiled(sx.T), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return jnp.abs(self.convx(x)) + jnp.abs(self.convy(x))


class GRDB(nnx.Module):
    """Gradient residual dense block [GRDB_module + RGBD].

    conv+LReLU(.2), then a two-layer dense block squeezed by a 1x1, plus a Sobel branch
    through a 1x1, summed and passed through LReLU(.1).
    """

    def __init__(self, dim: int = 64, *, rngs: nnx.Rngs):
        self.conv = Conv2d(dim, dim, 3, padding=1, rngs=rngs)
        self.dense1 = Conv2d(dim, dim, 3, padding=1, rngs=rngs)
        self.dense2 = Conv2d(2 * dim, dim, 3, padding=1, rngs=rngs)
        self.convdown = Conv2d(3 * dim, dim, 1, rngs=rngs)
        self.sobel = Sobel(dim, rngs=rngs)
        self.convup = Conv2d(dim, dim, 1, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = leaky_relu(self.conv(x), 0.2)
        d = jnp.concatenate([x, leaky_relu(self.dense1(x), 0.2)], axis=-1)
        d = jnp.concatenate([d, leaky_relu(self.dense2(d), 0.2)], axis=-1)
        return leaky_relu(self.convdown(d) + self.convup(self.sobel(x)), 0.1)


# --------------------------------------------------------------------------- CAI
class InvertedResidual(nnx.Module):
    """MobileNetV2 block [InvertedResidualBlock]: 1x1, ReLU6, reflect-pad dw 3x3, ReLU6, 1x1."""

    def __init__(self, inp: int = 32, oup: int = 32, expand: int = 2, *, rngs: nnx.Rngs):
        hidden = inp * expand
        self.expand = Conv2d(inp, hidden, 1, bias=False, rngs=rngs)
        self.dw = Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False,
                         pad_mode="reflect", rngs=rngs)
        self.project = Conv2d(hidden, oup, 1, bias=False, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.project(relu6(self.dw(relu6(self.expand(x)))))


class CrossAttention(nnx.Module):
    """Cross-modal transposed attention [Cross_Trans_Attention]: q from the guide, k/v from the other."""

    def __init__(self, dim: int = 32, heads: int = 8, *, rngs: nnx.Rngs):
        self.heads = heads
        self.temperature = nnx.Param(jnp.ones((heads,), jnp.float32))
        self.kv = Conv2d(dim, 2 * dim, 1, rngs=rngs)
        self.q = Conv2d(dim, dim, 1, rngs=rngs)
        self.kv_dw = Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim, rngs=rngs)
        self.q_dw = Conv2d(dim, dim, 3, padding=1, groups=dim, rngs=rngs)
        self.project_out = Conv2d(dim, dim, 1, rngs=rngs)

    def __call__(self, guide: Array, other: Array) -> Array:
        q = self.q_dw(self.q(guide))
        k, v = jnp.split(self.kv_dw(self.kv(other)), 2, axis=-1)
        return self.project_out(channel_attention(q, k, v, self.temperature[...], self.heads))


class DetailNode(nnx.Module):
    """Invertible detail node: 1x1 shuffle, z2 += phi(z1), z1 = z1 * exp(rho(z2)) + eta(z2)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.theta_phi = InvertedResidual(rngs=rngs)
        self.theta_rho = InvertedResidual(rngs=rngs)
        self.theta_eta = InvertedResidual(rngs=rngs)
        self.shuffle = Conv2d(64, 64, 1, rngs=rngs)

    def __call__(self, z1: Array, z2: Array) -> tuple[Array, Array]:
        z1, z2 = jnp.split(self.shuffle(jnp.concatenate([z1, z2], axis=-1)), 2, axis=-1)
        z2 = z2 + self.theta_phi(z1)
        z1 = z1 * jnp.exp(self.theta_rho(z2)) + self.theta_eta(z2)
        return z1, z2


class CAI(nnx.Module):
    """Cross attention + invertible detail branch [DetailFeatureExtraction_Encoder].

    The channel halves attend to each other through one shared cross-attention (both
    directions), then pass through the invertible detail node.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.cross_attention = CrossAttention(32, 8, rngs=rngs)
        self.node = DetailNode(rngs=rngs)

    def __call__(self, x: Array) -> Array:
        z1, z2 = jnp.split(x, 2, axis=-1)
        f1 = self.cross_attention(z2, z1)
        f2 = self.cross_attention(z1, z2)
        return jnp.concatenate(self.node(f1, f2), axis=-1)


# --------------------------------------------------------------------------- encoder / decoder
class Encoder(nnx.Module):
    """Shared encoder [Restormer_Encoder]; returns (base, detail, shallow, level1)."""

    def __init__(self, dim: int = 64, *, rngs: nnx.Rngs):
        self.patch_embed = Conv2d(1, dim, 3, padding=1, bias=False, rngs=rngs)
        self.level1 = RestormerBlock(dim, 8, rngs=rngs)
        self.bfe = BFE(dim, 8, rngs=rngs)
        self.cai = CAI(rngs=rngs)
        self.grdb = GRDB(dim, rngs=rngs)

    def __call__(self, x: Array) -> tuple[Array, Array, Array, Array]:
        shallow = self.patch_embed(x)
        level1 = self.level1(shallow)
        detail = self.cai(self.grdb(level1))
        base = self.bfe(level1)
        return base, detail, shallow, level1


class Decoder(nnx.Module):
    """[Restormer_Decoder]: a Restormer block, then three 3x3 convs (LReLU 0.01 between).

    Returns (logits, feature); the image is sigmoid(logits). The reference's decoder takes
    the source image as an argument and discards it.
    """

    def __init__(self, dim: int = 64, *, rngs: nnx.Rngs):
        self.level1 = RestormerBlock(dim, 8, rngs=rngs)
        self.out1 = Conv2d(dim, dim // 2, 3, padding=1, bias=False, rngs=rngs)
        self.out2 = Conv2d(dim // 2, dim // 4, 3, padding=1, bias=False, rngs=rngs)
        self.out3 = Conv2d(dim // 4, 1, 3, padding=1, bias=False, rngs=rngs)

    def __call__(self, feature: Array) -> tuple[Array, Array]:
        feature = self.level1(feature)
        y = leaky_relu(self.out1(feature), 0.01)  # nn.LeakyReLU() default slope
        y = leaky_relu(self.out2(y), 0.01)
        return self.out3(y), feature


# --------------------------------------------------------------------------- GR
class ConvBNReLU(nnx.Module):
    def __init__(self, cin: int, cout: int, *, dilation: int = 1, rngs: nnx.Rngs):
        self.conv = Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False, rngs=rngs)
        self.bn = BatchNorm2d(cout)

    def __call__(self, x: Array) -> Array:
        return self.normalize(self.conv(x))

    def normalize(self, y: Array) -> Array:
        """BatchNorm + ReLU of the conv output (the only batch-coupled step)."""
        return jax.nn.relu(self.bn(y))


class PPM(nnx.Module):
    """Graph nodes: three dilated 3x3 conv+BN+ReLU views (dilations 4, 8, 16)."""

    def __init__(self, dim: int = 64, dilations=(4, 8, 16), *, rngs: nnx.Rngs):
        self.convs = nnx.List([ConvBNReLU(dim, dim, dilation=d, rngs=rngs) for d in dilations])

    def __call__(self, x: Array) -> list[Array]:
        return self.normalize(self.conv_outputs(x))

    def conv_outputs(self, x: Array) -> list[Array]:
        """The dilated convolutions, before their BatchNorms (per sample)."""
        return [c.conv(x) for c in self.convs]

    def normalize(self, pre: list[Array]) -> list[Array]:
        """BatchNorm + ReLU of each view (batch statistics in training)."""
        return [c.normalize(y) for c, y in zip(self.convs, pre)]


class ConvGRUCell(nnx.Module):
    """1x1 ConvGRU: h' = (1 - u) * h + u * tanh(W [x, r * h]). Weights init N(0, 0.01).

    The convs of the concatenations [x, h] and [x, r * h] are computed as sums of matmuls
    with the kernels' row blocks, and the reset and update gates from their own columns:
    the same products without concatenated or split copies (exact up to float rounding;
    XLA:CPU spent more time copying the 128-channel tensors than multiplying them).
    """

    def __init__(self, dim: int = 64, *, rngs: nnx.Rngs):
        normal = normal_init(0.01)
        self.gates = Conv2d(2 * dim, 2 * dim, 1, kernel_init=normal, rngs=rngs)
        self.candidate = Conv2d(2 * dim, dim, 1, kernel_init=normal, rngs=rngs)

    def __call__(self, x: Array, h: Array) -> Array:
        d = h.shape[-1]
        wg = self.gates.kernel[...][0, 0].astype(x.dtype)       # rows: [x | h], cols: [r | u]
        bg = self.gates.bias[...].astype(x.dtype)
        wc = self.candidate.kernel[...][0, 0].astype(x.dtype)   # rows: [x | r * h]
        bc = self.candidate.bias[...].astype(x.dtype)

        def gate(cols):
            return jax.nn.sigmoid(x @ wg[:d, cols] + h @ wg[d:, cols] + bg[cols])

        reset, update = gate(slice(0, d)), gate(slice(d, 2 * d))
        c = jnp.tanh(x @ wc[:d] + (reset * h) @ wc[d:] + bc)
        return (1 - update) * h + update * c


class GraphModel(nnx.Module):
    """One message-passing round over the nodes, with a ConvGRU update and a learned gamma.

    Each node receives from the others messages gated by sigmoid(C_wgt(h_t - h_n)), where
    C_wgt is a grouped 1x1 conv giving one map per neighbour. The reference expands those
    maps to channels with `unsqueeze(1).repeat(1, c // (n-1), 1, 1, 1).view(b, c, h, w)`,
    which *interleaves* them: channel j of the concatenated neighbours is gated by map
    j mod (n-1), not by its own neighbour's map. The port reproduces that.

    Computed neighbour by neighbour (no 128-channel concatenations): the grouped conv is one
    matmul per neighbour with its group's kernel column, and channel c of neighbour g takes
    edge map (g * dim + c) mod (n - 1); products and sums as the reference forms them.
    """

    def __init__(self, n_nodes: int = 3, dim: int = 64, *, rngs: nnx.Rngs):
        self.n_nodes = n_nodes
        self.edge_weight = Conv2d(dim * (n_nodes - 1), n_nodes - 1, 1, groups=n_nodes - 1,
                                  bias=False, rngs=rngs)
        self.gru = ConvGRUCell(dim, rngs=rngs)
        self.gamma = nnx.Param(jnp.zeros((1,), jnp.float32))

    def __call__(self, nodes: list[Array]) -> list[Array]:
        n = self.n_nodes
        kernel = self.edge_weight.kernel[...][0, 0]                 # (dim, n - 1): group g's column g
        dim = kernel.shape[0]
        out = []
        for i in range(n):
            h_t = nodes[i]
            neighbours = [nodes[j] for j in range(n) if j != i]
            gates = [jax.nn.sigmoid((h_t - nb) @ kernel[:, g:g + 1].astype(h_t.dtype))
                     for g, nb in enumerate(neighbours)]            # each (..., 1)
            m_t = 0
            for g, nb in enumerate(neighbours):
                idx = (g * dim + np.arange(dim)) % (n - 1)
                gate = gates[0]
                for k in range(1, n - 1):  # an exact per-channel selection, fused by XLA
                    gate = jnp.where(idx == k, gates[k], gate)
                m_t = m_t + nb * gate
            out.append(self.gru(m_t, h_t) * self.gamma[...] + h_t)
        return out


class GraphReasoning(nnx.Module):
    """[GraphReasoning] with node=False (the only path the reference takes).

    PPM nodes per modality, two rounds of cross-modal edge gating per node, then
    `n_iter` graph-model iterations per modality. The reference also builds a
    channel-attention `C_ca` used only when node=True; its weights are kept aside.
    """

    def __init__(self, dim: int = 64, dilations=(4, 8, 16), n_iter: int = 2, *, rngs: nnx.Rngs):
        self.n_iter = n_iter
        self.ppm_ir = PPM(dim, dilations, rngs=rngs)
        self.ppm_vi = PPM(dim, dilations, rngs=rngs)
        self.graph_ir = GraphModel(len(dilations), dim, rngs=rngs)
        self.graph_vi = GraphModel(len(dilations), dim, rngs=rngs)
        self.gate_to_vi = Conv2d(dim, 1, 1, bias=False, rngs=rngs)  # C_pa[0]
        self.gate_to_ir = Conv2d(dim, 1, 1, bias=False, rngs=rngs)  # C_pa[1]

    def _exchange(self, ir: Array, vi: Array) -> tuple[Array, Array]:
        new_vi = ir * jax.nn.sigmoid(self.gate_to_vi(ir - vi)) + vi
        new_ir = vi * jax.nn.sigmoid(self.gate_to_ir(vi - ir)) + ir
        return new_ir, new_vi

    def ppm_convs(self, ir: Array, vi: Array) -> tuple[list[Array], list[Array]]:
        return self.ppm_ir.conv_outputs(ir), self.ppm_vi.conv_outputs(vi)

    def ppm_normalize(self, pre_ir: list[Array], pre_vi: list[Array]):
        return self.ppm_ir.normalize(pre_ir), self.ppm_vi.normalize(pre_vi)

    def exchange(self, nodes_ir: list[Array], nodes_vi: list[Array]):
        """Two rounds of cross-modal edge gating per node (per sample)."""
        nodes_ir, nodes_vi = list(nodes_ir), list(nodes_vi)
        for i in range(len(nodes_ir)):
            for _ in range(2):
                nodes_ir[i], nodes_vi[i] = self._exchange(nodes_ir[i], nodes_vi[i])
        return nodes_ir, nodes_vi

    def iterate(self, nodes_ir: list[Array], nodes_vi: list[Array]):
        """`n_iter` graph-model iterations per modality (per sample)."""
        for _ in range(self.n_iter):
            nodes_ir = self.graph_ir(nodes_ir)
        for _ in range(self.n_iter):
            nodes_vi = self.graph_vi(nodes_vi)
        return nodes_ir, nodes_vi

    def nodes(self, ir: Array, vi: Array) -> tuple[list[Array], list[Array]]:
        """Each modality's PPM nodes after two rounds of cross-modal edge gating."""
        return self.exchange(*self.ppm_normalize(*self.ppm_convs(ir, vi)))

    def __call__(self, ir: Array, vi: Array) -> tuple[list[Array], list[Array]]:
        return self.iterate(*self.nodes(ir, vi))


class GR(nnx.Module):
    """Graph reasoning branch [CGR_backbone + CGR]; returns (fused, ir, vi) features.

    Only `C_cat[0]` (ir) and `C_cat[1]` (vi) of the reference's six concat convs, and the
    outer `C_cls`, take part in the forward pass; the rest are kept aside by the converter.
    """

    def __init__(self, dim: int = 64, *, rngs: nnx.Rngs):
        self.reasoning = GraphReasoning(dim, rngs=rngs)
        self.concat_ir = ConvBNReLU(3 * dim, dim, rngs=rngs)
        self.concat_vi = ConvBNReLU(3 * dim, dim, rngs=rngs)
        self.fuse = Conv2d(2 * dim, dim, 1, rngs=rngs)

    def __call__(self, vi: Array, ir: Array) -> tuple[Array, Array, Array]:
        nodes_ir, nodes_vi = self.reasoning(ir, vi)
        f_ir = self.concat_ir(jnp.concatenate(nodes_ir, axis=-1))
        f_vi = self.concat_vi(jnp.concatenate(nodes_vi, axis=-1))
        return self.fuse_modalities(f_ir, f_vi), f_ir, f_vi

    def fuse_modalities(self, f_ir: Array, f_vi: Array) -> Array:
        return self.fuse(jnp.concatenate([f_ir, f_vi], axis=-1))


# --------------------------------------------------------------------------- fusion layers
class BaseFuseLayer(nnx.Module):
    """Base fusion layer [BaseFeatureExtraction]: LayerNorm+MDTA, LayerNorm+LeFF, residual."""

    def __init__(self, dim: int = 64, heads: int = 8, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim)
        self.attn = MDTA(dim, heads, rngs=rngs)
        self.norm2 = LayerNorm(dim)
        self.mlp = LeFF(dim, 64, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AffineInvertibleBlock(nnx.Module):
    """[INV_block_affine], run as the reference runs it: its forward's default `rev=True`.

    After a 1x1 shuffle: y2 = (x2 - eta(x1)) / e(rho(x1)), y1 = (x1 - phi(y2)) / e(psi(y2)),
    with e(s) = exp(2 * clamp * (sigmoid(s) - 0.5)), clamp = 2.
    """

    def __init__(self, clamp: float = 2.0, *, rngs: nnx.Rngs):
        self.clamp = clamp
        self.rho = InvertedResidual(rngs=rngs)   # r
        self.eta = InvertedResidual(rngs=rngs)   # y
        self.phi = InvertedResidual(rngs=rngs)   # f
        self.psi = InvertedResidual(rngs=rngs)   # p
        self.shuffle = Conv2d(64, 64, 1, rngs=rngs)

    def _e(self, s: Array) -> Array:
        return jnp.exp(self.clamp * 2 * (jax.nn.sigmoid(s) - 0.5))

    def __call__(self, x1: Array, x2: Array) -> tuple[Array, Array]:
        x1, x2 = jnp.split(self.shuffle(jnp.concatenate([x1, x2], axis=-1)), 2, axis=-1)
        y2 = (x2 - self.eta(x1)) / self._e(self.rho(x1))
        y1 = (x1 - self.phi(y2)) / self._e(self.psi(y2))
        return y1, y2


class DetailFuseLayer(nnx.Module):
    """Detail fusion layer [DetailFeatureExtraction]: GRDB, then two affine invertible blocks."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.grdb = GRDB(64, rngs=rngs)
        self.blocks = nnx.List([AffineInvertibleBlock(rngs=rngs) for _ in range(2)])

    def __call__(self, x: Array) -> Array:
        z1, z2 = jnp.split(self.grdb(x), 2, axis=-1)
        for block in self.blocks:
            z1, z2 = block(z1, z2)
        return jnp.concatenate([z1, z2], axis=-1)


# --------------------------------------------------------------------------- the whole model
SUBMODELS = ("encoder", "decoder", "graph", "base_fuse", "detail_fuse")


class SMFNet(nnx.Module):
    """The five sub-models and the reference's two forward paths.

    Inputs are NHWC (N, H, W, 1) in [0, 1]. The training forward passes are sequences of
    `Stage`s (PHASE1_STAGES, PHASE2_STAGES) so that `train.step` can run the per-sample
    ones a slice of the batch at a time.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.encoder = Encoder(rngs=rngs)
        self.decoder = Decoder(rngs=rngs)
        self.graph = GR(rngs=rngs)
        self.base_fuse = BaseFuseLayer(rngs=rngs)
        self.detail_fuse = DetailFuseLayer(rngs=rngs)

    def run_stages(self, stages: tuple[Stage, ...], vi: Array, ir: Array) -> dict[str, Array]:
        values = {"vi": vi, "ir": ir}
        for stage in stages:
            values.update(stage.apply(self, {k: values[k] for k in stage.inputs}))
        del values["vi"], values["ir"]
        return values

    def phase1(self, vi: Array, ir: Array) -> dict[str, Array]:
        """Phase-I reconstruction of each modality from detail + base + its graph feature."""
        return self.run_stages(PHASE1_STAGES, vi, ir)

    def phase2(self, vi: Array, ir: Array) -> dict[str, Array]:
        """Phase-II fusion (also the inference path)."""
        return self.run_stages(PHASE2_STAGES, vi, ir)

    def __call__(self, vi: Array, ir: Array) -> Array:
        return self.phase2(vi, ir)["fused"]


# --------------------------------------------------------------------------- training stages
@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a training forward pass: `apply(model, {k: values[k] for k in inputs})`
    returns new named values.

    `per_sample` stages compute every row of their inputs independently (a sample, or one
    modality's image of it for the encoder), so they may run on any split of those rows; the
    others (the GR BatchNorms, with batch statistics in training, and the cheap reshuffles
    of the two modalities) see the whole batch. `train.step` uses this to compute exact gradients a
    micro-batch at a time; `SMFNet.phase1/phase2` just run the stages in order.
    """
    name: str
    inputs: tuple[str, ...]
    per_sample: bool
    apply: Callable[[SMFNet, dict], dict]


def _stack_modalities(m: SMFNet, v: dict) -> dict:
    return {"images": jnp.concatenate([v["vi"], v["ir"]], axis=0)}


def _encode(m: SMFNet, v: dict) -> dict:
    """The shared encoder on both modalities as one batch of images (one compiled copy)."""
    return dict(zip(("base", "detail", "shallow", "level1"), m.encoder(v["images"])))


def _split_modalities(m: SMFNet, v: dict) -> dict:
    n = v["base"].shape[0] // 2
    return {f"{mod}_{name}": t[i * n:(i + 1) * n] for name, t in v.items()
            for i, mod in enumerate(("vi", "ir"))}


def _ppm_convs(m: SMFNet, v: dict) -> dict:
    pre_ir, pre_vi = m.graph.reasoning.ppm_convs(v["ir_level1"], v["vi_level1"])
    return {"ppm_pre_ir": pre_ir, "ppm_pre_vi": pre_vi}


def _ppm_normalize(m: SMFNet, v: dict) -> dict:
    nodes_ir, nodes_vi = m.graph.reasoning.ppm_normalize(v["ppm_pre_ir"], v["ppm_pre_vi"])
    return {"ppm_ir": nodes_ir, "ppm_vi": nodes_vi}


def _graph_reasoning(m: SMFNet, v: dict) -> dict:
    gr = m.graph
    nodes_ir, nodes_vi = gr.reasoning.iterate(*gr.reasoning.exchange(v["ppm_ir"], v["ppm_vi"]))
    return {"concat_pre_ir": gr.concat_ir.conv(jnp.concatenate(nodes_ir, axis=-1)),
            "concat_pre_vi": gr.concat_vi.conv(jnp.concatenate(nodes_vi, axis=-1))}


def _concat_normalize(m: SMFNet, v: dict) -> dict:
    return {"graph_ir": m.graph.concat_ir.normalize(v["concat_pre_ir"]),
            "graph_vi": m.graph.concat_vi.normalize(v["concat_pre_vi"])}


def _reconstruct(m: SMFNet, v: dict) -> dict:
    """Phase-I head: each modality decoded from detail + base + its graph feature."""
    n = v["vi_base"].shape[0]
    x = jnp.concatenate([v["vi_detail"] + v["vi_base"] + v["graph_vi"],
                         v["ir_detail"] + v["ir_base"] + v["graph_ir"]], axis=0)
    logits, feature = m.decoder(x)
    return {"vi_hat": jax.nn.sigmoid(logits[:n]), "ir_hat": jax.nn.sigmoid(logits[n:]),
            "vi_feature": feature[:n], "ir_feature": feature[n:]}


def _fuse(m: SMFNet, v: dict) -> dict:
    """Phase-II head: the graph's fused feature, the fusion layers and the decoder."""
    g = m.graph.fuse_modalities(v["graph_ir"], v["graph_vi"])
    fuse_base = m.base_fuse(v["ir_base"] + v["vi_base"])
    fuse_detail = m.detail_fuse(v["ir_detail"] + v["vi_detail"])
    logits, feature = m.decoder(fuse_detail + fuse_base + g)
    return {"graph_fused": g, "fuse_base": fuse_base, "fuse_detail": fuse_detail,
            "fused_logits": logits, "fused": jax.nn.sigmoid(logits), "fused_feature": feature}


_SHARED_STAGES = (
    Stage("stack_modalities", ("vi", "ir"), False, _stack_modalities),
    Stage("encode", ("images",), True, _encode),
    Stage("split_modalities", ("base", "detail", "shallow", "level1"), False, _split_modalities),
    Stage("gr_ppm_convs", ("ir_level1", "vi_level1"), True, _ppm_convs),
    Stage("gr_ppm_batchnorm", ("ppm_pre_ir", "ppm_pre_vi"), False, _ppm_normalize),
    Stage("gr_reasoning", ("ppm_ir", "ppm_vi"), True, _graph_reasoning),
    Stage("gr_concat_batchnorm", ("concat_pre_ir", "concat_pre_vi"), False, _concat_normalize),
)
PHASE1_STAGES = _SHARED_STAGES + (Stage(
    "reconstruct", ("vi_base", "ir_base", "vi_detail", "ir_detail", "graph_ir", "graph_vi"),
    True, _reconstruct),)
PHASE2_STAGES = _SHARED_STAGES + (Stage(
    "fuse", ("vi_base", "ir_base", "vi_detail", "ir_detail", "graph_ir", "graph_vi"),
    True, _fuse),)


def create_model(seed: int = 0) -> SMFNet:
    """A freshly initialised SMFNet (PyTorch-default-like init), in train mode."""
    return SMFNet(rngs=nnx.Rngs(seed))


def abstract_model() -> SMFNet:
    """The model's structure with shape-only leaves, for loading weights without an init."""
    return nnx.eval_shape(lambda: SMFNet(rngs=nnx.Rngs(0)))
