"""SMFNet training objective as pure JAX functions.

Every function reproduces, value for value, what the PyTorch reference computes in its
``train.py`` / ``loss.py`` with kornia 0.2.0 (the version that repository pins). The
reference's quirks are kept on purpose, because the goal is loss parity; each one is noted
where it happens:

* ``cc()`` in the reference returns ``.item()``, so the decomposition terms change the loss
  value but carry no gradient. :func:`cc` reproduces that with ``stop_gradient`` unless
  ``differentiable=True`` (what the paper describes); the phase losses expose it as
  ``decomp_grad``.
* ``Seg_loss`` takes a softmax over the channel axis of a one-channel image, which is 1
  everywhere: the term is a constant of the network output (0 unless some label pixel is
  exactly 0) and has zero gradient. :func:`lovasz_softmax_seg_loss` implements the general
  C-channel Lovasz-softmax, so the constant falls out of the same code.
* Phase II adds ``cc_detail**2`` twice and computes a graph correlation it never uses.
* Gradients follow torch's conventions where JAX's differ: |x|' = sign(x) is 0 at x == 0
  (`smfnet_jax.layers.torch_abs`; flat regions give Sobel responses of exactly 0), and clamp
  passes the gradient on its boundaries.

Precision: kornia computes the SSIM variances as E[x^2] - E[x]^2, which cancels in float32
on real images (means ~0.5-1, local variances down to ~1e-6): its float32 SSIM map is ~1e-5
off, its loss value 1e-5 to 4e-5 (relative). Near an SSIM of 0 that error decides on which
side of the loss's clamp a pixel falls (gradient on or off), and each pixel on the wrong
side moves every weight's gradient by ~1e-3, which Adam turns into full-size steps: this was
the largest difference between our training and the float64 original's. Here the local
moments are two-pass with kornia's own window (`_local_moments`): the float64 evaluation is
kornia's float64 function (to 1e-16), and the float32 map is ~1e-7 from it. The other terms
agree with the reference to ~1e-7.

Layout: every image/feature tensor is NHWC, ``(N, H, W, C)``; the reference is NCHW. All
reductions that the reference does over the whole tensor (means, correlation, Gram MSE)
are layout independent, so the values match.

Computation is done in float32 (inputs of lower precision, e.g. bfloat16 activations, are
promoted) and every convolution / matmul passes ``precision`` (default ``"highest"``, so that
GPUs/TPUs do not silently drop to TF32/bf16 passes); the trainer passes its model policy's.
"""
from __future__ import annotations

from functools import partial
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from smfnet_jax import kernels
from smfnet_jax.layers import torch_abs
from smfnet_jax.policy import lax_precision

__all__ = [
    "ssim_loss",
    "sobel_gradient",
    "stage1_gradient_loss",
    "fusion_loss",
    "gram_matrix",
    "gram_mse_loss",
    "spatial_gradient",
    "spatial_gradient_l1_loss",
    "lovasz_softmax",
    "lovasz_softmax_seg_loss",
    "cc",
    "combine_phase1_terms",
    "combine_phase2_terms",
    "phase1_loss",
    "phase2_loss",
    "phase1_sample_terms",
    "phase1_batch_terms",
    "phase2_sample_terms",
    "phase2_batch_terms",
    "PHASE1_OUTPUT_KEYS",
    "PHASE2_OUTPUT_KEYS",
]

# Coefficients of the reference train.py.
COEFF_MSE_VF = 1.0      # weight of the visible reconstruction group
COEFF_MSE_IF = 1.0      # weight of the infrared reconstruction group
COEFF_DECOMP = 2.0      # weight of the decomposition (correlation) term, both phases
COEFF_TV = 5.0          # weight of the kornia SpatialGradient L1 term (phase I)
COEFF_SSIM = 8.0        # inside mse_loss_V / mse_loss_I
COEFF_STAGE1_GRAD = 10.0
COEFF_FUSION_GRAD = 10.0  # inside Fusionloss
DECOMP_OFFSET = 1.01

