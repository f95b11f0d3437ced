"""Inference helpers: exact weight folding, the persistent compilation cache, tiled fusion.

    from smfnet_jax.api import load_fuser
    from smfnet_jax.inference import fuse_tiled
    fuser = load_fuser("models/model_VIF.pth")          # folded, jitted, cache enabled
    fused = fuse_tiled(fuser, ir, vi, tile=512, overlap=32)   # any size, bounded memory

`fold_for_inference` rewrites the model into an algebraically equal one that is cheaper to
run; its output differs from the original only by float rounding.

`fuse_tiled` fuses overlapping tiles and blends them. SMFNet has global channel attention
(every attention layer normalises over the whole image), so a tiled result is close to,
but not equal to, the whole-image one; see the README for the measured deviation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smfnet_jax.layers import Conv2d, channel_attention_matrix, depthwise_valid, leaky_relu
from smfnet_jax.model import GR, GRDB, MDTA, ConvBNReLU, CrossAttention, DenseAttention, SMFNet

CACHE_ENV = "SMFNET_JAX_CACHE"
_CACHE_OFF = {"", "0", "off", "none", "false", "no"}


# --------------------------------------------------------------------------- weight folding
def fold_dense_qkv(w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Compose a bias-free 1x1 conv (HWIO (1, 1, C, M)) into a following 3x3 conv (3, 3, M, O).

    conv3x3(conv1x1(x)) = conv3x3'(x) with W'[kh, kw, i, o] = sum_m W1[i, m] W2[kh, kw, m, o].
    Exact with zero padding because the 1x1 conv has no bias: it maps the zero padding of x
    to the zero padding the 3x3 conv would have seen. Summed in float64, then rounded once.
    """
    w1 = np.asarray(w1, np.float64)
    w2 = np.asarray(w2, np.float64)
    if w1.shape[:2] != (1, 1) or w1.shape[3] != w2.shape[2]:
        raise ValueError(f"cannot fold 1x1 kernel {w1.shape} into kernel {w2.shape}")
    return np.einsum("im,hwmo->hwio", w1[0, 0], w2)


def _fold_attention(attn: DenseAttention) -> None:
    c1, c2 = attn.qkv1, attn.qkv2
    if c1.bias is not None or c2.bias is not None or c2.pad_mode != "zeros" or c2.groups != 1 \
            or c1.groups != 1 or c2.dilation != 1:
        raise ValueError("DenseAttention folding needs two bias-free, ungrouped, zero-padded convs")
    kernel = fold_dense_qkv(np.asarray(c1.kernel[...]), np.asarray(c2.kernel[...]))
    dtype = c2.kernel[...].dtype
    k, _, cin, cout = kernel.shape
    # nnx.data: the attribute starts as None (static); the folded conv carries parameters.
    attn.qkv_folded = nnx.data(Conv2d(cin, cout, k, padding=c2.padding, bias=False,
                                      kernel_init=lambda key, shape, dtype=dtype: kernel.astype(dtype),
                                      rngs=nnx.Rngs(0)))


def attention_projected(q: jax.Array, k: jax.Array, v: jax.Array, temperature: jax.Array,
                        heads: int, proj) -> jax.Array:
    """`proj(channel_attention(q, k, v, temperature, heads))` with the 1x1 projection `proj`
    merged into the attention matrix: M = B @ P per image, so the output is one
    pixels x C @ C x C matmul. Equal up to float rounding."""
    n, h, w, c = v.shape
    kernel = proj.kernel[...][0, 0].astype(jnp.float32)                # (C, Cout)
    mix = jnp.einsum("ncd,de->nce", channel_attention_matrix(q, k, temperature, heads),
                     kernel).astype(v.dtype)
    y = jnp.einsum("nsc,nce->nse", v.reshape(n, h * w, c), mix)
    if proj.bias is not None:
        y = y + proj.bias[...].astype(y.dtype)
    return y.reshape(n, h, w, -1)


