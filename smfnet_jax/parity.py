"""The PyTorch reference's parity fixture: which of its arrays is which of our outputs.

`fixtures/parity/reference.npz` holds the reference's inputs (`vi`, `ir`, NCHW) and its
eval-mode outputs and intermediates for the fixture checkpoint; `REFERENCE_PHASE2` /
`REFERENCE_PHASE1` map its names to the keys of `SMFNet.phase2` / `phase1`. The tests and
`python -m infer.device_check` compare with the same error measure, `relative_error`.
"""
from __future__ import annotations

import numpy as np

REFERENCE_PHASE2 = {
    "enc_vi_base": "vi_base", "enc_vi_detail": "vi_detail", "enc_vi_shallow": "vi_shallow",
    "enc_vi_level1": "vi_level1", "enc_ir_base": "ir_base", "enc_ir_detail": "ir_detail",
    "enc_ir_shallow": "ir_shallow", "enc_ir_level1": "ir_level1",
    "graph_fused": "graph_fused", "graph_ir": "ir_graph", "graph_vi": "vi_graph",
    "fuse_base": "fuse_base", "fuse_detail": "fuse_detail",
    "fused": "fused", "fused_logits": "fused_logits", "fused_feature": "fused_feature",
}
REFERENCE_PHASE1 = {"recon_vi": "vi_hat", "recon_ir": "ir_hat", "recon_vi_feature": "vi_feature"}
PARITY_RTOL = 1e-5  # the bound every array is held to: relative_error <= PARITY_RTOL


def nhwc(a: np.ndarray) -> np.ndarray:
    """The reference's NCHW arrays in our NHWC layout (other ranks unchanged)."""
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max(1, max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} != reference shape {ref.shape}")
    return float(np.max(np.abs(ours - ref)) / max(1.0, float(np.max(np.abs(ref)))))
