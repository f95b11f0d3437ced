"""Fusion as a portable file: a serialized `jax.export.Exported` (StableHLO), or ONNX.

    from smfnet_jax.export import ExportedFuser, export_fusion, save_exported
    save_exported("smfnet.jaxexport", export_fusion(fuser, platforms=("cpu", "cuda", "tpu")), fuser.policy)
    fuse = ExportedFuser("smfnet.jaxexport")   # runs the file: no checkpoint reader, no model code
    fused = fuse(ir, vi)                        # HxW (or NxHxW) float32 in [0, 1] -> raw sigmoid output

The exported function is `Fuser`'s: (ir, vi) as N x H x W float32 in [0, 1] -> the N x H x W
fused image before any 8-bit normalisation (`infer.main --no-normalize`). Batch, height and
width are symbolic (one file serves every size; H, W >= 2, `inference.MIN_SIDE`, which the
reflect padding of the invertible blocks needs). The weights are **baked in** as constants:
one self-contained file that a deployment loads without our checkpoint readers, key map or
model code, at the cost of ~10.6 MB per file (the weights as an argument would make it 0.3 MB
plus a separate weights file and its tree layout to keep in step). The compute policy
(routines, precision, dtype) is fixed at export and recorded in the header.

File layout: a first line `SMFNET-JAXEXPORT 1`, a JSON header line (platforms, policy,
payload length and SHA-256), then the payload (`Exported.serialize()`). The checksum lets a
corrupt or truncated file be refused with one line before the deserializer sees it, and the
deserialized payload's signature is checked (two float32 N x H x W in, one out, N, H, W
symbolic) before any pair is fused with it.

ONNX (`export_onnx`, `OnnxFuser`; the `[onnx]` extra: jax2onnx, onnx, onnxruntime): the same
function through jax2onnx, opset 23, inputs `ir`, `vi` and output `fused` with dynamic
`B, H, W`, weights as initializers inside the one file; XLA's convolutions (routines `xla`),
and the runtime chooses its own precision.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from smfnet_jax.fileio import atomic_write
from smfnet_jax.inference import MIN_SIDE
from smfnet_jax.policy import ComputePolicy

MAGIC = b"SMFNET-JAXEXPORT 1\n"
SUFFIX = ".jaxexport"
ONNX_SUFFIX = ".onnx"
ONNX_OPSET = 23
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
ONNX_EXTRA = "the ONNX format needs the [onnx] extra: pip install 'smfnet-jax[onnx]'"


class ExportError(ValueError):
    """An exported file that cannot be used here (corrupt, truncated, other platform)."""


def export_fusion(fuser, platforms=("cpu",)) -> jax.export.Exported:
    """`fuser` (an `api.Fuser`) as an Exported for `platforms`, weights baked in, symbolic
    N, H, W. Lowering for cuda/tpu works on a CPU-only machine (nothing runs)."""
    platforms = tuple(platforms)
    problem = platforms_problem(platforms)
    if problem:
        raise ValueError(f"platforms {list(platforms)}: {problem}")
    spec = _symbolic_pair_spec("n, h, w")
    return jax.export.export(jax.jit(_weights_baked_in(fuser)), platforms=platforms)(spec, spec)


def platforms_problem(platforms) -> str | None:
    """Why `platforms` is not a list to export for (empty, unknown or repeated names), or None.
    A repeated name would be lowered twice and would read as several platforms (whose
    routines default to xla), so it is refused rather than merged."""
    unknown = [p for p in platforms if p not in PLATFORMS]
    if not platforms or unknown:
        return f"expected some of {', '.join(PLATFORMS)}"
    repeated = sorted({p for p in platforms if list(platforms).count(p) > 1})
    if repeated:
        return f"{', '.join(repeated)} given more than once"
    return None


def _weights_baked_in(fuser):
    """`fuser`'s fusion as fuse(ir, vi) on N x H x W, its weights closed over (constants)."""
    state = fuser._state
    return lambda ir, vi: fuser._fuse(state, ir, vi)


