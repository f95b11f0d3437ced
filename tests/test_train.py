"""Training: loss/gradient parity with the reference, sharding, resume, multi-host (the
optimiser and its schedules: tests/test_optim.py).

Model compiles dominate the cost here, so every training run uses the same tiny shapes
(16x16 patches, global batch 2) and the persistent compilation cache set in conftest.py.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from smfnet_jax.metrics import METRIC_NAMES
from train.configs import smoke

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3


# --------------------------------------------------------------------------- loss parity
@pytest.fixture(scope="module")
def our_losses(fixture_pth, reference_arrays):
    """{(phase, microbatches): (terms, grad norms, grads, batch stats)} on the parity inputs;
    microbatches=2 is the exact micro-batched gradient (one pair per micro-batch)."""
    import jax
    import optax
    from smfnet_jax.checkpoint import load_pth_model
    from smfnet_jax.torch_weights.keymap import SUBMODEL_KEYS
    from train.configs.msrs import get_config
    from train.step import make_value_and_grad, split_model
    vi, ir = (reference_arrays[k].transpose(0, 2, 3, 1) for k in ("vi", "ir"))
    model = load_pth_model(fixture_pth).model
    graphdef, params, stats = split_model(model)
    out = {}
    for phase in (1, 2):
        for k in (1, 2):
            cfg = get_config()
            cfg.microbatches = k
            fn = jax.jit(make_value_and_grad(graphdef, phase, cfg))
            (_, (terms, new_stats)), grads = fn(params, stats, vi, ir)
            norms = {torch_name: float(optax.global_norm(grads[ours]))
                     for torch_name, ours in SUBMODEL_KEYS.items()}
            out[phase, k] = ({n: float(v) for n, v in terms.items()}, norms, grads, new_stats)
            if k == 1:  # rounding sensitivity: the same step on inputs scaled by 1 + 2**-22
                eps = np.float32(1 + 2 ** -22)
                out[phase, "perturbed"] = fn(params, stats, vi * eps, ir * eps)[1]
    return out


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("phase", [1, 2])
def test_loss_terms_match_reference(phase, microbatches, our_losses, reference_losses):
    terms = our_losses[phase, microbatches][0]
    names = [k for k in reference_losses if not k.startswith("grad_norm") and k in terms]
    assert f"total_phase{phase}" in names and len(names) >= 6
    for name in names:
        ref = reference_losses[name]
        assert abs(terms[name] - ref) <= LOSS_RTOL * max(abs(ref), 1e-12) or (ref == 0 and terms[name] == 0), \
            f"{name}: ours {terms[name]!r} vs reference {ref!r}"


@pytest.mark.parametrize("microbatches", [1, 2])
@pytest.mark.parametrize("phase", [1, 2])
def test_gradient_norms_match_reference(phase, microbatches, our_losses, reference_losses):
    norms = our_losses[phase, microbatches][1]
    ref = reference_losses[f"grad_norm_phase{phase}"]
    for sub, value in ref.items():
        assert abs(norms[sub] - value) <= GRAD_RTOL * value, f"{sub}: {norms[sub]} vs {value}"
    if phase == 1:  # the fusion layers are not in the phase-I graph at all
        assert norms["BaseFuseLayer"] == 0.0 and norms["DetailFuseLayer"] == 0.0


@pytest.mark.parametrize("phase", [1, 2])
def test_unused_in_phase_is_what_the_phase_leaves_without_gradient(phase, our_losses):
    """train.phases.PHASES[n].unused (the parameters torch's Adam skips, .grad None) against the
    gradients the phase produces: exactly zero there, nonzero in every other leaf."""
    import jax
    from train.optim import trained_mask
    grads = our_losses[phase, 1][2]
    for sub, tree in grads.items():
        mask = trained_mask(phase, {sub: tree})[sub]
        for (path, g), trained in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(mask)):
            nonzero = bool(np.any(np.asarray(g) != 0))
            assert nonzero == trained, (phase, sub, jax.tree_util.keystr(path), trained)


def _worst_leaf_difference(grads_a, grads_b) -> float:
    """max over leaves of max|a - b| / max|a|; a leaf that is zero in one must be in both."""
    import jax
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_a), jax.tree.leaves(grads_b)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.max(np.abs(a))
        assert (scale == 0) == (np.max(np.abs(b)) == 0), jax.tree_util.keystr(path)
        if scale:
            worst = max(worst, float(np.max(np.abs(a - b)) / scale))
    return worst


@pytest.mark.parametrize("phase", [1, 2])
def test_microbatched_gradient_equals_whole_batch(phase, our_losses):
    """Same terms, batch statistics and gradients as the whole-batch step, up to rounding.

    "Rounding" is calibrated, not guessed: a few leaves (Sobel kernels behind |x|, BatchNorm
    biases) move by up to ~6e-3 of their largest entry when the inputs are scaled by
    1 + 2**-22, because float32 rounding flips signs under |.| and max. The micro-batched
    gradient (whose convolutions run at another batch size, so round differently) may differ
    from the whole-batch one by no more than twice what that perturbation causes; a wrong
    weight, a missing cotangent or a wrong sample order gives differences of order 1."""
    import jax
    terms1, _, grads1, stats1 = our_losses[phase, 1]
    terms2, _, grads2, stats2 = our_losses[phase, 2]
    assert terms1.keys() == terms2.keys()
    for name in terms1:
        assert terms2[name] == pytest.approx(terms1[name], rel=1e-5, abs=1e-7), name
    for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    sensitivity = _worst_leaf_difference(grads1, our_losses[phase, "perturbed"])
    worst = _worst_leaf_difference(grads1, grads2)
    assert worst <= max(1e-5, 2 * sensitivity), (worst, sensitivity)
    # Kink flips move a few elements a lot; an error in the computation moves all of them a
    # little, which the per-leaf bound above can hide: the median relative difference over
    # every element is float32 rounding (~5e-7; 2.5e-3 for the miscompiled micro-batched step
    # that test_sharded_step_equals_single_device_step caught, on its batch of 8).
    a, b = (np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])
            for g in (grads1, grads2))
    nonzero = a != 0
    median = float(np.median(np.abs(b - a)[nonzero] / np.abs(a)[nonzero]))
    assert median <= 1e-5, median


def test_xla_routines_equal_cpu_routines(our_losses, fixture_pth, reference_arrays):
    """The GPU/TPU path (XLA's convolutions, automatic differentiation), run on CPU: the same
    phase-II loss terms, BatchNorm statistics and gradients as the XLA:CPU routines, up to
    float32 rounding (calibrated as in the micro-batch test above)."""
    import jax
    from smfnet_jax.checkpoint import load_pth_model
    from smfnet_jax.policy import ComputePolicy, set_policy
    from train.configs.msrs import get_config
    from train.step import make_value_and_grad, split_model
    vi, ir = (reference_arrays[k].transpose(0, 2, 3, 1) for k in ("vi", "ir"))
    graphdef, params, stats = split_model(set_policy(load_pth_model(fixture_pth).model,
                                                     ComputePolicy("xla")))
    cfg = get_config()
    cfg.microbatches = 0  # auto: the whole batch with XLA's routines
    (_, (terms, new_stats)), grads = jax.jit(make_value_and_grad(graphdef, 2, cfg))(
        params, stats, vi, ir)
    terms_cpu, _, grads_cpu, stats_cpu = our_losses[2, 1]
    assert {n: float(v) for n, v in terms.items()} == pytest.approx(terms_cpu, rel=1e-5, abs=1e-7)
    for a, b in zip(jax.tree.leaves(stats_cpu), jax.tree.leaves(new_stats)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    sensitivity = _worst_leaf_difference(grads_cpu, our_losses[2, "perturbed"])
    worst = _worst_leaf_difference(grads_cpu, grads)
    assert worst <= max(1e-5, 2 * sensitivity), (worst, sensitivity)


@pytest.mark.parametrize("phase", [1, 2])
def test_stage_table_equals_the_model_forward(phase, fixture_pth, reference_arrays):
    """The micro-batching executor's stages, run in order on the whole batch, compute
    exactly `SMFNet.phase1` / `phase2` in train mode: every output and the BatchNorm update."""
    import jax
    from flax import nnx
    from smfnet_jax.checkpoint import load_pth_model
    from train.microbatch import run_stages, stages_for
    vi, ir = (reference_arrays[k].transpose(0, 2, 3, 1) for k in ("vi", "ir"))
    outputs = {}
    for how in ("model", "stages"):
        model = load_pth_model(fixture_pth).model
        model.train()
        if how == "model":
            fn = nnx.jit(lambda m, a, b: m.phase1(a, b) if phase == 1 else m.phase2(a, b))
        else:
            fn = nnx.jit(lambda m, a, b: run_stages(m, stages_for(phase), a, b))
        outputs[how] = (fn(model, vi, ir), nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
    (plain, stats_plain), (staged, stats_staged) = outputs["model"], outputs["stages"]
    assert set(plain) <= set(staged)
    for key in plain:
        np.testing.assert_allclose(np.asarray(staged[key]), np.asarray(plain[key]), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(stats_plain), jax.tree.leaves(stats_staged)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_microbatch_split_is_strided_and_invertible():
    """Micro-batch i holds samples i, i + k, ...: a batch split over devices in contiguous
    blocks keeps every micro-batch split the same way."""
    import jax
    from train.microbatch import join_microbatches, split_microbatches
    from train.step import resolve_microbatches
    x = np.arange(12).reshape(12, 1) * np.ones((1, 3))
    s = np.asarray(split_microbatches(x, 3))
    assert s.shape == (3, 4, 3)
    assert s[1, :, 0].tolist() == [1, 4, 7, 10]
    np.testing.assert_array_equal(np.asarray(join_microbatches(s)), x)
    assert resolve_microbatches(3, 12, "cpu") == resolve_microbatches(3, 12, "xla") == 3
    # auto: one sample per micro-batch with the XLA:CPU routines, the whole batch with XLA's
    assert resolve_microbatches(0, 12, "cpu") == 12 // jax.device_count()
    assert resolve_microbatches(0, 12, "xla") == 1


def test_microbatches_must_divide_the_per_device_batch(tmp_path, monkeypatch):
    import jax
    from train.configs.validate import ConfigError
    from train.trainer import Trainer, TrainingError
    cfg = smoke.get_config()
    cfg.microbatches = 3  # batch 2: the config check refuses it, whatever the devices
    with pytest.raises(ConfigError, match="microbatches=3"):
        Trainer(cfg, tmp_path / "w")
    cfg.microbatches = 2  # divides the batch, not the per-device batch of 1 on 2 devices
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    with pytest.raises(TrainingError, match="microbatches=2"):
        Trainer(cfg, tmp_path / "w")


# --------------------------------------------------------------------------- tiny training runs
def tiny_overrides(h5: Path, eval_every_epochs: int = 0) -> list[str]:
    """eval_every_epochs: 0 (no evaluation, which smoke.py does at epoch 4) unless asked."""
    return [f"--config.data.h5={h5}", "--config.batch_size=2", "--config.steps_per_epoch=2",
            "--config.num_epochs=2", "--config.phase1_epochs=1", "--config.checkpoint_every_steps=2",
            "--config.log_every_steps=1", "--config.sample_every_epochs=1", "--config.progress=False",
            "--config.lr=1e-3", "--config.data.crop_size=0",
            f"--config.eval_every_epochs={eval_every_epochs}"]


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory):
    from train.data import write_synthetic_h5
    return write_synthetic_h5(tmp_path_factory.mktemp("h5") / "tiny.h5", n=8, size=16, seed=3)


# Single-process runs use 2 CPU devices: the same partitioned program as the 2-process run,
# whose reductions then add the same partial sums. Against a 1-device run, float rounding in
# near-zero gradients is amplified by Adam's first steps (update ~ lr * g / (|g| + eps)) to
# ~1e-3 after 4 steps at lr 1e-3, so only step 1 is compared with that run.
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}


def run_train(workdir: Path, extra: list[str], timeout: int = 900, env: dict | None = None):
    cmd = [sys.executable, "-m", "train.main", "--config", "smoke.py", "--workdir", str(workdir), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **TWO_DEVICES, **(env or {})})


def read_metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def load_state(workdir: Path) -> dict:
    """Every array of the latest checkpoint (model, optimizer) as numpy, by path."""
    import jax
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        step = mngr.latest_step()
        restored = mngr.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), opt=ocp.args.StandardRestore()))
    flat = jax.tree_util.tree_flatten_with_path({"model": restored["model"], "opt": restored["opt"]})[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat} | {"step": step}


@pytest.fixture(scope="session")
def full_run(tiny_h5, tmp_path_factory):
    """4 steps (2 of phase I, 2 of phase II) uninterrupted."""
    workdir = tmp_path_factory.mktemp("full")
    r = run_train(workdir, tiny_overrides(tiny_h5))
    assert r.returncode == 0, r.stderr[-3000:]
    first = next(line for line in r.stderr.splitlines() if line.startswith("device "))
    assert "; routines cpu, precision highest, float32, float64 conv sums; batch " in first, first  # the policy, first
    return workdir


def test_training_cli_writes_logs_checkpoints_samples(full_run, tmp_path):
    rows = read_metrics(full_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["phase"] for r in rows] == [1, 1, 2, 2]
    for r in rows:
        assert {"loss", "lr/encoder", "grad_norm/encoder", "grad_norm/graph", "param_norm/decoder"} <= set(r)
        assert all(math.isfinite(v) for v in r.values() if v is not None)
        assert r["mfu"] is None  # CPU: no published peak (the run's first line says so)
    assert "ssim_loss_vi" in rows[0] and "fusion_intensity" in rows[2]
    assert "grad_norm/base_fuse" not in rows[0] and "grad_norm/base_fuse" in rows[2]
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert any((full_run / "tensorboard").iterdir())
    assert sorted(p.name for p in (full_run / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    # the workdir is a checkpoint for fusion
    from smfnet_jax.checkpoint import load_checkpoint
    assert load_checkpoint(full_run).step == 4


def test_resume_follows_the_uninterrupted_run(full_run, tiny_h5, tmp_path):
    workdir = tmp_path / "resumed"
    first = run_train(workdir, tiny_overrides(tiny_h5) + ["--config.max_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train(workdir, tiny_overrides(tiny_h5))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    a, b = load_state(full_run), load_state(workdir)
    assert a["step"] == b["step"] == 4
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # same data order and the same loss trajectory
    la = [r["loss"] for r in read_metrics(full_run)]
    lb = [r["loss"] for r in read_metrics(workdir)]
    assert la == lb


def test_missing_dataset_explains_how_to_get_msrs(tmp_path):
    r = run_train(tmp_path / "w", ["--config.data.h5=/nonexistent/msrs.h5", "--config.progress=False"],
                  timeout=300)
    assert r.returncode == 2
    assert "MSRS" in r.stderr and "train.prepare" in r.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_h5, tmp_path):
    """The loop's guard, with the jitted step replaced by one that returns a NaN loss."""
    from ml_collections import config_dict
    from train.trainer import Trainer, TrainingError
    cfg = smoke.get_config()
    cfg.data.h5 = str(tiny_h5)
    cfg.data.crop_size = 0
    cfg.steps_per_epoch, cfg.checkpoint_every_steps, cfg.log_every_steps = 2, 1, 1
    cfg.progress = False
    cfg = config_dict.FrozenConfigDict(cfg)
    trainer = Trainer(cfg, tmp_path)
    calls = []

    def fake_step(state, vi, ir):
        calls.append(1)
        return state, {"loss": np.float32(1.0 if len(calls) == 1 else np.nan)}

    trainer.steps = {1: fake_step, 2: fake_step}
    with pytest.raises(TrainingError, match="non-finite loss at step 2"):
        trainer.run(progress=False)
    assert trainer.ckpt.latest_step() == 1


# --------------------------------------------------------------------------- data parallel
SHARDED_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    assert jax.device_count() == 4, jax.devices()
    from train.configs import smoke
    from train.data import SyntheticPairs
    from train.optim import make_optimizer
    from train.step import init_train_state, jit_train_step
    from train.trainer import make_mesh, _replicate
    from smfnet_jax.model import create_model
    cfg = smoke.get_config()  # lr 1e-3 at every sub-model's first step
    src = SyntheticPairs(4, 16, seed=5)
    vi = np.stack([src[i]["vi"] for i in range(4)]); ir = np.stack([src[i]["ir"] for i in range(4)])
    tx = make_optimizer(cfg, 1, 2)
    graphdef, state = init_train_state(create_model(0), cfg, tx=tx)
    single, m1 = jit_train_step(graphdef, 2, cfg, tx=tx)(jax.device_put(state, jax.devices()[0]), vi, ir)
    mesh = make_mesh()
    from jax.sharding import NamedSharding, PartitionSpec as P
    batch = NamedSharding(mesh, P("data"))
    graphdef, state = init_train_state(create_model(0), cfg, tx=tx)
    sharded, m4 = jit_train_step(graphdef, 2, cfg, mesh, tx=tx)(
        _replicate(state, mesh), jax.device_put(vi, batch), jax.device_put(ir, batch))
    assert len(sharded["params"]["encoder"]["patch_embed"]["kernel"].sharding.device_set) == 4
    # the micro-batched step on the mesh: batch 8, 2 samples per device, 2 micro-batches
    vi8, ir8 = np.concatenate([vi, vi[::-1]]), np.concatenate([ir, ir[::-1]])
    graphdef, state = init_train_state(create_model(0), cfg, tx=tx)
    single8, m1_8 = jit_train_step(graphdef, 2, cfg, tx=tx)(jax.device_put(state, jax.devices()[0]), vi8, ir8)
    cfg.microbatches = 2
    graphdef, state = init_train_state(create_model(0), cfg, tx=tx)
    micro, m4_8 = jit_train_step(graphdef, 2, cfg, mesh, tx=tx)(
        _replicate(state, mesh), jax.device_put(vi8, batch), jax.device_put(ir8, batch))

    def leaf_differences(x, y):  # per leaf: max |a - b| / max(1, max |a|)
        out = []
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            out.append(float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a))))))
        return out

    def sensitivity(step, state_of, vi, ir):  # per leaf: the step's move for inputs moved k ulps
        base = step(state_of(), vi, ir)
        worst = None
        for k in (1, 2, 3, 5, 8):
            e = np.float32(1 + k * 2 ** -23)
            d = leaf_differences(base, step(state_of(), vi * e, ir * e))
            worst = d if worst is None else [max(a, b) for a, b in zip(worst, d)]
        return worst

    def fresh(cfg_):
        return lambda: jax.device_put(init_train_state(create_model(0), cfg_, tx=tx)[1], jax.devices()[0])

    cfg.microbatches = 1
    single_step = jit_train_step(graphdef, 2, cfg, tx=tx)
    print(json.dumps({
        "diff": leaf_differences((single, m1), (sharded, m4)), "loss": float(m1["loss"]),
        "sensitivity": sensitivity(single_step, fresh(cfg), vi, ir),
        "diff_micro": leaf_differences((single8, m1_8), (micro, m4_8)),
        "sensitivity_micro": sensitivity(single_step, fresh(cfg), vi8, ir8),
        "loss_micro": [float(m1_8["loss"]), float(m4_8["loss"])]}))
