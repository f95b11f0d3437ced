"""SMFNet in Flax NNX, NHWC throughout.

Parts, named after the paper (reference class names in brackets):

- `Encoder` [Restormer_Encoder], shared by both modalities: patch embedding, one Restormer
  block, then three branches: BFE (base features) [SwinIR_Encoder], GRDB + CAI (cross
  attention + invertible detail node) [GRDB_module + DetailFeatureExtraction_Encoder].
- `GR` [CGR_backbone]: graph reasoning between the two modalities' level-1 features
  (PPM nodes, cross-modal edge gating, a graph model updated by a ConvGRU).
- Fusion layers: the base one [BaseFeatureExtraction] is a `RestormerBlock`;
  `DetailFuseLayer` [DetailFeatureExtraction] is a GRDB + two affine invertible blocks.
- `Decoder` [Restormer_Decoder].

`SMFNet` holds the five sub-models under the same split as the reference checkpoint
(`encoder`, `decoder`, `graph`, `base_fuse`, `detail_fuse`), because training optimises
and clips each of them separately.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smfnet_jax import kernels
from smfnet_jax.layers import (BatchNorm2d, Conv2d, LayerNorm, channel_attention, conv_blocks,
                               dense_conv_blocks, gelu, leaky_relu, normal_init, relu6,
                               torch_abs)
from smfnet_jax.policy import ComputePolicy, resolve, set_policy
from smfnet_jax.torch_weights.keymap import SUBMODEL_KEYS

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
        self.policy = resolve()  # the model's, set by `set_policy`: the attention's dots

    def __call__(self, x: Array) -> Array:
        q, k, v = conv_blocks([self.qkv, self.qkv_dw], x, 3)
        return channel_attention(q, k, v, self.temperature[...], self.heads, self.project_out,
                                 precision=self.policy.lax_precision)


class DenseAttention(nnx.Module):
    """TransformerBase's attention [AttentionBase]: 1x1 then a dense 3x3 qkv projection.

    Both convs are bias-free and the 3x3 one zero-pads, so qkv2(qkv1(x)) is exactly one 3x3
    conv of x with the composed kernel W[h, w, i, o] = sum_m W1[i, m] W2[h, w, m, o]: a
    third of the FLOPs, no 3C-channel intermediate, differentiable in both weights.
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.scale = nnx.Param(jnp.ones((heads,), jnp.float32))
        self.qkv1 = Conv2d(dim, 3 * dim, 1, bias=False, rngs=rngs)
        self.qkv2 = Conv2d(3 * dim, 3 * dim, 3, padding=1, bias=False, rngs=rngs)
        self.proj = Conv2d(dim, dim, 1, bias=False, rngs=rngs)
        self.deterministic = False  # eval mode (model.eval()): how q/k/v are split, not what
        self.policy = resolve()     # the model's, set by `set_policy`

    def __call__(self, x: Array) -> Array:
        precision = self.policy.lax_precision
        kernel = kernels.einsum("io,hwom->hwim", self.qkv1.kernel[...][0, 0], self.qkv2.kernel[...],
                                precision=precision).astype(x.dtype)
        q, k, v = dense_conv_blocks(x, kernel, 3, self.policy, padding=1,
                                    deterministic=self.deterministic)
        return channel_attention(q, k, v, self.scale[...], self.heads, self.proj, precision=precision)


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
    """Depthwise Sobel |gx| + |gy|; trainable kernels initialised to Sobel, as in the reference
    (|.| with torch's derivative, 0 at 0)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        sx = jnp.array([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]], jnp.float32)
        def tiled(k):
            return lambda key, shape, dtype=jnp.float32: jnp.broadcast_to(k[:, :, None, None], shape).astype(dtype)
        self.convx = Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False,
                            kernel_init=tiled(sx), rngs=rngs)
        self.convy = Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False,
                            kernel_init=tiled(sx.T), rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return torch_abs(self.convx(x)) + torch_abs(self.convy(x))


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
        d1 = leaky_relu(self.dense1(x), 0.2)
        d2 = leaky_relu(self.dense2([x, d1]), 0.2)          # convs of the dense block's
        return leaky_relu(self.convdown([x, d1, d2])        # concatenations, part by part
                          + self.convup(self.sobel(x)), 0.1)


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
        self.policy = resolve()  # the model's, set by `set_policy`: the attention's dots

    def __call__(self, guide: Array, other: Array) -> Array:
        q = self.q_dw(self.q(guide))
        k, v = conv_blocks([self.kv, self.kv_dw], other, 2)
        return channel_attention(q, k, v, self.temperature[...], self.heads, self.project_out,
                                 precision=self.policy.lax_precision)


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
    """3x3 conv (of one input, or of the concatenation of a list of parts), BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, *, dilation: int = 1, rngs: nnx.Rngs):
        self.conv = Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False, rngs=rngs)
        self.bn = BatchNorm2d(cout)

    def __call__(self, x: Array | list[Array]) -> Array:
        return self.bn_relu(self.conv(x))

    def bn_relu(self, y: Array) -> Array:
        """BatchNorm + ReLU of the conv output: the batch-coupled half (batch statistics in
        training), apart so that a micro-batched gradient can run the conv per sample."""
        return jax.nn.relu(self.bn(y))


