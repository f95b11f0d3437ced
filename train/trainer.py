"""The training loop: data, mesh, jitted steps, orbax checkpoints, logging.

Data parallel: a 1-D `jax.make_mesh` mesh over every device of every process; the train
state is replicated, the global batch is split along 'data'. Each process reads only its
rows of every global batch (train.data's order contract), so the same code runs on one CPU,
several GPUs, or a multi-host pod, and 1 process and N processes see the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

from flax import nnx

from smfnet_jax.checkpoint import TRAIN_CHECKPOINT_SUBDIR as CHECKPOINT_SUBDIR
from smfnet_jax.checkpoint import error_head, model_state, quiet_orbax_failures, set_model_state
from smfnet_jax.model import create_model
from smfnet_jax.runtime import describe_device
from train import step as train_step_lib
from train.optim import from_adam_state_tree, is_adam_state_tree, make_optimizer


class TrainingError(RuntimeError):
    """Training cannot go on (bad data, non-finite loss); the message says why."""


class TrainingInterrupted(Exception):
    """`Trainer.run` stopped early on SIGTERM/SIGINT (or, in a multi-process run, a preemption
    notice to any process) after saving the step it stopped at and waiting for that save; a
    rerun resumes from it. `exit_status` is 128 + the signal's number, as for a process
    that the signal ended (143 for SIGTERM, 130 for SIGINT): not 0, so a scheduler restarts it."""

    def __init__(self, step: int, signum: int, cause: str, directory: Path):
        self.step, self.signum, self.directory = step, signum, directory
        self.exit_status = 128 + signum
        super().__init__(f"interrupted ({cause}): saved checkpoint step {step} in {directory}; "
                         "run the same command again to resume")


class StopSignals:
    """While active (a `with` block), SIGTERM and SIGINT only note that the run should stop;
    the training loop reads `received` at its next step boundary. The handler does nothing
    else (no I/O: it may interrupt a write to the same stream), except that it gives both
    signals back their default action, so a second one ends the process at once. The
    previous handlers are restored on exit; a signal whose handler was not set from Python
    (signal.getsignal() is None), and every signal off the main thread (where Python cannot
    set handlers), is left alone."""

    def __init__(self, signums=(signal.SIGTERM, signal.SIGINT)):
        self.signums = tuple(signums)
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                previous = signal.getsignal(signum)
                if previous is not None:
                    self._previous[signum] = previous
                    signal.signal(signum, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        for s in self._previous:
            signal.signal(s, signal.SIG_DFL)

    def __exit__(self, *exc):
        while self._previous:
            signum, handler = self._previous.popitem()
            signal.signal(signum, handler)


# --------------------------------------------------------------------------- set-up helpers
# What restoring a damaged step raises: TensorStore's read errors (a truncated or missing data
# file, manifest) are ValueErrors, a torn _METADATA or data-iterator JSON a JSONDecodeError (a
# ValueError too), a deleted _METADATA a FileNotFoundError, a deleted item folder a KeyError.
RESTORE_ERRORS = (ValueError, OSError, KeyError)


def _restore_failure(error: BaseException, limit: int = 200) -> str:
    """One line for a failed restore: the error's class and the head of its message."""
    name = type(error).__name__
    if isinstance(error, KeyError) and error.args:  # a KeyError's str() is its repr
        error = RuntimeError(str(error.args[0]))
    return f"{name}: {error_head(error, limit)}"


SUMMARY_NAME = "summary.json"  # the last run's throughput figures, in the workdir

# After a failed save, how long to wait for the step's other writes before removing its files.
SAVE_THREADS_TIMEOUT_S = 60.0


def init_distributed(cfg) -> None:
    """Join a multi-process run: coordinator_address "HOST:PORT" with num_processes and
    process_id, or "auto" to let JAX find them (TPU VMs, SLURM, Open MPI); "" runs alone."""
    d = cfg.distributed
    if not d.coordinator_address:
        return
    if d.coordinator_address == "auto":
        jax.distributed.initialize()
        return
    if d.cpu_collectives and jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes, process_id=d.process_id)


def make_mesh() -> jax.sharding.Mesh:
    # Auto axes: XLA propagates the batch sharding; the model code stays sharding-agnostic.
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _replicate(tree, mesh):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return jax.tree.map(put, tree)


def _global_batch(local: dict, mesh) -> tuple[jax.Array, jax.Array]:
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
                 for k in ("vi", "ir"))


