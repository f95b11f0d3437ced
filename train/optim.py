"""The optimiser: the reference's five Adams, its clipping and its StepLR as optax transformations.

`make_optimizer(cfg, steps_per_epoch, phase)` is one `optax.GradientTransformation` over the
whole parameter tree ({sub-model: params}): `optax.multi_transform` (`optax.partition` in
optax >= 0.2.5) keyed by sub-model, each
sub-model with its own chain, as the reference's five optimisers and clippings:

    optax.chain(torch_clip_by_global_norm(cfg.clip_norm),
                optax.inject_hyperparams(OPTIMIZER)(learning_rate=schedule, **cfg.optimizer_kwargs))

OPTIMIZER is `torch_adam` (the default: torch.optim.Adam, the reference) or any optax
optimiser by name (`cfg.optimizer`); the rate of the current step is in the state
(`learning_rate(opt_state, sub)`). Each chain is wrapped in `only_trained` with the phase's
mask (`train.phases.PHASES[n].unused`): what a phase does not train neither moves nor changes
its state, and a sub-model the phase does not train at all (the fusion layers in phase I)
does not count the step, so its schedule starts when its training does, as the reference's
fusion schedulers do. Every phase's optimiser has the same state (`init`), so one state is
carried across the phase switch.

These live in train/ rather than the library: smfnet_jax holds the model, its weights and
inference; nothing there trains.
"""
from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smfnet_jax.model import SUBMODELS
from train.phases import FUSION_SUBMODELS, PHASES

DEFAULT_OPTIMIZER = "torch_adam"
SCHEDULES = ("step", "cosine", "constant")


# --------------------------------------------------------------------------- transformations
class TorchAdamState(NamedTuple):
    """torch.optim.Adam's per-parameter state, named as its state_dict names it: a step count
    per parameter (a tree of int32 scalars like the params), exp_avg and exp_avg_sq."""
    step: optax.Params
    exp_avg: optax.Updates
    exp_avg_sq: optax.Updates