def _symbolic_pair_spec(dims: str) -> jax.ShapeDtypeStruct:
    """N x H x W float32 with symbolic dims, one spec for both inputs (one symbolic scope: they
    have one shape); H, W >= MIN_SIDE, which the reflect padding of the invertible blocks needs."""
    n, h, w = (d.strip() for d in dims.split(","))
    shape = jax.export.symbolic_shape(dims, constraints=(f"{h} >= {MIN_SIDE}", f"{w} >= {MIN_SIDE}"))
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _signature_problem(exported: jax.export.Exported) -> str | None:
    """Why `exported` is not a fusion function as `export_fusion` makes them, or None: it must
    take (ir, vi), two float32 N x H x W arrays of one shape whose N, H, W are three symbols,
    and return one float32 array of that shape. (The symbols' constraints, H, W >= MIN_SIDE,
    are not visible after deserializing: the module checks them when it is compiled.)"""
    ins, outs = exported.in_avals, exported.out_avals
    expected_tree = jax.tree_util.tree_structure(((0, 0), {}))
    if exported.in_tree != expected_tree or exported.out_tree != jax.tree_util.tree_structure(0):
        n = exported.out_tree.num_leaves
        return (f"takes {_describe_arguments(exported)} and returns {n} array{'s' if n != 1 else ''}; "
                "expected two arrays (ir, vi) in and one out")
    shape = ins[0].shape
    if not all(a.dtype == jnp.float32 and a.shape == shape for a in (*ins, *outs)):
        return "expected float32 inputs and output of one shape"
    symbols = {str(d) for d in shape if jax.export.is_symbolic_dim(d) and str(d).isidentifier()}
    if len(shape) != 3 or len(symbols) != 3:  # not a fixed size, nor 2*h, nor (n, h, h)
        return "expected N x H x W with three symbolic dimensions N, H, W (any batch and size)"
    return None


def _describe_signature(exported: jax.export.Exported) -> str:
    """e.g. "float16[n,h,w], float16[n,h,w] -> float16[n,h,w]": its arrays in and out."""
    ins = ", ".join(a.str_short() for a in exported.in_avals) or "nothing"
    return f"{ins} -> {', '.join(a.str_short() for a in exported.out_avals) or 'nothing'}"


def _describe_arguments(exported: jax.export.Exported) -> str:
    """e.g. "3 positional arguments and keyword arguments scale" (in_tree is (args, kwargs))."""
    args, kwargs = exported.in_tree.children()
    n = len(args.children())
    keys = kwargs.node_data()[1] if kwargs.children() else ()
    return (f"{n} positional argument{'s' if n != 1 else ''}"
            + (f" and keyword arguments {', '.join(map(str, keys))}" if keys else ""))


@contextlib.contextmanager
def _symbolic_dims_copied_as_themselves(spec: jax.ShapeDtypeStruct):
    """jax2onnx deep-copies primitive parameters, and a deep copy of a constrained symbolic
    dimension loses its scope's rules (AttributeError '_normalization_rules'). The dimensions
    are immutable, so a copy may be the object itself; set so only while converting."""
    cls = type(spec.shape[1])
    had, old = "__deepcopy__" in cls.__dict__, cls.__dict__.get("__deepcopy__")
    cls.__deepcopy__ = lambda self, memo: self
    try:
        yield
    finally:
        if had:
            cls.__deepcopy__ = old
        else:
            del cls.__deepcopy__


def export_onnx(fuser, path: str | os.PathLike) -> Path:
    """Write `fuser`'s fusion as one ONNX file (atomically): opset ONNX_OPSET, inputs ir, vi
    and output fused, dynamic B, H, W. Needs jax2onnx and onnx (the [onnx] extra)."""
    try:
        from jax2onnx import to_onnx
    except ImportError:
        raise ExportError(ONNX_EXTRA) from None
    if fuser.policy.routines != "xla":  # the XLA:CPU routines' slicing does not convert
        raise ExportError("ONNX export takes the xla routines (XLA's convolutions); "
                          f"this fuser computes with routines {fuser.policy.routines}")
    spec = _symbolic_pair_spec("B, H, W")
    # onnx_ir warns, value by value (~200 lines), that it skips type info of shape helpers.
    serde = logging.getLogger("onnx_ir.serde")
    level = serde.level
    serde.setLevel(logging.ERROR)
    try:
        with _symbolic_dims_copied_as_themselves(spec):
            model = to_onnx(_weights_baked_in(fuser), inputs=[spec, spec], model_name="smfnet_fusion",
                            opset=ONNX_OPSET, input_names=["ir", "vi"], output_names=["fused"], return_mode="proto")
    finally:
        serde.setLevel(level)
    return atomic_write(path, lambda f: f.write(model.SerializeToString()))


