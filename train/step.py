"""The jitted train step: the reference's objective, and an optax optimiser (train/optim.py).

The train state is a plain pytree of dicts so that it shards, donates and checkpoints
without ceremony:

    {"params": {sub: ...}, "batch_stats": {sub: ...}, "opt": optax state over params}

The optimiser is a `GradientTransformation` over the whole parameter tree, one per phase
(`train.optim.make_optimizer`, every phase's with the same state): by default the
reference's five Adams, one per sub-model (encoder, decoder, graph, base_fuse, detail_fuse),
each with its own global-norm clipping and StepLR schedule, in torch.optim.Adam's own
arithmetic. What a phase does not train (`PHASES[n].unused`, train/phases.py) neither moves
nor counts a step, as in PyTorch, where it has no gradient and Adam skips it.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from smfnet_jax.layers import cast_floats
from smfnet_jax.model import SMFNet
from smfnet_jax.policy import ComputePolicy, resolve, set_policy
from train.configs.validate import microbatches_divide
from train.microbatch import make_microbatched_value_and_grad
from train.optim import learning_rate
from train.phases import PHASES


def split_model(model: SMFNet):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def train_policy(cfg) -> ComputePolicy:
    """The compute policy a config chooses: `compute_dtype`, `precision`, `conv_sums`, and the
    routines for this backend ($SMFNET_JAX_IMPL may force them)."""
    return resolve(None, precision=cfg.precision, dtype=cfg.compute_dtype,
                   conv_sums=cfg.conv_sums)


def init_train_state(model: SMFNet, cfg, policy: ComputePolicy | None = None, *,
                     tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, state) of `model` with `policy` set on it (default the config's,
    `train_policy`) and the optimiser `tx`'s initial state (any phase's: they share it).
    The policy is static in the graphdef, so every step built from it computes with it
    (pass another to compile for a target machine)."""
    graphdef, params, stats = split_model(set_policy(model, policy or train_policy(cfg)))
    return graphdef, {"params": params, "batch_stats": stats, "opt": tx.init(params)}


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


def make_train_step(graphdef, phase: int, cfg, devices: int | None = None, *,
                    tx: optax.GradientTransformation) -> Callable:
    """(state, vi, ir) -> (state, metrics): one step of `phase` with the optimiser `tx` (that
    phase's, `train.optim.make_optimizer`). Pure; jit it with shardings and donation
    (`devices`: what the batch is split over; see `resolve_microbatches`). Metrics per
    sub-model the phase trains: the gradient's norm before clipping, the parameters' norm
    after the step, and the learning rate of the step (from the optimiser state)."""
    value_and_grad = make_value_and_grad(graphdef, phase, cfg, devices)
    updated = PHASES[phase].submodels

    def train_step(state, vi, ir):
        (loss, (terms, new_stats)), grads = value_and_grad(
            state["params"], state["batch_stats"], vi, ir)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **terms}
        for sub in updated:
            metrics[f"grad_norm/{sub}"] = optax.global_norm(grads[sub])
            metrics[f"param_norm/{sub}"] = optax.global_norm(params[sub])
            metrics[f"lr/{sub}"] = learning_rate(opt, sub)
        return {"params": params, "batch_stats": new_stats, "opt": opt}, metrics

    return train_step


def jit_train_step(graphdef, phase: int, cfg, mesh: jax.sharding.Mesh | None = None, *,
                   tx: optax.GradientTransformation) -> Callable:
    """The step jitted with the state replicated, the batch split over the mesh's 'data'
    axis, and the state's buffers donated. The mesh may be another machine's (train.plan
    compiles for TPU and GPU meshes from `jax.experimental.topologies`)."""
    step = make_train_step(graphdef, phase, cfg, None if mesh is None else mesh.size, tx=tx)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    P = jax.sharding.PartitionSpec
    replicated = jax.sharding.NamedSharding(mesh, P())
    batch = jax.sharding.NamedSharding(mesh, P("data"))
    return jax.jit(step, in_shardings=(replicated, batch, batch),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