class PPM(nnx.Module):
    """Graph nodes: three dilated 3x3 conv+BN+ReLU views (dilations 4, 8, 16)."""

    def __init__(self, dim: int = 64, dilations=(4, 8, 16), *, rngs: nnx.Rngs):
        self.convs = nnx.List([ConvBNReLU(dim, dim, dilation=d, rngs=rngs) for d in dilations])

    def __call__(self, x: Array) -> list[Array]:
        return self.bn_relu(self.dilated_convs(x))

    def dilated_convs(self, x: Array) -> list[Array]:
        """The three views before their BatchNorms (per sample)."""
        return [c.conv(x) for c in self.convs]

    def bn_relu(self, views: list[Array]) -> list[Array]:
        """BatchNorm + ReLU of each view (`ConvBNReLU.bn_relu`)."""
        return [c.bn_relu(y) for c, y in zip(self.convs, views)]


class ConvGRUCell(nnx.Module):
    """1x1 ConvGRU: h' = (1 - u) * h + u * tanh(W [x, r * h]). Weights init N(0, 0.01).

    The convs of the concatenations [x, h] and [x, r * h] are summed over their parts (no
    concatenated copies); the reset and update gates are the two halves of one conv's
    output (`conv_blocks`).
    """

    def __init__(self, dim: int = 64, *, rngs: nnx.Rngs):
        normal = normal_init(0.01)
        self.gates = Conv2d(2 * dim, 2 * dim, 1, kernel_init=normal, rngs=rngs)    # -> [r | u]
        self.candidate = Conv2d(2 * dim, dim, 1, kernel_init=normal, rngs=rngs)

    def __call__(self, x: Array, h: Array) -> Array:
        reset, update = (jax.nn.sigmoid(g) for g in conv_blocks([self.gates], [x, h], 2))
        c = jnp.tanh(self.candidate([x, reset * h]))
        return (1 - update) * h + update * c


