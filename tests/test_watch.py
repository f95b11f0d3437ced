"""Watching a run: the peak table shared by train.plan and the trainer, the throughput
figures, and the profile/eval config checks (no training here; the runs are in
tests/test_train.py)."""
from __future__ import annotations

import pytest

from smfnet_jax.policy import resolve
from train import chips, plan
from train.configs import smoke
from train.configs.validate import config_problems, parse_steps
from train.trainer import RunClock


def test_one_peak_table_for_plan_and_trainer():
    assert plan.V5E is chips.V5E and plan.H100 is chips.H100 and plan.peak_flops is chips.peak_flops
    assert chips.chip_for("TPU v5 lite") is chips.V5E and chips.chip_for("TPU v6 lite") is chips.V6E
    assert chips.chip_for("NVIDIA H100 80GB HBM3") is chips.H100
    assert chips.chip_for("NVIDIA A100-SXM4-40GB") is chips.A100
    assert chips.chip_for("cpu") is None and chips.chip_for("NVIDIA H100 PCIe") is None


def test_peak_follows_dtype_and_precision():
    bf16 = resolve(None, precision="highest", dtype="bfloat16")
    f32 = resolve(None, precision="highest", dtype="float32")
    tf32 = resolve(None, precision="default", dtype="float32")
    assert chips.peak_flops(chips.H100, bf16) == 989e12
    assert chips.peak_flops(chips.H100, f32) == 67e12 and chips.peak_flops(chips.H100, tf32) == 494.5e12
    assert chips.peak_flops(chips.V5E, f32) == 197e12 / 6 and chips.peak_flops(chips.V5E, tf32) == 197e12
    assert chips.describe_peak(chips.H100, bf16, "x") == ("mfu peak 989 TFLOP/s per chip (NVIDIA H100 "
                                                          "80GB HBM3, bfloat16, precision highest)")
    assert chips.describe_peak(None, f32, "cpu").startswith("mfu: null (no published peak for 'cpu'")


def test_run_clock_splits_wall_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("train.trainer.time.perf_counter", lambda: now[0])
    clock = RunClock(global_batch=8, devices=2, peak_flops=1e12)
    clock.add("compile", 2.0)
    clock.add("data", 1.0)
    clock.steps = 4
    now[0] += 10.0  # 10 s: 2 compiling, 1 waiting for data, 7 in 4 steps
    w = clock.window(flops=1e12)
    assert w["step_time_s"] == pytest.approx(1.75) and w["samples_per_s"] == pytest.approx(8 / 1.75)
    assert w["samples_per_s_per_device"] == pytest.approx(4 / 1.75)
    assert w["data_wait_share"] == pytest.approx(0.1) and w["compile_share"] == pytest.approx(0.2)
    assert w["goodput"] == pytest.approx(0.7) and w["mfu"] == pytest.approx(1e12 / (1.75 * 2 * 1e12))
    clock.steps = 6
    now[0] += 1.0
    w = clock.window(flops=None)  # a new window: 2 steps in 1 s, no waits; no FLOPs, no MFU
    assert w["step_time_s"] == pytest.approx(0.5) and w["goodput"] == 1.0 and w["mfu"] is None
    s = clock.summary({1: 1e12, 2: 3e12})
    assert s["steps"] == 6 and s["wall_s"] == pytest.approx(11.0) and s["goodput"] == pytest.approx(8 / 11)


def test_profile_and_eval_settings_are_checked():
    assert parse_steps("3:5") == (3, 5) and parse_steps("0:2") is None and parse_steps("5:3") is None
    assert parse_steps("3") is None and parse_steps("a:b") is None
    cfg = smoke.get_config()
    assert config_problems(cfg) == []  # the smoke config evaluates samples/TNO
    cfg.profile_steps = "5:2"
    cfg.eval.vi = ""
    problems = config_problems(cfg)
    assert any(p.startswith("profile_steps='5:2': must be") for p in problems), problems
    assert "eval.ir and eval.vi: give both folders of test pairs, or neither" in problems
    cfg = smoke.get_config()
    cfg.eval.ir = "/no/such/folder"
    assert config_problems(cfg) == ["eval.ir='/no/such/folder': no such folder"]


def test_profile_traces_the_asked_steps_on_process_0(tmp_path, capsys):
    import jax.numpy as jnp
    from train.trainer import Profile
    cfg = smoke.get_config()
    cfg.profile_steps = "2:3"
    assert Profile(cfg, tmp_path / "other", is_main=False).steps is None  # process 0 only, by default
    profile = Profile(cfg, tmp_path, is_main=True)
    for step in range(1, 5):
        profile.before(step)
        profile.after(step, jnp.ones(4) * step)
        assert profile.active == (step == 2)
    profile.stop()  # nothing left to stop
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert capsys.readouterr().err.startswith(f"profile of steps 2..3 in {tmp_path / 'profile'} ")
