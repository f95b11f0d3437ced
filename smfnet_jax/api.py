"""The Python API for fusion.

    from smfnet_jax.api import load_fuser
    fuser = load_fuser("models/model_VIF.pth")      # or a converted dir / training workdir
    fused = fuser(ir, vi)   # float32 HxW arrays in [0, 1] -> raw sigmoid output, HxW float32

The jitted function is compiled once per input shape and reused for every pair of that size.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smfnet_jax.checkpoint import Loaded, load_checkpoint
from smfnet_jax.model import SMFNet


class Fuser:
    """Fuses (ir, vi) pairs with an SMFNet in eval mode (BatchNorm running statistics)."""

    def __init__(self, model: SMFNet, *, dtype=jnp.float32):
        model.eval()
        graphdef, state = nnx.split(model)
        self.dtype = jnp.dtype(dtype)
        compute = self.dtype

        def fuse(state, ir, vi):
            m = nnx.merge(graphdef, state)
            if compute != jnp.float32:
                state_c = jax.tree.map(lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
                m = nnx.merge(graphdef, state_c)
            out = m(vi[None, :, :, None].astype(compute), ir[None, :, :, None].astype(compute))
            return out[0, :, :, 0].astype(jnp.float32)

        self._state = state
        self._fuse = jax.jit(fuse)

    def fuse_device(self, ir: jax.Array, vi: jax.Array) -> jax.Array:
        return self._fuse(self._state, ir, vi)

    def __call__(self, ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
        ir = np.asarray(ir, np.float32)
        vi = np.asarray(vi, np.float32)
        if ir.ndim != 2 or ir.shape != vi.shape:
            raise ValueError(f"expected two HxW arrays of one size, got {ir.shape} and {vi.shape}")
        return np.asarray(self._fuse(self._state, ir, vi))


def load_fuser(ckpt: str | os.PathLike, **kwargs) -> Fuser:
    """A `Fuser` from a reference `.pth`, a converted orbax directory, or a training workdir."""
    loaded: Loaded = load_checkpoint(Path(ckpt))
    return Fuser(loaded.model, **kwargs)
