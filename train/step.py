"""The jitted train step, the optimiser and the learning-rate schedule of the reference.

The train state is a plain pytree of dicts so that it shards, donates and checkpoints
without ceremony:

    {"params": {sub: ...}, "batch_stats": {sub: ...}, "opt": {sub: AdamState}}

One Adam per sub-model (encoder, decoder, graph, base_fuse, detail_fuse), each with its own
global-norm clipping, exactly as the reference's five optimisers. Adam is torch.optim.Adam's
own arithmetic, step count per parameter included (`adam_update`): a parameter that a phase
never uses gets no gradient in PyTorch (None), and Adam skips it, so it neither moves nor
counts the step. Phase I uses neither fusion layer nor the graph's fused head
(`PHASES[1].unused`, train/phases.py), whose first real step is then Adam's step 1 in
phase II.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from smfnet_jax.layers import cast_floats
from smfnet_jax.model import SUBMODELS, SMFNet
from smfnet_jax.policy import ComputePolicy, resolve, set_policy
from train.configs.validate import microbatches_divide
from train.microbatch import make_microbatched_value_and_grad
from train.phases import FUSION_SUBMODELS, PHASES

def learning_rates(epoch: int, cfg) -> dict[str, float]:
    """StepLR(step, gamma) per epoch, floored at lr_min, as the reference's schedulers.

    The fusion layers' schedulers step only in phase II, so their decay counts phase-II
    epochs: at epoch 40 they start at lr while the others are at lr * gamma**2.
    """
    def step_lr(n_epochs: int) -> float:
        return max(cfg.lr_min, cfg.lr * cfg.lr_gamma ** (n_epochs // cfg.lr_step_epochs))

    fusion_epochs = max(0, epoch - cfg.phase1_epochs)
    return {sub: step_lr(fusion_epochs if sub in FUSION_SUBMODELS else epoch) for sub in SUBMODELS}


def trained_mask(phase: int, sub: str, params) -> dict:
    """A tree like `params` (one sub-model's) of Python bools: True where the phase trains it."""
    prefixes = [p for s, p in PHASES[phase].unused if s == sub]
    def trained(path, _):
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
        return not any(keys[:len(p)] == p for p in prefixes)
    return jax.tree_util.tree_map_with_path(trained, params)


class AdamState(NamedTuple):
    """torch.optim.Adam's per-parameter state: step count, exp_avg, exp_avg_sq."""
    step: dict
    exp_avg: dict
    exp_avg_sq: dict


def adam_init(params) -> AdamState:
    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    return AdamState(jax.tree.map(lambda p: jnp.zeros((), jnp.int32), params), zeros(params), zeros(params))


def adam_update(grads, state: AdamState, params, lr, mask, cfg):
    """One torch.optim.Adam step (weight_decay 0), in its order of operations:

        exp_avg.lerp_(g, 1 - b1); exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = exp_avg_sq.sqrt() / sqrt(1 - b2**t) + eps; p.addcdiv_(exp_avg, denom, value=-lr / (1 - b1**t))

    with t the parameter's own step count. Leaves where `mask` is False are left as they
    are (PyTorch skips a parameter without gradient). The bias corrections 1 - b**t are
    -expm1(t log b): in float32, 1 - 0.999**t loses ~1e-5 to cancellation at small t, which
    would scale every update by the same wrong factor. Returns (params, state).
    """
    b1, b2, eps = cfg.adam_b1, cfg.adam_b2, cfg.adam_eps
    log_b1, log_b2 = math.log(b1), math.log(b2)

    def leaf(on, g, p, t, m, v):
        if not on:
            return p, t, m, v
        t = t + 1
        m = m + (1 - b1) * (g - m)
        v = v * b2 + (1 - b2) * (g * g)
        tf = t.astype(jnp.float32)
        step_size = lr / -jnp.expm1(tf * log_b1)
        denom = jnp.sqrt(v) / jnp.sqrt(-jnp.expm1(tf * log_b2)) + eps
        return p - step_size * (m / denom), t, m, v

    out = jax.tree.map(leaf, mask, grads, params, state.step, state.exp_avg, state.exp_avg_sq)
    params, step, exp_avg, exp_avg_sq = jax.tree.transpose(
        jax.tree.structure(params), jax.tree.structure((0, 0, 0, 0)), out)
    return params, AdamState(step, exp_avg, exp_avg_sq)


def clip_grad_norm(grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""
    norm = optax.global_norm(grads)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef, grads), norm


def split_model(model: SMFNet):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def train_policy(cfg) -> ComputePolicy:
    """The compute policy a config chooses: `compute_dtype`, `precision`, `conv_sums`, and the
    routines for this backend ($SMFNET_JAX_IMPL may force them)."""
    return resolve(None, precision=cfg.precision, dtype=cfg.compute_dtype,
                   conv_sums=cfg.conv_sums)


def init_train_state(model: SMFNet, cfg, policy: ComputePolicy | None = None) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, state) of `model` with `policy` set on it (default the config's,
    `train_policy`): the policy is static in the graphdef, so every step built from it
    computes with it (pass another to compile for a target machine)."""
    graphdef, params, stats = split_model(set_policy(model, policy or train_policy(cfg)))
    opt = {sub: adam_init(params[sub]) for sub in SUBMODELS}
    return graphdef, {"params": params, "batch_stats": stats, "opt": opt}


def policy_of(graphdef, state: dict) -> ComputePolicy:
    """The compute policy a train state's graphdef carries (static: no computation)."""
    return nnx.merge(graphdef, nnx.State(state["params"]), nnx.State(state["batch_stats"])).policy