def open_data(cfg):
    from train import data as data_lib
    if cfg.data.h5:
        # raises MissingDatasetError with the MSRS help; BadPatchError before any large read
        source = data_lib.H5PairSource(cfg.data.h5, patch_size=cfg.data.patch_size)
    elif cfg.data.synthetic_pairs > 0:
        source = data_lib.SyntheticPairs(cfg.data.synthetic_pairs, cfg.data.synthetic_size, cfg.seed)
    else:
        raise data_lib.MissingDatasetError(data_lib.MSRS_HELP)
    crop = cfg.data.get("crop_size", 0)
    if crop > 0:
        shape = getattr(source, "patch_shape", None)
        if shape is not None and crop > min(shape):
            raise TrainingError(f"data.crop_size={crop} is larger than the {shape[0]}x{shape[1]} "
                                f"patches of {source!r}; use a smaller crop or 0 (whole patches)")
        source = data_lib.CroppedPairs(source, crop, cfg.seed)
    return source


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """One training run in `workdir`. Holds the workdir's lock from construction to `close()`
    (also a context manager); the process's exit releases it too, however it ends."""

    def __init__(self, cfg, workdir: str | os.PathLike, allow_config_change: bool = False):
        from train.configs.validate import check_config
        check_config(cfg)  # ConfigError listing every problem, before anything is touched
        self.cfg = cfg
        self.workdir = Path(workdir).absolute()
        self.is_main = jax.process_index() == 0
        self.lock = None
        self.ckpt = None
        self._saving = None  # the step being saved in the background, until it is confirmed
        self._save_threads = []  # the threads orbax started for that save
        n_dev = jax.device_count()
        if cfg.batch_size % n_dev:
            raise TrainingError(f"batch_size {cfg.batch_size} is not divisible by the {n_dev} devices")
        try:
            train_step_lib.resolve_microbatches(cfg.microbatches, cfg.batch_size,
                                                train_step_lib.train_policy(cfg).routines)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        self.mesh = make_mesh()
        try:
            self._claim_workdir(allow_config_change)
            self._build()
            self._record_config()
        except BaseException:
            self.close()
            raise

    def _claim_workdir(self, allow_config_change: bool) -> None:
        """Process 0 takes the lock and compares the config with the recorded one (recorded
        only after the restore, `_record_config`); every process learns whether that worked,
        so none is left waiting for a process 0 that stopped."""
        from train.workdir import WorkdirError, WorkdirLock, compare_config, unusable_workdir
        error = None
        self._config_change = None
        if self.is_main:
            try:
                self.lock = WorkdirLock(self.workdir).acquire()
                if self.lock.took_over:
                    print(f"note: took over the lock of {self.workdir}, left by "
                          f"pid {self.lock.took_over.get('pid')} (no longer running)", file=sys.stderr)
                self._check_checkpoint_dir()
                self._config_change = compare_config(self.workdir, self.cfg, self._latest_step_on_disk(),
                                                     allow_change=allow_config_change)
            except WorkdirError as e:
                error = e
            except OSError as e:  # the workdir or its lock file cannot be made or written
                error = unusable_workdir(self.workdir, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                error = WorkdirError(f"process 0 could not start on {self.workdir}; its output says why")
        if error is not None:
            raise error

    def _check_checkpoint_dir(self) -> None:
        """An existing WORKDIR/checkpoints must be a folder we can write: orbax's save into
        one it cannot create waits forever instead of failing. (A missing one is made by
        orbax, in the workdir whose lock file was just written.)"""
        from train.workdir import WorkdirError
        directory = self.workdir / CHECKPOINT_SUBDIR
        if directory.is_symlink() and not directory.exists():
            raise WorkdirError(f"{directory}: a symbolic link to nothing (the workdir's checkpoints go there)")
        if directory.exists() and not directory.is_dir():
            raise WorkdirError(f"{directory}: not a folder (the workdir's checkpoints go there)")
        if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
            raise WorkdirError(f"{directory}: not writable by this process")

    def _record_config(self) -> None:
        """Record the config (process 0), once the run's starting point is settled: a failed
        restore leaves config.json and config_history/ as they were."""
        from train.workdir import unusable_workdir
        if self._config_change is not None:
            try:
                self._config_change.record(self.start_step)
            except OSError as e:
                raise unusable_workdir(self.workdir, e) from None

    def _latest_step_on_disk(self) -> int | None:
        import orbax.checkpoint as ocp
        directory = self.workdir / CHECKPOINT_SUBDIR
        steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
        return max(steps) if steps else None

    def _build(self) -> None:
        cfg = self.cfg
        self.source = open_data(cfg)
        from train.data import steps_per_epoch
        spe = steps_per_epoch(self.source, cfg.batch_size)
        if spe == 0:
            raise TrainingError(f"{len(self.source)} patches is less than one batch of {cfg.batch_size}")
        self.steps_per_epoch = min(spe, cfg.steps_per_epoch) if cfg.steps_per_epoch > 0 else spe
        self.total_steps = cfg.num_epochs * self.steps_per_epoch
        if cfg.max_steps > 0:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        model = self._initial_model()
        self.optimizers = {phase: make_optimizer(cfg, self.steps_per_epoch, phase) for phase in (1, 2)}
        self.graphdef, state = train_step_lib.init_train_state(model, cfg, tx=self.optimizers[1])
        self.state = _replicate(state, self.mesh)
        self.steps = {phase: train_step_lib.jit_train_step(self.graphdef, phase, cfg, self.mesh,
                                                           tx=self.optimizers[phase])
                      for phase in (1, 2)}
        self.data_iter = self._make_iterator()
        self._fuse_sample = nnx.jit(lambda m, vi, ir: m.fuse(vi, ir))
        from train.chips import chip_for
        self.chip = chip_for(jax.devices()[0].device_kind)
        self.step_flops: dict[int, float | None] = {}  # per phase, once compiled
        self.summary: dict | None = None  # the last run()'s throughput figures
        self.evaluator = None  # process 0 evaluates; the others wait for it
        if cfg.eval_every_epochs > 0 and cfg.eval.ir and self.is_main:
            from train.evaluation import Evaluator
            self.evaluator = Evaluator(cfg.eval.ir, cfg.eval.vi, cfg.eval.max_pairs)
        self.ckpt = self._checkpoint_manager()
        self.start_step = self._maybe_restore()

    def close(self) -> None:
        """Wait for pending checkpoint writes, then release the workdir (idempotent)."""
        try:
            if self.ckpt is not None:
                self.wait_for_saves()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ construction
    def _initial_model(self):
        if self.cfg.init_from:
            from smfnet_jax.checkpoint import load_checkpoint
            try:
                return load_checkpoint(self.cfg.init_from).model
            except (ValueError, OSError) as e:  # every checkpoint error is a ValueError
                text = error_head(e, limit=1000)
                if self.cfg.init_from not in text:
                    text = f"{self.cfg.init_from}: {text}"
                raise TrainingError(f"init_from: {text}") from None
        return create_model(self.cfg.seed)

    def _make_iterator(self):
        from train.data import make_train_iterator
        return make_train_iterator(self.source, global_batch_size=self.cfg.batch_size,
                                   seed=self.cfg.seed, worker_count=self.cfg.data.worker_count)

    def _checkpoint_manager(self):
        import orbax.checkpoint as ocp
        quiet_orbax_failures()  # a failed save is one line (`_save_failed`), not hundreds
        options = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep_checkpoints, create=True)
        return ocp.CheckpointManager(self.workdir / CHECKPOINT_SUBDIR, options=options)

    def _model(self, state: dict):
        """The SMFNet holding `state`'s parameters and BatchNorm statistics."""
        return nnx.merge(self.graphdef, nnx.State(state["params"]), nnx.State(state["batch_stats"]))

    def _ckpt_args(self, save: bool):
        import grain
        import orbax.checkpoint as ocp
        if save:
            host = jax.device_get(self.state)
            return ocp.args.Composite(
                model=ocp.args.StandardSave(model_state(self._model(host))),
                opt=ocp.args.StandardSave(host["opt"]),
                data=grain.checkpoint.CheckpointSave(self.data_iter))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
        return ocp.args.Composite(
            model=ocp.args.StandardRestore(model_state(self._model(abstract))),
            opt=ocp.args.StandardRestore(abstract["opt"]),
            data=grain.checkpoint.CheckpointRestore(self.data_iter))

    def _maybe_restore(self) -> int:
        """Restore the newest intact step (0: none on disk). A step that fails to restore
        while an older one restores is damaged: it is set aside (`_set_aside`), never
        deleted. If no step restores, nothing is moved (the failure may be this run's, e.g.
        another optimiser, rather than the files') and TrainingError names each step."""
        directory = self.workdir / CHECKPOINT_SUBDIR
        failed = []  # (step, error) of the newer steps that did not restore
        for step in sorted(self.ckpt.all_steps(), reverse=True):
            args, old_opt = self._ckpt_args(save=False), self._adam_state_tree(step)
            if old_opt:  # written before the optimiser was optax: restored as it is, then converted
                import orbax.checkpoint as ocp
                args = ocp.args.Composite(**{**{k: args[k] for k in args.keys()}, "opt": old_opt})
            try:
                restored = self.ckpt.restore(step, args=args)
            except RESTORE_ERRORS as e:
                failed.append((step, e))
                continue
            if failed:
                self._set_aside(failed)
            host = jax.device_get(self.state)
            model = self._model(host)
            set_model_state(model, restored["model"])
            _, params, stats = train_step_lib.split_model(model)
            opt = from_adam_state_tree(restored["opt"], host["opt"]) if old_opt else restored["opt"]
            self.state = _replicate({"params": params, "batch_stats": stats, "opt": opt}, self.mesh)
            if self.is_main:
                newest = " (the newest intact step)" if failed else ""
                print(f"resumed from {directory} step {step}{newest}", file=sys.stderr)
            return step
        if failed:
            raise TrainingError(
                f"{directory}: no checkpoint step restores (" +
                "; ".join(f"step {s}: {_restore_failure(e, 150)}" for s, e in failed) +
                "); nothing was changed: move those steps aside, or use another workdir, to "
                "start afresh")
        return 0

    def _set_aside(self, failed: list) -> None:
        """Rename each damaged step folder to `<step>.damaged-<time>` (a name orbax does not
        list as a step; kept for inspection), say so, and make the manager forget them."""
        import time
        directory = self.workdir / CHECKPOINT_SUBDIR
        if self.is_main:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step, error in failed:
                dest = directory / f"{step}.damaged-{stamp}"
                n = 1
                while dest.exists():
                    dest, n = directory / f"{step}.damaged-{stamp}-{n}", n + 1
                try:
                    os.rename(directory / str(step), dest)
                except OSError as e:
                    raise TrainingError(f"{directory / str(step)}: damaged ({_restore_failure(error)}) "
                                        f"and cannot be set aside ({e.strerror})") from None
                print(f"warning: checkpoint step {step} is damaged ({_restore_failure(error)}); "
                      f"set aside as {dest}", file=sys.stderr)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("smfnet_set_aside_damaged_steps")
        self.ckpt.reload()

    def _adam_state_tree(self, step: int):
        """The restore args of a checkpoint's "opt" item in the layout written before the
        optimiser was optax ({sub-model: {step, exp_avg, exp_avg_sq}}), or None."""
        import orbax.checkpoint as ocp
        from etils import epath
        try:
            meta = ocp.StandardCheckpointHandler().metadata(
                epath.Path(self.workdir / CHECKPOINT_SUBDIR / str(step) / "opt"))
        except Exception:  # noqa: BLE001 - not readable here: the restore itself says why
            return None
        if not is_adam_state_tree(getattr(meta, "tree", meta)):
            return None
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state["params"])
        count = jax.ShapeDtypeStruct((), np.int32)
        return ocp.args.StandardRestore({sub: {"step": jax.tree.map(lambda _: count, p),
                                               "exp_avg": p, "exp_avg_sq": p}
                                         for sub, p in params.items()})

    # ------------------------------------------------------------------ running
    def describe(self) -> str:
        """The first line of a run: devices, the model's compute policy, batch and steps."""
        dev = describe_device()
        policy = train_step_lib.policy_of(self.graphdef, self.state)
        k = train_step_lib.resolve_microbatches(self.cfg.microbatches, self.cfg.batch_size, policy.routines)
        return (f"device {dev['platform']} ({dev['device']}), {dev['device_count']} in "
                f"{jax.process_count()} process(es); {policy.describe()}; batch {self.cfg.batch_size} "
                f"in {k} micro-batch(es) per device; steps {self.start_step}..{self.total_steps}; "
                f"workdir {self.workdir}; {self.describe_peak()}")

    def describe_peak(self) -> str:
        from train.chips import describe_peak
        policy = train_step_lib.policy_of(self.graphdef, self.state)
        return describe_peak(self.chip, policy, jax.devices()[0].device_kind)

    def peak_flops(self) -> float | None:
        """Per chip, at the policy's dtype and precision; None off the table (CPUs)."""
        from train.chips import peak_flops
        if self.chip is None:
            return None
        return peak_flops(self.chip, train_step_lib.policy_of(self.graphdef, self.state))

    def compile_phase(self, phase: int, vi, ir) -> float:
        """Compile `phase`'s step ahead of its first call (which then reuses it) and note its
        model FLOPs per global step; the seconds it took."""
        t0 = time.perf_counter()
        args = (self.state, vi, ir)
        lower = getattr(self.steps[phase], "lower", None)
        if lower is None:  # not a jitted function (tests' stand-ins): nothing to compile or count
            self.step_flops[phase] = None
            return 0.0
        lowered = lower(*args)
        lowered.compile()
        seconds = time.perf_counter() - t0
        self.step_flops[phase] = self._model_flops(phase, lowered, args)
        return seconds

    def _model_flops(self, phase: int, lowered, args) -> float | None:
        """The global step's FLOPs by XLA's cost analysis of the step as lowered (before
        optimisation, so the model's arithmetic, the same on every backend). Micro-batches run
        in a loop whose body the analysis counts once: those steps are counted whole-batch
        (the same arithmetic; micro-batching only re-does some of it)."""
        policy = train_step_lib.policy_of(self.graphdef, self.state)
        k = train_step_lib.resolve_microbatches(self.cfg.microbatches, self.cfg.batch_size,
                                                policy.routines)
        try:
            if k > 1:
                cfg = self.cfg.copy_and_resolve_references()
                cfg.microbatches = 1
                lowered = train_step_lib.jit_train_step(self.graphdef, phase, cfg, self.mesh,
                                                         tx=self.optimizers[phase]).lower(*args)
            cost = lowered.cost_analysis()
        except Exception:  # noqa: BLE001 - a backend without a cost analysis: no MFU
            return None
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        flops = (cost or {}).get("flops")
        return float(flops) if flops and flops > 0 else None

    def phase_of(self, step: int) -> int:
        return 1 if step // self.steps_per_epoch < self.cfg.phase1_epochs else 2

    def save(self, step: int) -> None:
        """Start saving `step` in the background (after the previous save has finished);
        a failed save, this one or the previous, raises TrainingError (`_save_failed`)."""
        import threading
        self.wait_for_saves()
        before = set(threading.enumerate())
        try:
            self._saving = step
            self.ckpt.save(step, args=self._ckpt_args(save=True), force=True)
        except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise ValueError, OSError, ...
            raise self._save_failed(step, e) from None
        finally:  # the threads writing this step (not idle pool workers, which never end)
            self._save_threads = [t for t in threading.enumerate() if t not in before and getattr(
                getattr(t, "_target", None), "__module__", "") != "concurrent.futures.thread"]

    def wait_for_saves(self) -> None:
        """Wait for the background save; TrainingError if it failed (then once only)."""
        if self._saving is None:
            return
        try:
            self.ckpt.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._saving, e) from None
        self._saving = None

    def _save_failed(self, step: int, error: Exception) -> TrainingError:
        """The one-line error of a failed save, after removing the step's partial files
        (orbax writes into `<step>.orbax-checkpoint-tmp` and renames only when complete, so
        every such folder is unfinished; each would hold its space). Orbax reports the first
        failed write while the step's other writes still run: wait for them first."""
        import shutil
        import time
        self._saving = None
        deadline = time.monotonic() + SAVE_THREADS_TIMEOUT_S
        for thread in self._save_threads:
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - orbax's threads re-raise the failure on join
                pass
        directory = self.workdir / CHECKPOINT_SUBDIR
        if self.is_main:
            for partial in directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        good = self._latest_step_on_disk()
        last = (f"the last good checkpoint is step {good}" if good is not None
                else "no checkpoint was completed")
        text = str(error)
        if "No space left on device" in text or getattr(error, "errno", None) == 28:
            return TrainingError(f"no space left on device saving checkpoint step {step} in "
                                 f"{directory} (its partial files removed); {last}")
        return TrainingError(f"saving checkpoint step {step} in {directory} failed "
                             f"({type(error).__name__}: {error_head(error)}); its partial files "
                             f"removed; {last}")

    def run(self, progress: bool | None = None) -> dict:
        """Train from `start_step` to `total_steps`; the last logged metrics.

        SIGTERM or SIGINT (handled so only during this call) stops the run at the next step
        boundary: that step is checked, logged and saved like a scheduled one, the save is
        waited for, then `TrainingInterrupted` says which step. A multi-process run leaves
        SIGTERM to JAX's preemption service, which tells every process (SIGINT is passed on
        to it), and every process stops at the same step, the service's sync point."""
        cfg = self.cfg
        progress = cfg.progress if progress is None else progress
        preemption = self._preemption_service()
        signals = StopSignals(() if preemption is None else
                              (signal.SIGINT,) if preemption else (signal.SIGTERM, signal.SIGINT))
        with signals:
            last = self._loop(progress, signals, preemption)
            self.wait_for_saves()  # the last save's failure is this run's error
        if self.is_main and self.summary is not None:
            throughput_line(self.summary, self.workdir / SUMMARY_NAME)
        return last

    def _preemption_service(self) -> bool | None:
        """False: one process, which handles the signals itself. True: several processes and
        JAX's preemption service, whose sync point says when to stop. None: several processes
        without it (jax_enable_preemption_service off): signals keep their usual effect,
        since processes stopping at different steps would wait for each other forever."""
        if jax.process_count() == 1:
            return False
        from jax.experimental import multihost_utils
        try:
            multihost_utils.reached_preemption_sync_point(self.start_step)
        except RuntimeError:  # the service is off
            return None
        return True

    def _loop(self, progress: bool, signals: StopSignals, preemption: bool | None) -> dict:
        cfg = self.cfg
        logger = MetricsLogger(self.workdir, enabled=self.is_main, start_step=self.start_step)
        bar = None
        if progress and self.is_main:  # a bar on a terminal, plain lines in a log
            from smfnet_jax.cli import Progress
            bar = Progress(self.total_steps, "train", "step", initial=self.start_step)
        last, status, notice_sent = {}, "", False
        clock = RunClock(cfg.batch_size, jax.device_count(), self.peak_flops())
        profile = Profile(cfg, self.workdir, self.is_main)
        try:
            for step in range(self.start_step, self.total_steps):
                epoch = step // self.steps_per_epoch
                phase = self.phase_of(step)
                with clock.timing("data"):
                    vi, ir = _global_batch(next(self.data_iter), self.mesh)
                if phase not in self.step_flops:
                    seconds = self.compile_phase(phase, vi, ir)
                    clock.add("compile", seconds)
                    clock.compile_s[phase] = seconds
                done = step + 1
                profile.before(done)
                self.state, metrics = self.steps[phase](self.state, vi, ir)
                clock.steps += 1
                profile.after(done, metrics)
                if preemption:
                    if signals.received is not None and not notice_sent:
                        notice_sent = True  # JAX's notifier watches SIGTERM; it tells every process
                        signal.raise_signal(signal.SIGTERM)
                    from jax.experimental import multihost_utils
                    stop = multihost_utils.reached_preemption_sync_point(done)  # every step
                else:
                    stop = signals.received is not None
                stop = stop and done < self.total_steps  # at the end the run is complete anyway
                eval_now = (cfg.eval_every_epochs > 0 and bool(cfg.eval.ir) and done % self.steps_per_epoch == 0
                            and (epoch + 1) % cfg.eval_every_epochs == 0)
                log_now = done % cfg.log_every_steps == 0 or done == self.total_steps or eval_now
                save_now = done % cfg.checkpoint_every_steps == 0 or done == self.total_steps or stop
                if log_now or save_now:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
                    if bad:
                        raise TrainingError(
                            f"non-finite {', '.join(bad)} at step {done} (epoch {epoch}, phase {phase}); "
                            f"stopping without saving: the last good checkpoint is step "
                            f"{self.ckpt.latest_step()} in {self.workdir / CHECKPOINT_SUBDIR}")
                    values.update(step=done, epoch=epoch, phase=phase)
                    if eval_now:
                        with clock.timing("eval"):
                            values.update(self.evaluate(phase, logger, done))
                    if log_now:
                        values.update(clock.window(self.step_flops.get(phase)))
                        logger.log(values)
                    last = values
                    status = f"loss {values['loss']:.4f}, phase {phase}, epoch {epoch}"
                if save_now:
                    with clock.timing("checkpoint"):
                        self.save(done)
                if done % self.steps_per_epoch == 0 and (epoch + 1) % cfg.sample_every_epochs == 0:
                    with clock.timing("eval"):
                        self.write_sample(epoch, vi, ir, logger, done)
                if bar is not None:
                    bar.update(1, status)
                if stop:
                    self.wait_for_saves()
                    raise self._interrupted(done, signals.received)
        finally:
            profile.stop()
            if bar is not None:
                bar.close()
            if clock.steps:
                self.summary = clock.summary(self.step_flops)
                logger.summary(self.summary)
            logger.close()
        return last

    def _interrupted(self, step: int, received: int | None) -> TrainingInterrupted:
        if received is not None:
            signum, cause = received, signal.Signals(received).name
        else:  # a multi-process run: JAX's preemption service saw SIGTERM in some process
            signum = signal.SIGTERM
            cause = f"a preemption notice to one of the {jax.process_count()} processes"
        return TrainingInterrupted(step, signum, cause, self.workdir / CHECKPOINT_SUBDIR)

    def evaluate(self, phase: int, logger, step: int) -> dict:
        """Phase II: the fusion metrics' means on the eval pairs; phase I: the reconstructions'
        PSNR and SSIM (train.evaluation), with their images into TensorBoard. Process 0
        evaluates, with the state's own arrays on its first device (no copy); every process
        then meets at a barrier, so all go on at the same step."""
        values = {}
        if self.evaluator is not None:
            model = self._model(jax.tree.map(lambda x: x.addressable_data(0), self.state))
            model.eval()
            values, images = (self.evaluator.phase2 if phase == 2 else self.evaluator.phase1)(model)
            for name, image in images:
                logger.image(f"eval/{name}", image, step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("smfnet_eval")
        return values

    def write_sample(self, epoch: int, vi: jax.Array, ir: jax.Array, logger=None,
                     step: int | None = None) -> None:
        """Fuse the first pair of the current batch in eval mode and write it as a PNG
        (infrared | visible | fused), and as the TensorBoard image `samples` at `step`."""
        if not self.is_main:
            return
        from smfnet_jax.imageio import float_to_uint8, write_png
        model = self._model(jax.device_get(self.state))
        model.eval()
        local_vi = np.asarray(vi.addressable_shards[0].data)[:1]
        local_ir = np.asarray(ir.addressable_shards[0].data)[:1]
        fused = np.asarray(self._fuse_sample(model, local_vi, local_ir))[0, :, :, 0]
        row = np.concatenate([local_ir[0, :, :, 0], local_vi[0, :, :, 0], fused], axis=1)
        out = self.workdir / "samples" / f"epoch_{epoch + 1:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        image = float_to_uint8(row * 255.0)
        write_png(out, image)
        if logger is not None:
            logger.image("samples", image, epoch + 1 if step is None else step)


class RunClock:
    """Where a run's wall time goes: steps, and the time spent waiting for the data iterator,
    compiling, saving checkpoints and evaluating (sample images included), per logging window
    and for the whole run. Step time is the window's wall time less those waits, over its
    steps: dispatch is asynchronous and the window ends at the logged step's device_get,
    which waits for every step in it."""

    KINDS = ("data", "compile", "checkpoint", "eval")
    # What `window` adds to a logged row: timings, which differ from run to run.
    KEYS = ("step_time_s", "samples_per_s", "samples_per_s_per_device", "data_wait_share",
            "compile_share", "checkpoint_share", "eval_share", "goodput", "mfu")

    def __init__(self, global_batch: int, devices: int, peak_flops: float | None):
        self.global_batch, self.devices, self.peak = global_batch, devices, peak_flops
        self.start = self._mark = time.perf_counter()
        self.total = dict.fromkeys(self.KINDS, 0.0)
        self._window = dict.fromkeys(self.KINDS, 0.0)
        self.steps = 0
        self._window_steps = 0
        self.compile_s: dict[int, float] = {}

    def add(self, kind: str, seconds: float) -> None:
        self.total[kind] += seconds
        self._window[kind] += seconds

    def timing(self, kind: str):
        clock = self

        class _Timing:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.add(kind, time.perf_counter() - self.t0)
        return _Timing()

    def _figures(self, wall: float, waits: dict, steps: int, flops: float | None) -> dict:
        busy = wall - sum(waits.values())
        step_time = busy / steps if steps else None
        out = {"step_time_s": step_time,
               "samples_per_s": self.global_batch / step_time if step_time else None,
               "samples_per_s_per_device": (self.global_batch / step_time / self.devices
                                            if step_time else None)}
        out.update({f"{k}_share": (waits[k] / wall if wall > 0 else 0.0) for k in self.KINDS})
        out["data_wait_share"] = out.pop("data_share")
        out["goodput"] = busy / wall if wall > 0 else 0.0
        out["mfu"] = (flops / (step_time * self.devices * self.peak)
                      if flops and self.peak and step_time else None)
        return out

    def window(self, flops: float | None) -> dict:
        """The figures since the previous call (or the start), then a new window."""
        now = time.perf_counter()
        out = self._figures(now - self._mark, self._window, self.steps - self._window_steps, flops)
        self._mark, self._window_steps = now, self.steps
        self._window = dict.fromkeys(self.KINDS, 0.0)
        return out

    def summary(self, step_flops: dict) -> dict:
        """The whole run's figures (MFU with the mean of the phases' FLOPs it compiled)."""
        known = [f for f in step_flops.values() if f]
        flops = sum(known) / len(known) if known else None
        wall = time.perf_counter() - self.start
        out = {"steps": self.steps, "wall_s": wall, **self._figures(wall, self.total, self.steps, flops)}
        out.update({f"compile_s/phase{p}": v for p, v in sorted(self.compile_s.items())})
        out.update({f"model_flops_per_step/phase{p}": f for p, f in sorted(step_flops.items())})
        return out


class Profile:
    """`cfg.profile_steps` "A:B": a jax.profiler trace of steps A..B (numbered as in
    metrics.jsonl) into WORKDIR/profile, on process 0 unless cfg.profile_all_processes."""

    def __init__(self, cfg, workdir: Path, is_main: bool):
        from train.configs.validate import parse_steps
        self.steps = parse_steps(cfg.profile_steps) if cfg.profile_steps else None
        if not (is_main or cfg.profile_all_processes):
            self.steps = None
        self.directory = workdir / "profile"
        self.active = False

    def before(self, step: int) -> None:
        if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.first, self.last, self.active = step, step, True

    def after(self, step: int, outputs) -> None:
        if self.active:
            self.last = step
            if step >= self.steps[1]:
                jax.block_until_ready(outputs)  # the trace holds the last step's device work
                self.stop()

    def stop(self) -> None:
        """End the trace (at step B, or where the run stopped before it) and say where it is."""
        if not self.active:
            return
        self.active = False
        jax.profiler.stop_trace()
        print(f"profile of steps {self.first}..{self.last} in {self.directory} (tensorboard --logdir "
              f"{self.directory}, or ui.perfetto.dev with its .trace.json.gz)", file=sys.stderr)


class MetricsLogger:
    """WORKDIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events."""

    def __init__(self, workdir: Path, enabled: bool, start_step: int = 0):
        """start_step: the step the run starts from; rows and events logged after it by an
        earlier run (killed between checkpoints) are dropped, as they are about to be redone."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        from train.workdir import METRICS_NAME, truncate_metrics
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / METRICS_NAME
        dropped = truncate_metrics(self.path, start_step)
        if dropped:
            print(f"note: dropped {dropped} row(s) after step {start_step} from {self.path} "
                  "(logged after the checkpoint this run starts from)", file=sys.stderr)
        self.file = open(self.path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            # purge_step: TensorBoard hides the earlier files' events from this step on.
            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)
        except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
            self.tb = None

    def log(self, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(values, sort_keys=True) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k, v, values["step"])

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """A uint8 image (H, W) or (H, W, 3) into TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HW" if image.ndim == 2 else "HWC")

    def summary(self, values: dict) -> None:
        """The run's throughput figures: WORKDIR/summary.json (also for a run that failed or
        was interrupted; `throughput_line` says them on a clean finish)."""
        if not self.enabled:
            return
        from smfnet_jax.fileio import atomic_write
        text = json.dumps(values, sort_keys=True, indent=1) + "\n"
        atomic_write(self.path.parent / SUMMARY_NAME, lambda f: f.write(text.encode()))

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()



def throughput_line(values: dict, path: Path) -> None:
    """One line on stderr with a run's throughput figures (`path`: its summary.json), said
    once the run finished cleanly: a failed run's last line is its error alone."""
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)
    compile_s = sum(v for k, v in values.items() if k.startswith("compile_s/"))
    print(f"throughput: {values['steps']} steps, {fmt(values['step_time_s'], '.4f')} s/step, "
          f"{fmt(values['samples_per_s'], '.2f')} samples/s, mfu {fmt(values['mfu'], '.3%')}; "
          f"wall {values['wall_s']:.1f} s: goodput {values['goodput']:.1%}, data "
          f"{values['data_wait_share']:.1%}, compile {values['compile_share']:.1%} "
          f"({compile_s:.1f} s), checkpoints {values['checkpoint_share']:.1%}, eval "
          f"{values['eval_share']:.1%} (in {path})", file=sys.stderr)


__all__ = ["Trainer", "TrainingError", "TrainingInterrupted", "StopSignals", "MetricsLogger",
           "init_distributed", "CHECKPOINT_SUBDIR", "RunClock", "Profile", "SUMMARY_NAME"]
