"""The Python API for fusion.

    from smfnet_jax.api import load_fuser
    fuser = load_fuser("models/model_VIF.pth")      # or .safetensors, a converted dir, a workdir
    fused = fuser(ir, vi)   # float32 HxW arrays in [0, 1] -> raw sigmoid output, HxW float32
    fused = fuser(irs, vis) # or NxHxW stacks of same-size pairs -> NxHxW (one call for N pairs)

The jitted function is compiled once per input shape and reused for every pair of that size;
`load_fuser` also turns on the persistent compilation cache, so a new process reuses it.
Images too large for memory: `smfnet_jax.inference.fuse_tiled(fuser, ir, vi, tile, overlap)`.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smfnet_jax.checkpoint import Loaded, load_checkpoint
from smfnet_jax.export import ONNX_SUFFIX
from smfnet_jax.export import SUFFIX as EXPORT_SUFFIX
from smfnet_jax.export import ExportedFuser, OnnxFuser
from smfnet_jax.inference import too_small
from smfnet_jax.layers import cast_floats
from smfnet_jax.model import SMFNet
from smfnet_jax.policy import ComputePolicy, set_policy
from smfnet_jax.runtime import configure_xla_cpu, enable_compilation_cache


class Fuser:
    """Fuses (ir, vi) pairs with `SMFNet.fuse` in eval mode (BatchNorm running statistics).

    `fuser(ir, vi)` takes two HxW float32 arrays in [0, 1] and returns the HxW raw sigmoid
    output, or two NxHxW stacks of same-size pairs and returns N outputs (one program for N
    pairs: better use of a GPU or TPU; equal to fusing them one by one up to float rounding).
    policy (`smfnet_jax.policy.ComputePolicy`): routines, precision and dtype it computes
    with; default the model's (precision highest: full float32 on every backend).
    dtype: shorthand for the policy's dtype. bfloat16 casts the parameters to bf16 once and
    computes in bf16 (meant for GPU/TPU; slow on CPU); the output is always float32.
    The model passed in is not modified (the fuser keeps an eval-mode copy).
    """

    def __init__(self, model: SMFNet, *, policy: ComputePolicy | None = None, dtype=None,
                 step: int | None = None):
        self.step = step  # the checkpoint step the model came from (None: a weights file)
        policy = policy or model.policy
        if dtype is not None:
            policy = policy.replace(dtype=jnp.dtype(dtype).name)
        model = set_policy(nnx.clone(model), policy)
        model.eval()
        graphdef, state = nnx.split(model)
        self.policy = policy
        self.dtype = compute = policy.compute_dtype
        if compute != jnp.float32:
            state = cast_floats(state, compute)

        def fuse(state, ir, vi):  # (N, H, W) -> (N, H, W)
            m = nnx.merge(graphdef, state)
            out = m.fuse(vi[..., None].astype(compute), ir[..., None].astype(compute))
            return out[..., 0].astype(jnp.float32)

        self._state = state
        self.model = model  # the eval-mode model the program was built from
        self._fuse_fn = fuse
        self._fuse = jax.jit(fuse)

    def replace_model(self, model: SMFNet) -> None:
        """Fuse with `model`'s weights from now on. It must have the structure of the model
        this fuser was made from, so the compiled programs are reused; its arrays are used as
        they are, not copied (a trainer evaluating its current weights)."""
        model = set_policy(nnx.clone(model), self.policy)
        model.eval()
        _, state = nnx.split(model)
        if self.dtype != jnp.float32:
            state = cast_floats(state, self.dtype)
        self._state, self.model = state, model

    def lower(self, height: int, width: int, batch: int = 1, *, mesh: jax.sharding.Mesh | None = None):
        """The jitted fusion lowered for `batch` pairs of HxW (`.compile()` it; for benchmarks).

        mesh: lower for that mesh instead (the pairs split over its first axis, the weights
        replicated), which may be another machine's: compile-only devices from
        `jax.experimental.topologies` (train.plan)."""
        problem = too_small(height, width)
        if problem:
            raise ValueError(problem)
        spec = jax.ShapeDtypeStruct((batch, height, width), jnp.float32)
        if mesh is None:
            return self._fuse.lower(self._state, spec, spec)
        P, named = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
        pairs, weights = named(mesh, P(mesh.axis_names[0])), named(mesh, P())
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=weights), self._state)
        spec = jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=pairs)
        return jax.jit(self._fuse_fn, out_shardings=pairs).lower(state, spec, spec)

    def compile(self, height: int, width: int, batch: int = 1):
        """Compile for `batch` pairs of HxW ahead of time; returns `fn(ir, vi)` (HxW arrays for
        batch 1, else NxHxW stacks) and keeps the executable (`fn.compiled`, e.g. for
        `.cost_analysis()`)."""
        compiled = self.lower(height, width, batch).compile()
        return _batched(lambda ir, vi: compiled(self._state, ir, vi), compiled)

    def __call__(self, ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
        return _batched(lambda a, b: self._fuse(self._state, a, b))(ir, vi)


def _batched(run, compiled=None):
    """`run` on NxHxW float32 stacks, also callable with one HxW pair; a pair smaller than
    `inference.MIN_SIDE` a side is refused (ValueError) on every path, before `run`."""
    def fn(ir, vi):
        ir = np.asarray(ir, np.float32)
        vi = np.asarray(vi, np.float32)
        if ir.ndim not in (2, 3) or ir.shape != vi.shape:
            raise ValueError("expected two HxW arrays (or NxHxW stacks) of one size, "
                             f"got {ir.shape} and {vi.shape}")
        problem = too_small(*ir.shape[-2:])
        if problem:
            raise ValueError(problem)
        if ir.ndim == 2:
            return np.asarray(run(ir[None], vi[None]))[0]
        return np.asarray(run(ir, vi))
    fn.compiled = compiled
    return fn


def load_fuser(ckpt: str | os.PathLike, *, cache: bool = True, **kwargs) -> Fuser | ExportedFuser | OnnxFuser:
    """A `Fuser` from a reference `.pth`, a `.safetensors`, a converted orbax directory, or a
    training workdir (`load_checkpoint`: weights checked finite, cast to float32); for a
    `.jaxexport` or `.onnx` file (`smfnet_jax.export`), an `ExportedFuser` / `OnnxFuser` that
    is called the same way.

    cache: enable the persistent compilation cache (`enable_compilation_cache`; location
    from $SMFNET_JAX_CACHE, default ~/.cache/smfnet_jax/xla, SMFNET_JAX_CACHE=off disables).
    Other keyword arguments go to `Fuser` (policy, dtype). Called before any JAX computation
    in the process, it also sets the memory-saving XLA:CPU flags (`configure_xla_cpu`).
    """
    configure_xla_cpu()
    if cache:
        enable_compilation_cache()
    exported = {EXPORT_SUFFIX: ExportedFuser, ONNX_SUFFIX: OnnxFuser}.get(Path(ckpt).suffix)
    if exported is not None:  # a file from `python -m infer.export`
        if kwargs:
            raise ValueError(f"{ckpt}: an exported model computes as it was exported "
                             f"(its policy is fixed); {', '.join(kwargs)} cannot change it")
        return exported(ckpt)
    loaded: Loaded = load_checkpoint(Path(ckpt))
    return Fuser(loaded.model, step=loaded.step, **kwargs)
