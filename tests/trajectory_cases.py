"""Trajectory cases of our own: ten training steps of the PyTorch original on small inputs,
recorded with `tests/reference/record_trajectory.py` (see tests/fixtures/trajectory/README.md).

A case is small enough to commit (< 2 MB) because its two big inputs are rebuilt here:
- the initial weights, from a seed (`random_reference_checkpoint`): every tensor of the
  released checkpoint's layout drawn with numpy, perturbed like the shared parity fixture's
  so that no value sits at a default a port could hard-code;
- the training data, from crops of the shared test images (`build_h5`).
`case.json` records the hashes of both, so a changed generator or data folder is an error,
never a silent new case. What the reference computed is stored next to it: the loss and
per-sub-model gradient norm of every step in float32 and float64, and the float64
parameters after step 1 (`step1_float64.npz`, as (p1 - p0) / lr in int8 steps of 1/127).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "trajectory"
DELTA_SCALE = 127  # int8 steps per learning rate in step1_float64.npz
# Input scales 1 + k 2**-23: the same step 1 in five roundings. A float32 run's count of
# elements far from float64 after step 1 is decided by which values near a kink (ReLU after
# BatchNorm, LeakyReLU, ReLU6, the SSIM clamp) rounding puts on the wrong side; one rounding
# is one draw, so the counts are compared as medians over these draws.
INPUT_SCALES = tuple(float(np.float32(1 + k * 2.0 ** -23)) for k in (-2, -1, 0, 1, 2))
# Adam's first step moves an element by at most lr (|m_hat / sqrt(v_hat)| <= 1), so
# (p1 - p0) / lr lies in [-1, 1] and 1/127 of lr (7.9e-6 at lr 1e-3) resolves the 1e-4 test.


# --------------------------------------------------------------------------- initial weights
@functools.cache
def _torch_shapes() -> "OrderedDict[tuple[str, str], tuple[str, tuple]]":
    """(sub-model, 'module.key') -> (kind, torch shape) for every tensor of the released file."""
    from flax import nnx
    from smfnet_jax.model import abstract_model
    from smfnet_jax.torch_weights.keymap import KEY_MAP, SUBMODEL_KEYS, torch_shape
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(abstract_model()))}
    out = OrderedDict()
    for row in KEY_MAP:
        if row.path is None:
            shape = tuple(row.shape)
        else:
            shape = torch_shape(row.kind, tuple(flat[(SUBMODEL_KEYS[row.submodel],) + row.path].shape))
        out[row.submodel, row.full_key] = (row.kind, shape)
    return out


_SOBEL = np.array([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])


def random_reference_checkpoint(seed: int) -> dict:
    """A checkpoint in the released `.pth` layout with random, perturbed weights.

    The rules follow the shared parity fixture's generator: PyTorch's default uniform init
    scaled by U(0.8, 1.2); biases N(0, 0.05); norm weights U(0.8, 1.2); BatchNorm running
    mean N(0, 0.1) and var U(0.5, 1.5); attention temperature/scale and the graph's gamma
    U(0.5, 1.5); the GRDB Sobel kernels Sobel + N(0, 0.1). Deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    ckpt: dict = {}
    for (sub, key), (kind, shape) in _torch_shapes().items():
        leaf = key.rsplit(".", 1)[-1]
        if kind == "count":
            arr = np.zeros(shape, np.int64)
        elif leaf == "running_var":
            arr = rng.uniform(0.5, 1.5, shape)
        elif leaf == "running_mean":
            arr = rng.normal(0.0, 0.1, shape)
        elif leaf in ("temperature", "scale", "gamma"):
            arr = rng.uniform(0.5, 1.5, shape)
        elif leaf == "bias":
            arr = rng.normal(0.0, 0.05, shape)
        elif len(shape) == 1:
            arr = rng.uniform(0.8, 1.2, shape)
        elif "sobelconv" in key:
            base = _SOBEL if key.endswith("convx.weight") else _SOBEL.T
            arr = np.broadcast_to(base, shape) + rng.normal(0.0, 0.1, shape)
        else:
            bound = 1.0 / math.sqrt(int(np.prod(shape[1:])))
            arr = rng.uniform(-bound, bound, shape) * rng.uniform(0.8, 1.2, shape)
        ckpt.setdefault(sub, OrderedDict())[key] = np.array(  # (not ascontiguousarray: 0-d stays 0-d)
            arr, np.int64 if kind == "count" else np.float32)
    return ckpt