def _train_model(graphdef, params, batch_stats) -> SMFNet:
    """The model in train mode, its float parameters cast to its policy's compute dtype."""
    model = nnx.merge(graphdef, nnx.State(params), nnx.State(batch_stats))
    compute = model.policy.compute_dtype
    if compute != jnp.float32:
        model = nnx.merge(graphdef, nnx.State(cast_floats(params, compute)), nnx.State(batch_stats))
    model.train()
    return model


def _batch_stats(model: SMFNet) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def make_loss_fn(graphdef, phase: int, cfg) -> Callable:
    """(params, batch_stats, vi, ir) -> (loss, (terms, new_batch_stats)), model in train mode."""
    p = PHASES[phase]

    def loss_fn(params, batch_stats, vi, ir):
        model = _train_model(graphdef, params, batch_stats)
        policy = model.policy
        out = p.forward(model, vi.astype(policy.compute_dtype), ir.astype(policy.compute_dtype))
        out = cast_floats(out, jnp.float32)  # losses in f32 whatever the compute dtype
        total, terms = p.loss(out, vi, ir, decomp_grad=cfg.decomp_grad, precision=policy.precision)
        return total, (terms, _batch_stats(model))

    return loss_fn


def resolve_microbatches(setting: int, global_batch: int, routines: str,
                         devices: int | None = None) -> int:
    """cfg.microbatches: >0 as given; 0 (auto): one sample per micro-batch with the XLA:CPU
    routines (the policy's `routines == "cpu"`), where it is both faster (each slice's activations
    stay in cache) and several times smaller in memory, and the whole batch with XLA's
    ("xla", GPU/TPU), where small slices would idle the device. `devices`: how many the batch
    is split over (default this process's `jax.device_count()`; a mesh compiled for another
    machine passes its own, train.plan).
    Raises ValueError unless the setting is 0 or divides the per-device batch."""
    per_device = global_batch // (devices or jax.device_count())
    if not microbatches_divide(setting, per_device):
        raise ValueError(f"microbatches={setting} must be 0 (auto) or divide the per-device "
                         f"batch {per_device}")
    if setting:
        return setting
    return max(1, per_device) if routines == "cpu" else 1


def make_value_and_grad(graphdef, phase: int, cfg, devices: int | None = None) -> Callable:
    """(params, batch_stats, vi, ir) -> ((loss, (terms, new_batch_stats)), grads), whole-batch
    or micro-batched (`cfg.microbatches`, resolved when traced, for a batch split over
    `devices`: see `resolve_microbatches`)."""
    whole = jax.value_and_grad(make_loss_fn(graphdef, phase, cfg), has_aux=True)

    def value_and_grad(params, stats, vi, ir):
        policy = policy_of(graphdef, {"params": params, "batch_stats": stats})  # static
        k = resolve_microbatches(cfg.microbatches, vi.shape[0], policy.routines, devices)
        if k == 1:
            return whole(params, stats, vi, ir)
        train_model = functools.partial(_train_model, graphdef)
        return make_microbatched_value_and_grad(train_model, _batch_stats, phase, cfg, k, policy)(
            params, stats, vi, ir)

    return value_and_grad


def make_train_step(graphdef, phase: int, cfg, devices: int | None = None) -> Callable:
    """(state, vi, ir, lrs) -> (state, metrics). Pure; jit it with shardings and donation
    (`devices`: what the batch is split over; see `resolve_microbatches`)."""
    value_and_grad = make_value_and_grad(graphdef, phase, cfg, devices)
    updated = PHASES[phase].submodels

    def train_step(state, vi, ir, lrs):
        (loss, (terms, new_stats)), grads = value_and_grad(
            state["params"], state["batch_stats"], vi, ir)
        params, opt = dict(state["params"]), dict(state["opt"])
        metrics = {"loss": loss, **terms}
        for sub in updated:
            g, norm = clip_grad_norm(grads[sub], cfg.clip_norm)
            params[sub], opt[sub] = adam_update(g, opt[sub], params[sub], lrs[sub],
                                                trained_mask(phase, sub, params[sub]), cfg)
            metrics[f"grad_norm/{sub}"] = norm
            metrics[f"param_norm/{sub}"] = optax.global_norm(params[sub])
            metrics[f"lr/{sub}"] = lrs[sub]
        return {"params": params, "batch_stats": new_stats, "opt": opt}, metrics

    return train_step


def jit_train_step(graphdef, phase: int, cfg, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """The step jitted with the state replicated, the batch split over the mesh's 'data'
    axis, and the state's buffers donated. The mesh may be another machine's (train.plan
    compiles for TPU and GPU meshes from `jax.experimental.topologies`)."""
    step = make_train_step(graphdef, phase, cfg, None if mesh is None else mesh.size)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    P = jax.sharding.PartitionSpec
    replicated = jax.sharding.NamedSharding(mesh, P())
    batch = jax.sharding.NamedSharding(mesh, P("data"))
    return jax.jit(step, in_shardings=(replicated, batch, batch, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