PHASE1_OUTPUT_KEYS = ("vi_hat", "ir_hat", "vi_base", "ir_base", "vi_detail", "ir_detail")
PHASE2_OUTPUT_KEYS = ("fused", "vi_base", "ir_base", "vi_detail", "ir_detail")

_F32_EPS = float(np.finfo(np.float32).eps)

# kornia 0.2.0 SSIM(11): a Gaussian window (sigma 1.5) whose values are float32, bit for bit
# the ones kornia computes: the 1-D taps exp(-x^2 / 4.5) in float32 (correctly rounded),
# divided by their float32 sum, and the 2-D window their float32 outer product (kornia's
# `get_gaussian_kernel2d`). The window is applied as it is, not separably: its 121 rounded
# values are not an exact outer product, and in float64 the reference computes with them.
# They sum to 1 - 6.8e-8, not 1, which `_local_moments` accounts for.
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 1.0) ** 2  # max_val = 1
_SSIM_C2 = (0.03 * 1.0) ** 2


def _kornia_gaussian_1d(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float32) - np.float32(size // 2)
    arg = (-(x * x)).astype(np.float32) / np.float32(2 * sigma ** 2)
    g = np.exp(arg.astype(np.float64)).astype(np.float32)
    return (g / np.float32(g.astype(np.float64).sum())).astype(np.float32)


_SSIM_TAPS_1D = _kornia_gaussian_1d(_SSIM_WINDOW, _SSIM_SIGMA)
_SSIM_KERNEL = (_SSIM_TAPS_1D[:, None] * _SSIM_TAPS_1D[None, :]).astype(np.float32)
_SSIM_KERNEL_DEFICIT = float(1.0 - _SSIM_KERNEL.astype(np.float64).sum())  # 1 - sum(window)

# loss.py Sobelxy: un-normalised Sobel, applied as cross-correlation (F.conv2d).
_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)
_SOBEL_Y_LOSSPY = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]], np.float32)
# kornia 0.2.0 SpatialGradient(): Sobel x and its transpose, each divided by its L1 norm (8).
_KORNIA_SOBEL = np.stack([_SOBEL_X, _SOBEL_X.T]) / np.float32(8.0)

ArrayLike = Union[jax.Array, np.ndarray]


# --------------------------------------------------------------------------- helpers
def _as_float(x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_nhwc(name: str, *arrays: jax.Array) -> None:
    for a in arrays:
        if a.ndim != 4:
            raise ValueError(f"smfnet_jax.losses.{name}: expected NHWC arrays of rank 4, "
                             f"got shape {tuple(a.shape)}")
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"smfnet_jax.losses.{name}: shapes differ: {sorted(shapes)}")


def _clamp(x: jax.Array, lo: float, hi: float) -> jax.Array:
    # torch.clamp passes the gradient where lo <= x <= hi (boundaries included);
    # jnp.clip would halve it at exact ties.
    return jnp.where(x < lo, lo, jnp.where(x > hi, hi, x)).astype(x.dtype)


def _depthwise_correlate(x_padded: jax.Array, taps: np.ndarray, precision: str) -> jax.Array:
    """Cross-correlate each channel of an already padded NHWC array with K 2-D kernels.

    Returns (N, H', W', C, K) with 'valid' output size.
    """
    k, kh, kw = taps.shape
    c = x_padded.shape[-1]
    # rhs (kh, kw, 1, C*K): output channel c*K + j is channel c filtered by kernel j.
    rhs = np.tile(np.transpose(taps, (1, 2, 0))[:, :, None, :], (1, 1, 1, c))
    out = kernels.conv_op(x_padded, jnp.asarray(rhs, x_padded.dtype), groups=c,
                          precision=lax_precision(precision))
    n, h, w, _ = out.shape
    return out.reshape(n, h, w, c, k)