def checkpoint_digest(ckpt: dict) -> str:
    h = hashlib.sha256()
    for sub, sd in ckpt.items():
        for key, arr in sd.items():
            h.update(f"{sub}/{key}/{arr.dtype}/{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- training data
def _load_grey(path: Path, kind: str) -> np.ndarray:
    """An image as float32 on [0, 1]: 'ir' its first channel, 'vi' the Y of RGB
    (0.299 R + 0.587 G + 0.114 B), the layout `train.prepare` writes."""
    from PIL import Image
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB") if kind == "vi" else im).astype(np.float32) / 255.0
    if kind == "ir":
        return a[..., 0] if a.ndim == 3 else a
    return (0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]).astype(np.float32)


def crop_pairs(shared_dir: Path, crops: list[dict], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(vi, ir) as (N, 1, size, size) float32 from crops {"ir", "vi", "y", "x"} (paths under
    shared_dir/data)."""
    vis, irs = [], []
    for c in crops:
        y, x = c["y"], c["x"]
        ir = _load_grey(shared_dir / "data" / c["ir"], "ir")[y:y + size, x:x + size]
        vi = _load_grey(shared_dir / "data" / c["vi"], "vi")[y:y + size, x:x + size]
        if ir.shape != (size, size) or vi.shape != (size, size):
            raise ValueError(f"crop {c} of size {size} leaves the image")
        irs.append(ir[None])
        vis.append(vi[None])
    return np.stack(vis), np.stack(irs)


def data_digest(vi: np.ndarray, ir: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vi).tobytes() + np.ascontiguousarray(ir).tobytes()).hexdigest()


def write_h5(path: Path, vi: np.ndarray, ir: np.ndarray) -> None:
    """The reference's H5 layout: groups ir_patchs / vis_patchs of (1, H, W) float32 patches."""
    import h5py
    with h5py.File(path, "w") as f:
        for group, arrs in (("ir_patchs", ir), ("vis_patchs", vi)):
            g = f.create_group(group)
            for i, a in enumerate(arrs):
                g.create_dataset(str(i), data=a)


# --------------------------------------------------------------------------- a recorded case
def case_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").is_file())


def load_case(name: str) -> dict:
    return json.loads((FIXTURES / name / "case.json").read_text())


def materialise(name: str, shared_dir: Path, out: Path) -> tuple[Path, Path]:
    """Write the case's initial checkpoint and H5 under `out`, checked against its hashes."""
    from smfnet_jax.torch_weights.pth_io import save_pth
    case = load_case(name)
    ckpt = random_reference_checkpoint(case["seed"])
    if checkpoint_digest(ckpt) != case["checkpoint_sha256"]:
        raise AssertionError(f"case {name}: the weights made from seed {case['seed']} are not the "
                             "ones the reference trained (random_reference_checkpoint changed?)")
    vi, ir = crop_pairs(shared_dir, case["crops"], case["size"])
    if data_digest(vi, ir) != case["data_sha256"]:
        raise AssertionError(f"case {name}: the crops of {shared_dir / 'data'} are not the pixels "
                             "the reference trained on")
    out.mkdir(parents=True, exist_ok=True)
    pth, h5 = out / f"{name}.pth", out / f"{name}.h5"
    save_pth(pth, ckpt)
    write_h5(h5, vi, ir)
    return pth, h5


def step1_reference(name: str, ckpt: dict) -> dict[str, np.ndarray]:
    """The float64 reference's parameters after step 1, 'SubModel/module.key' -> float64 array,
    for the tensors the model holds: the others (C_cat[2:], the C_ca convs, ...; `path` None
    in the key map) are never used, so the original's Adam never moves them either, and an
    export writes their defaults, not the loaded values."""
    from smfnet_jax.torch_weights.keymap import KEY_MAP
    held = {f"{row.submodel}/{row.full_key}" for row in KEY_MAP if row.path is not None}
    case = load_case(name)
    lr = case["run"]["lr"]
    with np.load(FIXTURES / name / "step1_float64.npz") as z:
        return {k: ckpt[k.split("/", 1)[0]][k.split("/", 1)[1]].astype(np.float64)
                + z[k].astype(np.float64) * (lr / DELTA_SCALE) for k in z.files if k in held}


def original_step1_draws(case: dict) -> list[int]:
    """Every recorded count of the float32 original's step-1 elements > 1e-4 from float64: the
    five roundings of the machine that made the case, then those of each `--recount` (the
    original's count depends on the CPU it ran on, so one machine's five are one draw of it)."""
    step1 = case["float32_step1"]
    runs = [step1["off_1e-4_by_input_scale"]] + [r["off_1e-4_by_input_scale"] for r in step1.get("reruns", [])]
    return [int(n) for run in runs for n in run.values()]
