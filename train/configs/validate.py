"""Every rule a training config must satisfy, checked before anything is compiled or written.

`config_problems(cfg)` returns one line per problem (all of them, not just the first);
`check_config(cfg)` raises `ConfigError` holding them. The known keys are those of
`train/configs/msrs.py` (every config derives from it), so a typo in a config file is
reported as well as a bad value.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable, Iterator

from smfnet_jax.policy import CONV_SUMS_CHOICES, DTYPES as COMPUTE_DTYPES, PRECISIONS
CPU_COLLECTIVES = ("gloo", "mpi", "")
# jax.random.key keeps only the low 32 bits of a seed (without jax_enable_x64): key(2**32 + 5)
# is key(5), and above 2**63 - 1 it raises OverflowError. One seed, one initialisation.
MAX_SEED = 2**32 - 1


class ConfigError(ValueError):
    """The config has problems; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:  # one line, as every other bad input
            super().__init__(f"invalid config: {self.problems[0]}")
        else:
            super().__init__("invalid config:\n" + "\n".join(f"  {p}" for p in self.problems))


def as_dict(cfg) -> dict:
    """A ConfigDict / FrozenConfigDict / dict as a plain nested dict."""
    if hasattr(cfg, "as_configdict"):
        cfg = cfg.as_configdict()
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    return {k: as_dict(v) if isinstance(v, dict) or hasattr(v, "to_dict") else v
            for k, v in dict(cfg).items()}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"data": {"h5": x}} -> {"data.h5": x}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def known_keys() -> list[str]:
    from train.configs import msrs
    return sorted(flatten(as_dict(msrs.get_config())))


def unknown_key_message(key: str, known: list[str] | None = None) -> str:
    known = known_keys() if known is None else known
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"{key}: unknown config key" + (f" (did you mean {', '.join(close)}?)" if close else "")


# Keyword arguments of the optimiser: any name it takes, checked against its signature.
FREE_FORM = "optimizer_kwargs"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def microbatches_divide(microbatches: int, batch: int) -> bool:
    """Whether cfg.microbatches splits `batch` samples into equal micro-batches (0: auto,
    always). The config checks the global batch; train.step the per-device one it splits."""
    return microbatches == 0 or (microbatches > 0 and batch % microbatches == 0)


