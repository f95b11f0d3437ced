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
            kind_ok = (np.issubdtype(arr.dtype, np.integer) if row.kind == "count"
                       else np.issubdtype(arr.dtype, np.floating))
            if not kind_ok:
                raise KeyMapError(f"{source}: {sub}/{key} has dtype {arr.dtype}")


def load_reference_weights(model, ckpt, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Copy a reference checkpoint into `model` in place; return the unused weights (extras)."""
    check_layout(ckpt, model, source)
    state = nnx.state(model)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    extras: dict[str, np.ndarray] = {}
    unused_index = 0
    for row in KEY_MAP:
        arr = np.asarray(ckpt[row.submodel][row.full_key])
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
           "extras_template", "PREFIX"]
