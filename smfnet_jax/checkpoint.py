"""Loading and saving SMFNet weights: orbax directories, reference `.pth` and `.safetensors`.

Every orbax directory this project writes (a converted checkpoint or a training workdir) is
an orbax `CheckpointManager` directory whose steps hold an item `model`: the NNX pure state
of `SMFNet` (parameters and BatchNorm statistics). A converted checkpoint also holds
`extras` (the reference's unused weights, for a faithful export) and `meta` (JSON).

A `.safetensors` file holds the reference's tensors under flat names
`<sub-model>/<state_dict key>` (`mapping.SEP`), unused weights included, so PyTorch loads
it per sub-model. Whatever the format, every loaded tensor goes through one dtype policy
(`mapping.accepted_array`) and one finiteness check (`mapping.check_finite`).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from smfnet_jax.export import ONNX_SUFFIX
from smfnet_jax.export import SUFFIX as EXPORT_SUFFIX
from smfnet_jax.model import SMFNet, abstract_model, create_model
from smfnet_jax.torch_weights.mapping import (check_finite, export_reference_weights,
                                              extras_template, flatten_reference,
                                              load_reference_weights, reference_arrays,
                                              unflatten_reference)
from smfnet_jax.torch_weights.pth_io import load_pth
from smfnet_jax.torch_weights.safetensors_io import load_safetensors, save_safetensors

MODEL_ITEM = "model"
EXTRAS_ITEM = "extras"
META_ITEM = "meta"
TRAIN_CHECKPOINT_SUBDIR = "checkpoints"  # where train.main keeps orbax steps inside a workdir
SAFETENSORS_SUFFIX = ".safetensors"
SAFETENSORS_FORMAT = "smfnet-reference-state-dicts"  # __metadata__["format"] of our files
SAFETENSORS_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and the reason."""


class CheckpointRestoredWarning(UserWarning):
    """A checkpoint that an interrupted `save_converted(overwrite=True)` had set aside was
    put back under its name (`restore_interrupted_swap`); the message says from where."""


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


CONVERTED_ITEMS = frozenset({MODEL_ITEM, EXTRAS_ITEM, META_ITEM})


def replace_problem(directory: str | os.PathLike) -> str | None:
    """Why `save_converted(directory, overwrite=True)` must not replace what is at `directory`,
    or None when it may: nothing there, an empty folder, or an orbax checkpoint as
    `save_converted` writes it (step folders, each an orbax step of the items `model` and
    optionally `extras`, `meta`, and nothing else). Anything else, a training workdir
    included (one of ours, but only as a source), holds data that a replacement would delete."""
    directory = Path(directory)
    if not directory.exists():
        return None
    if not directory.is_dir():
        return "is a file, not an orbax checkpoint folder"
    entries = sorted(directory.iterdir())
    if (directory / TRAIN_CHECKPOINT_SUBDIR).is_dir():
        return "is a training workdir, not a converted checkpoint"
    others = [p.name for p in entries if not (p.name.isdigit() and p.is_dir())]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return f"is a folder that is not a converted orbax checkpoint (it holds {shown})"
    for step in entries:
        items = {p.name for p in step.iterdir() if p.is_dir()}
        if MODEL_ITEM not in items or not items <= CONVERTED_ITEMS:
            return (f"is not a converted orbax checkpoint (its step {step.name} holds "
                    f"{', '.join(sorted(items)) or 'no items'})")
    return None


