"""The optimiser as optax transformations (train/optim.py): torch's Adam and clipping, the
phases' masks, the schedules, other optax optimisers from the config, and checkpoints written
before the optimiser was optax.

Cheap except `test_adamw_with_cosine_trains_the_smoke_config` (two compiled steps, 16x16).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.configs import msrs, smoke

REPO = Path(__file__).resolve().parents[1]
SUBS = ("encoder", "decoder", "graph", "base_fuse", "detail_fuse")


def torch_adam_float64(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam (weight_decay 0) written from its documented update, in float64;
    `grads[i]` None: no gradient at step i (torch skips the parameter, its count included)."""
    p = np.array(p, np.float64)
    m, v, t = np.zeros_like(p), np.zeros_like(p), 0
    for g in grads:
        if g is None:
            continue
        t += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
    return p, t


def test_torch_adam_is_torch_adam_with_per_parameter_steps():
    """Two leaves over four steps, one of them untrained for the first two (like the graph's
    fused head in phase I): each takes torch's steps, counted per parameter, so the late one's
    first step is step 1 (full bias correction), not step 3."""
    import jax.numpy as jnp
    import optax
    from train.optim import only_trained, torch_adam
    r = np.random.default_rng(0)
    p0 = {"early": r.normal(size=5).astype(np.float32), "late": np.zeros(5, np.float32)}
    gs = [r.normal(size=5).astype(np.float32) * 10.0 ** -k for k in range(4)]
    tx = {late_on: only_trained(torch_adam(1e-3), lambda u, on=late_on: {"early": True, "late": on})
          for late_on in (False, True)}
    params, state = dict(p0), tx[True].init(p0)
    for i, g in enumerate(gs):
        updates, state = tx[i >= 2].update({"early": jnp.asarray(g), "late": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    want_early, t_early = torch_adam_float64(p0["early"], gs, 1e-3)
    want_late, t_late = torch_adam_float64(p0["late"], [None, None] + gs[2:], 1e-3)
    assert int(state.step["early"]) == t_early == 4 and int(state.step["late"]) == t_late == 2
    np.testing.assert_allclose(params["early"], want_early, rtol=0, atol=2e-7)
    np.testing.assert_allclose(params["late"], want_late, rtol=0, atol=2e-7)
    # from 0, the late leaf holds the updates themselves: float32-exact, which needs
    # 1 - 0.999**t not computed in float32 (that alone scales a step 1 by 1 + 6e-6)
    np.testing.assert_allclose(params["late"], want_late, rtol=1e-6)


def test_torch_clip_by_global_norm_is_torch_formula():
    import jax.numpy as jnp
    from train.optim import torch_clip_by_global_norm
    g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}
    clipped, _ = torch_clip_by_global_norm(0.01).update(g, None)
    assert np.allclose(clipped["a"], np.array([3.0, 4.0]) * 0.01 / (5.0 + 1e-6), rtol=1e-7)
    small, _ = torch_clip_by_global_norm(100.0).update(g, None)
    assert np.array_equal(small["a"], g["a"])        # never scaled up


def test_step_schedule_is_the_references_steplr():
    """StepLR per epoch, floored, of a sub-model's own step count (the fusion layers' count
    starts in phase II), each value rounded once from float64."""
    from train.optim import learning_rate_schedule
    cfg = msrs.get_config()  # lr 1e-4, x0.5 every 20 epochs, floor 1e-6
    lr = lambda count, spe=3: float(learning_rate_schedule(cfg, spe, "encoder")(count))  # noqa: E731
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    assert lr(0) == lr(59) == f32(1e-4) and lr(60) == f32(5e-5)
    assert lr(40, spe=1) == f32(2.5e-5) and lr(119, spe=1) == f32(1e-4 / 32)
    cfg.lr_min = 2e-5
    assert lr(119, spe=1) == f32(2e-5)          # floored like the reference's manual clamp
    cfg.lr, cfg.lr_gamma, cfg.lr_min = 1e-3, 0.3, 0.0
    assert lr(40, spe=1) == f32(1e-3 * 0.3 ** 2)  # not 1e-3 * 0.3 * 0.3 in float32


def fake_params():
    """A parameter tree shaped like the model's sub-models, small, with the graph's fused
    head (unused in phase I)."""
    r = np.random.default_rng(1)
    leaf = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    return {"encoder": {"w": leaf(3, 2), "b": leaf(2)}, "decoder": {"w": leaf(4)},
            "graph": {"fuse": {"kernel": leaf(2, 2)}, "gru": {"kernel": leaf(3)}},
            "base_fuse": {"w": leaf(2)}, "detail_fuse": {"w": leaf(2)}}


def run_phases(cfg, spe: int, steps: dict[int, int]):
    """`steps[phase]` steps of each phase's optimiser on fake_params with random gradients;
    returns [(phase, params, opt state, {sub: lr})] after each step, and the initial params."""
    import jax
    import optax
    from train.optim import learning_rate, make_optimizer
    params = fake_params()
    txs = {p: make_optimizer(cfg, spe, p) for p in (1, 2)}
    state = txs[1].init(params)
    assert jax.tree.structure(state) == jax.tree.structure(txs[2].init(params))
    r = np.random.default_rng(2)
    out, p0 = [], params
    for phase in (1, 2):
        update = jax.jit(txs[phase].update)
        for _ in range(steps[phase]):
            grads = jax.tree.map(lambda x: r.normal(size=x.shape).astype(np.float32), params)
            updates, state = update(grads, state, params)
            params = optax.apply_updates(params, updates)
            out.append((phase, params, state, {s: float(learning_rate(state, s)) for s in SUBS}))
    return out, p0


def test_phases_mask_what_they_do_not_train_and_the_fusion_schedule_starts_late():
    """Phase I (3 epochs of 2 steps): the fusion layers and the graph's fused head neither move
    nor count a step (their state stays the initial one), and the fusion layers' StepLR starts
    at phase II; in phase II the fused head's Adam takes its step 1."""
    import jax
    cfg = smoke.get_config()  # lr 1e-3, x0.5 every 2 epochs
    cfg.num_epochs, cfg.phase1_epochs = 6, 3
    rows, p0 = run_phases(cfg, spe=2, steps={1: 6, 2: 6})
    step_lr = lambda epoch: float(np.float32(max(1e-6, 1e-3 * 0.5 ** (epoch // 2))))  # noqa: E731
    for i, (phase, params, state, lrs) in enumerate(rows):
        epoch = i // 2
        assert lrs["encoder"] == lrs["graph"] == step_lr(epoch), (i, lrs)
        assert lrs["base_fuse"] == lrs["detail_fuse"] == step_lr(max(0, epoch - 3)), (i, lrs)
        if phase == 1:
            for sub in ("base_fuse", "detail_fuse"):
                np.testing.assert_array_equal(params[sub]["w"], p0[sub]["w"])
            np.testing.assert_array_equal(params["graph"]["fuse"]["kernel"], p0["graph"]["fuse"]["kernel"])
            assert not np.array_equal(params["graph"]["gru"]["kernel"], p0["graph"]["gru"]["kernel"])
    _, _, state, _ = rows[5]  # the end of phase I
    adam = lambda sub: state.inner_states[sub].inner_state[1].inner_state  # noqa: E731
    assert int(adam("graph").step["graph"]["gru"]["kernel"]) == 6
    assert int(adam("graph").step["graph"]["fuse"]["kernel"]) == 0
    assert not np.any(adam("graph").exp_avg["graph"]["fuse"]["kernel"])
    assert int(state.inner_states["base_fuse"].inner_state[1].count) == 0
    assert int(adam("base_fuse").step["base_fuse"]["w"]) == 0
    _, _, state, _ = rows[6]  # the first step of phase II
    assert int(adam("graph").step["graph"]["fuse"]["kernel"]) == 1
    assert int(adam("graph").step["graph"]["gru"]["kernel"]) == 7
    assert int(state.inner_states["detail_fuse"].inner_state[1].count) == 1
    assert jax.tree.leaves(adam("encoder").step["encoder"]) == [7, 7]


def test_cosine_schedule_warms_up_and_ends_at_lr_min_per_sub_model():
    from train.optim import learning_rate_schedule
    cfg = smoke.get_config()  # 4 epochs, 2 of phase I, lr 1e-3, lr_min 1e-6
    cfg.schedule, cfg.warmup_epochs = "cosine", 0.5
    enc, fuse = (learning_rate_schedule(cfg, 4, s) for s in ("encoder", "base_fuse"))
    assert float(enc(0)) == 0.0 and float(enc(2)) == pytest.approx(1e-3)
    assert float(enc(16)) == pytest.approx(1e-6) and float(fuse(8)) == pytest.approx(1e-6)
    assert float(enc(8)) > 4e-4 > float(fuse(6))   # each decays over the steps it trains


def test_adamw_with_cosine_trains_the_smoke_config(tmp_path):
    """`optimizer=adamw, schedule=cosine` trains the smoke config (2 steps on 16x16 pairs, one
    per phase): the state holds optax's own ScaleByAdamState per sub-model, the rate of each
    step is each sub-model's cosine (the fusion layers' starting in phase II), the kwargs are
    recorded, and the fusion layers do not move in phase I (AdamW's decay would move them)."""
    import jax
    import optax
    from flax import nnx
    from ml_collections import config_dict
    from smfnet_jax.checkpoint import load_checkpoint
    from smfnet_jax.model import create_model
    from train.data import write_synthetic_h5
    from train.optim import learning_rate_schedule
    from train.trainer import Trainer
    cfg = smoke.get_config()
    cfg.data.h5 = str(write_synthetic_h5(tmp_path / "t.h5", n=4, size=16, seed=3))
    cfg.data.crop_size = 0
    cfg.steps_per_epoch, cfg.num_epochs, cfg.phase1_epochs = 1, 2, 1
    cfg.checkpoint_every_steps, cfg.sample_every_epochs, cfg.progress = 1, 100, False
    cfg.optimizer, cfg.schedule = "adamw", "cosine"
    with cfg.unlocked():
        cfg.optimizer_kwargs.weight_decay = 0.05
    cfg = config_dict.FrozenConfigDict(cfg)
    with Trainer(cfg, tmp_path / "w") as trainer:
        trainer.run(progress=False)
        opt = jax.device_get(trainer.state["opt"])
    adams = [x for x in jax.tree.leaves(opt, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(x, optax.ScaleByAdamState)]
    assert len(adams) == len(SUBS)
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    cosine = lambda sub, count: float(learning_rate_schedule(cfg, 1, sub)(count))  # noqa: E731
    assert rows[0]["lr/encoder"] == cosine("encoder", 0) == pytest.approx(1e-3)
    assert rows[1]["lr/encoder"] == cosine("encoder", 1) == pytest.approx(5.005e-4)
    assert rows[1]["lr/base_fuse"] == cosine("base_fuse", 0) == pytest.approx(1e-3)
    recorded = json.loads((tmp_path / "w" / "config.json").read_text())
    assert recorded["optimizer"] == "adamw" and recorded["optimizer_kwargs"] == {"weight_decay": 0.05}
    # the step-1 checkpoint: phase I moved the encoder, not the fusion layers
    first, last = (load_checkpoint(tmp_path / "w", step=s).model for s in (1, 2))
    start = create_model(cfg.seed)
    for sub, moved in (("base_fuse", False), ("encoder", True)):
        a, b = (jax.tree.leaves(nnx.state(getattr(m, sub), nnx.Param)) for m in (start, first))
        assert any(not np.array_equal(x, y) for x, y in zip(a, b)) == moved, sub
    assert any(not np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(nnx.state(first.base_fuse, nnx.Param)), jax.tree.leaves(nnx.state(last.base_fuse, nnx.Param))))


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("changes,message", [
    ({"optimizer": "adamx"}, "optimizer='adamx': neither torch_adam nor an optax optimiser"),
    ({"optimizer": "adamw", "optimizer_kwargs": {"weight_decy": 0.1}},
     "optimizer_kwargs.weight_decy: adamw takes no argument weight_decy (did you mean weight_decay?)"),
    ({"optimizer_kwargs": {"learning_rate": 0.1}},
     "optimizer_kwargs.learning_rate: the learning rate is set by lr and schedule"),
    ({"optimizer_kwargs": {"b3": 0.1}}, "optimizer_kwargs.b3: torch_adam takes no argument b3"),
    ({"schedule": "cosin"}, "schedule='cosin': must be one of step, cosine, constant"),
    ({"warmup_epochs": -1.0}, "warmup_epochs=-1.0: must be a finite number >= 0"),
    ({"warmup_epochs": 1.0}, "warmup_epochs=1.0: only schedule='cosine' warms up"),
])
def test_optimizer_config_errors_are_one_line(changes, message):
    from train.configs.validate import as_dict, config_problems
    cfg = as_dict(smoke.get_config())
    cfg.update(changes)
    problems = config_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_optimizer_from_the_command_line(tmp_path):
    """--config.optimizer_kwargs.NAME=VALUE takes any name (config_flags would refuse one the
    config lacks); a name the optimiser does not take is one line, exit 2, before any work."""
    from train.main import pop_optimizer_kwargs
    argv, kwargs = pop_optimizer_kwargs(["--config", "smoke.py", "--config.optimizer_kwargs.weight_decay=0.05",
                                         "--config.optimizer_kwargs.nesterov", "True",
                                         "--config.optimizer_kwargs.mu_dtype=bfloat16", "--config.lr=1"])
    assert argv == ["--config", "smoke.py", "--config.lr=1"]
    assert kwargs == {"weight_decay": 0.05, "nesterov": True, "mu_dtype": "bfloat16"}
    r = subprocess.run([sys.executable, "-m", "train.main", "--config", "smoke.py", "--workdir",
                        str(tmp_path / "w"), "--config.optimizer=adamw",
                        "--config.optimizer_kwargs.weight_decy=0.05"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "optimizer_kwargs.weight_decy: adamw takes no argument weight_decy (did you mean " \
           "weight_decay?)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- old checkpoints
def test_checkpoint_of_the_adam_state_layout_restores(tmp_path):
    """A workdir checkpointed before the optimiser was optax ({sub-model: AdamState(step,
    exp_avg, exp_avg_sq)} under "opt", config.json with adam_b1/b2/eps and without the
    optimiser keys) resumes: each sub-model's torch_adam state holds the old arrays, and its
    chain's step count (its schedule's) is its largest per-parameter count."""
    import jax
    import orbax.checkpoint as ocp
    from ml_collections import config_dict
    from train.data import write_synthetic_h5
    from train.optim import learning_rate
    from train.trainer import Trainer
    cfg = smoke.get_config()
    cfg.data.h5 = str(write_synthetic_h5(tmp_path / "t.h5", n=4, size=16, seed=3))
    cfg.data.crop_size, cfg.steps_per_epoch, cfg.progress = 0, 2, False
    cfg = config_dict.FrozenConfigDict(cfg)
    work = tmp_path / "w"
    r = np.random.default_rng(0)
    with Trainer(cfg, work) as trainer:  # writes a step-3 checkpoint in the old layout, no training
        params = jax.device_get(trainer.state["params"])
        old = {}
        for sub in SUBS:
            trained = 0 if sub in ("base_fuse", "detail_fuse") else 3  # a phase-I checkpoint
            old[sub] = {"step": jax.tree.map(lambda p: np.int32(trained), params[sub]),
                        "exp_avg": jax.tree.map(lambda p: r.normal(size=p.shape).astype(p.dtype), params[sub]),
                        "exp_avg_sq": jax.tree.map(lambda p: r.random(p.shape).astype(p.dtype), params[sub])}
        old["graph"]["step"]["fuse"] = jax.tree.map(lambda c: np.int32(0), old["graph"]["step"]["fuse"])
        args = trainer._ckpt_args(save=True)
        trainer.ckpt.save(3, args=ocp.args.Composite(model=args["model"], data=args["data"],
                                                     opt=ocp.args.StandardSave(old)), force=True)
        trainer.ckpt.wait_until_finished()
    record = json.loads((work / "config.json").read_text())
    for key in ("optimizer", "optimizer_kwargs", "schedule", "warmup_epochs"):
        del record[key]
    record.update(adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8)
    (work / "config.json").write_text(json.dumps(record))
    with Trainer(cfg, work) as trainer:
        assert trainer.start_step == 3
        opt = jax.device_get(trainer.state["opt"])
    for sub in SUBS:
        adam = opt.inner_states[sub].inner_state[1].inner_state
        for field in ("step", "exp_avg", "exp_avg_sq"):
            for a, b in zip(jax.tree.leaves(getattr(adam, field)[sub]), jax.tree.leaves(old[sub][field])):
                np.testing.assert_array_equal(a, b, err_msg=f"{sub} {field}")
        count = int(opt.inner_states[sub].inner_state[1].count)
        assert count == (0 if sub in ("base_fuse", "detail_fuse") else 3), sub
    assert float(learning_rate(opt, "encoder")) == pytest.approx(1e-3)