# --------------------------------------------------------------------------- SSIM
def _windows(x_padded: jax.Array) -> jax.Array:
    """(N, H + 10, W + 10, C) -> (N, H, W, C, 121): every output pixel's 11x11 window, row-major."""
    k = _SSIM_WINDOW
    h, w = x_padded.shape[1] - k + 1, x_padded.shape[2] - k + 1
    return jnp.stack([x_padded[:, a:a + h, b:b + w] for a in range(k) for b in range(k)], axis=-1)


@partial(jax.checkpoint, static_argnums=(2,))  # the 121-tap windows are recomputed, never stored
def _local_moments(x_padded: jax.Array, y_padded: jax.Array, precision: str):
    """kornia's local statistics of two reflect-padded images: the windowed means mu_x, mu_y
    and var_x = E[x^2] - mu_x^2, var_y, cov = E[xy] - mu_x mu_y, E[.] the window-weighted sum.

    Computed as in exact arithmetic, not as E[x^2] - mu^2 in float32: that difference cancels
    (means ~0.5-1, local variances down to ~1e-6), which leaves the SSIM map with errors of
    ~1e-5, enough to put pixels whose SSIM is near 0 on the wrong side of the loss's clamp
    (a zero gradient for one, a full one for the other) and to move every weight's gradient
    by ~1e-3. Here each window is centred on its own mean first (two-pass), and
    sum(w (x - c)^2) + c^2 (1 - sum(w)), with c = mu_x, is exactly E[x^2] - mu_x^2 for the
    window w; the covariance likewise. c is held constant for differentiation: the
    expression does not depend on it, so the gradient is exact (2 w (x - mu_x) per tap).
    """
    hi = lax_precision(precision)
    kernel = jnp.asarray(_SSIM_KERNEL.reshape(-1), x_padded.dtype)
    wx, wy = _windows(x_padded), _windows(y_padded)
    mu_x = kernels.einsum("nhwct,t->nhwc", wx, kernel, precision=hi)
    mu_y = kernels.einsum("nhwct,t->nhwc", wy, kernel, precision=hi)
    cx, cy = lax.stop_gradient(mu_x), lax.stop_gradient(mu_y)
    dx, dy = wx - cx[..., None], wy - cy[..., None]
    var_x = kernels.einsum("nhwct,t->nhwc", dx * dx, kernel, precision=hi)
    var_y = kernels.einsum("nhwct,t->nhwc", dy * dy, kernel, precision=hi)
    cov = kernels.einsum("nhwct,t->nhwc", dx * dy, kernel, precision=hi)
    d = _SSIM_KERNEL_DEFICIT
    return mu_x, mu_y, var_x + d * cx * cx, var_y + d * cy * cy, cov + d * cx * cy


def ssim_loss(img1: ArrayLike, img2: ArrayLike, *, precision: str = "highest") -> jax.Array:
    """kornia 0.2.0 ``SSIM(11, reduction='mean')(img1, img2)`` for NHWC images.

    Per channel: kornia's 11x11 Gaussian window (sigma 1.5), reflect padding of 5 (so H, W >= 6),
    C1 = 0.01**2, C2 = 0.03**2 (max_val 1); loss map = clamp(1 - ssim, 0, 1) / 2, averaged
    over every element. The reference calls it as ``Loss_ssim(x, x_hat)``. The local
    statistics are computed without float32 cancellation (`_local_moments`), so this is
    closer to the float64 reference than kornia's own float32 value is.
    """
    x = _as_float(img1)
    y = _as_float(img2)
    _check_nhwc("ssim_loss", x, y)
    pad = _SSIM_WINDOW // 2
    if min(x.shape[1], x.shape[2]) <= pad:
        raise ValueError(f"smfnet_jax.losses.ssim_loss: H and W must exceed {pad} for reflect "
                         f"padding, got shape {tuple(x.shape)}")
    mu1, mu2, sigma1_sq, sigma2_sq, sigma12 = _local_moments(
        kernels.pad_hw(x, pad, "reflect"), kernels.pad_hw(y, pad, "reflect"), precision)
    mu1_mu2 = mu1 * mu2
    ssim_map = ((2.0 * mu1_mu2 + _SSIM_C1) * (2.0 * sigma12 + _SSIM_C2)) / (
        (mu1 * mu1 + mu2 * mu2 + _SSIM_C1) * (sigma1_sq + sigma2_sq + _SSIM_C2))
    return jnp.mean(_clamp(1.0 - ssim_map, 0.0, 1.0) / 2.0)