def torch_adam(learning_rate, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8) -> optax.GradientTransformation:
    """torch.optim.Adam (weight_decay 0, amsgrad off), its defaults being the reference's.

    Per leaf, with t its own step count:

        exp_avg.lerp_(g, 1 - b1); exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = exp_avg_sq.sqrt() / sqrt(1 - b2**t) + eps; p.addcdiv_(exp_avg, denom, value=-lr / (1 - b1**t))

    The update is -(lr / (1 - b1**t)) * (exp_avg / denom). The rate enters before the ratio, as
    in PyTorch, so it is an argument here (like `optax.adam`'s) and not a separate
    `scale_by_learning_rate`, which would round differently; wrap in `optax.inject_hyperparams`
    to schedule it. The bias corrections 1 - b**t are -expm1(t log b): in float32, 1 - 0.999**t
    loses ~1e-5 to cancellation at small t, which would scale every update by the same wrong
    factor. A leaf counts its own steps (`only_trained` leaves the counts of what a phase
    does not train alone), so a parameter first trained late takes Adam's step 1 then.
    """
    if callable(learning_rate):
        raise TypeError("torch_adam takes a number as learning_rate; for a schedule use "
                        "optax.inject_hyperparams(torch_adam)(learning_rate=schedule)")
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def init(params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return TorchAdamState(jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params),
                              jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        del params

        def leaf(g, t, m, v):
            t = t + 1
            m = m + (1 - b1) * (g - m)
            v = v * b2 + (1 - b2) * (g * g)
            tf = t.astype(jnp.float32)
            step_size = learning_rate / -jnp.expm1(tf * log_b1)
            denom = jnp.sqrt(v) / jnp.sqrt(-jnp.expm1(tf * log_b2)) + eps
            return -(step_size * (m / denom)), t, m, v

        out = jax.tree.map(leaf, grads, state.step, state.exp_avg, state.exp_avg_sq)
        updates, step, exp_avg, exp_avg_sq = jax.tree.transpose(
            jax.tree.structure(grads), jax.tree.structure((0, 0, 0, 0)), out)
        return updates, TorchAdamState(step, exp_avg, exp_avg_sq)

    return optax.GradientTransformation(init, update)


def torch_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)), where
    `optax.clip_by_global_norm` scales by max_norm / norm and only above it."""

    def update(updates, state, params=None):
        del params
        coef = jnp.minimum(1.0, max_norm / (optax.global_norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * coef, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def only_trained(inner: optax.GradientTransformation,
                 trained: Callable[[optax.Params], optax.Params]) -> optax.GradientTransformation:
    """`inner` on the leaves where `trained(updates)` (a tree of Python bools like the updates)
    is True; the others get no update and keep their state: every part of the state shaped
    like the parameters (moments, `torch_adam`'s step counts) is kept there, as PyTorch skips
    a parameter without gradient. With no leaf trained, nothing runs and the whole state is
    kept, step counts and schedules included. Unlike `optax.masked` the state's structure is
    `inner`'s whatever the mask, so optimisers masked differently share one state.

    The update of an untrained leaf is -0.0, which leaves every parameter as it is (-0.0 too).
    """

    def update(updates, state, params=None, **extra):
        mask = trained(updates)
        on = jax.tree.leaves(mask)
        off = lambda u: jnp.full_like(u, -0.0)  # noqa: E731
        if not any(on):
            return jax.tree.map(off, updates), state
        new_updates, new_state = optax.with_extra_args_support(inner).update(
            updates, state, params, **extra)
        if all(on):
            return new_updates, new_state
        new_updates = jax.tree.map(lambda t, u: u if t else off(u), mask, new_updates)
        shape = jax.tree.structure(updates)
        like_params = lambda x: jax.tree.structure(x) == shape  # noqa: E731

        def keep(new, old):
            if not like_params(new):
                return new
            return jax.tree.map(lambda t, n, o: n if t else o, mask, new, old)

        return new_updates, jax.tree.map(keep, new_state, state, is_leaf=like_params)

    return optax.GradientTransformationExtraArgs(inner.init, update)


# --------------------------------------------------------------------------- schedules
def step_lr(init_value: float, steps_per_decay: int, gamma: float, floor: float,
            decays: int) -> optax.Schedule:
    """torch's StepLR with the reference's floor: max(floor, init * gamma**(step // steps_per_decay)),
    each value rounded once from float64 (as PyTorch computes it), held after `decays` decays."""
    table = np.array([max(floor, init_value * gamma ** n) for n in range(decays + 1)], np.float32)

    def schedule(count):
        return jnp.asarray(table)[jnp.minimum(count // steps_per_decay, decays)]

    return schedule


def trained_epochs(cfg, sub: str) -> int:
    """The epochs `sub` trains: all of them, or phase II's for the fusion layers."""
    return cfg.num_epochs - (cfg.phase1_epochs if sub in FUSION_SUBMODELS else 0)


def learning_rate_schedule(cfg, steps_per_epoch: int, sub: str) -> optax.Schedule:
    """`sub`'s learning rate as a function of its own step count, which starts with its
    training (`only_trained`): cfg.schedule "step" (the reference: StepLR every
    lr_step_epochs epochs, gamma lr_gamma, floored at lr_min), "cosine" (linear warm-up from
    0 over warmup_epochs, then cosine to lr_min at the end of the sub-model's training),
    "constant" (lr)."""
    if cfg.schedule == "step":
        return step_lr(cfg.lr, cfg.lr_step_epochs * steps_per_epoch, cfg.lr_gamma, cfg.lr_min,
                       cfg.num_epochs // cfg.lr_step_epochs)
    if cfg.schedule == "cosine":
        total = trained_epochs(cfg, sub) * steps_per_epoch
        warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total, warmup + 1),
                                                  end_value=cfg.lr_min)
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    raise ValueError(f"schedule={cfg.schedule!r}: must be one of {', '.join(SCHEDULES)}")


# --------------------------------------------------------------------------- by name
def optimizer_names() -> list[str]:
    """The optax optimisers a config may name: functions of optax and optax.contrib taking a
    `learning_rate` (contrib's as "contrib.NAME")."""
    import optax.contrib
    names = [DEFAULT_OPTIMIZER]
    for prefix, module in (("", optax), ("contrib.", optax.contrib)):
        for name in dir(module):
            fn = getattr(module, name)
            if not name.startswith("_") and inspect.isfunction(fn) and \
                    "learning_rate" in inspect.signature(fn).parameters:
                names.append(prefix + name)
    return names


def optimizer_factory(name: str) -> Callable[..., optax.GradientTransformation]:
    """torch_adam, or the optax optimiser called `name` ("adamw", "contrib.muon"); ValueError
    with the closest names otherwise."""
    if name == DEFAULT_OPTIMIZER:
        return torch_adam
    names = optimizer_names()
    if name in names:
        import optax.contrib  # noqa: F401 - makes optax.contrib an attribute
        fn = optax
        for part in name.split("."):
            fn = getattr(fn, part)
        return fn
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    raise ValueError(f"optimizer={name!r}: neither torch_adam nor an optax optimiser taking a "
                     f"learning_rate" + (f" (did you mean {', '.join(close)}?)" if close else ""))


def optimizer_argument_problems(name: str, kwargs: dict) -> list[str]:
    """One line per keyword the optimiser `name` does not take (learning_rate included: it is
    lr and schedule's), or per value its constructor refuses; [] when `name` is unknown."""
    try:
        factory = optimizer_factory(name)
    except ValueError:
        return []
    params = inspect.signature(factory).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params.values())
    known = [n for n in params if n != "learning_rate"]
    problems = []
    for key in sorted(kwargs):
        if key == "learning_rate":
            problems.append("optimizer_kwargs.learning_rate: the learning rate is set by lr and "
                            "schedule")
        elif key not in params and not open_ended:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            problems.append(f"optimizer_kwargs.{key}: {name} takes no argument {key}"
                            + (f" (did you mean {close[0]}?)" if close else
                               f" (it takes {', '.join(known)})"))
    if not problems:
        try:
            factory(learning_rate=1e-3, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever the constructor refuses, one line
            problems.append(f"optimizer_kwargs: {name}({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))}) "
                            f"fails: {type(e).__name__}: {e}")
    return problems


# --------------------------------------------------------------------------- the optimiser
def trained_mask(phase: int, params) -> optax.Params:
    """A tree like `params` ({sub-model: tree}, some perhaps optax.MaskedNode) of Python bools:
    True where the phase trains the leaf (`PHASES[phase].unused`)."""
    unused = PHASES[phase].unused

    def trained(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        return not any(keys[0] == sub and keys[1:1 + len(p)] == p for sub, p in unused)

    return jax.tree_util.tree_map_with_path(trained, params)


def submodel_chain(cfg, steps_per_epoch: int, sub: str) -> optax.GradientTransformation:
    """`sub`'s clipping and optimiser, its learning rate injected (in its state)."""
    factory = optimizer_factory(cfg.optimizer)
    kwargs = dict(cfg.optimizer_kwargs)
    # only the rate is injected: the others keep their Python values (torch_adam's b1 enters
    # its arithmetic as a float64 constant, an int stays an int)
    static = [n for n in inspect.signature(factory).parameters if n != "learning_rate"]
    opt = optax.inject_hyperparams(factory, static_args=static)(
        learning_rate=learning_rate_schedule(cfg, steps_per_epoch, sub), **kwargs)
    return optax.chain(torch_clip_by_global_norm(cfg.clip_norm), opt)


def make_optimizer(cfg, steps_per_epoch: int, phase: int) -> optax.GradientTransformation:
    """The optimiser of `phase` over {sub-model: params}: see the module's docstring. Every
    phase's has the same `init`."""
    chains = {sub: only_trained(submodel_chain(cfg, steps_per_epoch, sub),
                                lambda tree: trained_mask(phase, tree))
              for sub in SUBMODELS}
    return optax.multi_transform(chains, lambda params: {sub: sub for sub in params})


def learning_rate(opt_state, sub: str):
    """The learning rate `sub` took its last step with (its schedule's first value before any)."""
    return optax.tree_utils.tree_get(opt_state.inner_states[sub], "hyperparams")["learning_rate"]


# --------------------------------------------------------------------------- old checkpoints
def is_adam_state_tree(opt_tree) -> bool:
    """Whether a checkpoint's optimiser tree (its metadata or arrays) is the layout written
    before the optimiser was optax: {sub-model: {step, exp_avg, exp_avg_sq}}."""
    return isinstance(opt_tree, dict) and set(opt_tree) == set(SUBMODELS) and all(
        isinstance(v, dict) and set(v) == set(TorchAdamState._fields) for v in opt_tree.values())


def from_adam_state_tree(old: dict, template):
    """An optimiser state of `make_optimizer` (its `init` state, `template`) holding the
    torch_adam state of an old checkpoint's {sub-model: {step, exp_avg, exp_avg_sq}}. Each
    chain's step count is its sub-model's largest per-parameter count (the steps it trained:
    every step trains some of its leaves), so its schedule goes on where it was."""
    inner = dict(template.inner_states)
    for sub in SUBMODELS:
        masked = inner[sub]
        clip_state, injected = masked.inner_state
        holder = {s: (optax.MaskedNode() if s != sub else None) for s in SUBMODELS}

        def placed(tree, holder=holder):
            return {s: tree if v is None else v for s, v in holder.items()}

        adam = TorchAdamState(*(placed(old[sub][f]) for f in TorchAdamState._fields))
        count = jnp.asarray(max([int(np.max(c)) for c in jax.tree.leaves(old[sub]["step"])] + [0]),
                            jnp.int32)
        states = {k: type(v)(count=count) if hasattr(v, "count") else v
                  for k, v in injected.hyperparams_states.items()}
        injected = injected._replace(count=count, hyperparams_states=states, inner_state=adam)
        inner[sub] = masked._replace(inner_state=(clip_state, injected))
    return template._replace(inner_states=inner)


__all__ = ["torch_adam", "torch_clip_by_global_norm", "only_trained", "TorchAdamState", "step_lr",
           "learning_rate_schedule", "make_optimizer", "learning_rate", "optimizer_factory",
           "optimizer_names", "optimizer_argument_problems", "trained_mask", "SCHEDULES",
           "DEFAULT_OPTIMIZER", "is_adam_state_tree", "from_adam_state_tree"]