def _swap_names(directory: Path, suffix: str) -> list[Path]:
    """The staging (`.tmp`) or set-aside (`.old`) folders `save_converted` names after
    `directory`: `.NAME.<12 hex digits>.SUFFIX` beside it."""
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.[0-9a-f]{{12}}\.{suffix}")
    try:
        return sorted(p for p in directory.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:  # no parent folder: nothing was swapped there
        return []


def restore_interrupted_swap(directory: str | os.PathLike) -> str | None:
    """Put back the checkpoint that an interrupted `save_converted(overwrite=True)` set aside.

    The swap renames the old checkpoint to `.NAME.<tag>.old`, then the complete new one from
    `.NAME.<tag>.tmp` to NAME; a process killed between the two leaves no NAME, only those
    two. The `.old` is the previous checkpoint, complete; the `.tmp` is not provably complete
    (the run never said it finished), so the `.old` is renamed back and the `.tmp` deleted.
    Returns a one-line note when it restored, None when there was nothing to restore (NAME
    exists, or no such leftover). A set-aside `.old` without its `.tmp` (or several) is not
    restored by guesswork: CheckpointError says where it is."""
    directory = Path(directory).absolute()
    if directory.exists() or directory.is_symlink():
        return None
    olds = _swap_names(directory, "old")
    if not olds:
        return None
    staged = {p.name for p in _swap_names(directory, "tmp")}
    if len(olds) == 1 and olds[0].name[:-len("old")] + "tmp" in staged:
        old, tmp = olds[0], olds[0].with_name(olds[0].name[:-len("old")] + "tmp")
        try:
            os.rename(old, directory)
        except OSError as e:
            raise CheckpointError(
                f"{directory}: missing; an interrupted conversion with --force left the previous "
                f"checkpoint at {old}; rename it to {directory.name} (could not here: "
                f"{e.strerror or e})") from None
        shutil.rmtree(tmp, ignore_errors=True)
        return (f"restored {directory} from {old.name}, where an interrupted conversion with "
                "--force had left it")
    where = ", ".join(str(p) for p in olds)
    raise CheckpointError(f"{directory}: missing; an earlier conversion with --force set the previous "
                          f"checkpoint aside at {where}: rename the one to keep to {directory.name}")


def save_converted(directory: str | os.PathLike, model: SMFNet, extras: dict | None,
                   meta: dict, *, overwrite: bool = False) -> None:
    """Write a one-step orbax checkpoint directory.

    It is written beside `directory` and renamed into place once complete, so a failure
    leaves no partial directory. `overwrite` replaces an existing one: the old directory is
    renamed aside, the new one renamed in, then the old one deleted (a failure before the
    swap leaves the old checkpoint intact; a process killed between the two renames leaves
    the old one aside, which `restore_interrupted_swap` puts back, as this function and
    `load_checkpoint` do first). Only a converted checkpoint (or an empty folder) is ever
    replaced (`replace_problem`); without `overwrite`, an existing non-empty directory is a
    CheckpointError too.
    """
    ocp = _ocp()
    directory = Path(directory).absolute()
    note = restore_interrupted_swap(directory)
    if note:
        warnings.warn(CheckpointRestoredWarning(note), stacklevel=2)
    problem = replace_problem(directory)
    if problem:
        raise CheckpointError(f"{directory} {problem}: refusing to replace it")
    if directory.exists() and not overwrite and any(directory.iterdir()):
        raise CheckpointError(f"{directory} exists; pass --force (overwrite=True) to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():  # superseded checkpoints a killed swap left behind: --force meant to delete them
        for stale in _swap_names(directory, "old"):
            _remove(stale)
    tag = secrets.token_hex(6)
    tmp = directory.parent / f".{directory.name}.{tag}.tmp"
    old = directory.parent / f".{directory.name}.{tag}.old"
    items = {MODEL_ITEM: ocp.args.StandardSave(model_state(model)),
             META_ITEM: ocp.args.JsonSave(meta)}
    if extras:
        items[EXTRAS_ITEM] = ocp.args.StandardSave(extras)
    try:
        with ocp.CheckpointManager(tmp) as mngr:
            mngr.save(0, args=ocp.args.Composite(**items), force=True)
            mngr.wait_until_finished()
        if directory.exists() or directory.is_symlink():
            os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            if old.exists() or old.is_symlink():
                os.replace(old, directory)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a folder, a file or a link (not what a link points to); nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def save_safetensors_checkpoint(path: str | os.PathLike, model: SMFNet, extras: dict | None,
                                source: str) -> None:
    """The model (and the unused weights) as a `.safetensors` of the reference's tensors,
    named `<sub-model>/<state_dict key>`; written atomically."""
    metadata = {"format": SAFETENSORS_FORMAT, "version": SAFETENSORS_VERSION, "source": source,
                "naming": "<sub-model>/<state_dict key>", "producer": "smfnet-jax"}
    save_safetensors(path, flatten_reference(export_reference_weights(model, extras)), metadata)


_QUIETED = False


def quiet_orbax_failures() -> None:
    """Keep one failed orbax read or write to the one line its caller prints.

    After one TensorStore read or write fails, orbax abandons the others: each abandoned
    coroutine's error is printed when it is collected, each TensorStore callback that finds
    the event loop closed prints a 'RuntimeError: Event loop is closed' traceback (through
    sys.unraisablehook, also at exit), and orbax logs the failure with its traceback at
    ERROR from several threads: hundreds of lines. Drop exactly those; the exception itself
    still reaches the caller. Installed once per process (idempotent)."""
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    import logging
    orbax_dir = f"{os.sep}orbax{os.sep}"
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and orbax_dir in code.co_filename:
            return  # an abandoned orbax coroutine
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return  # a TensorStore callback into orbax's closed loop
        previous(unraisable)

    sys.unraisablehook = hook

    def keep(record) -> bool:
        return not (record.levelno >= logging.ERROR and orbax_dir in record.pathname)

    def keep_task(record) -> bool:  # 'Task/Future exception was never retrieved' of an orbax write
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        return not ("never retrieved" in text
                    and any(mark in text for mark in (orbax_dir, "OCDBT", "TensorStore", "tensorstore")))

    logging.getLogger("absl").addFilter(keep)
    logging.getLogger("asyncio").addFilter(keep_task)


def error_head(e: BaseException, limit: int = 200) -> str:
    """The head of an error's message: its first line, before any TensorStore spec."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = text.split(" [tensorstore_spec")[0].split(". See full TensorStore")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _restore_dir(path: Path, step: int | None) -> Loaded:
    ocp = _ocp()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / TRAIN_CHECKPOINT_SUBDIR).is_dir():  # a training workdir
        path = path / TRAIN_CHECKPOINT_SUBDIR
    # Handlers registered for the items we read (orbax warns about every item it finds
    # without one); not read_only (which warns on every open) but create=False, and
    # nothing is saved, so the directory is not touched.
    handlers = {MODEL_ITEM: ocp.StandardCheckpointHandler(),
                EXTRAS_ITEM: ocp.StandardCheckpointHandler(),
                META_ITEM: ocp.JsonCheckpointHandler()}
    mngr = ocp.CheckpointManager(path.absolute(), item_handlers=handlers,
                                 options=ocp.CheckpointManagerOptions(create=False))
    try:
        steps = mngr.all_steps()
        if not steps:
            raise CheckpointError(
                f"{path}: no orbax checkpoint step found (expected a directory written by "
                "`python -m convert.main --out` or a training workdir)")
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f"{path}: no step {step} (steps: {sorted(steps)})")
        # The step's item folders, listed rather than asked of orbax (item_metadata warns
        # about items such as a workdir's `opt` and `data` that we do not restore).
        step_dir = path / str(step)
        items = {p.name for p in step_dir.iterdir() if p.is_dir()} if step_dir.is_dir() else set()
        if MODEL_ITEM not in items:
            raise CheckpointError(f"{path}: step {step} has no '{MODEL_ITEM}' item (items: {sorted(items)})")
        args = {MODEL_ITEM: ocp.args.StandardRestore(model_state_template())}
        if EXTRAS_ITEM in items:
            args[EXTRAS_ITEM] = ocp.args.StandardRestore(extras_template())
        if META_ITEM in items:
            args[META_ITEM] = ocp.args.JsonRestore()
        for item in items & set(args):  # orbax reports these without naming the file
            if (step_dir / item / "ocdbt.process_0").is_dir() and not (step_dir / item / "manifest.ocdbt").is_file():
                # (and TensorStore's threads print tracebacks at exit after failing on it)
                raise CheckpointError(f"{step_dir / item / 'manifest.ocdbt'}: missing: corrupt or "
                                      "truncated orbax checkpoint")
            meta_file = step_dir / item / "_METADATA"
            if meta_file.is_file():
                try:
                    json.loads(meta_file.read_text())
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise CheckpointError(f"{meta_file}: corrupt (not JSON: {e})") from None
        quiet_orbax_failures()  # before: a failed read's echoes start at once, on other threads
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # TensorStore / orbax errors, many lines and a JSON spec each
            raise CheckpointError(f"{path} step {step}: corrupt or truncated orbax checkpoint "
                                  f"({error_head(e)})") from None
    finally:
        mngr.close()
    model = create_model(0)
    set_model_state(model, restored[MODEL_ITEM])
    extras = restored.get(EXTRAS_ITEM) if EXTRAS_ITEM in items else None
    meta = restored.get(META_ITEM) if META_ITEM in items else {}
    extras = extras and {k: np.asarray(v) for k, v in extras.items()}
    check_finite(reference_arrays(model, extras), f"{path} step {step}")
    return Loaded(model, extras, step, meta or {})


def load_pth_model(path: str | os.PathLike) -> Loaded:
    ckpt = load_pth(path)
    model = create_model(0)
    extras = load_reference_weights(model, ckpt, source=str(path))
    return Loaded(model, extras, None, {"source": str(path)})


def load_safetensors_model(path: str | os.PathLike) -> Loaded:
    tensors, metadata = load_safetensors(path)
    model = create_model(0)
    extras = load_reference_weights(model, unflatten_reference(tensors, str(path)), source=str(path))
    return Loaded(model, extras, None, {"source": str(path), **metadata})


def is_safetensors(path: Path) -> bool:
    """By suffix, else by content: a zip (.pth) starts 'PK', a safetensors header '{'."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and not head.startswith(b"PK") and head[8:9] == b"{"


def checkpoint_kind(path: str | os.PathLike) -> str:
    """What `load_checkpoint` will take `path` for, in words (for logs)."""
    path = Path(path)
    if path.is_file() and path.suffix in (EXPORT_SUFFIX, ONNX_SUFFIX):
        return "exported model" if path.suffix == EXPORT_SUFFIX else "ONNX model"
    if path.is_file():
        return "safetensors file" if is_safetensors(path) else ".pth file"
    return "training workdir" if (path / TRAIN_CHECKPOINT_SUBDIR).is_dir() else "orbax folder"


def load_checkpoint(path: str | os.PathLike, step: int | None = None) -> Loaded:
    """Load SMFNet from a reference `.pth`, a `.safetensors`, a converted orbax dir, or a
    training workdir (its latest step, or `step`)."""
    path = Path(path)
    if path.is_file():
        return load_safetensors_model(path) if is_safetensors(path) else load_pth_model(path)
    if not path.exists():
        note = restore_interrupted_swap(path)
        if note is None:
            raise CheckpointError(f"{path}: no such file or directory")
        warnings.warn(CheckpointRestoredWarning(note), stacklevel=2)
    return _restore_dir(path, step)
