"""Image-fusion quality metrics, as the fusion literature's evaluator computes them.

Every infrared-visible / medical fusion paper since CDDFuse (and SMFNet) reports the
numbers of CDDFuse's ``utils/Evaluator.py``. This module computes the same quantities
with the same definitions, vectorised with numpy (no scipy / scikit-image / scikit-learn):

========  ================================================================================
EN        entropy (bits) of the 256-bin histogram of ``round(F)``
SD        standard deviation of F (population, ``np.std``)
SF        spatial frequency ``sqrt(mean(dx^2) + mean(dy^2))`` of first differences
AG        average gradient ``mean(sqrt((Gx^2 + Gy^2) / 2))``, central differences inside,
          one-sided at the border (``np.gradient``)
MI        ``mi(F, A) + mi(F, B)``, sklearn's ``mutual_info_score`` (natural log, grey
          levels as labels)
SCD       sum of correlations of differences ``corr(A, F - B) + corr(B, F - A)``
VIF       the evaluator's ``VIFF``: pixel-domain VIF over 4 scales (Gaussian windows
          17/9/5/3, sigma = N/5, "valid" filtering, decimation by 2, sigma_n^2 = 2),
          ``vif(A, F) + vif(B, F)``
Qabf      Xydeas-Petrovic edge preservation with 3x3 Sobel, weights = gradient magnitudes
SSIM      ``ssim(F, A) + ssim(F, B)``, scikit-image defaults: 7x7 uniform window, sample
          covariance (49/48), K1 = 0.01, K2 = 0.03, border of 3 pixels excluded
MSE       ``(mse(F, A) + mse(F, B)) / 2``
CC        ``(corr(F, A) + corr(F, B)) / 2``
PSNR      ``10 log10(max(F)^2 / MSE)`` (peak = the fused image's own maximum)
========  ================================================================================

Inputs are 2-D arrays of grey levels 0..255 (any real dtype).
``A`` is the infrared (or first) source image, ``B`` the visible (or second), ``F`` the
fused image; read files with :func:`smfnet_jax.imageio.read_gray` to get exactly the
evaluator's cv2 GRAY conversion.

SSIM conventions: the evaluator calls scikit-image's ``structural_similarity`` on float
images. scikit-image <= 0.19 silently used ``data_range = 2`` for floats (the range of
[-1, 1]); that is what the CDDFuse tables report. SMFNet's ``metrics.py`` passes
``data_range = 255``, correct for 0..255 grey levels. :func:`evaluate_pair` takes
``ssim_range`` (default 255); ``ssim_range=2`` reproduces the CDDFuse numbers.

Quirks of the reference kept on purpose (they change the numbers):

* Qabf: where the two gradient magnitudes are equal the strength ratio is set to the
  fused magnitude itself, not to 1 (``GAF[gA == gF] = gF``); edge orientation is
  ``arctan(Sy / Sx)`` with ``pi / 2`` where ``Sx == 0`` (also for flat pixels); Sobel
  responses use zero padding at the border.
* VIF returns 1.0 for a scale pyramid whose denominator is 0 (a constant source image),
  because the reference maps the resulting NaN to 1.
* PSNR uses ``max(F)`` as the peak, not 255, and the *average* of the two MSEs.
* MI is in nats (natural log), not bits, while EN is in bits.

Undefined values are returned as the reference returns them (NaN or +-inf), never replaced:
CC and SCD are NaN when an image they correlate has zero variance (a constant image, or
F = source + constant for SCD); PSNR is +inf when F equals both sources (MSE 0) and -inf
(NaN) when F is all black; Qabf is NaN when neither source has any Sobel gradient.
:func:`undefined_reasons` says, for each such value, why.

Differences from the reference, all far below the 4 digits papers print. The reference
computes on float32 images (``cv2.imread(...).astype('float32')``); this module computes
in float64, except Qabf (float32, like the reference) and SSIM's window sums (float32,
where integer grey levels make them exact). Gaussian filtering uses FFTs, and sums of
logarithms are taken as logarithms of products. On the TNO fixtures every metric agrees
within 2e-7 relative, except SSIM with ``data_range=2`` at 2e-5: its tiny constants
make it sensitive to the reference's own float32 rounding. EN clips values to 0..255
before counting (the reference's uint8 cast of out-of-range values is undefined).

Speed: about 10-20x faster than the reference evaluator (scipy ``convolve2d``,
scikit-image, scikit-learn) on the TNO pairs; see ``python -m infer.bench_metrics``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Tuple

import numpy as np

__all__ = [
    "METRIC_NAMES",
    "MIN_IMAGE_SIDE",
    "entropy",
    "standard_deviation",
    "spatial_frequency",
    "average_gradient",
    "mutual_information",
    "sum_of_correlation_differences",
    "visual_information_fidelity",
    "qabf",
    "ssim",
    "mse",
    "correlation_coefficient",
    "psnr",
    "evaluate_pair",
    "undefined_reasons",
]

# Column order of the papers' tables (and of the JSON written by infer.evaluate).
METRIC_NAMES: Tuple[str, ...] = (
    "EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "MSE", "CC", "PSNR")

# VIF's 4-scale pyramid ("valid" 17x17 window, then 3 decimations) needs 41 pixels a side
# for every scale to be non-empty; SSIM's window needs 7.
MIN_IMAGE_SIDE = 41

_VIF_SIGMA_NSQ = 2.0
_VIF_EPS = 1e-10
_SSIM_WIN = 7
_SSIM_K1, _SSIM_K2 = 0.01, 0.03

# Qabf constants (Xydeas & Petrovic), as in the reference.
_QABF_TG, _QABF_KG, _QABF_DG = 0.9994, -15.0, 0.5
_QABF_TA, _QABF_KA, _QABF_DA = 0.9879, -22.0, 0.8


# ----------------------------------------------------------------------------- inputs

def _as_image(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D grey image, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                 or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name}: expected real grey levels, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _as_triplet(image_f, image_a, image_b, min_side: int = 1):
    f = _as_image(image_f, "fused image")
    a = _as_image(image_a, "source image A")
    b = _as_image(image_b, "source image B")
    if not f.shape == a.shape == b.shape:
        raise ValueError(f"image shapes differ: fused {f.shape}, A {a.shape}, B {b.shape}")
    if min(f.shape) < min_side:
        raise ValueError(f"images of shape {f.shape} are too small: these metrics need at "
                         f"least {min_side} pixels on each side")
    return f, a, b


# ----------------------------------------------------------------------------- helpers

def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """Sum of x * y over all pixels in one pass.

    einsum's own loop, not BLAS: a multithreaded BLAS dot is slower on vectors of this
    size, and far slower on a busy machine.
    """
    return float(np.einsum("i,i->", x.ravel(), y.ravel()))


def _sum_log10_1p(t: np.ndarray) -> float:
    """sum(log10(1 + t)) for t >= 0, taking one log per block of products.

    log10 is the costliest operation in VIF; sum(log(x_i)) = log(prod(x_i)), and blocks
    are sized from max(t) so that the products cannot overflow. Overwrites t.
    """
    v = t.reshape(-1)
    if v.size == 0:
        return 0.0
    v += 1.0
    log_top = math.log10(float(v.max()))
    block = 1
    while block < 64 and 2 * block * log_top < 300.0:  # float64 max is 1.8e308
        block *= 2
    main = v.size - v.size % block
    total = 0.0
    if main:
        prods = np.prod(v[:main].reshape(block, -1), axis=0)
        total += float(np.log10(prods).sum())
    if main < v.size:
        total += float(np.log10(v[main:]).sum())
    return total


# Per-pixel chains run over horizontal strips of about this many pixels: their
# temporaries then stay in cache and are recycled by the allocator, instead of many
# image-sized arrays (which cost page faults on every call).
_STRIP_PIXELS = 1 << 15


def _strips(n_rows: int, n_cols: int):
    """(start, stop) row ranges covering n_rows, each about _STRIP_PIXELS pixels."""
    step = max(4, _STRIP_PIXELS // max(1, n_cols))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def _fast_fft_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (pocketfft is slow on sizes with large prime factors)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


class _ValidFilter:
    """'valid' 2-D filtering with separable symmetric kernels, through the FFT.

    Zero-padding the image to a fast FFT size and multiplying spectra gives a circular
    convolution; its outputs at index >= N - 1 only read pixels inside the image, and
    they are exactly the 'valid' outputs (``convolve2d(x, k, 'valid')``) for a symmetric
    kernel. One forward transform per image serves every kernel.
    """

    def __init__(self, shape: Tuple[int, int], kernels: Dict[str, np.ndarray]):
        self.shape = shape
        self.fft_shape = (_fast_fft_len(shape[0]), _fast_fft_len(shape[1]))
        hp, wp = self.fft_shape
        self.kernels = {}
        for name, k in kernels.items():
            k = np.asarray(k, np.float64)
            spectrum = np.fft.fft(k, hp)[:, None] * np.fft.rfft(k, wp)[None, :]
            self.kernels[name] = (len(k), spectrum)

    def __call__(self, image: np.ndarray, names: Iterable[str]) -> List[np.ndarray]:
        h, w = self.shape
        spectrum = np.fft.rfft2(image, s=self.fft_shape)
        out = []
        for name in names:
            n, k = self.kernels[name]
            full = np.fft.irfft2(spectrum * k, s=self.fft_shape)
            out.append(full[n - 1:h, n - 1:w])
        return out


def _vif_window(scale: int) -> np.ndarray:
    """1-D factor of the reference's MATLAB-style Gaussian window at a VIF scale (1..4).

    The 2-D window exp(-(x^2 + y^2) / (2 sd^2)) / sum is the outer product of this
    normalised 1-D Gaussian with itself; the reference's "zero values below eps * max"
    step never fires for these sizes (the corner value is >= 0.004 * max).
    """
    n = 2 ** (4 - scale + 1) + 1
    sd = n / 5.0
    x = np.arange(n) - (n - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sd * sd))
    return g / g.sum()


# ----------------------------------------------------------------------------- EN, SD, SF, AG

def _entropy_from_counts(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _grey_labels(img: np.ndarray):
    """img as uint8 when it holds integer grey levels 0..255 exactly, else None."""
    with np.errstate(invalid="ignore"):  # out-of-range casts are caught by the comparison
        lab = img.astype(np.uint8)
    return lab if np.array_equal(lab, img) else None


def _entropy(img: np.ndarray, grey=None) -> float:
    levels = grey if grey is not None else np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return _entropy_from_counts(np.bincount(levels.ravel(), minlength=256))


def entropy(image) -> float:
    """EN: Shannon entropy in bits of the 256-bin histogram of round(image)."""
    return _entropy(_as_image(image, "image"))


def standard_deviation(image) -> float:
    """SD: population standard deviation of the grey levels."""
    return float(np.std(_as_image(image, "image")))


def _spatial_frequency(img: np.ndarray) -> float:
    dx = img[:, 1:] - img[:, :-1]
    dy = img[1:, :] - img[:-1, :]
    return math.sqrt(_dot(dx, dx) / dx.size + _dot(dy, dy) / dy.size)


def spatial_frequency(image) -> float:
    """SF: sqrt(mean squared horizontal difference + mean squared vertical difference)."""
    return _spatial_frequency(_as_image(image, "image"))


def _gradient_axis(img: np.ndarray, axis: int) -> np.ndarray:
    """np.gradient along one axis: central differences / 2, one-sided at the ends."""
    x = np.moveaxis(img, axis, 0)
    g = np.empty_like(x)
    np.subtract(x[2:], x[:-2], out=g[1:-1])
    g[1:-1] *= 0.5
    g[0] = x[1] - x[0]
    g[-1] = x[-1] - x[-2]
    return np.moveaxis(g, 0, axis)


def _average_gradient(img: np.ndarray) -> float:
    if min(img.shape) < 2:
        raise ValueError(f"AG needs at least 2 pixels per side, got shape {img.shape}")
    gx = _gradient_axis(img, 1)
    gy = _gradient_axis(img, 0)
    gx *= gx
    gy *= gy
    gx += gy
    gx *= 0.5
    np.sqrt(gx, out=gx)
    return float(gx.mean())


def average_gradient(image) -> float:
    """AG: mean of sqrt((Gx^2 + Gy^2) / 2) with np.gradient-style differences."""
    return _average_gradient(_as_image(image, "image"))


# ----------------------------------------------------------------------------- MI

def _mi_from_joint_counts(c: np.ndarray) -> float:
    """sklearn.metrics.mutual_info_score from a contingency table (natural log)."""
    n = c.sum()
    pi = c.sum(axis=1)
    pj = c.sum(axis=0)
    rows, cols = np.nonzero(c)
    nz = c[rows, cols].astype(np.float64)
    outer = pi[rows].astype(np.float64) * pj[cols].astype(np.float64)
    terms = (nz / n) * (np.log(nz) + math.log(n) - np.log(outer))
    terms[np.abs(terms) < np.finfo(np.float64).eps] = 0.0  # as sklearn
    return max(float(terms.sum()), 0.0)


def _labels(x: np.ndarray, grey=None):
    """(labels 0..k-1, k) treating every distinct value as a class, as sklearn does.

    grey: x's :func:`_grey_labels` when already computed.
    """
    lab = grey if grey is not None else _grey_labels(x)
    if lab is not None:
        return lab.ravel(), 256
    uniq, inv = np.unique(x.ravel(), return_inverse=True)
    return inv.ravel().astype(np.intp), len(uniq)


def _joint_counts(lab_x: np.ndarray, kx: int, lab_y: np.ndarray, ky: int) -> np.ndarray:
    if kx == ky == 256:  # grey levels: a 16-bit joint index
        joint = lab_x.astype(np.uint16)
        joint <<= 8
        joint |= lab_y
        return np.bincount(joint, minlength=1 << 16).reshape(256, 256)
    if kx * ky <= (1 << 22):
        return np.bincount(lab_x.astype(np.intp) * ky + lab_y, minlength=kx * ky).reshape(kx, ky)
    # many distinct (float) values: count only the pairs that occur
    pairs, counts = np.unique(lab_x.astype(np.int64) * ky + lab_y, return_counts=True)
    _, ix = np.unique(pairs // ky, return_inverse=True)
    _, iy = np.unique(pairs % ky, return_inverse=True)
    table = np.zeros((ix.max() + 1, iy.max() + 1), np.int64)
    table[ix, iy] = counts
    return table


def _mutual_information(f, a, b, grey=(None, None, None)) -> float:
    """MI(F, A) + MI(F, B); grey: the images' :func:`_grey_labels` if already computed."""
    lf, kf = _labels(f, grey[0])
    total = 0.0
    for src, g in ((a, grey[1]), (b, grey[2])):
        ls, ks = _labels(src, g)
        total += _mi_from_joint_counts(_joint_counts(lf, kf, ls, ks))
    return total


