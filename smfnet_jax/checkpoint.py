"""Loading and saving SMFNet weights: orbax directories and reference `.pth` files.

Every orbax directory this project writes (a converted checkpoint or a training workdir) is
an orbax `CheckpointManager` directory whose steps hold an item `model`: the NNX pure state
of `SMFNet` (parameters and BatchNorm statistics). A converted checkpoint also holds
`extras` (the reference's unused weights, for a faithful export) and `meta` (JSON).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from smfnet_jax.model import SMFNet, abstract_model, create_model
from smfnet_jax.torch_weights.mapping import extras_template, load_reference_weights
from smfnet_jax.torch_weights.pth_io import load_pth

MODEL_ITEM = "model"
EXTRAS_ITEM = "extras"
META_ITEM = "meta"
TRAIN_CHECKPOINT_SUBDIR = "checkpoints"  # where train.main keeps orbax steps inside a workdir


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and the reason."""


@dataclass
class Loaded:
    model: SMFNet
    extras: dict | None = None
    step: int | None = None
    meta: dict = field(default_factory=dict)


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import and not always needed
    return ocp


def model_state_template() -> dict:
    """Shape/dtype tree of the `model` item, used as the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(nnx.state(abstract_model())))


def model_state(model: SMFNet) -> dict:
    return nnx.to_pure_dict(nnx.state(model))


def set_model_state(model: SMFNet, pure: dict) -> None:
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def save_converted(directory: str | os.PathLike, model: SMFNet, extras: dict | None,
                   meta: dict) -> None:
    """Write a one-step orbax checkpoint. Orbax commits a step atomically (temp dir + rename)."""
    ocp = _ocp()
    directory = Path(directory).absolute()
    items = {MODEL_ITEM: ocp.args.StandardSave(model_state(model)),
             META_ITEM: ocp.args.JsonSave(meta)}
    if extras:
        items[EXTRAS_ITEM] = ocp.args.StandardSave(extras)
    with ocp.CheckpointManager(directory) as mngr:
        mngr.save(0, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()


def _restore_dir(path: Path, step: int | None) -> Loaded:
    ocp = _ocp()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / TRAIN_CHECKPOINT_SUBDIR).is_dir():  # a training workdir
        path = path / TRAIN_CHECKPOINT_SUBDIR
    mngr = ocp.CheckpointManager(path.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(
                f"{path}: no orbax checkpoint step found (expected a directory written by "
                "`python -m convert.main --out` or a training workdir)")
        step = max(steps) if step is None else step
        items = set(mngr.item_metadata(step).keys())
        if MODEL_ITEM not in items:
            raise CheckpointError(f"{path}: step {step} has no '{MODEL_ITEM}' item (items: {sorted(items)})")
        args = {MODEL_ITEM: ocp.args.StandardRestore(model_state_template())}
        if EXTRAS_ITEM in items:
            args[EXTRAS_ITEM] = ocp.args.StandardRestore(extras_template())
        if META_ITEM in items:
            args[META_ITEM] = ocp.args.JsonRestore()
        restored = mngr.restore(step, args=ocp.args.Composite(**args))
    finally:
        mngr.close()
    model = create_model(0)
    set_model_state(model, restored[MODEL_ITEM])
    extras = restored.get(EXTRAS_ITEM) if EXTRAS_ITEM in items else None
    meta = restored.get(META_ITEM) if META_ITEM in items else {}
    return Loaded(model, extras and {k: np.asarray(v) for k, v in extras.items()}, step, meta or {})


def load_pth_model(path: str | os.PathLike) -> Loaded:
    ckpt = load_pth(path)
    model = create_model(0)
    extras = load_reference_weights(model, ckpt, source=str(path))
    return Loaded(model, extras, None, {"source": str(path)})


def load_checkpoint(path: str | os.PathLike, step: int | None = None) -> Loaded:
    """Load SMFNet from a reference `.pth`, a converted orbax dir, or a training workdir."""
    path = Path(path)
    if path.is_file():
        return load_pth_model(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    return _restore_dir(path, step)