# --------------------------------------------------------------------------- Sobel (loss.py)
def sobel_gradient(x: ArrayLike, *, precision: str = "highest") -> jax.Array:
    """loss.py ``Sobelxy``: |Sobel_x * x| + |Sobel_y * x|, zero padding 1, un-normalised.

    NHWC in, same shape out. The reference only accepts one channel; here each channel is
    filtered on its own (identical for C = 1).
    """
    x = _as_float(x)
    _check_nhwc("sobel_gradient", x)
    g = _depthwise_correlate(kernels.pad_hw(x, 1, "zeros"), np.stack([_SOBEL_X, _SOBEL_Y_LOSSPY]),
                             precision)
    return torch_abs(g[..., 0]) + torch_abs(g[..., 1])


def _l1(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(torch_abs(a - b))


def stage1_gradient_loss(orig: ArrayLike, rec: ArrayLike, *, precision: str = "highest") -> jax.Array:
    """loss.py ``Fusion_loss_stage1``: L1 between Sobelxy of the first channels."""
    orig = _as_float(orig)
    rec = _as_float(rec)
    _check_nhwc("stage1_gradient_loss", orig, rec)
    return _l1(sobel_gradient(orig[..., :1], precision=precision),
               sobel_gradient(rec[..., :1], precision=precision))


def fusion_loss(vi: ArrayLike, ir: ArrayLike, fused: ArrayLike, *, precision: str = "highest"):
    """loss.py ``Fusionloss(image_vis, image_ir, generate_img)``.

    Returns ``(total, intensity, gradient)`` with intensity = L1(max(vi_y, ir), fused),
    gradient = L1(max(Sobelxy(vi_y), Sobelxy(ir)), Sobelxy(fused)),
    total = intensity + 10 * gradient; vi_y is the first channel of vi.
    """
    vi = _as_float(vi)
    ir = _as_float(ir)
    fused = _as_float(fused)
    vi_y = vi[..., :1]
    _check_nhwc("fusion_loss", vi_y, ir, fused)
    intensity = _l1(jnp.maximum(vi_y, ir), fused)
    joint_grad = jnp.maximum(sobel_gradient(vi_y, precision=precision),
                             sobel_gradient(ir, precision=precision))
    gradient = _l1(joint_grad, sobel_gradient(fused, precision=precision))
    return intensity + COEFF_FUSION_GRAD * gradient, intensity, gradient


# --------------------------------------------------------------------------- Gram
def gram_matrix(y: ArrayLike, *, precision: str = "highest") -> jax.Array:
    """loss.py ``gram_matrix`` for NHWC: (N, C, C) = F^T F / (C*H*W), F = (N, H*W, C)."""
    y = _as_float(y)
    _check_nhwc("gram_matrix", y)
    n, h, w, c = y.shape
    f = y.reshape(n, h * w, c)
    return kernels.einsum("npc,npd->ncd", f, f, precision=lax_precision(precision)) / (c * h * w)


def gram_mse_loss(a: ArrayLike, b: ArrayLike, *, precision: str = "highest") -> jax.Array:
    """``MSELoss(gram_matrix(a), gram_matrix(b))`` (mean over N*C*C)."""
    return jnp.mean(jnp.square(gram_matrix(a, precision=precision) - gram_matrix(b, precision=precision)))


# --------------------------------------------------------------------------- kornia SpatialGradient
def spatial_gradient(x: ArrayLike, *, precision: str = "highest") -> jax.Array:
    """kornia 0.2.0 ``SpatialGradient()`` (Sobel, order 1, normalised) for NHWC input.

    Replicate padding; returns (N, H, W, C, 2) with [..., 0] = d/dx (along W) and
    [..., 1] = d/dy (along H), each the Sobel kernel divided by 8 (kornia: (N, C, 2, H, W)).
    """
    x = _as_float(x)
    _check_nhwc("spatial_gradient", x)
    return _depthwise_correlate(kernels.pad_hw(x, 1, "edge"), _KORNIA_SOBEL, precision)


def spatial_gradient_l1_loss(a: ArrayLike, b: ArrayLike, *, precision: str = "highest") -> jax.Array:
    """``L1Loss(SpatialGradient()(a), SpatialGradient()(b))``."""
    return _l1(spatial_gradient(a, precision=precision), spatial_gradient(b, precision=precision))


# --------------------------------------------------------------------------- Lovasz-softmax
def _lovasz_grad(fg_sorted: jax.Array, valid_sorted: jax.Array) -> jax.Array:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors.

    Delta(S_i) = |S_i| / |fg u S_i| for the top-i set S_i; the result is its first difference.
    Invalid (ignored) pixels are sorted last and never enter the counts.
    """
    fg = fg_sorted * valid_sorted
    gts = jnp.sum(fg)
    intersection = gts - jnp.cumsum(fg)
    union = gts + jnp.cumsum((1.0 - fg_sorted) * valid_sorted)
    # union >= 1 on every valid position; guard the all-invalid tail against 0/0.
    jaccard = 1.0 - intersection / jnp.maximum(union, 1.0)
    return jnp.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(probas: ArrayLike, labels: ArrayLike,
                   classes: Union[str, Sequence[int]] = "present",
                   ignore=None, *, precision: str = "highest") -> jax.Array:
    """Multi-class Lovasz-softmax loss (Berman et al. 2018), batch-flattened.

    probas: (N, H, W, C) class probabilities; labels: (N, H, W) class ids (may be float,
    compared with ``==`` like the reference). ``classes``: 'present' (average over classes
    that occur in the labels; 0 if none), 'all', or a sequence of class ids. Pixels whose
    label equals ``ignore`` are dropped. Static-shape version: ignored pixels are masked and
    sorted last instead of being removed.
    """
    probas = _as_float(probas)
    labels = jnp.asarray(labels)
    if probas.ndim != 4 or labels.shape != probas.shape[:3]:
        raise ValueError("smfnet_jax.losses.lovasz_softmax: expected probas (N, H, W, C) and "
                         f"labels (N, H, W), got {tuple(probas.shape)} and {tuple(labels.shape)}")
    num_classes = probas.shape[-1]
    p = probas.reshape(-1, num_classes)
    lab = labels.reshape(-1)
    valid = jnp.ones(lab.shape, p.dtype) if ignore is None else (lab != ignore).astype(p.dtype)
    present_only = isinstance(classes, str) and classes == "present"
    if isinstance(classes, str):
        if classes not in ("present", "all"):
            raise ValueError(f"smfnet_jax.losses.lovasz_softmax: classes must be 'present', "
                             f"'all' or a list of ids, got {classes!r}")
        class_ids = list(range(num_classes))
    else:
        class_ids = [int(c) for c in classes]

    losses, weights = [], []
    for c in class_ids:
        fg = (lab == c).astype(p.dtype) * valid
        errors = torch_abs(fg - p[:, c]) * valid
        # descending sort of the valid errors; ignored pixels (key -1) go last
        perm = jnp.argsort(-jnp.where(valid > 0, errors, -1.0), stable=True)
        perm = lax.stop_gradient(perm)
        grad = lax.stop_gradient(_lovasz_grad(fg[perm], valid[perm]))
        losses.append(kernels.einsum("i,i->", errors[perm], grad, precision=lax_precision(precision)))
        if present_only:
            weights.append((jnp.sum(fg) > 0).astype(p.dtype))
        else:
            weights.append(jnp.asarray(1.0, p.dtype))
    if not losses:
        return jnp.zeros((), p.dtype)
    losses = jnp.stack(losses)
    weights = jnp.stack(weights)
    count = jnp.sum(weights)
    # The reference's mean() of an empty list is 0.
    return jnp.where(count > 0, jnp.sum(losses * weights) / jnp.maximum(count, 1.0), 0.0)


def lovasz_softmax_seg_loss(image: ArrayLike, label: ArrayLike, *, precision: str = "highest") -> jax.Array:
    """loss.py ``Seg_loss(image, label)``: Lovasz-softmax of softmax(image over channels)
    against ``label[..., 0]`` used as class ids, classes='present'.

    In the reference it is called as ``Seg_loss(vi_hat, vi)`` with one channel: the softmax
    is identically 1, so the value is (number of pixels of vi not exactly 0) / (number of
    pixels) when some pixel of vi is exactly 0, else 0, and its gradient is 0.
    """
    image = _as_float(image)
    label = jnp.asarray(label)
    if image.ndim != 4 or label.ndim != 4 or label.shape[-1] != 1 or \
            label.shape[:3] != image.shape[:3]:
        raise ValueError("smfnet_jax.losses.lovasz_softmax_seg_loss: expected image (N, H, W, C)"
                         f" and label (N, H, W, 1), got {tuple(image.shape)} and "
                         f"{tuple(label.shape)}")
    return lovasz_softmax(jax.nn.softmax(image, axis=-1), label[..., 0], classes="present",
                          precision=precision)


# --------------------------------------------------------------------------- correlation
def cc(a: ArrayLike, b: ArrayLike, *, differentiable: bool = False) -> jax.Array:
    """Correlation coefficient over the whole tensors (loss.py ``cc``), clamped to [-1, 1].

    cc = sum(a' b') / (eps + sqrt(sum a'^2) sqrt(sum b'^2)), a' = a - mean(a), eps = float32
    machine epsilon. The reference returns ``.item()``, so by default the result is wrapped
    in ``stop_gradient``; ``differentiable=True`` keeps the gradient (the paper's intent).
    """
    a = _as_float(a)
    b = _as_float(b)
    if a.shape != b.shape:
        raise ValueError(f"smfnet_jax.losses.cc: shapes differ: {tuple(a.shape)} vs "
                         f"{tuple(b.shape)}")
    a = a - jnp.mean(a)
    b = b - jnp.mean(b)
    num = jnp.sum(a * b)
    den = _F32_EPS + jnp.sqrt(jnp.sum(a * a)) * jnp.sqrt(jnp.sum(b * b))
    value = _clamp(num / den, -1.0, 1.0)
    return value if differentiable else lax.stop_gradient(value)


# --------------------------------------------------------------------------- phase objectives
def combine_phase1_terms(terms: Mapping[str, jax.Array]) -> jax.Array:
    """Phase-I total from its raw terms (names as in reference_losses.json)."""
    mse_v = (COEFF_SSIM * terms["ssim_loss_vi"] + terms["seg_loss_vi"]
             + COEFF_STAGE1_GRAD * terms["stage1_grad_vi"])
    mse_i = (COEFF_SSIM * terms["ssim_loss_ir"] + terms["gram_mse_ir"]
             + COEFF_STAGE1_GRAD * terms["stage1_grad_ir"])
    return (COEFF_MSE_VF * mse_v + COEFF_MSE_IF * mse_i
            + COEFF_DECOMP * terms["decomp_phase1"]
            + COEFF_TV * terms["spatial_gradient_l1_vi"])


def combine_phase2_terms(terms: Mapping[str, jax.Array]) -> jax.Array:
    """Phase-II total from its raw terms (names as in reference_losses.json)."""
    return terms["fusion_total"] + COEFF_DECOMP * terms["decomp_phase2"]


def _get_outputs(outputs: Mapping[str, ArrayLike], keys, where: str):
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise KeyError(f"smfnet_jax.losses.{where}: outputs lack {missing}; "
                       f"expected keys {list(keys)}")
    return [outputs[k] for k in keys]


def phase1_sample_terms(outputs: Mapping[str, ArrayLike], vi: ArrayLike, ir: ArrayLike, *,
                        precision: str = "highest"):
    """Phase-I terms that are means over the batch of per-sample quantities.

    Over equal-sized micro-batches each is the average of the micro-batch values, which is
    what lets `train.step` accumulate gradients over micro-batches exactly.
    """
    vi_hat, ir_hat = _get_outputs(outputs, ("vi_hat", "ir_hat"), "phase1_sample_terms")
    vi = _as_float(vi)
    ir = _as_float(ir)
    return {
        "ssim_loss_vi": ssim_loss(vi, vi_hat, precision=precision),
        "stage1_grad_vi": stage1_gradient_loss(vi, vi_hat, precision=precision),
        "ssim_loss_ir": ssim_loss(ir, ir_hat, precision=precision),
        "gram_mse_ir": gram_mse_loss(ir, ir_hat, precision=precision),
        "stage1_grad_ir": stage1_gradient_loss(ir, ir_hat, precision=precision),
        "spatial_gradient_l1_vi": spatial_gradient_l1_loss(vi, vi_hat, precision=precision),
    }


def phase1_batch_terms(outputs: Mapping[str, ArrayLike], vi: ArrayLike, *,
                       decomp_grad: bool = False, precision: str = "highest"):
    """Phase-I terms of the whole batch: the correlations, the decomposition term and the
    Lovasz seg term (a sort over all pixels; a constant with zero gradient, see
    `lovasz_softmax_seg_loss`)."""
    vi_hat, vi_b, ir_b, vi_d, ir_d = _get_outputs(
        outputs, ("vi_hat", "vi_base", "ir_base", "vi_detail", "ir_detail"), "phase1_batch_terms")
    cc_b = cc(vi_b, ir_b, differentiable=decomp_grad)
    cc_d = cc(vi_d, ir_d, differentiable=decomp_grad)
    return {
        "cc_base": cc_b,
        "cc_detail": cc_d,
        "seg_loss_vi": lovasz_softmax_seg_loss(vi_hat, _as_float(vi), precision=precision),
        "decomp_phase1": cc_d ** 2 / (DECOMP_OFFSET + cc_b),
    }


def phase1_loss(outputs: Mapping[str, ArrayLike], vi: ArrayLike, ir: ArrayLike, *,
                decomp_grad: bool = False, precision: str = "highest"):
    """Phase-I objective of the reference train.py.

    outputs (all NHWC): ``vi_hat``, ``ir_hat`` (N, H, W, 1) reconstructions;
    ``vi_base``, ``ir_base``, ``vi_detail``, ``ir_detail`` encoder base/detail features.
    vi, ir: the (N, H, W, 1) inputs.

    total = [8 SSIM(vi, vi_hat) + Seg(vi_hat, vi) + 10 Sobel-L1(vi, vi_hat)]
          + [8 SSIM(ir, ir_hat) + GramMSE(ir, ir_hat) + 10 Sobel-L1(ir, ir_hat)]
          + 2 cc_detail**2 / (1.01 + cc_base) + 5 L1(SpatialGradient(vi), SpatialGradient(vi_hat))

    Returns ``(total, terms)``; terms hold the raw (uncoefficiented) pieces named as in
    reference_losses.json: cc_base, cc_detail, ssim_loss_vi, seg_loss_vi, stage1_grad_vi,
    ssim_loss_ir, gram_mse_ir, stage1_grad_ir, spatial_gradient_l1_vi,
    decomp_phase1 (= cc_detail**2 / (1.01 + cc_base), before the factor 2), total_phase1.
    ``decomp_grad=True`` lets the correlation terms carry gradients (the reference does not).
    ``precision``: of every conv and dot (the model's policy's; `smfnet_jax.policy`).
    """
    _get_outputs(outputs, PHASE1_OUTPUT_KEYS, "phase1_loss")
    terms = {**phase1_batch_terms(outputs, vi, decomp_grad=decomp_grad, precision=precision),
             **phase1_sample_terms(outputs, vi, ir, precision=precision)}
    total = combine_phase1_terms(terms)
    terms["total_phase1"] = total
    return total, terms


def phase2_sample_terms(outputs: Mapping[str, ArrayLike], vi: ArrayLike, ir: ArrayLike, *,
                        precision: str = "highest"):
    """Phase-II terms that are batch means of per-sample quantities (Fusionloss's parts)."""
    (fused,) = _get_outputs(outputs, ("fused",), "phase2_sample_terms")
    f_total, f_int, f_grad = fusion_loss(vi, ir, fused, precision=precision)
    return {"fusion_total": f_total, "fusion_intensity": f_int, "fusion_gradient": f_grad}


def phase2_batch_terms(outputs: Mapping[str, ArrayLike], *, decomp_grad: bool = False,
                       precision: str = "highest"):
    """Phase-II terms of the whole batch: the correlations and the decomposition term."""
    vi_b, ir_b, vi_d, ir_d = _get_outputs(
        outputs, ("vi_base", "ir_base", "vi_detail", "ir_detail"), "phase2_batch_terms")
    cc_b = cc(vi_b, ir_b, differentiable=decomp_grad)
    cc_d = cc(vi_d, ir_d, differentiable=decomp_grad)
    terms = {"cc_base": cc_b, "cc_detail": cc_d,
             "decomp_phase2": (cc_d ** 2 + cc_d ** 2) / (DECOMP_OFFSET + cc_b)}
    if "vi_graph" in outputs and "ir_graph" in outputs:
        terms["cc_graph"] = cc(outputs["ir_graph"], outputs["vi_graph"],
                               differentiable=decomp_grad)
    return terms


def phase2_loss(outputs: Mapping[str, ArrayLike], vi: ArrayLike, ir: ArrayLike, *,
                decomp_grad: bool = False, precision: str = "highest"):
    """Phase-II objective of the reference train.py.

    outputs (all NHWC): ``fused`` (N, H, W, 1); ``vi_base``, ``ir_base``, ``vi_detail``,
    ``ir_detail`` encoder features; optionally ``vi_graph`` and ``ir_graph`` (the graph
    module's per-modality outputs), whose correlation the reference computes but never uses:
    if given it is reported as ``cc_graph`` and does not enter the total.

    total = Fusionloss(vi, ir, fused)[0] + 2 (cc_detail**2 + cc_detail**2) / (1.01 + cc_base)
    (the reference adds cc_detail twice; kept for parity).

    Returns ``(total, terms)`` with cc_base, cc_detail, fusion_total, fusion_intensity,
    fusion_gradient, decomp_phase2 (= 2 cc_detail**2 / (1.01 + cc_base), before the factor 2
    of coeff_decomp), total_phase2 [, cc_graph].
    """
    _get_outputs(outputs, PHASE2_OUTPUT_KEYS, "phase2_loss")
    terms = {**phase2_batch_terms(outputs, decomp_grad=decomp_grad, precision=precision),
             **phase2_sample_terms(outputs, vi, ir, precision=precision)}
    total = combine_phase2_terms(terms)
    terms["total_phase2"] = total
    return total, terms