def mutual_information(image_f, image_a, image_b) -> float:
    """MI: mutual_info_score(F, A) + mutual_info_score(F, B), in nats."""
    f, a, b = _as_triplet(image_f, image_a, image_b)
    return _mutual_information(f, a, b)


# ----------------------------------------------------------------------------- SCD, MSE, CC, PSNR

def _pixel_statistics(f, a, b) -> Dict[str, float]:
    """SCD, MSE, CC, PSNR from sums over centred images, accumulated strip by strip."""
    means = [float(x.mean()) for x in (f, a, b)]
    names = ("af", "bf", "aa", "bb", "ff", "a_dfb", "b_dfa", "dfb", "dfa", "mse_a", "mse_b")
    acc = dict.fromkeys(names, 0.0)
    for r0, r1 in _strips(*f.shape):
        fc, ac, bc = (x[r0:r1] - m for x, m in zip((f, a, b), means))
        d_fa = fc - ac  # (F - A) minus its mean
        d_fb = fc - bc
        for key, x, y in (("af", ac, fc), ("bf", bc, fc), ("aa", ac, ac), ("bb", bc, bc),
                          ("ff", fc, fc), ("a_dfb", ac, d_fb), ("b_dfa", bc, d_fa),
                          ("dfb", d_fb, d_fb), ("dfa", d_fa, d_fa)):
            acc[key] += _dot(x, y)
        d_fa = f[r0:r1] - a[r0:r1]
        d_fb = f[r0:r1] - b[r0:r1]
        acc["mse_a"] += _dot(d_fa, d_fa)
        acc["mse_b"] += _dot(d_fb, d_fb)

    def corr(xy, xx, yy):  # NaN when one image is constant (0 / 0), as the reference
        den = math.sqrt(acc[xx] * acc[yy])
        return acc[xy] / den if den > 0 else float("nan")

    n = f.size
    mse_val = (acc["mse_a"] / n + acc["mse_b"] / n) / 2.0
    scd = corr("a_dfb", "aa", "dfb") + corr("b_dfa", "bb", "dfa")
    cc = (corr("af", "aa", "ff") + corr("bf", "bb", "ff")) / 2.0
    peak = float(f.max())
    with np.errstate(divide="ignore", invalid="ignore"):
        psnr_val = float(10.0 * np.log10(np.float64(peak * peak) / np.float64(mse_val)))
    return {"SCD": scd, "MSE": mse_val, "CC": cc, "PSNR": psnr_val}


