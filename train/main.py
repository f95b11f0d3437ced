"""Train SMFNet.

  python -m train.main --config smoke.py --workdir /tmp/w                # synthetic data, minutes
  smfnet-train --config smoke.py --workdir /tmp/w                        # the same, installed
  python -m train.main --config msrs.py --workdir runs/msrs --config.data.h5=data/msrs_train.h5

--config takes a config file; a bare name (msrs.py, smoke.py) is looked up in train/configs/.
Any field can be overridden with --config.FIELD=VALUE (e.g. --config.batch_size=12), and the
optimiser's arguments given by any name: --config.optimizer=adamw
--config.optimizer_kwargs.weight_decay=0.05 (docs/training.md, "Another optimiser").
A workdir that already holds checkpoints is resumed from its latest step. The workdir records
its config (config.json) and a resume with a different one is refused, except for the keys
that only say how long to train and how often to log/save (num_epochs, max_steps, cadences,
progress, distributed address); --allow_config_change resumes anyway and records the new one.
One trainer per workdir (WORKDIR/train.lock). Bad config values are all listed at once (exit 2).
SIGTERM (preemption) or Ctrl-C: the step in progress finishes and is saved, one line names it,
exit status 143 / 130 (unfinished: a scheduler restarts it; the same command resumes).
Compiled steps are cached on disk ($SMFNET_JAX_CACHE, default ~/.cache/smfnet_jax/xla; "off"
disables). absl's --verbosity=0 shows orbax's INFO logs (hidden by default).
Multi-host: --config.distributed.coordinator_address=HOST:PORT
            --config.distributed.num_processes=N --config.distributed.process_id=I
            (none on TPU VMs, where jax.distributed.initialize finds the pod by itself)
Compute routines: $SMFNET_JAX_IMPL=auto|cpu|xla (default auto: the XLA:CPU-tuned routines
and one-sample micro-batches on CPU, XLA's native convolutions and whole batches on GPU/TPU).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _config_flag(argv: list[str]) -> tuple[int, str, str] | None:
    """The --config flag of `argv` that absl uses (the last one): (index of the word holding
    its value, the value, the prefix before the value in that word: "--config=" or ""), or None."""
    found = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            found = i + 1, argv[i + 1], ""
        elif arg.startswith("--config="):
            found = i, arg.split("=", 1)[1], "--config="
    return found


def resolve_config_arg(argv: list[str]) -> list[str]:
    """Let `--config msrs.py` name a file of train/configs/ as well as a path."""
    out = list(argv)
    found = _config_flag(out)
    if found:
        j, value, prefix = found
        path, _, rest = value.partition(":")  # config_flags allows FILE:ARG
        if not Path(path).exists() and (CONFIG_DIR / path).exists():
            out[j] = prefix + str(CONFIG_DIR / path) + (":" + rest if rest else "")
    return out


def config_file_problem(argv: list[str]) -> str | None:
    """One line for a --config file that cannot give a config (missing, a syntax error, a
    get_config() that raises or returns something else), or None. Loaded here first because
    absl would report these as tracebacks; ml_collections loads it again (configs are cheap)."""
    found = _config_flag(argv)
    if found is None:
        return None  # absl reports the missing required flag
    path, _, config_arg = found[1].partition(":")
    if not Path(path).is_file():
        return f"--config {path}: no such file (nor in {CONFIG_DIR})"
    import ml_collections
    try:
        module = _load_config_module(path)
        if not hasattr(module, "get_config"):
            return f"--config {path}: defines no get_config()"
        cfg = module.get_config(config_arg) if config_arg else module.get_config()
    except Exception as e:  # whatever the file raises, one line naming it
        return f"--config {path}: {type(e).__name__}: {e}"
    if not isinstance(cfg, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return f"--config {path}: get_config() returned {type(cfg).__name__}, not a ConfigDict"
    return None


def _define_flags(argv: list[str]):
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file(  # its overrides from `argv`, not sys.argv (pop_optimizer_kwargs)
        "config", None, "training config file (bare names are looked up in train/configs/)",
        lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics.jsonl, TensorBoard events "
                        "and sample images go; resumed if it holds checkpoints")
    flags.DEFINE_bool("allow_config_change", False, "resume even though the config differs from "
                      "the one recorded in WORKDIR/config.json (the new one is then recorded)")
    flags.mark_flags_as_required(["config", "workdir"])
    return flags.FLAGS


def _load_config_module(path: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("_smfnet_train_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unknown_overrides(argv: list[str]) -> list[str]:
    """One line per `--config.KEY=...` naming a key the config does not have (config_flags
    would end in a traceback). Empty when the config file cannot be loaded here: then
    config_flags reports that itself."""
    from train.configs.validate import as_dict, flatten, unknown_key_message
    found = _config_flag(argv)
    if found is None:
        return []
    path, _, extra = found[1].partition(":")
    try:
        module = _load_config_module(path)
        cfg = module.get_config(extra) if extra else module.get_config()
        known = flatten(as_dict(cfg))
    except Exception:  # noqa: BLE001 - config_flags will report a broken config file
        return []
    prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
    out = []
    for arg in argv:
        if arg.startswith("--config.") or arg.startswith("--noconfig."):
            key = arg.split(".", 1)[1].split("=", 1)[0]
            if key not in known and key not in prefixes:
                out.append(unknown_key_message(key, sorted(known)) + f" (in {arg})")
    return out


KWARGS_PREFIX = "--config.optimizer_kwargs."


def pop_optimizer_kwargs(argv: list[str]) -> tuple[list[str], dict]:
    """(`argv` without its --config.optimizer_kwargs.NAME=VALUE (or NAME VALUE) words, {NAME:
    VALUE}): config_flags overrides only the keys a config already has, and an optimiser's
    arguments are whatever it takes. A VALUE is read as a Python literal, else kept as text."""
    import ast
    rest, kwargs, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(KWARGS_PREFIX):
            name, eq, value = arg[len(KWARGS_PREFIX):].partition("=")
            if not eq:  # NAME VALUE, or a bare NAME: True, as absl's boolean flags
                nxt = argv[i + 1] if i + 1 < len(argv) else "--"
                i, value = (i + 1, nxt) if not nxt.startswith("--") else (i, "True")
            try:
                kwargs[name] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[name] = value
        else:
            rest.append(arg)
        i += 1
    return rest, kwargs


def with_optimizer_kwargs(cfg, kwargs: dict):
    """`cfg` with `kwargs` added to (or replacing those of) cfg.optimizer_kwargs."""
    if kwargs:
        import ml_collections
        with cfg.unlocked():
            cfg.optimizer_kwargs = ml_collections.ConfigDict(
                {**dict(cfg.get("optimizer_kwargs") or {}), **kwargs})
    return cfg


def run(cfg, workdir: str, allow_config_change: bool = False) -> int:
    from smfnet_jax.checkpoint import TRAIN_CHECKPOINT_SUBDIR
    from train.configs.validate import ConfigError, check_config, missing_data
    from train.data import MSRS_HELP, BadPatchError, MissingDatasetError
    from train.trainer import Trainer, TrainingError, TrainingInterrupted, init_distributed
    from train.workdir import WorkdirError
    try:
        check_config(cfg)  # before joining other processes: a bad value stops every one alike
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        if missing_data(e.problems):
            print(MSRS_HELP, file=sys.stderr)
        return 2
    if Path(workdir).exists() and not Path(workdir).is_dir():
        print(f"error: --workdir {workdir} is not a folder", file=sys.stderr)
        return 2
    init_distributed(cfg)
    try:
        with Trainer(cfg, workdir, allow_config_change=allow_config_change) as trainer:
            if trainer.is_main:
                print(trainer.describe(), file=sys.stderr)
            if trainer.start_step >= trainer.total_steps:
                print(f"{workdir}: already trained to step {trainer.start_step}", file=sys.stderr)
                return 0
            last = trainer.run()
    except (MissingDatasetError, BadPatchError, TrainingError, WorkdirError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:  # the step it stopped at is saved; a rerun resumes there
        print(e, file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # Ctrl-C outside Trainer.run's steps (set-up, restore)
        print(f"interrupted (SIGINT) without saving; a rerun resumes from the latest checkpoint "
              f"in {Path(workdir) / TRAIN_CHECKPOINT_SUBDIR}, if any", file=sys.stderr)
        return 128 + signal.SIGINT  # as a shell reports a process that SIGINT ended
    if last:
        print(f"done: step {last['step']}, loss {last['loss']:.5f}; checkpoints in "
              f"{Path(workdir) / TRAIN_CHECKPOINT_SUBDIR}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Here rather than under __main__ so the smfnet-train console script gets it too.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from smfnet_jax.cli import exit_on_environment_error
    from smfnet_jax.runtime import configure_xla_cpu
    exit_on_environment_error()
    configure_xla_cpu()  # memory-optimised XLA:CPU scheduler; must precede any JAX work
    from absl import app
    argv = resolve_config_arg(list(sys.argv if argv is None else argv))
    problem = config_file_problem(argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    argv, optimizer_kwargs = pop_optimizer_kwargs(argv)
    unknown = unknown_overrides(argv[1:])
    if unknown:
        for line in unknown:
            print(f"error: {line}", file=sys.stderr)
        return 2
    flags = _define_flags(argv)
    wants_help = any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:])
    if wants_help:
        print(__doc__)
    result = {"rc": 0}

    def _main(_):
        from absl import logging
        if not flags["verbosity"].present:
            # orbax and grain log every save at INFO; keep the console to the progress bar.
            logging.set_verbosity(logging.WARNING)
        from smfnet_jax.runtime import enable_compilation_cache
        enable_compilation_cache()  # a rerun (or resume) skips the minute-long compiles
        cfg = with_optimizer_kwargs(flags.config, optimizer_kwargs)
        result["rc"] = run(cfg, flags.workdir, flags.allow_config_change)

    try:
        app.run(_main, argv=argv)
    except SystemExit as e:
        if wants_help:
            return 0  # absl exits 1 after printing the help that was asked for
        if e.code not in (None, 0):  # absl has printed the flag error (bad value, unknown flag)
            return 2
    return result["rc"]


if __name__ == "__main__":
    sys.exit(main())
