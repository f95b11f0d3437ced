"""Config validation, the workdir lock, the recorded config and resume log truncation.

All cheap: no model is built and nothing is compiled (the CLI runs of these rules are in
tests/test_train.py).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.configs import msrs, smoke
from train.configs.validate import ConfigError, as_dict, check_config, config_problems
from train.workdir import (CONFIG_HISTORY, CONFIG_NAME, LOCK_NAME, WorkdirError, WorkdirLock,
                           reconcile_config, truncate_metrics)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- validation
def test_shipped_configs_are_valid(tmp_path):
    assert config_problems(smoke.get_config()) == []
    cfg = msrs.get_config()
    cfg.data.h5 = str(tmp_path / "x.h5")
    (tmp_path / "x.h5").write_bytes(b"")
    assert config_problems(cfg) == []


BAD_VALUES = [
    ("batch_size", 0, "batch_size=0: must be a positive integer"),
    ("batch_size", -2, "batch_size=-2: must be a positive integer"),
    ("num_epochs", 0, "num_epochs=0: must be a positive integer"),
    ("steps_per_epoch", 0, "steps_per_epoch=0: must be -1 or a positive integer"),
    ("max_steps", -5, "max_steps=-5: must be -1 or a positive integer"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps=0: must be a positive integer"),
    ("log_every_steps", 0, "log_every_steps=0: must be a positive integer"),
    ("sample_every_epochs", 0, "sample_every_epochs=0: must be a positive integer"),
    ("keep_checkpoints", 0, "keep_checkpoints=0: must be an integer >= 1"),
    ("microbatches", -1, "microbatches=-1: must be an integer >= 0"),
    ("microbatches", 4, "microbatches=4: must be 0 (auto) or divide batch_size=2"),
    ("lr", -1e-3, "lr=-0.001: must be a finite number > 0"),
    ("lr", 0.0, "lr=0.0: must be a finite number > 0"),
    ("lr", float("nan"), "lr=nan: must be a finite number > 0"),
    ("lr_min", -1e-6, "lr_min=-1e-06: must be a finite number >= 0"),
    ("lr_min", 1.0, "lr_min=1.0: the floor must be <= lr=0.001"),
    ("lr_gamma", 0.0, "lr_gamma=0.0: must be a number in (0, 1]"),
    ("lr_gamma", 1.5, "lr_gamma=1.5: must be a number in (0, 1]"),
    ("lr_step_epochs", 0, "lr_step_epochs=0: must be a positive integer"),
    ("optimizer", 3, "optimizer=3: must be a string"),
    ("schedule", "linear", "schedule='linear': must be one of step, cosine, constant"),
    ("clip_norm", 0.0, "clip_norm=0.0: must be a finite number > 0"),
    ("phase1_epochs", 5, "phase1_epochs=5: must be <= num_epochs=4"),
    ("phase1_epochs", -1, "phase1_epochs=-1: must be an integer >= 0"),
    ("seed", -1, "seed=-1: must be an integer in [0, 4294967295]"),
    ("compute_dtype", "float16", "compute_dtype='float16': must be one of float32, bfloat16"),
    ("progress", 1, "progress=1: must be True or False"),
    ("data.crop_size", -1, "data.crop_size=-1: must be an integer >= 0"),
    ("data.crop_size", 64, "data.crop_size=64: larger than the synthetic pairs"),
    ("data.synthetic_size", 0, "data.synthetic_size=0: must be a positive integer"),
    ("data.worker_count", -1, "data.worker_count=-1: must be an integer >= 0"),
    ("data.h5", "/nonexistent/x.h5", "data.h5='/nonexistent/x.h5': no such file"),
    ("init_from", "/nonexistent/w.pth", "init_from='/nonexistent/w.pth': no such file"),
    ("distributed.process_id", 1, "distributed.process_id=1: must be < distributed.num_processes=1"),
    ("distributed.num_processes", 0, "distributed.num_processes=0: must be a positive integer"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_each_rule_names_the_key_and_the_reason(key, value, message):
    # a plain dict: ConfigDict's own type checks would refuse some of these before we see them
    cfg = as_dict(smoke.get_config())  # batch 2, 4 epochs, synthetic 32x32, lr 1e-3
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    problems = config_problems(cfg)
    assert len(problems) == 1, problems
    assert problems[0].startswith(message), problems


def test_all_problems_listed_at_once_and_unknown_keys_named():
    cfg = smoke.get_config()
    with cfg.unlocked():
        cfg.batch_size, cfg.lr, cfg.keep_checkpoints = 0, -1.0, 0
        cfg.lr_gama = 0.5
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    problems = e.value.problems
    assert len(problems) == 4, problems
    assert problems[0] == "lr_gama: unknown config key (did you mean lr_gamma?)"
    assert all(line.strip() in str(e.value) for line in problems)


def test_trainer_validates_before_touching_the_workdir(tmp_path):
    from train.trainer import Trainer
    cfg = smoke.get_config()
    cfg.keep_checkpoints = 0
    with pytest.raises(ConfigError, match="keep_checkpoints=0"):
        Trainer(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_unknown_override_is_one_line_with_a_suggestion():
    from train.main import resolve_config_arg, unknown_overrides
    argv = resolve_config_arg(["--config", "smoke.py", "--config.batch_sise=3", "--config.data.h5=x",
                               "--config.data.crop=3", "--config.foo=1", "--config.data=1"])
    assert unknown_overrides(argv) == [
        "batch_sise: unknown config key (did you mean batch_size?) (in --config.batch_sise=3)",
        "data.crop: unknown config key (did you mean data.crop_size?) (in --config.data.crop=3)",
        "foo: unknown config key (in --config.foo=1)"]


# --------------------------------------------------------------------------- the lock
HOLDER = textwrap.dedent("""
    import sys, time
    from train.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _start_holder(workdir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_trainer_is_refused_and_a_killed_holder_taken_over(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(WorkdirError, match=f"in use by another trainer: pid {holder.pid} on host "
                                               f"{socket.gethostname()}"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = WorkdirLock(tmp_path).acquire()  # the kernel dropped the dead holder's flock
    try:
        assert lock.took_over["pid"] == holder.pid
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_is_exclusive_within_a_process_and_released_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with WorkdirLock(tmp_path):
            with pytest.raises(WorkdirError, match=f"pid {os.getpid()}"):
                WorkdirLock(tmp_path).acquire()
            raise RuntimeError("boom")
    with WorkdirLock(tmp_path) as lock:
        assert lock.took_over is None  # released cleanly: nothing stale to take over


def test_lock_of_another_host_is_not_judged_stale(tmp_path):
    record = {"pid": 4242, "host": "elsewhere.example", "started": "2025-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(WorkdirError, match=r"another host: pid 4242 on host elsewhere.example.*"
                                           r"if you know it is no longer running, delete"):
        WorkdirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == record  # left as it was


def test_lock_naming_a_live_process_of_this_host_is_not_taken(tmp_path):
    # flock free yet the recorded pid alive: no flock on this file system, or pid reuse
    record = {"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(WorkdirError, match="still running"):
        WorkdirLock(tmp_path).acquire()


# --------------------------------------------------------------------------- the config record
def test_config_recorded_then_compared_on_resume(tmp_path):
    cfg = smoke.get_config()
    assert reconcile_config(tmp_path, cfg, None) == []
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["batch_size"] == 2
    cfg.batch_size, cfg.data.crop_size = 4, 16
    with pytest.raises(WorkdirError) as e:
        reconcile_config(tmp_path, cfg, 12)
    msg = str(e.value)
    assert "trained to step 12" in msg and "--allow_config_change" in msg
    assert "  batch_size: 2 -> 4" in msg and "  data.crop_size: 32 -> 16" in msg
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["batch_size"] == 2  # unchanged

    notes = []
    lines = reconcile_config(tmp_path, cfg, 12, allow_change=True, log=notes.append)
    assert lines == ["batch_size: 2 -> 4", "data.crop_size: 32 -> 16"]
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["batch_size"] == 4
    assert json.loads((tmp_path / CONFIG_HISTORY / "step_00000012.json").read_text())["batch_size"] == 2
    assert "batch_size: 2 -> 4" in notes[0]


def test_training_longer_and_cadences_may_change_on_resume(tmp_path):
    cfg = smoke.get_config()
    reconcile_config(tmp_path, cfg, None)
    cfg.num_epochs, cfg.log_every_steps, cfg.progress = 8, 5, False
    notes = []
    assert reconcile_config(tmp_path, cfg, 24, log=notes.append) == [
        "log_every_steps: 1 -> 5", "num_epochs: 4 -> 8", "progress: True -> False"]
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["num_epochs"] == 8
    assert reconcile_config(tmp_path, cfg, 30) == []  # now the recorded one


def test_config_recorded_before_the_optax_optimiser_resumes(tmp_path):
    """A record with adam_b1/b2/eps and none of the optimiser keys reads as torch_adam with
    those arguments: at torch_adam's defaults it is the current default config; another beta
    is named as the optimizer_kwargs entry it now is."""
    cfg = smoke.get_config()
    reconcile_config(tmp_path, cfg, None)
    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in ("optimizer", "optimizer_kwargs", "schedule", "warmup_epochs"):
        del record[key]
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**record, "adam_b1": 0.9, "adam_b2": 0.999,
                                                    "adam_eps": 1e-8}))
    assert reconcile_config(tmp_path, cfg, 6) == []
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**record, "adam_b1": 0.9, "adam_b2": 0.99,
                                                    "adam_eps": 1e-8}))
    with pytest.raises(WorkdirError) as e:
        reconcile_config(tmp_path, cfg, 6)
    assert "  optimizer_kwargs.b2: 0.99 -> '(absent)'" in str(e.value)
    with cfg.unlocked():
        cfg.optimizer_kwargs.b2 = 0.99
    assert reconcile_config(tmp_path, cfg, 6) == []


