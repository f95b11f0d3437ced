"""Record, or compare bit for bit, what the default training configuration computes.

Runs the trainer (its public surface only, so the same script runs on any version of
train/step.py) on every trajectory case, the shared one and tests/fixtures/trajectory/*, as
tests/test_trajectory.py configures them, and on a 2-device sharded run of 4 steps (2 of
phase I, 2 of phase II) on synthetic data; saves every logged metric of every step, the
final parameters and BatchNorm statistics, and the optimiser's per-parameter Adam state
(step count, first and second moments, found by name in whatever tree holds them).

    SMFNET_SHARED=/work/shared python tests/reference/record_bitwise.py record OUT_DIR
    SMFNET_SHARED=/work/shared python tests/reference/record_bitwise.py compare BEFORE AFTER

A case runs in its own process (the 2-device one needs XLA_FLAGS before JAX starts).
`compare` prints one line per case and exits 1 unless every array is `np.array_equal`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TWO_DEVICES = "--xla_force_host_platform_device_count=2"
SHARED_RUN = {"epochs": 10, "phase1_epochs": 5, "lr": 1e-3, "lr_step_epochs": 2, "lr_gamma": 0.5,
              "lr_min": 1e-6, "clip_norm": 0.01}


def case_names() -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    import trajectory_cases as tc
    return ["shared"] + tc.case_names() + ["sharded2"]


KINDS = {"step": "count", "exp_avg": "mu", "exp_avg_sq": "nu", "count": "count", "mu": "mu",
         "nu": "nu"}
SUBS = ("encoder", "decoder", "graph", "base_fuse", "detail_fuse")


def adam_leaves(opt) -> dict[str, np.ndarray]:
    """The optimiser state's per-parameter Adam arrays, keyed 'kind|sub-model/path': kind is
    count, mu or nu, whatever the tree's own names for them (AdamState's step/exp_avg/
    exp_avg_sq, or an optax state's count/mu/nu), next to the sub-model's name on either side
    ({sub: AdamState(...)} or {...: TorchAdamState(step={sub: ...})}). Per-chain scalars (a
    schedule's count) are not per-parameter and are left out."""
    import jax
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        sub_at = [i for i, n in enumerate(names) if n in SUBS]
        if not sub_at or sub_at[-1] == len(names) - 1:
            continue
        i = sub_at[-1]  # the sub-model whose parameter tree the leaf is in
        if names[i + 1] in KINDS:  # {sub: AdamState(step=...)}
            kind, rest = KINDS[names[i + 1]], names[i + 2:]
        elif i > 0 and names[i - 1] in KINDS:  # TorchAdamState(step={sub: ...})
            kind, rest = KINDS[names[i - 1]], names[i + 1:]
        else:
            continue
        out[f"{kind}|{names[i]}/{'/'.join(rest)}"] = np.asarray(leaf)
    return out


def canonical(key: str) -> str:
    """An array's key without the state's own field names in its path (the first recordings
    kept AdamState's: 'opt|count|encoder/step/...')."""
    if not key.startswith("opt|"):
        return key
    _, kind, path = key.split("|", 2)
    return f"opt|{kind}|{'/'.join(p for p in path.split('/') if p not in KINDS)}"


def run_case(name: str, out: Path) -> None:
    import jax
    from ml_collections import config_dict
    sys.path.insert(0, str(REPO / "tests"))
    import trajectory_cases as tc
    from test_trajectory import recipe_config
    from train.trainer import Trainer
    shared = Path(os.environ["SMFNET_SHARED"])
    work = out / f"{name}_work"
    if name == "shared":
        f = shared / "fixtures"
        cfg = recipe_config(f / "trajectory/tiny.h5", f / "parity/smfnet_random_init.pth",
                            SHARED_RUN, microbatches=1)
    elif name == "sharded2":
        assert jax.device_count() == 2, jax.devices()
        from train.configs import smoke
        from train.data import write_synthetic_h5
        h5 = write_synthetic_h5(out / "sharded2.h5", n=8, size=16, seed=3)
        c = smoke.get_config()
        c.data.h5, c.data.crop_size = str(h5), 0
        c.batch_size, c.steps_per_epoch, c.num_epochs, c.phase1_epochs = 2, 2, 2, 1
        c.checkpoint_every_steps, c.log_every_steps, c.sample_every_epochs = 4, 1, 1000
        c.lr, c.progress = 1e-3, False
        cfg = config_dict.FrozenConfigDict(c)
    else:
        case = tc.load_case(name)
        pth, h5 = tc.materialise(name, shared, out / f"{name}_inputs")
        cfg = recipe_config(h5, pth, case["run"], microbatches=0)
    with Trainer(cfg, work) as trainer:
        trainer.run(progress=False)
        state = jax.device_get(trainer.state)
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    arrays = {}
    for part in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(state[part])[0]:
            arrays[f"{part}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    arrays.update({f"opt|{k}": v for k, v in adam_leaves(state["opt"]).items()})
    for key in sorted({k for r in rows for k in r}):
        arrays[f"metric|{key}"] = np.array([r.get(key, np.nan) for r in rows], np.float64)
    np.savez(out / f"{name}.npz", **arrays)
    print(f"{name}: {len(rows)} steps, {len(arrays)} arrays -> {out / f'{name}.npz'}")


def record(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rc = 0
    for name in case_names():
        env = dict(os.environ)
        if name == "sharded2":
            env["XLA_FLAGS"] = TWO_DEVICES
            env["JAX_PLATFORMS"] = "cpu"
        r = subprocess.run([sys.executable, __file__, "case", name, str(out)], cwd=REPO, env=env)
        rc = rc or r.returncode
    return rc


def compare(before: Path, after: Path) -> int:
    bad = 0
    for name in case_names():
        with np.load(before / f"{name}.npz") as za, np.load(after / f"{name}.npz") as zb:
            a, b = ({canonical(k): z[k] for k in z.files} for z in (za, zb))
            missing = sorted(set(a) ^ set(b))
            differ = [k for k in sorted(set(a) & set(b))
                      if not np.array_equal(a[k], b[k], equal_nan=True)]
            kinds = {k.split("|")[0].split("[")[0] for k in a}
            steps = len(a["metric|loss"])
            ok = not missing and not differ
            bad += not ok
            print(f"{name}: {len(a)} arrays ({', '.join(sorted(kinds))}) over {steps} steps: "
                  + ("all np.array_equal" if ok else
                     f"{len(differ)} differ {differ[:5]}, {len(missing)} in one only {missing[:5]}"))
    return 1 if bad else 0


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "case":
        from smfnet_jax.runtime import configure_xla_cpu, enable_compilation_cache
        configure_xla_cpu()
        enable_compilation_cache()
        run_case(args[0], Path(args[1]))
    elif cmd == "record":
        sys.exit(record(Path(args[0])))
    elif cmd == "compare":
        sys.exit(compare(Path(args[0]), Path(args[1])))
    else:
        sys.exit(f"unknown command {cmd}")