def sum_of_correlation_differences(image_f, image_a, image_b) -> float:
    """SCD: corr(A, F - B) + corr(B, F - A)."""
    return _pixel_statistics(*_as_triplet(image_f, image_a, image_b))["SCD"]


def mse(image_f, image_a, image_b) -> float:
    """MSE: mean of the mean squared errors of F against A and against B."""
    return _pixel_statistics(*_as_triplet(image_f, image_a, image_b))["MSE"]


def correlation_coefficient(image_f, image_a, image_b) -> float:
    """CC: mean of the Pearson correlations of F with A and with B."""
    return _pixel_statistics(*_as_triplet(image_f, image_a, image_b))["CC"]


def psnr(image_f, image_a, image_b) -> float:
    """PSNR: 10 log10(max(F)^2 / MSE), MSE as :func:`mse` (the reference's definition)."""
    return _pixel_statistics(*_as_triplet(image_f, image_a, image_b))["PSNR"]


# ----------------------------------------------------------------------------- VIF

def _vif_strip_sums(mu_r, mu_d, e_rr, e_rd, s2):
    """One strip of one scale of the reference's compare_viff: (numerator, denominator).

    s2 is the (clamped) local variance of the distorted image. Same masking as the
    reference: negative variances -> 0; gain g = 0 where sigma_ref^2 < eps,
    sigma_dist^2 < eps or g < 0 (those pixels add log10(1) = 0 to the numerator);
    residual variance floored at eps; sigma_ref^2 < eps -> 0 in the denominator.
    """
    eps = _VIF_EPS
    t = mu_r * mu_r
    s1 = e_rr - t
    np.maximum(s1, 0.0, out=s1)
    np.multiply(mu_r, mu_d, out=t)
    s12 = e_rd - t
    g = np.add(s1, eps, out=t)
    np.divide(s12, g, out=g)
    keep = s1 >= eps
    keep &= s2 >= eps
    keep &= g > 0
    g *= keep
    sv = np.multiply(g, s12, out=s12)
    np.subtract(s2, sv, out=sv)
    np.maximum(sv, eps, out=sv)
    sv += _VIF_SIGMA_NSQ
    g *= g
    g *= s1
    g /= sv
    num = _sum_log10_1p(g)
    s1[s1 < eps] = 0.0
    s1 *= 1.0 / _VIF_SIGMA_NSQ
    den = _sum_log10_1p(s1)
    return num, den