def save_exported(path: str | os.PathLike, exported: jax.export.Exported,
                  policy: ComputePolicy) -> Path:
    """Write `exported` (made with `policy`) atomically in the `.jaxexport` layout."""
    payload = bytes(exported.serialize())
    header = {"platforms": list(exported.platforms), "policy": dataclasses.asdict(policy),
              "inputs": "ir, vi: N x H x W float32 in [0, 1]", "output": "N x H x W raw sigmoid output",
              "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    def write(f):
        f.write(MAGIC)
        f.write(json.dumps(header).encode() + b"\n")
        f.write(payload)

    return atomic_write(path, write)


def read_exported(path: str | os.PathLike) -> tuple[dict, jax.export.Exported]:
    """(header, Exported) of a `.jaxexport` file; ExportError names the file and the fault."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ExportError(f"{path}: cannot read: {e.strerror or e}") from None
    if not data.startswith(MAGIC):
        raise ExportError(f"{path}: not an exported SMFNet model (no '{MAGIC.decode().strip()}' "
                          "first line; made by `python -m infer.export`?)")
    end = data.find(b"\n", len(MAGIC))
    try:
        header = json.loads(data[len(MAGIC):end]) if end > 0 else None
        size, digest = int(header["bytes"]), str(header["sha256"])
    except (ValueError, TypeError, KeyError, RecursionError):  # RecursionError: JSON nested too deep
        raise ExportError(f"{path}: corrupt exported model (unreadable header)") from None
    payload = data[end + 1:]
    if len(payload) != size:
        raise ExportError(f"{path}: truncated or corrupt exported model ({len(payload)} bytes of "
                          f"payload, the header says {size})")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ExportError(f"{path}: corrupt exported model (SHA-256 of the payload does not match)")
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception as e:  # noqa: BLE001 - a checksummed payload that still fails: other jax
        raise ExportError(f"{path}: cannot deserialize ({type(e).__name__}: {e}); exported with "
                          "an incompatible jax?") from None
    problem = _signature_problem(exported)
    if problem:  # checked here, not at the first pair: another function would fail on every pair
        raise ExportError(f"{path}: not an SMFNet fusion model ({_describe_signature(exported)}: "
                          f"{problem})")
    return header, exported


def backend_platform() -> str:
    """The platform name jax.export uses for this process's default backend."""
    platform = jax.default_backend()
    if platform == "gpu":  # jax names the CUDA and ROCm backends "gpu"
        platform = "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
    return platform


class ExportedFuser:
    """A `.jaxexport` file as a fuser: `fuse(ir, vi)` like `api.Fuser` (HxW or NxHxW float32
    in [0, 1] -> the raw sigmoid output), compiled once per shape."""

    step = None  # no training step: a weights file

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header, self.exported = read_exported(self.path)
        here = backend_platform()
        if here not in self.exported.platforms:
            raise ExportError(f"{self.path} was exported for {', '.join(self.exported.platforms)} "
                              f"only; this process runs on {here} (export again with "
                              f"--platforms {here},...)")
        try:
            self.policy = ComputePolicy(**self.header["policy"])  # fixed at export; for logs
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{self.path}: corrupt exported model (no valid policy in the header)") from None
        from smfnet_jax.api import _batched  # api imports this module

        self._fuse = _batched(jax.jit(self.exported.call))

    def __call__(self, ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
        return self._fuse(ir, vi)


class OnnxFuser:
    """An ONNX file from `export_onnx` as a fuser (onnxruntime, CPU): called like `api.Fuser`."""

    step = None
    policy = None  # the runtime decides how it computes

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(f"{self.path}: {ONNX_EXTRA}") from None
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such file")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT notes every folded initializer
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's InvalidProtobuf, Fail, ...
            raise ExportError(f"{self.path}: corrupt or truncated ONNX model "
                              f"({str(e).strip().splitlines()[0][:200]})") from None
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (["ir", "vi"], ["fused"]):
            raise ExportError(f"{self.path}: not an SMFNet fusion model (inputs {names[0]}, "
                              f"outputs {names[1]}; expected ir, vi -> fused)")
        from smfnet_jax.api import _batched  # api imports this module

        self._fuse = _batched(lambda ir, vi: self.session.run(None, {"ir": ir, "vi": vi})[0])

    def __call__(self, ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
        return self._fuse(ir, vi)
