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
