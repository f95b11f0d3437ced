"""Per-module reference cases: single modules of the PyTorch original, run in float32 and
float64 on stored inputs, recorded with `tests/reference/make_module_cases.py` (see
tests/fixtures/modules/README.md).

A case is `tests/fixtures/modules/<name>.npz` + `<name>.json`. The weights are not stored:
they are `trajectory_cases.random_reference_checkpoint(seed)`, checked against the json's
SHA-256. The npz holds, NCHW as the original computes:

- `<module>/in/<input>`: the module's inputs (float32; both reference runs took these values);
- `<module>/out/<i>` and `<module>/grad/<input>`: the float64 run's outputs and the gradient
  of 0.5 * sum(output ** 2) (summed over the outputs) with respect to each input, stored as
  `<key>.hi` (float32) + `<key>.lo` (int8: the rest in 1/256 of hi's float32 spacing), so
  about 2**-32 of the value (`decode`), 5 bytes an element instead of 8.

The json keeps, per compared array, the float32 run's own error against float64
(`torch_float32_error`, measured as `scaled_error`: max |a - ref| / max |ref|, so that the
small outputs of the detail branch, |ref| < 0.3, are not measured against 1).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "modules"
LO_STEPS = 256  # int8 steps per float32 spacing of hi


def encode(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 -> (hi float32, lo int8) with hi + lo * spacing(hi) / 256 ~ a (2**-32 of a)."""
    a = np.asarray(a, np.float64)
    hi = a.astype(np.float32)
    lo = np.rint((a - hi.astype(np.float64)) / np.spacing(hi).astype(np.float64) * LO_STEPS)
    return hi, np.clip(lo, -127, 127).astype(np.int8)


def decode(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return hi.astype(np.float64) + lo.astype(np.float64) * np.spacing(hi).astype(np.float64) / LO_STEPS


def scaled_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| (float64)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} != reference shape {ref.shape}")
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def arrays_digest(stored: dict[str, np.ndarray]) -> str:
    """SHA-256 of the npz's arrays as stored (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for key in sorted(stored):
        digest.update(key.encode() + np.ascontiguousarray(stored[key]).tobytes())
    return digest.hexdigest()


def case_names() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.json"))


def load_case(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(json, arrays): arrays '<module>/in/<x>' float32, '<module>/out/<i>' and
    '<module>/grad/<x>' float64, all NCHW (or (N, nodes, C, H, W) for graph nodes)."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    arrays = {}
    with np.load(FIXTURES / f"{name}.npz") as z:
        stored = {key: z[key] for key in z.files}
    if arrays_digest(stored) != meta["arrays_sha256"]:
        raise AssertionError(f"module case {name}: {name}.npz is not the one {name}.json describes")
    for key in stored:
        if key.endswith(".hi"):
            arrays[key[:-3]] = decode(stored[key], stored[key[:-3] + ".lo"])
        elif not key.endswith(".lo"):
            arrays[key] = stored[key]
    return meta, arrays
