"""SIGTERM (a preemptible VM's or a scheduler's notice) and Ctrl-C during training.

`Trainer.run` stops at the next step boundary, saves that step and waits for the save; then
`train.main` prints one line naming the step and exits 128 + the signal (143, 130), so a
scheduler restarts it; the rerun resumes exactly (metrics.jsonl of both runs together equals
an uninterrupted run's). Two processes stop at the same step (JAX's preemption sync point),
whichever of them got the signal. Ctrl-C during set-up is one line, not a traceback. The
caller's signal handlers are its own again after the run.

Only the first test trains the real model (its subject is an exact resume); the others replace
the jitted step with a small function, as the model is not their subject.
"""
from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from train.trainer import RunClock
from test_train import (REPO, TWO_DEVICES, load_state, read_metrics, run_train,  # noqa: F401
                        tiny_h5, tiny_overrides)

STOP_LINE = re.compile(r"^interrupted \((?P<cause>[^)]*)\): saved checkpoint step (?P<step>\d+) in "
                       r"(?P<dir>\S+); run the same command again to resume$")


def _stop_lines(stderr: str) -> list[re.Match]:
    return [m for m in map(STOP_LINE.match, stderr.splitlines()) if m]


def _saved_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _rows_logged(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.endswith("}")) if path.exists() else 0


def _wait_for_row(workdir: Path, k: int, procs: list[subprocess.Popen], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while _rows_logged(workdir) < k:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise AssertionError(f"row {k} of {workdir / 'metrics.jsonl'} never came "
                                 f"(exit statuses {[p.poll() for p in procs]})")
        time.sleep(0.01)


# --------------------------------------------------------------------------- one process, real steps
STEPS = 8  # 4 epochs of 2 steps, all of phase II (one step function to compile, as test_train's)
SEED = 2026  # the signal's step is drawn from this; a failure message names both


def test_sigterm_at_a_random_step_saves_it_and_a_rerun_resumes_exactly(tiny_h5, tmp_path):
    """SIGTERM once metrics.jsonl has row k (k drawn with SEED): exit status 143, one line
    naming step S (k <= S < 8), checkpoint S the only one (checkpoint_every_steps=100: before,
    every step since the last scheduled save was lost). The rerun resumes from S; the rows of
    both runs together equal an uninterrupted run's, row for row, and so do the final states."""
    k = random.Random(SEED).randint(1, STEPS - 3)
    where = f"(SEED {SEED}: SIGTERM after row {k})"
    extra = tiny_overrides(tiny_h5) + [f"--config.num_epochs={STEPS // 2}", "--config.phase1_epochs=0",
                                       "--config.checkpoint_every_steps=100",
                                       "--config.sample_every_epochs=100"]
    workdir = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "train.main", "--config", "smoke.py", "--workdir", str(workdir), *extra]
    err_path = tmp_path / "first.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                env={**os.environ, **TWO_DEVICES}, start_new_session=True)
        try:
            _wait_for_row(workdir, k, [proc])
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    stderr = err_path.read_text()
    assert proc.returncode == 143, f"{where} exit status {proc.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = _stop_lines(stderr)
    assert len(lines) == 1 and lines[0]["cause"] == "SIGTERM", f"{where}\n{stderr[-3000:]}"
    assert lines[0]["dir"] == str(workdir / "checkpoints")
    stopped = int(lines[0]["step"])
    assert k <= stopped < STEPS, where
    assert _saved_steps(workdir) == [stopped], where  # the printed step is the one saved
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, stopped + 1)), where

    resumed = run_train(workdir, extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} step {stopped}" in resumed.stderr, where
    uninterrupted = run_train(tmp_path / "uninterrupted", extra)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    a, b = read_metrics(tmp_path / "uninterrupted"), read_metrics(workdir)
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    timings = set(RunClock.KEYS)  # wall-clock figures differ from run to run
    for row_a, row_b in zip(a, b, strict=True):
        assert ({k: v for k, v in row_a.items() if k not in timings} ==
                {k: v for k, v in row_b.items() if k not in timings}), f"{where} step {row_a['step']}"
    sa, sb = load_state(tmp_path / "uninterrupted"), load_state(workdir)
    assert sa.keys() == sb.keys() and sa["step"] == STEPS
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=f"{where} {key}")


# --------------------------------------------------------------------------- one process, in-process
def _tiny_config(tiny_h5: Path):
    """smoke.py as tiny_overrides() sets it, 8 steps, no scheduled checkpoint before the last."""
    from ml_collections import config_dict

    from train.configs import smoke
    cfg = smoke.get_config()
    cfg.data.h5, cfg.data.crop_size = str(tiny_h5), 0
    cfg.batch_size, cfg.steps_per_epoch, cfg.num_epochs, cfg.phase1_epochs = 2, 2, 4, 1
    cfg.checkpoint_every_steps, cfg.log_every_steps, cfg.sample_every_epochs = 100, 1, 100
    cfg.progress, cfg.eval_every_epochs = False, 0
    return config_dict.FrozenConfigDict(cfg)