def _vif_ratio(num: float, den: float) -> float:
    # the reference returns 1.0 when num / den is NaN (0 / 0: a flat reference image)
    if den == 0.0:
        return 1.0 if num == 0.0 else math.copysign(math.inf, num)
    return num / den


def _vif_pyramid(f, a, b) -> float:
    """VIF(A, F) + VIF(B, F) over the reference's 4 scales.

    At each scale: Gaussian means mu = G * x and second moments G * (x y) ('valid', one
    FFT per image); the next scale's image is G' * x (the next window) decimated by 2.
    Sources are processed one after the other to keep few image-sized arrays alive.
    """
    num = [0.0, 0.0]
    den = [0.0, 0.0]
    refs = [a, b]
    for scale in range(1, 5):
        kernels = {"win": _vif_window(scale)}
        if scale < 4:
            kernels["down"] = _vif_window(scale + 1)
        filt = _ValidFilter(f.shape, kernels)
        outs = filt(f, kernels)
        mu_f = outs[0]
        next_f = np.ascontiguousarray(outs[1][::2, ::2]) if scale < 4 else None
        s2 = filt(f * f, ["win"])[0]
        for r0, r1 in _strips(*s2.shape):  # local variance of F, clamped at 0
            part = s2[r0:r1]
            part -= mu_f[r0:r1] * mu_f[r0:r1]
            np.maximum(part, 0.0, out=part)
        for i, ref in enumerate(refs):
            outs = filt(ref, kernels)
            mu_r = outs[0]
            if scale < 4:
                refs[i] = np.ascontiguousarray(outs[1][::2, ::2])
            e_rr = filt(ref * ref, ["win"])[0]
            e_rf = filt(ref * f, ["win"])[0]
            for r0, r1 in _strips(*mu_r.shape):
                n_, d_ = _vif_strip_sums(mu_r[r0:r1], mu_f[r0:r1], e_rr[r0:r1],
                                         e_rf[r0:r1], s2[r0:r1])
                num[i] += n_
                den[i] += d_
            del outs, mu_r, e_rr, e_rf
        f = next_f
    return _vif_ratio(num[0], den[0]) + _vif_ratio(num[1], den[1])


