"""The one table between the reference checkpoint and the NNX model.

Every tensor of the released `.pth` (a dict of five state_dicts, names prefixed `module.`)
has exactly one row here, in the reference's own state_dict order: either the NNX path it
loads into, with the layout transform, or `None` for the weights the reference builds but
never uses in its forward pass. Those unused rows carry their shape so that an export
from a model trained here can still write a file the reference's strict `load_state_dict`
accepts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREFIX = "module."


@dataclass(frozen=True)
class Row:
    submodel: str           # reference top-level key, e.g. "DIDF_Encoder"
    torch_key: str          # without the "module." prefix
    path: tuple | None      # NNX state path under the SMFNet sub-model, None = unused
    kind: str               # "conv" (OIHW<->HWIO), "heads" ((h,1,1)<->(h,)), "same", "count"
    shape: tuple | None = None  # torch shape, required for unused rows

    @property
    def full_key(self) -> str:
        return PREFIX + self.torch_key


def _path(dotted: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


# --------------------------------------------------------------------------- row builders
def _conv(tk, path, bias=True):
    yield tk + ".weight", path + ".kernel", "conv"
    if bias:
        yield tk + ".bias", path + ".bias", "same"


def _ln(tk, path):
    yield tk + ".body.weight", path + ".weight", "same"
    yield tk + ".body.bias", path + ".bias", "same"


def _bn(tk, path):
    for t, p in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                 ("running_var", "var")):
        yield f"{tk}.{t}", f"{path}.{p}", "same"
    yield tk + ".num_batches_tracked", path + ".num_batches_tracked", "count"


def _leff(tk, path):
    for name in ("linear1", "dwconv", "linear2"):
        yield from _conv(f"{tk}.{name}.0", f"{path}.{name}")


def _mdta(tk, path):
    yield tk + ".temperature", path + ".temperature", "heads"
    yield from _conv(tk + ".qkv", path + ".qkv", bias=False)
    yield from _conv(tk + ".qkv_dwconv", path + ".qkv_dw", bias=False)
    yield from _conv(tk + ".project_out", path + ".project_out", bias=False)


def _restormer(tk, path, ffn_torch="ffn_leff"):
    yield from _ln(tk + ".norm1", path + ".norm1")
    yield from _mdta(tk + ".attn", path + ".attn")
    yield from _ln(tk + ".norm2", path + ".norm2")
    yield from _leff(f"{tk}.{ffn_torch}", f"{path}.ffn")


def _base_transformer(tk, path):
    yield from _ln(tk + ".norm1", path + ".norm1")
    yield tk + ".attn.scale", path + ".attn.scale", "heads"
    for t, p in (("qkv1", "qkv1"), ("qkv2", "qkv2"), ("proj", "proj")):
        yield from _conv(f"{tk}.attn.{t}", f"{path}.attn.{p}", bias=False)
    yield from _ln(tk + ".norm2", path + ".norm2")
    yield from _conv(tk + ".mlp.project_in", path + ".mlp.project_in", bias=False)
    yield from _conv(tk + ".mlp.project_out", path + ".mlp.project_out", bias=False)


def _three_conv(tk, path):
    for i in (0, 2, 4):
        yield from _conv(f"{tk}.{i}", f"{path}.conv{i}")


def _grdb(tk, path):
    yield from _conv(tk + ".conv.conv", path + ".conv")
    yield from _conv(tk + ".GRDB.dense.conv1.conv", path + ".dense1")
    yield from _conv(tk + ".GRDB.dense.conv2.conv", path + ".dense2")
    yield from _conv(tk + ".GRDB.convdown.conv", path + ".convdown")
    yield from _conv(tk + ".GRDB.sobelconv.convx", path + ".sobel.convx", bias=False)
    yield from _conv(tk + ".GRDB.sobelconv.convy", path + ".sobel.convy", bias=False)
    yield from _conv(tk + ".GRDB.convup.conv", path + ".convup")


def _inverted_residual(tk, path):
    for i, p in ((0, "expand"), (3, "dw"), (5, "project")):
        yield from _conv(f"{tk}.bottleneckBlock.{i}", f"{path}.{p}", bias=False)


def _unused(tk, shape):
    yield tk, None, _kind_of_unused(tk, shape), shape


def _kind_of_unused(tk, shape):
    if tk.endswith("num_batches_tracked"):
        return "count"
    return "same"  # kept aside exactly as stored, never transposed


# --------------------------------------------------------------------------- per sub-model
def _encoder():
    yield from _conv("patch_embed.proj", "patch_embed", bias=False)
    yield from _restormer("encoder_level1.0", "level1")
    yield from _conv("baseFeature.conv_first", "bfe.conv_first")
    yield from _unused("baseFeature.reduce_channel.weight", (64, 128, 1, 1))
    for i in range(2):
        for j in range(2):
            rg = f"baseFeature.layers.{i}.residual_group.{j}"
            yield from _restormer(rg + ".0", f"bfe.blocks.{i}.layers.{j}.0")
            yield from _base_transformer(rg + ".1", f"bfe.blocks.{i}.layers.{j}.1")
        yield from _three_conv(f"baseFeature.layers.{i}.conv", f"bfe.blocks.{i}.conv")
    yield from _unused("baseFeature.norm.weight", (64,))
    yield from _unused("baseFeature.norm.bias", (64,))
    for i, shape in ((0, (16, 64, 3, 3)), (2, (16, 16, 1, 1)), (4, (64, 16, 3, 3))):
        yield from _unused(f"baseFeature.conv_after_body.{i}.weight", shape)
        yield from _unused(f"baseFeature.conv_after_body.{i}.bias", (shape[0],))
    tca = "detailFeature.TCA"
    yield tca + ".temperature", "cai.cross_attention.temperature", "heads"
    for t in ("kv", "q"):
        yield from _conv(f"{tca}.{t}", f"cai.cross_attention.{t}")
    for t, p in (("kv_dwconv", "kv_dw"), ("q_dwconv", "q_dw"), ("project_out", "project_out")):
        yield from _conv(f"{tca}.{t}", f"cai.cross_attention.{p}")
    for t in ("theta_phi", "theta_rho", "theta_eta"):
        yield from _inverted_residual(f"detailFeature.layer.{t}", f"cai.node.{t}")
    yield from _conv("detailFeature.layer.shffleconv", "cai.node.shuffle")
    yield from _grdb("GRDB_module", "grdb")


def _decoder():
    yield from _restormer("encoder_level1.0", "level1")
    for i, p in ((0, "out1"), (2, "out2"), (4, "out3")):
        yield from _conv(f"output.{i}", p, bias=False)


def _graph():
    g = "graph.graph"
    for torch_name, ours in (("ppm_rgb", "ppm_ir"), ("ppm_dep", "ppm_vi")):
        for i in range(3):
            yield from _conv(f"{g}.{torch_name}.convs.{i}.0", f"reasoning.{ours}.convs.{i}.conv", bias=False)
            yield from _bn(f"{g}.{torch_name}.convs.{i}.1", f"reasoning.{ours}.convs.{i}.bn")
    for torch_name, ours in (("graph_rgb", "graph_ir"), ("graph_dep", "graph_vi")):
        yield f"{g}.{torch_name}.gamma", f"reasoning.{ours}.gamma", "same"
        yield from _conv(f"{g}.{torch_name}.C_wgt", f"reasoning.{ours}.edge_weight", bias=False)
        yield from _conv(f"{g}.{torch_name}.ConvGRU.ConvGates", f"reasoning.{ours}.gru.gates")
        yield from _conv(f"{g}.{torch_name}.ConvGRU.Conv_ct", f"reasoning.{ours}.gru.candidate")
    for i in range(2):  # channel attention for node=True, never taken
        yield from _unused(f"{g}.C_ca.{i}.1.weight", (32, 128, 1, 1))
        yield from _unused(f"{g}.C_ca.{i}.3.weight", (64, 32, 1, 1))
    yield from _conv(f"{g}.C_pa.0", "reasoning.gate_to_vi", bias=False)
    yield from _conv(f"{g}.C_pa.1", "reasoning.gate_to_ir", bias=False)
    for i in range(6):
        if i < 2:
            ours = ("concat_ir", "concat_vi")[i]
            yield from _conv(f"graph.C_cat.{i}.0", f"{ours}.conv", bias=False)
            yield from _bn(f"graph.C_cat.{i}.1", f"{ours}.bn")
        else:  # C_cat[2:] exist because the reference builds one per entry of chnn + chnn
            yield from _unused(f"graph.C_cat.{i}.0.weight", (64, 192, 3, 3))
            for t in ("weight", "bias", "running_mean", "running_var"):
                yield from _unused(f"graph.C_cat.{i}.1.{t}", (64,))
            yield from _unused(f"graph.C_cat.{i}.1.num_batches_tracked", ())
    yield from _unused("graph.C_cls.weight", (64, 128, 1, 1))
    yield from _unused("graph.C_cls.bias", (64,))
    yield from _conv("C_cls", "fuse")


def _base_fuse():
    yield from _restormer("", "", ffn_torch="mlp")  # a RestormerBlock here
    yield from _unused("reduce_channel.weight", (64, 128, 1, 1))


def _detail_fuse():
    for i in range(2):
        for t, p in (("r", "rho"), ("y", "eta"), ("f", "phi"), ("p", "psi")):
            yield from _inverted_residual(f"net.{i}.{t}", f"blocks.{i}.{p}")
        yield from _conv(f"net.{i}.shffleconv", f"blocks.{i}.shuffle")
    yield from _grdb("GRDB", "grdb")


# The one list of sub-models (`smfnet_jax.model.SUBMODELS` derives from it), in the reference
# checkpoint's order: its top-level key, the SMFNet attribute, the builder of its rows.
_SUBMODELS = (
    ("DIDF_Encoder", "encoder", _encoder),
    ("DIDF_Decoder", "decoder", _decoder),
    ("GraphModel", "graph", _graph),
    ("BaseFuseLayer", "base_fuse", _base_fuse),
    ("DetailFuseLayer", "detail_fuse", _detail_fuse),
)
SUBMODEL_KEYS = {ref: ours for ref, ours, _ in _SUBMODELS}  # reference key -> SMFNet attribute


def _rows() -> list[Row]:
    rows = []
    for sub, _, build in _SUBMODELS:
        for entry in build():
            tk, path, kind = entry[:3]
            shape = entry[3] if len(entry) > 3 else None
            tk, path = tk.lstrip("."), (path.lstrip(".") if path is not None else None)
            rows.append(Row(sub, tk, _path(path) if path is not None else None, kind, shape))
    return rows


KEY_MAP: tuple[Row, ...] = tuple(_rows())


# --------------------------------------------------------------------------- layout transforms
def to_nnx(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    if kind == "heads":
        return np.ascontiguousarray(array.reshape(-1))
    if kind == "count":
        return np.asarray(array, dtype=np.int32)
    return np.ascontiguousarray(array)


def to_torch(kind: str, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if kind == "conv":
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if kind == "heads":
        return np.ascontiguousarray(array.reshape(-1, 1, 1))
    if kind == "count":
        return np.asarray(array, dtype=np.int64)
    return np.ascontiguousarray(array)


def torch_shape(kind: str, nnx_shape: tuple) -> tuple:
    if kind == "conv":
        h, w, i, o = nnx_shape
        return (o, i, h, w)
    if kind == "heads":
        return (nnx_shape[0], 1, 1)
    return tuple(nnx_shape)


def unused_default(row: Row) -> np.ndarray:
    """A neutral value for an unused weight when exporting a model that never had one."""
    if row.kind == "count":
        return np.zeros((), np.int64)
    if row.torch_key.endswith(("norm.weight", "1.weight", "running_var")) and len(row.shape) == 1:
        return np.ones(row.shape, np.float32)  # LayerNorm / BatchNorm scales, running var
    return np.zeros(row.shape, np.float32)