def parse_steps(text: str) -> tuple[int, int] | None:
    """"A:B" -> (A, B) with 1 <= A <= B, else None."""
    a, sep, b = text.partition(":")
    try:
        first, last = int(a), int(b)
    except ValueError:
        return None
    return (first, last) if sep and 1 <= first <= last else None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rules() -> Iterator[tuple[str, Callable[[Any], bool], str]]:
    """(key, ok(value), what it must be)."""
    pos_int = (lambda v: _is_int(v) and v > 0, "a positive integer")
    nonneg_int = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    minus_one_or_pos = (lambda v: _is_int(v) and (v == -1 or v > 0), "-1 or a positive integer")
    positive = (lambda v: _is_number(v) and v > 0, "a finite number > 0")
    boolean = (lambda v: isinstance(v, bool), "True or False")
    string = (lambda v: isinstance(v, str), "a string")
    from train.optim import SCHEDULES
    table = {
        "seed": (lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
        "data.h5": string,
        "data.synthetic_pairs": nonneg_int,
        "data.synthetic_size": pos_int,
        "data.worker_count": nonneg_int,
        "data.crop_size": nonneg_int,
        "data.patch_size": nonneg_int,
        "batch_size": pos_int,
        "microbatches": nonneg_int,
        "num_epochs": pos_int,
        "phase1_epochs": nonneg_int,
        "steps_per_epoch": minus_one_or_pos,
        "max_steps": minus_one_or_pos,
        "lr": positive,
        "lr_step_epochs": pos_int,
        "lr_gamma": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "lr_min": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
        "optimizer": string,
        "schedule": (lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
        "warmup_epochs": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
        "clip_norm": positive,
        "decomp_grad": boolean,
        "compute_dtype": (lambda v: v in COMPUTE_DTYPES, f"one of {', '.join(COMPUTE_DTYPES)}"),
        "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
        "conv_sums": (lambda v: v in CONV_SUMS_CHOICES, f"one of {', '.join(CONV_SUMS_CHOICES)}"),
        "init_from": string,
        "checkpoint_every_steps": pos_int,
        "keep_checkpoints": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (0 would keep no "
                             "checkpoint at all)"),
        "log_every_steps": pos_int,
        "sample_every_epochs": pos_int,
        "progress": boolean,
        "eval_every_epochs": nonneg_int,
        "eval.ir": string,
        "eval.vi": string,
        "eval.max_pairs": nonneg_int,
        "profile_steps": (lambda v: isinstance(v, str) and (v == "" or parse_steps(v) is not None),
                          "'' or 'A:B' with 1 <= A <= B (steps as numbered in metrics.jsonl)"),
        "profile_all_processes": boolean,
        "distributed.coordinator_address": string,
        "distributed.num_processes": pos_int,
        "distributed.process_id": nonneg_int,
        "distributed.cpu_collectives": (lambda v: v in CPU_COLLECTIVES,
                                        "one of 'gloo', 'mpi' or '' (JAX's default)"),
    }
    for key, (ok, what) in table.items():
        yield key, ok, what


def config_problems(cfg) -> list[str]:
    """One line per problem of `cfg` (empty: valid). Reads no data and compiles nothing."""
    tree = as_dict(cfg)
    flat = flatten(tree)
    known = known_keys()
    problems = [unknown_key_message(k, known) for k in sorted(set(flat) - set(known))
                if k != FREE_FORM and not k.startswith(FREE_FORM + ".")]
    bad = set()
    for key, ok, what in _rules():
        if key not in flat:
            problems.append(f"{key}: missing (every config derives from train/configs/msrs.py)")
            bad.add(key)
        elif not ok(flat[key]):
            problems.append(f"{key}={flat[key]!r}: must be {what}")
            bad.add(key)

    def good(*keys):  # cross-field rules only between individually valid values
        return not bad.intersection(keys)

    g = flat.get
    if good("phase1_epochs", "num_epochs") and g("phase1_epochs") > g("num_epochs"):
        problems.append(f"phase1_epochs={g('phase1_epochs')}: must be <= num_epochs={g('num_epochs')}")
    if good("lr", "lr_min") and g("lr_min") > g("lr"):
        problems.append(f"lr_min={g('lr_min')!r}: the floor must be <= lr={g('lr')!r}")
    if good("optimizer"):
        from train.optim import optimizer_argument_problems, optimizer_factory
        kwargs = tree.get(FREE_FORM, {})
        try:
            optimizer_factory(g("optimizer"))
            problems.extend(optimizer_argument_problems(g("optimizer"), kwargs)
                            if isinstance(kwargs, dict) else [f"{FREE_FORM}: must be a ConfigDict"])
        except ValueError as e:
            problems.append(str(e))
    if good("warmup_epochs", "schedule") and g("warmup_epochs") > 0 and g("schedule") != "cosine":
        problems.append(f"warmup_epochs={g('warmup_epochs')!r}: only schedule='cosine' warms up "
                        f"(schedule={g('schedule')!r})")
    if good("microbatches", "batch_size") and not microbatches_divide(g("microbatches"), g("batch_size")):
        problems.append(f"microbatches={g('microbatches')}: must be 0 (auto) or divide "
                        f"batch_size={g('batch_size')}")
    if good("data.h5", "data.synthetic_pairs"):
        if g("data.h5"):
            h5 = Path(g("data.h5"))
            if not h5.is_file():
                problems.append(f"data.h5={g('data.h5')!r}: no such file" +
                                (" (it is a folder)" if h5.is_dir() else ""))
        elif g("data.synthetic_pairs") == 0:
            problems.append("data.h5: no training data (give data.h5, or data.synthetic_pairs > 0)")
        elif good("data.crop_size", "data.synthetic_size") and g("data.crop_size") > g("data.synthetic_size"):
            problems.append(f"data.crop_size={g('data.crop_size')}: larger than the synthetic "
                            f"pairs (data.synthetic_size={g('data.synthetic_size')})")
    if good("data.h5", "data.crop_size", "data.patch_size") and g("data.h5") and \
            0 < g("data.patch_size") < g("data.crop_size"):
        problems.append(f"data.crop_size={g('data.crop_size')}: larger than the patches "
                        f"(data.patch_size={g('data.patch_size')})")
    if good("init_from") and g("init_from"):
        init = Path(g("init_from"))
        from smfnet_jax.export import ONNX_SUFFIX, SUFFIX as EXPORT_SUFFIX
        if not init.exists():
            problems.append(f"init_from={g('init_from')!r}: no such file or folder")
        elif init.is_file() and init.suffix in (EXPORT_SUFFIX, ONNX_SUFFIX):
            problems.append(f"init_from={g('init_from')!r}: an exported model ({init.suffix}) "
                            "holds a compiled function, not trainable weights; start from a "
                            ".pth, a .safetensors, a converted orbax folder or a training workdir")
    if good("eval.ir", "eval.vi"):
        if bool(g("eval.ir")) != bool(g("eval.vi")):
            problems.append("eval.ir and eval.vi: give both folders of test pairs, or neither")
        for key in ("eval.ir", "eval.vi"):
            if g(key) and not Path(g(key)).is_dir():
                problems.append(f"{key}={g(key)!r}: no such folder")
    if good("distributed.num_processes", "distributed.process_id") and \
            g("distributed.process_id") >= g("distributed.num_processes"):
        problems.append(f"distributed.process_id={g('distributed.process_id')}: must be < "
                        f"distributed.num_processes={g('distributed.num_processes')}")
    return problems


def missing_data(problems: list[str]) -> bool:
    """Whether the problems include absent training data (the caller adds the MSRS help)."""
    return any(p.startswith("data.h5") and ("no such file" in p or "no training data" in p)
               for p in problems)


def check_config(cfg) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)


__all__ = ["ConfigError", "config_problems", "check_config", "flatten", "as_dict", "known_keys",
           "unknown_key_message", "missing_data", "parse_steps"]