def visual_information_fidelity(image_f, image_a, image_b) -> float:
    """VIF: the evaluator's VIFF, vif(A, F) + vif(B, F) (pixel-domain, 4 scales)."""
    f, a, b = _as_triplet(image_f, image_a, image_b, MIN_IMAGE_SIDE)
    return _vif_pyramid(f, a, b)


# ----------------------------------------------------------------------------- SSIM

def _ssim_sum_from_box_sums(sx, sy, sxx, syy, sxy, data_range: float) -> float:
    """Sum of the SSIM map over a block, from 7x7 window sums (scikit-image defaults)."""
    npix = float(_SSIM_WIN * _SSIM_WIN)
    cov_norm = npix / (npix - 1.0)  # sample covariance, scikit-image's default
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ux = np.divide(sx, npix, dtype=np.float64)  # window sums may be float32 (exact)
    uy = np.divide(sy, npix, dtype=np.float64)
    uxuy = ux * uy
    ux *= ux
    uy *= uy
    # S = (2 ux uy + C1)(2 vxy + C2) / ((ux^2 + uy^2 + C1)(vx + vy + C2)),
    # vx = cov_norm (uxx - ux^2), vy likewise, vxy = cov_norm (uxy - ux uy)
    b1 = np.add(ux, uy, out=ux)
    b2 = np.add(sxx, syy, dtype=np.float64)
    b2 *= cov_norm / npix
    b2 -= cov_norm * b1
    b2 += c2
    b1 += c1
    a2 = np.multiply(sxy, 2.0 * cov_norm / npix, dtype=np.float64)
    a2 -= (2.0 * cov_norm) * uxuy
    a2 += c2
    a1 = uxuy
    a1 *= 2.0
    a1 += c1
    a1 *= a2
    b1 *= b2
    a1 /= b1
    return float(a1.sum())