class GraphModel(nnx.Module):
    """`n_iter` message-passing rounds over the nodes, each a ConvGRU update with a learned
    gamma (the reference loops over one round; the weights are shared between rounds).

    Each node receives from the others messages gated by sigmoid(C_wgt(h_t - h_n)), where
    C_wgt is a grouped 1x1 conv giving one map per neighbour. The reference expands those
    maps to channels with `unsqueeze(1).repeat(1, c // (n-1), 1, 1, 1).view(b, c, h, w)`,
    which *interleaves* them: channel j of the concatenated neighbours is gated by map
    j mod (n-1), not by its own neighbour's map. The port reproduces that.

    Computed neighbour by neighbour (no 128-channel concatenations): the grouped conv is one
    matmul per neighbour with its group's kernel column, and channel c of neighbour g takes
    edge map (g * dim + c) mod (n - 1); products and sums as the reference forms them.
    """

    def __init__(self, n_nodes: int = 3, dim: int = 64, n_iter: int = 2, *, rngs: nnx.Rngs):
        self.n_nodes = n_nodes
        self.n_iter = n_iter
        self.edge_weight = Conv2d(dim * (n_nodes - 1), n_nodes - 1, 1, groups=n_nodes - 1,
                                  bias=False, rngs=rngs)
        self.gru = ConvGRUCell(dim, rngs=rngs)
        self.gamma = nnx.Param(jnp.zeros((1,), jnp.float32))
        self.policy = resolve()  # the model's, set by `set_policy`: the edge matmuls

    def __call__(self, nodes: list[Array]) -> list[Array]:
        for _ in range(self.n_iter):
            nodes = self._round(nodes)
        return nodes

    def _round(self, nodes: list[Array]) -> list[Array]:
        n = self.n_nodes
        kernel = self.edge_weight.kernel[...][0, 0]                 # (dim, n - 1): group g's column g
        dim = kernel.shape[0]
        out = []
        for i in range(n):
            h_t = nodes[i]
            neighbours = [nodes[j] for j in range(n) if j != i]
            gates = [jax.nn.sigmoid(kernels.matmul(h_t - nb, kernel[:, g:g + 1].astype(h_t.dtype),
                                                   precision=self.policy.lax_precision))
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
    """[GraphReasoning] with node=False (the only path the reference takes): the graph's
    nodes and their message passing, per modality.

    Calling it on the (vi, ir) level-1 features gives the nodes (nodes_vi, nodes_ir): PPM
    views of each modality after two rounds of cross-modal edge gating per node
    (`cross_gate`). `graph_vi` / `graph_ir` then run `n_iter` rounds of message passing on
    them (see `GR`). The reference also builds a channel-attention `C_ca`
    used only when node=True; its weights are kept aside.
    """

    def __init__(self, dim: int = 64, dilations=(4, 8, 16), n_iter: int = 2, *, rngs: nnx.Rngs):
        self.ppm_ir = PPM(dim, dilations, rngs=rngs)
        self.ppm_vi = PPM(dim, dilations, rngs=rngs)
        self.graph_ir = GraphModel(len(dilations), dim, n_iter, rngs=rngs)
        self.graph_vi = GraphModel(len(dilations), dim, n_iter, rngs=rngs)
        self.gate_to_vi = Conv2d(dim, 1, 1, bias=False, rngs=rngs)  # C_pa[0]
        self.gate_to_ir = Conv2d(dim, 1, 1, bias=False, rngs=rngs)  # C_pa[1]

    def __call__(self, vi: Array, ir: Array) -> tuple[list[Array], list[Array]]:
        return self.cross_gate(self.ppm_vi(vi), self.ppm_ir(ir))

    def cross_gate(self, nodes_vi: list[Array], nodes_ir: list[Array]):
        """Two rounds of cross-modal edge gating per node (per sample): each modality's node
        gains the other's, gated by sigmoid(C_pa(other - own)). -> (nodes_vi, nodes_ir)"""
        nodes_vi, nodes_ir = list(nodes_vi), list(nodes_ir)
        for i in range(len(nodes_vi)):
            for _ in range(2):
                vi, ir = nodes_vi[i], nodes_ir[i]
                nodes_vi[i] = ir * jax.nn.sigmoid(self.gate_to_vi(ir - vi)) + vi
                nodes_ir[i] = vi * jax.nn.sigmoid(self.gate_to_ir(vi - ir)) + ir
        return nodes_vi, nodes_ir


class GR(nnx.Module):
    """Graph reasoning branch [CGR_backbone + CGR]: (vi, ir) level-1 features -> the graph
    features (f_vi, f_ir); `merge(f_vi, f_ir)` is the fused graph feature of phase II.

    Only `C_cat[0]` (ir) and `C_cat[1]` (vi) of the reference's six concat convs, and the
    outer `C_cls` (`fuse`: the checkpoints' name for it), take part in the forward pass; the
    rest are kept aside by the converter.
    """

    def __init__(self, dim: int = 64, *, rngs: nnx.Rngs):
        self.reasoning = GraphReasoning(dim, rngs=rngs)
        self.concat_ir = ConvBNReLU(3 * dim, dim, rngs=rngs)
        self.concat_vi = ConvBNReLU(3 * dim, dim, rngs=rngs)
        self.fuse = Conv2d(2 * dim, dim, 1, rngs=rngs)

    def __call__(self, vi: Array, ir: Array) -> tuple[Array, Array]:
        r = self.reasoning
        nodes_vi, nodes_ir = r(vi, ir)
        f_ir = self.concat_ir(r.graph_ir(nodes_ir))
        # The ir graph is finished (down to its concat conv) before the vi graph starts, so
        # only one modality's graph temporaries are alive at a time.
        f_ir, nodes_vi = jax.lax.optimization_barrier((f_ir, nodes_vi))
        f_vi = self.concat_vi(r.graph_vi(nodes_vi))
        return f_vi, f_ir

    def merge(self, f_vi: Array, f_ir: Array) -> Array:
        """The fused graph feature: C_cls of the reference's concatenation [f_ir, f_vi]."""
        return self.fuse([f_ir, f_vi])


# --------------------------------------------------------------------------- fusion layers
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
SUBMODELS = tuple(SUBMODEL_KEYS.values())  # the reference checkpoint's split, in its order
ENCODER_OUTPUTS = ("base", "detail", "shallow", "level1")


def split_modalities(encoded: tuple[Array, ...]) -> dict[str, Array]:
    """The encoder's outputs on the batch [vi; ir] -> {"vi_base": ..., "ir_base": ..., ...}."""
    n = encoded[0].shape[0] // 2
    return {f"{mod}_{name}": t[i * n:(i + 1) * n] for name, t in zip(ENCODER_OUTPUTS, encoded)
            for i, mod in enumerate(("vi", "ir"))}


class SMFNet(nnx.Module):
    """The five sub-models and the reference's forward paths.

    Inputs are NHWC (N, H, W, 1) in [0, 1]. `phase1` and `phase2` are the training forward
    passes and return every intermediate by name; `fuse` (also `model(vi, ir)`) is phase II's
    fused image computed in less memory. `model.eval()` / `model.train()` switch BatchNorm
    between running and batch statistics.

    `policy` (`smfnet_jax.policy.ComputePolicy`; default `resolve()`: the routines for this
    backend or $SMFNET_JAX_IMPL, precision highest, float32) is set on every module, as a
    static attribute: it is part of the graphdef, so of every jit cache key. Change it with
    `set_policy(model, policy)`. Its dtype is what the trainer and the fuser cast the
    parameters and inputs to (`model.policy.compute_dtype`).
    """

    def __init__(self, *, rngs: nnx.Rngs, policy: ComputePolicy | None = None):
        self.encoder = Encoder(rngs=rngs)
        self.decoder = Decoder(rngs=rngs)
        self.graph = GR(rngs=rngs)
        self.base_fuse = RestormerBlock(rngs=rngs)     # [BaseFeatureExtraction]: the same block
        self.detail_fuse = DetailFuseLayer(rngs=rngs)
        self.policy = policy or resolve()
        set_policy(self, self.policy)

    def features(self, vi: Array, ir: Array) -> dict[str, Array]:
        """Encoder features of both modalities (one batch through the shared encoder) and
        the graph's per-modality features `vi_graph`, `ir_graph`."""
        f = split_modalities(self.encoder(jnp.concatenate([vi, ir], axis=0)))
        f["vi_graph"], f["ir_graph"] = self.graph(f["vi_level1"], f["ir_level1"])
        return f

    def phase1(self, vi: Array, ir: Array) -> dict[str, Array]:
        """Phase I: each modality reconstructed from its detail + base + graph feature."""
        f = self.features(vi, ir)
        return {**f, **self.reconstruct(f)}

    def phase2(self, vi: Array, ir: Array) -> dict[str, Array]:
        """Phase II: the fused image from the fusion layers and the fused graph feature."""
        f = self.features(vi, ir)
        return {**f, **self.fusion_head(f)}

    def reconstruct(self, f: dict[str, Array]) -> dict[str, Array]:
        """Phase-I head: both modalities through the decoder as one batch."""
        n = f["vi_base"].shape[0]
        x = jnp.concatenate([f["vi_detail"] + f["vi_base"] + f["vi_graph"],
                             f["ir_detail"] + f["ir_base"] + f["ir_graph"]], axis=0)
        logits, feature = self.decoder(x)
        image = _sigmoid_f32(logits)
        return {"vi_hat": image[:n], "ir_hat": image[n:],
                "vi_feature": feature[:n], "ir_feature": feature[n:]}

    def fusion_head(self, f: dict[str, Array]) -> dict[str, Array]:
        """Phase-II head: fused graph feature, base and detail fusion layers, decoder."""
        g = self.graph.merge(f["vi_graph"], f["ir_graph"])
        fuse_base = self.base_fuse(f["ir_base"] + f["vi_base"])
        fuse_detail = self.detail_fuse(f["ir_detail"] + f["vi_detail"])
        logits, feature = self.decoder(fuse_detail + fuse_base + g)
        return {"graph_fused": g, "fuse_base": fuse_base, "fuse_detail": fuse_detail,
                "fused_logits": logits, "fused": _sigmoid_f32(logits), "fused_feature": feature}

    def fuse(self, vi: Array, ir: Array) -> Array:
        """`phase2(vi, ir)["fused"]` with a small working set (the inference path).

        The shared encoder runs the two modalities one after the other (lax.scan: one
        compiled copy, half the working set) and keeps only what fusion needs: the sums
        base_vi + base_ir and detail_vi + detail_ir (bit for bit the reference's:
        0 + a + b == b + a) and both level-1 features. The fusion layers run before the
        graph branch (an optimization barrier orders them), and the graph finishes one
        modality before the other (`GR`). `tests/test_inference.py` checks it equals
        `phase2`'s fused output in eval mode.
        """
        def encode(sums, x):
            base, detail, _, level1 = self.encoder(x)
            return (sums[0] + base, sums[1] + detail), level1

        dim = self.encoder.patch_embed.kernel.shape[3]
        zeros = jnp.zeros(vi.shape[:3] + (dim,), vi.dtype)
        (base, detail), level1 = jax.lax.scan(encode, (zeros, zeros), jnp.stack([vi, ir]))
        fused = self.detail_fuse(detail) + self.base_fuse(base)
        fused, level1 = jax.lax.optimization_barrier((fused, level1))
        g = self.graph.merge(*self.graph(level1[0], level1[1]))
        logits, _ = self.decoder(fused + g)
        return _sigmoid_f32(logits)

    def __call__(self, vi: Array, ir: Array) -> Array:
        return self.fuse(vi, ir)


def _sigmoid_f32(logits: Array) -> Array:
    """The output image, computed in float32 whatever the compute dtype (mixed precision;
    float64 in a float64 run)."""
    return jax.nn.sigmoid(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))


def create_model(seed: int = 0, policy: ComputePolicy | None = None) -> SMFNet:
    """A freshly initialised SMFNet (PyTorch-default-like init), in train mode."""
    return SMFNet(rngs=nnx.Rngs(seed), policy=policy)


def abstract_model(policy: ComputePolicy | None = None) -> SMFNet:
    """The model's structure with shape-only leaves, for loading weights without an init."""
    return nnx.eval_shape(lambda: SMFNet(rngs=nnx.Rngs(0), policy=policy))