def test_fresh_start_overwrites_a_config_without_checkpoints(tmp_path):
    cfg = smoke.get_config()
    reconcile_config(tmp_path, cfg, None)
    cfg.batch_size = 4  # the first try failed before any checkpoint: nothing to be consistent with
    assert reconcile_config(tmp_path, cfg, None) == []
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["batch_size"] == 4


# --------------------------------------------------------------------------- the logs
def _rows(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_truncate_metrics_drops_rows_after_the_restored_step_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8))
                    + '{"step": 8, "lo')  # killed mid-write
    assert truncate_metrics(path, 4) == 4
    assert _rows(path) == [1, 2, 3, 4]
    assert truncate_metrics(path, 4) == 0
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == 0


def test_metrics_logger_resumes_without_duplicates(tmp_path):
    from train.trainer import MetricsLogger
    first = MetricsLogger(tmp_path, enabled=True)
    for s in range(1, 6):
        first.log({"step": s, "loss": float(s)})
    first.close()
    second = MetricsLogger(tmp_path, enabled=True, start_step=3)  # checkpoint 3, killed at 5
    for s in range(4, 7):
        second.log({"step": s, "loss": float(s)})
    second.close()
    assert _rows(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- the CLI (no compile)
def _train_cli(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.main", "--config", "smoke.py", "--workdir", str(workdir),
           "--config.progress=False", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_lists_every_bad_value_and_exits_2(tmp_path):
    r = _train_cli(tmp_path / "w", "--config.checkpoint_every_steps=0", "--config.log_every_steps=0",
                   "--config.batch_size=0", "--config.lr=-1e-4")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    for line in ("batch_size=0: must be a positive integer", "lr=-0.0001: must be a finite number > 0",
                 "checkpoint_every_steps=0: must be", "log_every_steps=0: must be"):
        assert line in r.stderr, r.stderr
    assert not (tmp_path / "w").exists()


def test_cli_unknown_key_and_bad_flag_value_exit_2(tmp_path):
    r = _train_cli(tmp_path / "w", "--config.foo=1", "--config.batch_sise=4")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: foo: unknown config key (in --config.foo=1)" in r.stderr
    assert "batch_sise: unknown config key (did you mean batch_size?)" in r.stderr
    r = _train_cli(tmp_path / "w", "--config.batch_size=abc")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "batch_size=abc" in r.stderr


def test_cli_refuses_a_locked_workdir(tmp_path):
    holder = _start_holder(tmp_path)
    try:
        r = _train_cli(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"in use by another trainer: pid {holder.pid}" in r.stderr