""")


def test_sharded_step_equals_single_device_step():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO, capture_output=True,
                       text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert math.isfinite(result["loss"])
    # Every leaf of the state and metrics within 1e-5, except where float32 rounding alone moves
    # the single-device step further (calibrated per leaf on inputs moved by 1-8 ulps): the
    # gradient is discontinuous at ReLU6/|x| kinks, and a value within an ulp of one may land
    # on either side in two programs that round differently, e.g. the detail fusion layer's
    # rho kernels of its second invertible block, whose gradient then jumps by ~3e-3 (float64
    # agrees with the sharded step there). A sharding error moves many leaves by far more.
    for key in ("", "_micro"):
        diff, sens = result["diff" + key], result["sensitivity" + key]
        bad = [(i, d, s) for i, (d, s) in enumerate(zip(diff, sens)) if d > max(1e-5, 2 * s)]
        assert not bad, (key, bad)
        assert sum(d > 1e-5 for d in diff) <= 2, (key, diff)
    # micro-batched on the mesh vs whole batch on one device: the same loss
    assert result["loss_micro"][1] == pytest.approx(result["loss_micro"][0], rel=1e-5)


# --------------------------------------------------------------------------- multi-host
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(full_run, tiny_h5, tmp_path):
    """2 processes joined over loopback (gloo CPU collectives) == the 1-process run.

    Each process has one CPU device and reads only its half of every global batch; the
    1-process run (`full_run`) has two devices and reads whole batches.
    """
    workdir = tmp_path / "multi"
    port = _free_port()
    procs = []
    try:
        for pid in range(2):
            cmd = [sys.executable, "-m", "train.main", "--config", "smoke.py", "--workdir", str(workdir),
                   # process 0 evaluates (phase I after step 2, phase II after 4); process 1 waits
                   *tiny_overrides(tiny_h5, eval_every_epochs=1),
                   f"--config.eval.ir={REPO / 'samples' / 'TNO' / 'ir'}",
                   f"--config.eval.vi={REPO / 'samples' / 'TNO' / 'vi'}", "--config.eval.max_pairs=1",
                   f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
            procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True,
                                          env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
                                               "JAX_PLATFORMS": "cpu",
                                               # two writers of one cache entry would race
                                               "SMFNET_JAX_CACHE": "off"}))
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:  # never leave a process behind, whatever happened
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    multi, single = load_state(workdir), load_state(full_run)
    assert multi["step"] == single["step"] == 4
    worst = 0.0
    for key in single:
        if key == "step":
            continue
        a, b = single[key].astype(np.float64), multi[key].astype(np.float64)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0) / max(1.0, float(np.max(np.abs(a), initial=0.0)))))
    assert worst <= 1e-5, worst
    rows = read_metrics(workdir)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in read_metrics(full_run)], rel=1e-5)
    # evaluated once per evaluation step, by process 0, and both processes went on to the end
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [sorted(k for k in r if k.startswith("eval/")) for r in rows] == [
        [], ["eval/psnr_ir", "eval/psnr_vi", "eval/ssim_ir", "eval/ssim_vi"], [],
        ["eval/" + n for n in sorted(METRIC_NAMES)]]
    # the checkpoint the two processes wrote restores in this single process
    from smfnet_jax.checkpoint import load_checkpoint
    assert load_checkpoint(workdir).step == 4


def tensorboard_tags(folder: Path) -> dict[str, set]:
    """{"scalar": tags, "image": tags} of every TensorBoard event file under `folder`
    (TFRecord framing read here: tensorboardX writes, but does not read)."""
    import struct
    from tensorboardX.proto import event_pb2
    tags = {"scalar": set(), "image": set()}
    for path in folder.rglob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for v in event.summary.value:
                tags["image" if v.HasField("image") else "scalar"].add(v.tag)
    return tags


def test_a_run_shows_throughput_fusion_quality_images_and_a_profile(tiny_h5, tmp_path):
    """Per logged step: step time, samples/s, data-wait share and an explicit null MFU (CPU,
    named in the first line); after phase I the reconstructions' PSNR/SSIM, after phase II
    eval/EN ... equal to infer.evaluate on infer.main's outputs of the final weights; image
    summaries in TensorBoard; a jax.profiler trace of the asked steps."""
    import shutil
    pairs = tmp_path / "pairs"
    for modality in ("ir", "vi"):
        (pairs / modality).mkdir(parents=True)
        shutil.copy(REPO / "samples" / "TNO" / modality / "07.png", pairs / modality / "07.png")
    workdir = tmp_path / "watched"
    r = run_train(workdir, tiny_overrides(tiny_h5, eval_every_epochs=1) + [
        f"--config.eval.ir={pairs / 'ir'}", f"--config.eval.vi={pairs / 'vi'}",
        "--config.profile_steps=2:3"])
    assert r.returncode == 0, r.stderr[-3000:]
    first = next(line for line in r.stderr.splitlines() if line.startswith("device "))
    assert "mfu: null (no published peak for 'cpu'" in first, first
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["step_time_s"] > 0 and row["samples_per_s"] > 0 and row["samples_per_s_per_device"] > 0
        assert 0 <= row["data_wait_share"] < 1 and 0 < row["goodput"] <= 1 and row["mfu"] is None
    assert {"eval/psnr_vi", "eval/psnr_ir", "eval/ssim_vi", "eval/ssim_ir"} <= set(rows[1])
    assert rows[1]["eval/psnr_vi"] > 0 and rows[1]["eval_share"] > 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["compile_s/phase1"] > 0 and summary["compile_s/phase2"] > 0
    assert "throughput: 4 steps" in r.stderr
    # the profile
    assert list((workdir / "profile").rglob("*.xplane.pb")), r.stderr[-2000:]
    assert f"profile of steps 2..3 in {workdir / 'profile'}" in r.stderr
    # images in TensorBoard: the sample PNGs and the evaluation grids
    tags = tensorboard_tags(workdir / "tensorboard")
    assert {"samples", "eval/07"} <= tags["image"], tags["image"]
    assert "eval/EN" in tags["scalar"] and "step_time_s" in tags["scalar"]
    # eval/* == infer.evaluate on infer.main's fusion with the final checkpoint (step 4)
    out = tmp_path / "fused"
    env = {**os.environ, **TWO_DEVICES}
    fused = subprocess.run([sys.executable, "-m", "infer.main", "--ckpt", str(workdir), "--ir", str(pairs / "ir"),
                            "--vi", str(pairs / "vi"), "--out", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=600, env=env)
    assert fused.returncode == 0, fused.stderr[-2000:]
    scored = subprocess.run([sys.executable, "-m", "infer.evaluate", "--ir", str(pairs / "ir"), "--vi",
                             str(pairs / "vi"), "--fused", str(out), "--json", str(tmp_path / "m.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert scored.returncode == 0, scored.stderr[-2000:]
    mean = json.loads((tmp_path / "m.json").read_text())["mean"]
    for name, value in mean.items():
        assert rows[3][f"eval/{name}"] == pytest.approx(value, rel=1e-6, abs=1e-12), name


def test_open_data_crops_and_rejects_oversized_crops(tiny_h5):
    from train.data import CroppedPairs
    from train.trainer import TrainingError, open_data
    cfg = smoke.get_config()
    cfg.data.h5, cfg.data.crop_size = str(tiny_h5), 8
    src = open_data(cfg)
    assert isinstance(src, CroppedPairs) and src[0]["vi"].shape == (8, 8, 1)
    cfg.data.crop_size = 0
    assert not isinstance(open_data(cfg), CroppedPairs)
    cfg.data.crop_size = 64
    with pytest.raises(TrainingError, match="crop_size=64 is larger"):
        open_data(cfg)


def test_kill_between_checkpoints_then_resume_logs_each_step_once(tiny_h5, tmp_path):
    """A real `kill -9` after checkpoint 8 and before checkpoint 16: the restarted run takes
    over the dead trainer's lock, resumes from step 8, drops the rows 9.. it logged before
    dying, and ends with exactly one metrics.jsonl row per step. The workdir then refuses a
    resume with another batch size (exit 2, the difference named)."""
    import time
    workdir = tmp_path / "killed"
    extra = tiny_overrides(tiny_h5) + ["--config.num_epochs=8", "--config.checkpoint_every_steps=8"]
    cmd = [sys.executable, "-m", "train.main", "--config", "smoke.py", "--workdir", str(workdir), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **TWO_DEVICES}, start_new_session=True)
    logged, saved = [], []
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            if (workdir / "metrics.jsonl").exists():
                logged = [json.loads(x)["step"] for x in
                          (workdir / "metrics.jsonl").read_text().splitlines() if x.endswith("}")]
                saved = sorted(int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.name.isdigit())
                if saved == [8] and logged and logged[-1] >= 10:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert saved == [8] and 10 <= logged[-1] < 16, (saved, logged)  # killed between checkpoints

    r = run_train(workdir, extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"took over the lock of {workdir}, left by pid {proc.pid}" in r.stderr
    assert "resumed from" in r.stderr and "step 8" in r.stderr
    assert [row["step"] for row in read_metrics(workdir)] == list(range(1, 17))

    r = run_train(workdir, extra + ["--config.batch_size=4", "--config.num_epochs=9"], timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "  batch_size: 2 -> 4" in r.stderr and "num_epochs" not in r.stderr