def _box_sums(m: np.ndarray) -> np.ndarray:
    """Sums over every 7x7 window ('valid'), by doubling: 4 adds per axis."""
    v = m[1:] + m[:-1]        # rows i..i+1
    v = v[2:] + v[:-2]        # rows i..i+3
    v = v[3:] + v[:-3]        # rows i..i+3 and i+3..i+6
    v -= m[3:-3]              # row i+3 was counted twice
    h = v[:, 1:] + v[:, :-1]
    h = h[:, 2:] + h[:, :-2]
    h = h[:, 3:] + h[:, :-3]
    h -= v[:, 3:-3]
    return h


def _ssim_pair(f, a, b, data_range: float, exact_float32: bool) -> float:
    """ssim(F, A) + ssim(F, B): mean SSIM over the pixels at least 3 from the border.

    exact_float32: the images hold integer grey levels 0..255, so every product and 7x7
    sum (< 49 * 255^2 < 2^24) is an integer that float32 represents exactly; the window
    sums are then computed in float32, twice as fast, with no rounding at all.
    """
    dt = np.float32 if exact_float32 else np.float64
    f, a, b = (x.astype(dt, copy=False) for x in (f, a, b))
    halo = _SSIM_WIN - 1
    n_out = f.shape[0] - halo
    totals = [0.0, 0.0]
    for r0, r1 in _strips(n_out, f.shape[1]):
        fs = f[r0:r1 + halo]
        box_f, box_ff = _box_sums(fs), _box_sums(fs * fs)
        for i, src in enumerate((a, b)):
            ss = src[r0:r1 + halo]
            totals[i] += _ssim_sum_from_box_sums(box_f, _box_sums(ss), box_ff,
                                                 _box_sums(ss * ss), _box_sums(ss * fs), data_range)
    count = n_out * (f.shape[1] - halo)
    return totals[0] / count + totals[1] / count


def _check_data_range(data_range) -> float:
    r = float(data_range)
    if not (r > 0 and math.isfinite(r)):
        raise ValueError(f"SSIM data range must be a positive number, got {data_range!r}")
    return r