def conv_part(conv: Conv2d, x: jax.Array, out: slice | None = None, inp: slice | None = None,
              bias: bool = True) -> jax.Array:
    """`conv` restricted to output channels `out` and (dense convs) input channels `inp`.

    Used to compute the pieces of a conv's output that are split apart anyway (q, k, v), or
    a conv of a concatenation as a sum of convs of its parts, without materialising the
    concatenation or the split copies. Same products, summed in a different order: equal
    up to float rounding. `bias=False` leaves the bias out (for all but one part of a sum).
    """
    k = conv.kernel[...]
    b = conv.bias[...] if (bias and conv.bias is not None) else None
    if out is not None:
        k = k[..., out]
        b = None if b is None else b[out]
    k = k.astype(x.dtype)
    if conv.groups > 1:  # depthwise: x is already the matching channel range
        if k.shape[2] != 1 or inp is not None:
            raise ValueError("conv_part supports dense and depthwise convs only")
        y = depthwise_valid(conv._pad(x), k[:, :, 0, :], conv.dilation)
    else:
        if inp is not None:
            k = k[:, :, inp, :]
        if k.shape[:2] == (1, 1):
            y = jnp.einsum("nhwc,cd->nhwd", x, k[0, 0])
        else:  # inference only: XLA's own conv, padding inside it (no padded copy of x)
            zeros = conv.pad_mode == "zeros"
            p = conv.padding if zeros else 0
            y = jax.lax.conv_general_dilated(
                x if zeros else conv._pad(x), k, (1, 1), ((p, p), (p, p)),
                rhs_dilation=(conv.dilation,) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if b is None else y + b.astype(y.dtype)


class _Conv2dInference(Conv2d):
    """Conv2d through `conv_part`: dense convs pad inside XLA's convolution (training keeps
    `layers.conv_valid`, whose hand-written backward wants the padded input)."""

    def __call__(self, x):
        return conv_part(self, x)


def _thirds(c: int) -> list[slice]:
    return [slice(i * c, (i + 1) * c) for i in range(3)]


# Inference variants: same attributes and parameters (they are the model's own instances,
# re-typed by `inference_types`), only __call__ differs.
class _MDTAInference(MDTA):
    """q, k and v each through their own slice of the 1x1 and depthwise convs: no 3C tensor
    and no split copies."""

    def __call__(self, x):
        q, k, v = (conv_part(self.qkv_dw, conv_part(self.qkv, x, out=s), out=s)
                   for s in _thirds(x.shape[-1]))
        return attention_projected(q, k, v, self.temperature[...], self.heads, self.project_out)


class _DenseAttentionInference(DenseAttention):
    def __call__(self, x):
        c = x.shape[-1]
        if self.qkv_folded is not None:
            q, k, v = (conv_part(self.qkv_folded, x, out=s) for s in _thirds(c))
        else:
            q, k, v = jnp.split(self.qkv2(self.qkv1(x)), 3, axis=-1)
        return attention_projected(q, k, v, self.scale[...], self.heads, self.proj)


class _CrossAttentionInference(CrossAttention):
    def __call__(self, guide, other):
        c = guide.shape[-1]
        q = self.q_dw(self.q(guide))
        k, v = (conv_part(self.kv_dw, conv_part(self.kv, other, out=s), out=s)
                for s in _thirds(c)[:2])
        return attention_projected(q, k, v, self.temperature[...], self.heads, self.project_out)


class _GRDBInference(GRDB):
    """GRDB with its dense-block convs of concatenations written as sums over the parts."""

    def __call__(self, x):
        c = x.shape[-1]
        x = leaky_relu(self.conv(x), 0.2)
        y1 = leaky_relu(self.dense1(x), 0.2)
        y2 = leaky_relu(conv_part(self.dense2, x, None, slice(0, c))
                        + conv_part(self.dense2, y1, None, slice(c, 2 * c), bias=False), 0.2)
        down = (conv_part(self.convdown, x, None, slice(0, c))
                + conv_part(self.convdown, y1, None, slice(c, 2 * c), bias=False)
                + conv_part(self.convdown, y2, None, slice(2 * c, 3 * c), bias=False))
        return leaky_relu(down + self.convup(self.sobel(x)), 0.1)


class _SMFNetInference(SMFNet):
    """SMFNet's fusion path (`phase2(...)["fused"]`), ordered for a small working set.

    The same arithmetic as `SMFNet.phase2`, but the shared encoder runs the two
    modalities one after the other (lax.scan: one compiled copy, half the working set)
    and keeps only what fusion needs: the running sums base_vi + base_ir and
    detail_vi + detail_ir, and both level-1 features. An optimization barrier orders the
    fusion layers before the graph module. The sums equal the reference's bit for bit
    (0 + a + b == b + a). The `phase1`/`phase2` methods are inherited unchanged.
    """

    def __call__(self, vi, ir):
        encoder = self.encoder

        def encode(sums, x):
            base, detail, _, level1 = encoder(x)
            return (sums[0] + base, sums[1] + detail), level1

        dim = encoder.patch_embed.kernel[...].shape[3]
        zeros = jnp.zeros(vi.shape[:3] + (dim,), vi.dtype)
        (base, detail), level1 = jax.lax.scan(encode, (zeros, zeros), jnp.stack([vi, ir]))
        fused = self.detail_fuse(detail) + self.base_fuse(base)
        fused, level1 = jax.lax.optimization_barrier((fused, level1))
        g, _, _ = self.graph(level1[0], level1[1])
        logits, _ = self.decoder(fused + g)
        return jax.nn.sigmoid(logits)


def _conv_bn_relu_of_concat(block: ConvBNReLU, parts: list) -> jax.Array:
    """`block(concatenate(parts, -1))` as a sum of per-part convolutions: no concatenated copy."""
    y, start = None, 0
    for part in parts:
        c = part.shape[-1]
        t = conv_part(block.conv, part, None, slice(start, start + c), bias=y is None)
        y = t if y is None else y + t
        start += c
    return jax.nn.relu(block.bn(y))


class _GRInference(GR):
    """GR with the ir graph finished (down to its 3x3 concat conv) before the vi graph
    starts, so only one modality's graph temporaries are alive at a time."""

    def __call__(self, vi, ir):
        r = self.reasoning
        nodes_ir, nodes_vi = r.nodes(ir, vi)
        for _ in range(r.n_iter):
            nodes_ir = r.graph_ir(nodes_ir)
        f_ir = _conv_bn_relu_of_concat(self.concat_ir, nodes_ir)
        f_ir, nodes_vi = jax.lax.optimization_barrier((f_ir, nodes_vi))
        for _ in range(r.n_iter):
            nodes_vi = r.graph_vi(nodes_vi)
        f_vi = _conv_bn_relu_of_concat(self.concat_vi, nodes_vi)
        return self.fuse(jnp.concatenate([f_ir, f_vi], axis=-1)), f_ir, f_vi


_INFERENCE_TYPES = {MDTA: _MDTAInference, DenseAttention: _DenseAttentionInference,
                    CrossAttention: _CrossAttentionInference, GR: _GRInference,
                    GRDB: _GRDBInference, Conv2d: _Conv2dInference,
                    SMFNet: _SMFNetInference}


def inference_types(model: nnx.Module) -> int:
    """Re-type modules of `model` (in place) to their inference variants (_INFERENCE_TYPES).

    Each variant is a subclass with the same attributes and parameters and an __call__
    that computes the same function faster or in less memory (attention through
    `attention_projected`, the graph without concatenated copies, the encoder pair in
    sequence). NNX records the subclass in the graph, so split/merge/jit keep it.
    Returns how many modules were re-typed.
    """
    n = 0
    for _, module in nnx.iter_modules(model):
        fast = _INFERENCE_TYPES.get(type(module))
        if fast is not None:
            module.__class__ = fast
            n += 1
    return n


def fold_for_inference(model: SMFNet) -> SMFNet:
    """A copy of `model` with every exact inference-time simplification applied.

    - TransformerBase attention: `qkv2(qkv1(x))` (1x1 64->192, then dense 3x3 192->192,
      both bias-free, zero padding) becomes one 3x3 64->192 conv. This removes about 40%
      of the model's FLOPs and the 192-channel intermediate of the 1x1 conv.
    - q, k and v from their own kernel slices; convs of concatenations (GRDB, the graph's
      concat convs) as sums over the parts; dense convs padded inside XLA's convolution
      (`conv_part`). The graph's grouped 1x1 conv and ConvGRU are concatenation-free in the
      model itself (`model.GraphModel`, `model.ConvGRUCell`).
    - Channel attention without transposes, its L2 normalisation moved onto the small
      logits matrix and its output projection merged into the attention matrix
      (`attention_projected`).
    - Memory: the two encoder passes run in sequence, the graph module avoids its
      concatenated copies and finishes one modality before the other (`_SMFNetInference`,
      `_GRInference`).

    The copy is put in eval mode (BatchNorm running statistics); `model` is left unchanged.
    The folded copy is for inference only: do not train or save it (its state carries the
    extra folded kernels).
    """
    folded = nnx.clone(model)
    folded.eval()
    n = 0
    for _, module in nnx.iter_modules(folded):
        if isinstance(module, DenseAttention) and module.qkv_folded is None:
            _fold_attention(module)
            n += 1
    if n == 0:
        raise ValueError("fold_for_inference: no unfolded DenseAttention found in the model")
    inference_types(folded)
    return folded


# --------------------------------------------------------------------------- compilation cache
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "smfnet_jax" / "xla"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache so a new process does not recompile.

    Location: `path` if given, else $SMFNET_JAX_CACHE, else ~/.cache/smfnet_jax/xla
    ($XDG_CACHE_HOME respected). SMFNET_JAX_CACHE=off (or 0, none, false, empty) disables it.
    Returns the directory in use, or None when disabled. Call it before the first compile;
    calling it again with another directory switches to that one.
    """
    if path is None:
        env = os.environ.get(CACHE_ENV)
        if env is not None and env.strip().lower() in _CACHE_OFF:
            return None
        path = env or default_cache_dir()
    path = Path(path).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # an unwritable cache must not stop inference
        import warnings
        warnings.warn(f"compilation cache disabled: cannot create {path}: {e}")
        return None
    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        from jax.experimental.compilation_cache import compilation_cache as cc
        cc.reset_cache()  # the cache is set up once per process; re-read the new directory
    # Every fusion program compiles in seconds; cache all of them (and skip tiny eager ops).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# --------------------------------------------------------------------------- XLA:CPU flags
CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def configure_xla_cpu() -> bool:
    """Add the XLA:CPU flags that fusion and training benefit from to $XLA_FLAGS; call before
    JAX starts.

    XLA's default CPU scheduler runs independent branches concurrently and keeps all their
    buffers alive together: at 480x640 the fusion needs ~3.3 GB of temporaries with it and
    ~1.6 GB without, at the same speed on a few cores; a training step at batch 2, 64x64
    3.44 GB with it and 1.93 GB without. The flag is only read when JAX
    creates its CPU backend (per-compile options do not reach it), so this returns False
    and changes nothing once a JAX computation has run. Flags already in $XLA_FLAGS win.
    """
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    return True


# --------------------------------------------------------------------------- tiling
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), consecutive tiles overlapping
    by at least `overlap`; the last tile is shifted to end exactly at the border."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_ramp(length: int, start: int, tile: int, overlap: int) -> np.ndarray:
    """1-D blending weight of one tile: a raised-cosine ramp over `overlap` pixels at each
    side that borders another tile, 1 elsewhere (and at image borders). Never zero, so
    every pixel has a positive total weight."""
    w = np.ones(tile, np.float64)
    if overlap > 0:
        t = (np.arange(overlap) + 0.5) / overlap
        ramp = 0.5 - 0.5 * np.cos(np.pi * t)  # smooth: zero slope at both ends
        if start > 0:
            w[:overlap] = ramp
        if start + tile < length:
            w[tile - overlap:] = np.minimum(w[tile - overlap:], ramp[::-1])
    return w


def fuse_tiled(fuser: Callable[[np.ndarray, np.ndarray], np.ndarray], ir: np.ndarray,
               vi: np.ndarray, tile: int | tuple[int, int] = 512, overlap: int = 32,
               progress: bool = False) -> np.ndarray:
    """Fuse an (ir, vi) pair of any size tile by tile; returns the HxW float32 fusion.

    `fuser(ir_tile, vi_tile) -> fused_tile` is any HxW -> HxW fuser (e.g. `load_fuser(...)`).
    Tiles are `tile` x `tile` (or (th, tw)) and overlap by at least `overlap` pixels; the
    last row/column of tiles is shifted to end at the border, so every tile has the same
    shape and the jitted fuser compiles once. Along an axis shorter than the tile, the tile
    spans the whole axis; an image no larger than one tile is fused whole, exactly as
    `fuser(ir, vi)`. Overlaps are blended with raised-cosine weights, so there are no seams.
    Memory: the fuser's working set for one tile plus three HxW arrays.
    """
    ir = np.asarray(ir, np.float32)
    vi = np.asarray(vi, np.float32)
    if ir.ndim != 2 or ir.shape != vi.shape:
        raise ValueError(f"expected two HxW arrays of one size, got {ir.shape} and {vi.shape}")
    th, tw = (tile, tile) if np.isscalar(tile) else tuple(tile)
    th, tw = int(th), int(tw)
    if th < 1 or tw < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    if overlap < 0 or overlap >= min(th, tw):
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap} for tile={tile}")
    h, w = ir.shape
    th, tw = min(th, h), min(tw, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(ys) == 1 and len(xs) == 1:
        return np.asarray(fuser(ir, vi), np.float32)

    wy = [blend_ramp(h, y, th, min(overlap, th)) for y in ys]
    wx = [blend_ramp(w, x, tw, min(overlap, tw)) for x in xs]
    # The tile grid is a product, so the total weight is separable: (sum_i wy_i) x (sum_j wx_j).
    norm_y, norm_x = np.zeros(h), np.zeros(w)
    for y, wgt in zip(ys, wy):
        norm_y[y:y + th] += wgt
    for x, wgt in zip(xs, wx):
        norm_x[x:x + tw] += wgt
    acc = np.zeros((h, w), np.float64)
    jobs = [(i, j) for i in range(len(ys)) for j in range(len(xs))]
    if progress:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc="tiles", unit="tile", leave=False)
    for i, j in jobs:
        y, x = ys[i], xs[j]
        out = np.asarray(fuser(ir[y:y + th, x:x + tw], vi[y:y + th, x:x + tw]), np.float64)
        if out.shape != (th, tw):
            raise ValueError(f"fuser returned shape {out.shape} for a {th}x{tw} tile")
        acc[y:y + th, x:x + tw] += out * wy[i][:, None] * wx[j][None, :]
    acc /= norm_y[:, None]
    acc /= norm_x[None, :]
    return acc.astype(np.float32)