def test_ctrl_c_saves_the_step_and_restores_the_callers_handlers(tiny_h5, tmp_path, monkeypatch, capsys):
    """Ctrl-C (SIGINT) during step 3 of `train.main.run` (what `main` runs once the flags are
    parsed): step 3 saved, one line naming it, exit status 130, no KeyboardInterrupt traceback.
    While stopping, a second SIGINT or SIGTERM would meet the default action (end the process
    at once); afterwards the caller's handlers are back."""
    from train import main as train_main
    from train import step as step_lib
    seen = {"calls": 0}

    def fake_jit_train_step(graphdef, phase, cfg, mesh=None, *, tx=None):
        def step(state, vi, ir):
            seen["calls"] += 1
            if seen["calls"] == 3:
                signal.raise_signal(signal.SIGINT)  # as a terminal's Ctrl-C, mid-step
                seen["while_stopping"] = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
            return state, {"loss": np.float32(np.mean(np.asarray(vi)))}
        return step

    monkeypatch.setattr(step_lib, "jit_train_step", fake_jit_train_step)

    def callers_handler(signum, frame):  # a library user's own SIGTERM handler
        raise AssertionError("not to be called")

    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        rc = train_main.run(_tiny_config(tiny_h5), str(tmp_path / "w"))
        after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = _stop_lines(err)
    assert len(lines) == 1 and lines[0]["cause"] == "SIGINT" and lines[0]["step"] == "3", err[-3000:]
    assert err.strip().splitlines()[-1] == lines[0].string  # the last word
    assert _saved_steps(tmp_path / "w") == [3]
    assert [r["step"] for r in read_metrics(tmp_path / "w")] == [1, 2, 3]
    assert seen["calls"] == 3  # stopped at the boundary after the signal
    assert seen["while_stopping"] == (signal.SIG_DFL, signal.SIG_DFL)
    assert after == (signal.default_int_handler, callers_handler)


def test_ctrl_c_during_set_up_is_one_line(tiny_h5, tmp_path, monkeypatch, capsys):
    """Ctrl-C before the first step (here: while the data opens): one line, exit status 130,
    the workdir's lock released."""
    from train import main as train_main
    from train import trainer as trainer_lib
    from train.workdir import WorkdirLock

    def interrupted_open_data(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_lib, "open_data", interrupted_open_data)
    rc = train_main.run(_tiny_config(tiny_h5), str(tmp_path / "w"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130, err
    assert err == [f"interrupted (SIGINT) without saving; a rerun resumes from the latest checkpoint "
                   f"in {tmp_path / 'w' / 'checkpoints'}, if any"], err
    WorkdirLock(tmp_path / "w").acquire().release()  # not held


# --------------------------------------------------------------------------- two processes
# train.main with the jitted step replaced by a cheap one: a global mean of the batch (a
# collective across the two processes, so neither can run ahead) at about 20 steps a second.
FAKE_STEP_MAIN = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from train import main, step as step_lib

    def fake_jit_train_step(graphdef, phase, cfg, mesh=None, *, tx=None):
        mean = jax.jit(lambda vi, ir: jnp.mean(vi) + jnp.mean(ir))
        def step(state, vi, ir):
            time.sleep(0.05)
            return state, {"loss": mean(vi, ir)}
        return step

    step_lib.jit_train_step = fake_jit_train_step
    sys.exit(main.main(["train.main", *sys.argv[1:]]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_two_processes_stop_at_the_same_step(signum, tiny_h5, tmp_path):
    """The signal goes to process 1 only (a preempted VM of a pod); both processes stop at
    the same step, which is saved and named by both; exit status 128 + signal for the one
    signalled, 143 (a preemption) for the other."""
    k = random.Random(SEED).randint(2, 10)
    where = f"(SEED {SEED}: {signum.name} to process 1 after row {k})"
    workdir = tmp_path / "multi"
    port = _free_port()
    procs, errs = [], [tmp_path / f"p{i}.err" for i in range(2)]
    env = {**{name: value for name, value in os.environ.items() if name != "XLA_FLAGS"},
           "JAX_PLATFORMS": "cpu",
           "SMFNET_JAX_CACHE": "off"}  # two writers of one cache entry would race
    try:
        for pid in range(2):
            cmd = [sys.executable, "-c", FAKE_STEP_MAIN, "--config", "smoke.py", "--workdir", str(workdir),
                   *tiny_overrides(tiny_h5), "--config.num_epochs=200", "--config.checkpoint_every_steps=1000",
                   "--config.sample_every_epochs=1000",
                   f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
            with open(errs[pid], "w") as err:
                procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                              start_new_session=True, env=env))
        _wait_for_row(workdir, k, procs)
        procs[1].send_signal(signum)
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:  # never leave a process behind, whatever happened
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    stderr = [e.read_text() for e in errs]
    both = f"{where}\n{stderr[0][-2000:]}\n{stderr[1][-2000:]}"
    assert [p.returncode for p in procs] == [143, 128 + signum], both
    lines = [_stop_lines(s) for s in stderr]
    assert all(len(ls) == 1 for ls in lines), both
    assert lines[0][0]["cause"] == "a preemption notice to one of the 2 processes"
    assert lines[1][0]["cause"] == (signum.name if signum == signal.SIGINT
                                    else "a preemption notice to one of the 2 processes")
    stopped = {int(ls[0]["step"]) for ls in lines}
    assert len(stopped) == 1, where  # the same step in both
    stopped = stopped.pop()
    assert k <= stopped < 400, where
    assert _saved_steps(workdir) == [stopped], where
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, stopped + 1)), where