def ssim(image_f, image_a, image_b, data_range: float = 255.0) -> float:
    """SSIM: ssim(F, A) + ssim(F, B) with scikit-image's defaults and ``data_range``.

    ``data_range=255`` is right for 0..255 grey levels (SMFNet's metrics.py);
    ``data_range=2`` is what scikit-image <= 0.19 used for float images and what the
    CDDFuse tables report.
    """
    r = _check_data_range(data_range)
    f, a, b = _as_triplet(image_f, image_a, image_b, _SSIM_WIN)
    exact = all(_grey_labels(x) is not None for x in (f, a, b))
    return _ssim_pair(f, a, b, r, exact)


# ----------------------------------------------------------------------------- Qabf

def _sobel_padded(p: np.ndarray):
    """The reference's convolve2d(img, h, 'same') Sobel responses, from img zero-padded by 1.

    Sx = [1,2,1]-smoothed column j-1 minus column j+1; Sy = [1,2,1]-smoothed row i+1
    minus row i-1 (the kernels are flipped by the true convolution).
    """
    v = p[:-2] + p[2:]
    v += 2 * p[1:-1]
    sx = v[:, :-2] - v[:, 2:]
    h = p[:, :-2] + p[:, 2:]
    h += 2 * p[:, 1:-1]
    sy = h[2:] - h[:-2]
    return sx, sy


def _edge_maps(padded: np.ndarray):
    """Gradient magnitude and a direction vector whose angle is the reference's aA.

    The reference's angle is arctan(Sy / Sx) in (-pi/2, pi/2), or pi/2 where Sx == 0:
    the angle of (|Sx|, Sy * sign(Sx)), with (0, 1) where Sx == 0.
    """
    sx, sy = _sobel_padded(padded)
    # sqrt(Sx^2 + Sy^2) as the reference (not hypot): equal sums give equal magnitudes
    mag = sx * sx
    mag += sy * sy
    np.sqrt(mag, out=mag)
    np.negative(sy, out=sy, where=sx < 0)
    np.abs(sx, out=sx)
    sy[sx == 0] = 1
    return mag, sx, sy


def _edge_preservation(g_src, x_src, y_src, g_f, x_f, y_f) -> np.ndarray:
    """The reference's Qabf_getQabf: per-pixel Q^{XF} = Qg * Qa (float32)."""
    # strength: min/max ratio, but gF itself where both are equal (reference quirk)
    with np.errstate(divide="ignore", invalid="ignore"):
        gaf = np.minimum(g_src, g_f)
        gaf /= np.maximum(g_src, g_f)
    equal = g_src == g_f
    gaf[equal] = g_f[equal]
    # |angle_src - angle_f| from the direction vectors: |d| = atan(|cross| / |dot|) where
    # dot >= 0 and pi minus that elsewhere (one arctan per pair instead of one per image;
    # cross and dot of integer Sobel responses are exact in float32)
    dot = x_src * x_f
    dot += y_src * y_f
    cross = y_src * x_f
    cross -= x_src * y_f
    np.abs(cross, out=cross)
    back = dot < 0
    np.abs(dot, out=dot)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross /= dot  # dot == 0 gives inf: atan = pi/2 (both vectors are never zero)
    d = np.arctan(cross.astype(np.float64))  # float64 arctan is the faster one in numpy
    np.subtract(math.pi, d, out=d, where=back)
    # Q = Tg / (1 + exp(kg (GAF - Dg))) * Ta / (1 + exp(ka (AAF - Da))), AAF = 1 - |d| / (pi/2)
    d *= -_QABF_KA * 2.0 / math.pi
    d += _QABF_KA * (1.0 - _QABF_DA)
    gaf -= np.float32(_QABF_DG)
    gaf *= np.float32(_QABF_KG)
    e_g = np.exp(gaf, out=gaf)
    e_a = np.exp(d.astype(np.float32))
    e_g += 1
    e_a += 1
    e_g *= e_a
    q = np.reciprocal(e_g, out=e_g)
    q *= np.float32(_QABF_TG * _QABF_TA)
    return q


def _qabf(f, a, b) -> float:
    """Qabf in float32, as the reference computes it (its images are float32).

    Sobel responses of integer grey levels are exact in float32; float32 roughly
    halves the memory traffic of this long chain of per-pixel operations.
    """
    pf, pa, pb = (np.pad(x.astype(np.float32), 1) for x in (f, a, b))
    num = den = 0.0
    for r0, r1 in _strips(f.shape[0], f.shape[1]):
        gf, xf, yf = _edge_maps(pf[r0:r1 + 2])
        for p in (pa, pb):
            g, x, y = _edge_maps(p[r0:r1 + 2])
            q = _edge_preservation(g, x, y, gf, xf, yf)
            num += float(np.einsum("ij,ij->", q, g, dtype=np.float64))
            den += float(g.sum(dtype=np.float64))
    return num / den if den != 0 else float("nan")


