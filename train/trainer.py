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
import sys
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


# --------------------------------------------------------------------------- set-up helpers
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
        except BaseException:
            self.close()
            raise

    def _claim_workdir(self, allow_config_change: bool) -> None:
        """Process 0 takes the lock and records or compares the config; every process learns
        whether that worked, so none is left waiting for a process 0 that stopped."""
        from train.workdir import WorkdirError, WorkdirLock, reconcile_config
        error = None
        if self.is_main:
            try:
                self.lock = WorkdirLock(self.workdir).acquire()
                if self.lock.took_over:
                    print(f"note: took over the lock of {self.workdir}, left by "
                          f"pid {self.lock.took_over.get('pid')} (no longer running)", file=sys.stderr)
                reconcile_config(self.workdir, self.cfg, self._latest_step_on_disk(),
                                 allow_change=allow_config_change)
            except WorkdirError as e:
                error = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                error = WorkdirError(f"process 0 could not start on {self.workdir}; its output says why")
        if error is not None:
            raise error

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
            return load_checkpoint(self.cfg.init_from).model
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
        step = self.ckpt.latest_step()
        if step is None:
            return 0
        args, old_opt = self._ckpt_args(save=False), self._adam_state_tree(step)
        if old_opt:  # written before the optimiser was optax: restored as it is, then converted
            import orbax.checkpoint as ocp
            args = ocp.args.Composite(**{**{k: args[k] for k in args.keys()}, "opt": old_opt})
        restored = self.ckpt.restore(step, args=args)
        host = jax.device_get(self.state)
        model = self._model(host)
        set_model_state(model, restored["model"])
        _, params, stats = train_step_lib.split_model(model)
        opt = from_adam_state_tree(restored["opt"], host["opt"]) if old_opt else restored["opt"]
        self.state = _replicate({"params": params, "batch_stats": stats, "opt": opt}, self.mesh)
        if self.is_main:
            print(f"resumed from {self.workdir / CHECKPOINT_SUBDIR} step {step}", file=sys.stderr)
        return step

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
                f"workdir {self.workdir}")

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
        cfg = self.cfg
        progress = cfg.progress if progress is None else progress
        logger = MetricsLogger(self.workdir, enabled=self.is_main, start_step=self.start_step)
        bar = None
        if progress and self.is_main:  # a bar on a terminal, plain lines in a log
            from smfnet_jax.cli import Progress
            bar = Progress(self.total_steps, "train", "step", initial=self.start_step)
        last, status = {}, ""
        try:
            for step in range(self.start_step, self.total_steps):
                epoch = step // self.steps_per_epoch
                phase = self.phase_of(step)
                vi, ir = _global_batch(next(self.data_iter), self.mesh)
                self.state, metrics = self.steps[phase](self.state, vi, ir)
                done = step + 1
                log_now = done % cfg.log_every_steps == 0 or done == self.total_steps
                save_now = done % cfg.checkpoint_every_steps == 0 or done == self.total_steps
                if log_now or save_now:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
                    if bad:
                        raise TrainingError(
                            f"non-finite {', '.join(bad)} at step {done} (epoch {epoch}, phase {phase}); "
                            f"stopping without saving: the last good checkpoint is step "
                            f"{self.ckpt.latest_step()} in {self.workdir / CHECKPOINT_SUBDIR}")
                    values.update(step=done, epoch=epoch, phase=phase)
                    last = values
                    if log_now:
                        logger.log(values)
                    status = f"loss {values['loss']:.4f}, phase {phase}, epoch {epoch}"
                if save_now:
                    self.save(done)
                if done % self.steps_per_epoch == 0 and (epoch + 1) % cfg.sample_every_epochs == 0:
                    self.write_sample(epoch, vi, ir)
                if bar is not None:
                    bar.update(1, status)
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        self.wait_for_saves()  # the last save's failure is this run's error
        return last

    def write_sample(self, epoch: int, vi: jax.Array, ir: jax.Array) -> None:
        """Fuse the first pair of the current batch in eval mode and write it as a PNG."""
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
        write_png(out, float_to_uint8(row * 255.0))


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
                if k != "step":
                    self.tb.add_scalar(k, v, values["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


__all__ = ["Trainer", "TrainingError", "MetricsLogger", "init_distributed", "CHECKPOINT_SUBDIR"]
