"""Moving weights between the reference checkpoint layout and an `SMFNet`, through KEY_MAP."""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from smfnet_jax.torch_weights.keymap import KEY_MAP, PREFIX, SUBMODEL_KEYS, Row, to_nnx, to_torch, torch_shape, unused_default


class KeyMapError(ValueError):
    """A checkpoint that does not match the reference's layout; the message names the key."""


# The dtype policy, for every checkpoint format: weights are float32 in the model; these
# float dtypes are cast to it on load, anything else is refused. Counters are integers.
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
COUNT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")


def accepted_array(arr, kind: str, name: str, source: str) -> np.ndarray:
    """`arr` as the model stores it (float32, or int64 for counters), or KeyMapError."""
    arr = np.asarray(arr)
    if kind == "count":
        if arr.dtype.name not in COUNT_DTYPES:
            raise KeyMapError(f"{source}: {name} has dtype {arr.dtype}; a counter must be an "
                              f"integer ({', '.join(COUNT_DTYPES)})")
        return arr.astype(np.int64, copy=False)
    if arr.dtype.name not in FLOAT_DTYPES:
        raise KeyMapError(f"{source}: {name} has dtype {arr.dtype}; accepted: "
                          f"{', '.join(FLOAT_DTYPES)} (all loaded as float32)")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: check_finite names it
        return arr.astype(np.float32, copy=False)


def check_finite(named_arrays, source: str) -> None:
    """KeyMapError naming the first tensor holding NaN or inf (after the float32 cast)."""
    for name, arr in named_arrays:
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise KeyMapError(f"{source}: {name} holds {bad} non-finite value(s) (NaN or inf, "
                              "possibly a float64 value beyond float32's range): the "
                              "checkpoint is corrupt or diverged")


def reference_arrays(model, extras: Mapping[str, np.ndarray] | None):
    """(reference name 'SubModel/module.key', array) of a loaded model and its extras."""
    flat = _flat_model_state(model)
    unused_index = 0
    for row in KEY_MAP:
        name = f"{row.submodel}{SEP}{row.full_key}"
        if row.path is None:
            key = unused_key(unused_index)
            unused_index += 1
            if extras is not None and key in extras:
                yield name, extras[key]
        else:
            yield name, flat[(SUBMODEL_KEYS[row.submodel],) + row.path].get_value()


# Flat names for formats without nesting (safetensors): "<sub-model>/<state_dict key>",
# e.g. "DIDF_Encoder/module.patch_embed.proj.weight".
SEP = "/"


def flatten_reference(ckpt: Mapping[str, Mapping[str, np.ndarray]]) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((f"{sub}{SEP}{key}", arr) for sub, sd in ckpt.items() for key, arr in sd.items())


def unflatten_reference(flat: Mapping[str, np.ndarray], source: str) -> dict:
    out: dict = {}
    for name, arr in flat.items():
        sub, sep, key = name.partition(SEP)
        if not sep or not key:
            raise KeyMapError(f"{source}: tensor name {name!r} is not '<sub-model>{SEP}<key>' "
                              f"(sub-models: {list(SUBMODEL_KEYS)})")
        out.setdefault(sub, OrderedDict())[key] = arr
    return out


def _flat_model_state(model) -> dict[tuple, nnx.Variable]:
    return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(model))}


def _unused_rows() -> list[Row]:
    return [r for r in KEY_MAP if r.path is None]


def unused_key(index: int) -> str:
    """Extras are stored by position among the unused rows (dotted names make poor tree keys)."""
    return f"u{index:03d}"


def check_layout(ckpt: Mapping[str, Mapping[str, np.ndarray]], model, source: str = "checkpoint") -> None:
    """Fail loudly, naming the key, on anything unknown, missing or mis-shaped."""
    unknown_top = sorted(set(ckpt) - set(SUBMODEL_KEYS))
    missing_top = [k for k in SUBMODEL_KEYS if k not in ckpt]
    if unknown_top or missing_top:
        raise KeyMapError(f"{source}: expected the five sub-model dicts {list(SUBMODEL_KEYS)}; "
                          f"unknown: {unknown_top}, missing: {missing_top}")
    flat = _flat_model_state(model)
    for sub in SUBMODEL_KEYS:
        rows = {r.full_key: r for r in KEY_MAP if r.submodel == sub}
        have = ckpt[sub]
        unknown = [k for k in have if k not in rows]
        if unknown:
            raise KeyMapError(f"{source}: {sub} has keys the reference model does not define: "
                              f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        missing = [k for k in rows if k not in have]
        if missing:
            raise KeyMapError(f"{source}: {sub} is missing keys: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for key, row in rows.items():
            arr = np.asarray(have[key])
            if row.path is None:
                want = tuple(row.shape)
            else:
                var = flat.get((SUBMODEL_KEYS[sub],) + row.path)
                if var is None:
                    raise KeyMapError(f"key map row {sub}/{key} points at a missing model path {row.path}")
                want = torch_shape(row.kind, tuple(var.shape))
            if tuple(arr.shape) != want:
                raise KeyMapError(f"{source}: {sub}/{key} has shape {tuple(arr.shape)}, expected {want}")
            accepted_array(arr, row.kind, f"{sub}/{key}", source)


def load_reference_weights(model, ckpt, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Copy a reference checkpoint into `model` in place; return the unused weights (extras)."""
    check_layout(ckpt, model, source)
    state = nnx.state(model)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    extras: dict[str, np.ndarray] = {}
    unused_index = 0
    for row in KEY_MAP:
        name = f"{row.submodel}{SEP}{row.full_key}"
        arr = accepted_array(ckpt[row.submodel][row.full_key], row.kind, name, source)
        check_finite([(name, arr)], source)
        if row.path is None:
            extras[unused_key(unused_index)] = np.array(arr)
            unused_index += 1
            continue
        var = flat[(SUBMODEL_KEYS[row.submodel],) + row.path]
        var.set_value(jnp.asarray(to_nnx(row.kind, arr), dtype=var.get_value().dtype))
    nnx.update(model, state)
    return extras


def export_reference_weights(model, extras: Mapping[str, np.ndarray] | None = None
                             ) -> dict[str, "OrderedDict[str, np.ndarray]"]:
    """The model as the reference's checkpoint dict, keys in the reference's order.

    `extras` are the unused weights kept by `load_reference_weights`; without them (a model
    trained here) neutral placeholders are written so that strict loading still works.
    """
    flat = _flat_model_state(model)
    out = {sub: OrderedDict() for sub in SUBMODEL_KEYS}
    unused_index = 0
    for row in KEY_MAP:
        if row.path is None:
            key = unused_key(unused_index)
            unused_index += 1
            value = np.asarray(extras[key]) if extras is not None and key in extras else unused_default(row)
            out[row.submodel][row.full_key] = to_torch(row.kind, value)
        else:
            var = flat[(SUBMODEL_KEYS[row.submodel],) + row.path]
            out[row.submodel][row.full_key] = to_torch(row.kind, np.asarray(var.get_value()))
    return out


def extras_template() -> dict[str, np.ndarray]:
    """Shapes/dtypes of the extras tree, for restoring it from a checkpoint."""
    out = {}
    for i, row in enumerate(_unused_rows()):
        out[unused_key(i)] = unused_default(row)
    return out


__all__ = ["KeyMapError", "check_layout", "load_reference_weights", "export_reference_weights",
           "extras_template", "PREFIX", "SEP", "FLOAT_DTYPES", "accepted_array", "check_finite",
           "reference_arrays", "flatten_reference", "unflatten_reference"]