def qabf(image_f, image_a, image_b) -> float:
    """Qabf: gradient-weighted edge preservation of A and B in F (Xydeas-Petrovic)."""
    return _qabf(*_as_triplet(image_f, image_a, image_b, 3))


# ----------------------------------------------------------------------------- all at once

def evaluate_pair(fused, image_a, image_b, ssim_range: float = 255.0) -> Dict[str, float]:
    """All twelve metrics of a fused image F against its sources A (ir) and B (vi).

    Returns ``{name: float}`` in :data:`METRIC_NAMES` order. Inputs are grey levels
    0..255 (2-D, same shape, at least :data:`MIN_IMAGE_SIDE` pixels a side); ssim_range
    is the SSIM data range (255, or 2 for the CDDFuse tables' convention).
    """
    r = _check_data_range(ssim_range)
    f, a, b = _as_triplet(fused, image_a, image_b, MIN_IMAGE_SIDE)
    grey = tuple(_grey_labels(x) for x in (f, a, b))
    integer = all(g is not None for g in grey)
    mi = _mutual_information(f, a, b, grey)
    en = _entropy(f, grey[0])
    del grey
    stats = _pixel_statistics(f, a, b)
    out = {
        "EN": en,
        "SD": float(np.std(f)),
        "SF": _spatial_frequency(f),
        "AG": _average_gradient(f),
        "MI": mi,
        "SCD": stats["SCD"],
        "VIF": _vif_pyramid(f, a, b),
        "Qabf": _qabf(f, a, b),
        "SSIM": _ssim_pair(f, a, b, r, exact_float32=integer),
        "MSE": stats["MSE"],
        "CC": stats["CC"],
        "PSNR": stats["PSNR"],
    }
    return {name: float(out[name]) for name in METRIC_NAMES}


def undefined_reasons(values: Dict[str, float], fused, image_a, image_b,
                      names: Tuple[str, str, str] = ("the fused image", "source A",
                                                     "source B")) -> Dict[str, str]:
    """Why each non-finite value of ``values`` (from :func:`evaluate_pair`) is undefined.

    Returns ``{metric: reason}`` for the NaN / infinite entries only (empty when all are
    finite; the images are then not even looked at). ``names`` name F, A and B in the reasons.
    """
    bad = [k for k in METRIC_NAMES if k in values and not math.isfinite(values[k])]
    if not bad:
        return {}
    f, a, b = _as_triplet(fused, image_a, image_b)
    nf, na, nb = names

    def constant(x: np.ndarray) -> bool:
        return float(x.max()) == float(x.min())

    def zero_variance(parts) -> str:
        flat = [what for what, x in parts if constant(x)]
        if not flat:  # numerically zero without being exactly constant
            return "zero variance in one of " + ", ".join(w for w, _ in parts) + " (0/0)"
        return (f"zero variance: {' and '.join(flat)} {'is' if len(flat) == 1 else 'are'} "
                "constant, so a correlation is 0/0")

    peak_zero = float(f.max()) == 0.0
    reasons = {}
    for k in bad:
        v = values[k]
        if k == "CC":
            reasons[k] = zero_variance([(nf, f), (na, a), (nb, b)])
        elif k == "SCD":
            reasons[k] = zero_variance([(na, a), (nb, b), (f"{nf} minus {nb}", f - b),
                                        (f"{nf} minus {na}", f - a)])
        elif k == "PSNR" and peak_zero:
            reasons[k] = f"{nf} is all black: the peak max(F) is 0" + (
                " and so is the MSE (0/0)" if math.isnan(v) else "")
        elif k == "PSNR" and v > 0:
            reasons[k] = f"MSE is 0 ({nf} equals both sources): PSNR is infinite"
        elif k == "Qabf":
            reasons[k] = f"no edges: {na} and {nb} have zero Sobel gradient everywhere (0/0)"
        elif k == "VIF":
            reasons[k] = "a source is flat at every scale (the VIF denominator is 0)"
        else:
            reasons[k] = f"not a finite number ({v})"
    return reasons
