"""The jitted train step, the optimiser and the learning-rate schedule of the reference.

The train state is a plain pytree of dicts so that it shards, donates and checkpoints
without ceremony:

    {"params": {sub: ...}, "batch_stats": {sub: ...}, "opt": {sub: ScaleByAdamState}}

One Adam per sub-model (encoder, decoder, graph, base_fuse, detail_fuse), each with its own
global-norm clipping, exactly as the reference's five optimisers. Phase I updates only the
encoder, decoder and graph; the fusion layers' Adam state does not advance until phase II.
"""
from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from smfnet_jax import losses
from smfnet_jax import model as model_lib
from smfnet_jax.model import SUBMODELS, SMFNet

PHASE1_SUBMODELS = ("encoder", "decoder", "graph")
FUSION_SUBMODELS = ("base_fuse", "detail_fuse")


def submodels_for(phase: int) -> tuple[str, ...]:
    return PHASE1_SUBMODELS if phase == 1 else SUBMODELS


def learning_rates(epoch: int, cfg) -> dict[str, float]:
    """StepLR(step, gamma) per epoch, floored at lr_min, as the reference's schedulers.

    The fusion layers' schedulers step only in phase II, so their decay counts phase-II
    epochs: at epoch 40 they start at lr while the others are at lr * gamma**2.
    """
    def step_lr(n_epochs: int) -> float:
        return max(cfg.lr_min, cfg.lr * cfg.lr_gamma ** (n_epochs // cfg.lr_step_epochs))

    out = {sub: step_lr(epoch) for sub in PHASE1_SUBMODELS}
    fusion_epochs = max(0, epoch - cfg.phase1_epochs)
    out.update({sub: step_lr(fusion_epochs) for sub in FUSION_SUBMODELS})
    return out


def make_adam(cfg) -> optax.GradientTransformation:
    return optax.scale_by_adam(b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)


def clip_grad_norm(grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6))."""
    norm = optax.global_norm(grads)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef, grads), norm


def split_model(model: SMFNet):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def init_train_state(model: SMFNet, cfg) -> tuple[nnx.GraphDef, dict]:
    graphdef, params, stats = split_model(model)
    adam = make_adam(cfg)
    opt = {sub: adam.init(params[sub]) for sub in SUBMODELS}
    return graphdef, {"params": params, "batch_stats": stats, "opt": opt}


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _train_model(graphdef, params, batch_stats, compute) -> SMFNet:
    """The model in train mode, its float parameters cast to the compute dtype."""
    p = params if compute == jnp.float32 else _cast_floats(params, compute)
    model = nnx.merge(graphdef, nnx.State(p), nnx.State(batch_stats))
    model.train()
    return model


def make_loss_fn(graphdef, phase: int, cfg) -> Callable:
    """(params, batch_stats, vi, ir) -> (loss, (terms, new_batch_stats)), model in train mode."""
    compute = jnp.dtype(cfg.compute_dtype)
    objective = losses.phase1_loss if phase == 1 else losses.phase2_loss

    def loss_fn(params, batch_stats, vi, ir):
        model = _train_model(graphdef, params, batch_stats, compute)
        forward = model.phase1 if phase == 1 else model.phase2
        out = forward(vi.astype(compute), ir.astype(compute))
        out = _cast_floats(out, jnp.float32)  # losses in f32 whatever the compute dtype
        total, terms = objective(out, vi, ir, decomp_grad=cfg.decomp_grad)
        new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return total, (terms, new_stats)

    return loss_fn


def _split_microbatches(x, k: int):
    """(B, ...) -> (k, B // k, ...); micro-batch i holds samples i, i + k, i + 2k, ...

    Strided rather than contiguous so that a batch split over devices in contiguous blocks
    stays split the same way inside every micro-batch (no data moves between devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def _join_microbatches(x):
    """Inverse of `_split_microbatches`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_microbatched_value_and_grad(graphdef, phase: int, cfg, k: int) -> Callable:
    """The same ((loss, (terms, batch_stats)), grads) as
    `jax.value_and_grad(make_loss_fn(...), has_aux=True)`, computed k slices of the batch
    at a time wherever the network allows it.

    Exact up to float rounding, not an approximation. The forward pass is the model's
    sequence of stages (`model.PHASE1_STAGES` / `PHASE2_STAGES`): per-sample stages (the
    encoder; the GR's convolutions and graph iterations; the head) run
    one micro-batch at a time inside `lax.map` / `lax.scan`, keeping only their outputs;
    the batch-coupled ones (the GR BatchNorms) run on the whole batch. The head's loss terms
    are batch means of per-sample quantities, so each micro-batch contributes its value /
    k; the whole-batch terms (correlations, seg term) are computed once from the collected
    outputs. The backward pass walks the stages in reverse, recomputing each per-sample
    stage's forward one micro-batch at a time (its vjp) and accumulating parameter
    gradients. The encoder's rows are images, so it runs on half a micro-batch (with one
    sample per micro-batch: one image) at a time. Peak memory is then one such encoder
    forward + backward plus the stage boundaries of the whole batch; the price is one more forward of the per-sample
    stages except the head (about +20% compute in phase II).
    """
    stages = model_lib.PHASE1_STAGES if phase == 1 else model_lib.PHASE2_STAGES
    *body, head = stages
    compute = jnp.dtype(cfg.compute_dtype)
    image_keys = ("vi_hat", "ir_hat") if phase == 1 else ("fused",)
    sample_terms = losses.phase1_sample_terms if phase == 1 else losses.phase2_sample_terms
    combine = losses.combine_phase1_terms if phase == 1 else losses.combine_phase2_terms
    join = functools.partial(jax.tree.map, _join_microbatches)

    def split(tree, rows: int = 1):
        return jax.tree.map(lambda x: _split_microbatches(x, k * rows), tree)

    def rows_per_sample(inputs, batch: int) -> int:
        # the encoder's rows are images (2 per sample): it runs on half a micro-batch at a time
        return jax.tree.leaves(inputs)[0].shape[0] // batch

    def run(stage, params, stats, inputs):
        m = _train_model(graphdef, params, stats, compute)
        return stage.apply(m, inputs), nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

    def head_loss(params, stats, inputs, vi, ir):
        out = _cast_floats(run(head, params, stats, inputs)[0], jnp.float32)
        terms = sample_terms(out, vi, ir)
        # the whole-batch terms are 0 here and added once below (combine is linear in them)
        total = combine(collections.defaultdict(float, terms)) / k
        return total, (terms, {key: out[key] for key in image_keys})

    def batch_loss(features, images, vi):
        outputs = {**features, **images}
        if phase == 1:
            terms = losses.phase1_batch_terms(outputs, vi, decomp_grad=cfg.decomp_grad)
        else:
            terms = losses.phase2_batch_terms(outputs, decomp_grad=cfg.decomp_grad)
        return combine(collections.defaultdict(float, terms)), terms

    def value_and_grad(params, stats, vi, ir):
        values = {"vi": vi.astype(compute), "ir": ir.astype(compute)}
        batch_vjps, produced = {}, {}
        for stage in body:                                   # forward
            inputs = {key: values[key] for key in stage.inputs}
            if stage.per_sample:
                r = rows_per_sample(inputs, vi.shape[0])
                out = join(jax.lax.map(lambda x, st=stage: run(st, params, stats, x)[0],
                                       split(inputs, r)))
            else:
                out, batch_vjps[stage.name], stats = jax.vjp(
                    lambda p, x, st=stage, s=stats: run(st, p, s, x), params, inputs,
                    has_aux=True)
            values.update(out)
            produced[stage.name] = tuple(out)

        head_grad = jax.value_and_grad(head_loss, argnums=(0, 2), has_aux=True)

        def head_step(acc, xs):
            inputs, vi_m, ir_m = xs
            (loss, (terms, images)), (g_params, g_inputs) = head_grad(params, stats, inputs, vi_m, ir_m)
            return _tree_add(acc, g_params), (loss, terms, images, g_inputs)

        grads, (loss_s, terms_s, images, cot) = jax.lax.scan(
            head_step, jax.tree.map(jnp.zeros_like, params),
            (split({key: values[key] for key in head.inputs}), split(vi), split(ir)))
        cot = join(cot)

        features = {key: values[key] for key in ("vi_base", "ir_base", "vi_detail", "ir_detail")}
        others = jax.lax.stop_gradient({**join(images), "graph_ir": values["graph_ir"],
                                        "graph_vi": values["graph_vi"]})
        (batch_total, batch_terms), g_features = jax.value_and_grad(batch_loss, has_aux=True)(
            features, others, vi)
        cot = {key: _tree_add(g, g_features[key]) if key in g_features else g
               for key, g in cot.items()}

        for stage in reversed(body):                         # backward
            g_out = {key: cot.pop(key) if key in cot else jax.tree.map(jnp.zeros_like, values[key])
                     for key in produced[stage.name]}
            inputs = {key: values[key] for key in stage.inputs}
            if stage.per_sample:
                def step(acc, xs, st=stage):
                    x, g = xs
                    _, vjp = jax.vjp(lambda p, x_: run(st, p, stats, x_)[0], params, x)
                    g_params, g_x = vjp(g)
                    return _tree_add(acc, g_params), g_x
                r = rows_per_sample(inputs, vi.shape[0])
                grads, g_in = jax.lax.scan(step, grads, (split(inputs, r), split(g_out, r)))
                g_in = join(g_in)
            else:
                g_params, g_in = batch_vjps[stage.name](g_out)
                grads = _tree_add(grads, g_params)
            for key, g in g_in.items():
                if key not in ("vi", "ir"):
                    cot[key] = _tree_add(cot[key], g) if key in cot else g

        total = jnp.sum(loss_s) + batch_total
        terms = {**{t: jnp.mean(v) for t, v in terms_s.items()}, **batch_terms,
                 f"total_phase{phase}": total}
        return (total, (terms, stats)), grads

    return value_and_grad


def resolve_microbatches(setting: int, global_batch: int) -> int:
    """cfg.microbatches: >0 as given; 0 (auto): one sample per micro-batch on CPU, where it
    is both faster (each slice's activations stay in cache) and several times smaller in
    memory, and the whole batch on GPU/TPU, where small slices would idle the device.
    Raises ValueError unless the setting is 0 or divides the per-device batch."""
    per_device = global_batch // jax.device_count()
    if setting < 0 or (setting and per_device % setting):
        raise ValueError(f"microbatches={setting} must be 0 (auto) or divide the per-device "
                         f"batch {per_device}")
    if setting:
        return setting
    return max(1, per_device) if jax.default_backend() == "cpu" else 1


def make_value_and_grad(graphdef, phase: int, cfg) -> Callable:
    """(params, batch_stats, vi, ir) -> ((loss, (terms, new_batch_stats)), grads), whole-batch
    or micro-batched (`cfg.microbatches`, resolved when traced)."""
    whole = jax.value_and_grad(make_loss_fn(graphdef, phase, cfg), has_aux=True)

    def value_and_grad(params, stats, vi, ir):
        k = resolve_microbatches(cfg.microbatches, vi.shape[0])
        if k == 1:
            return whole(params, stats, vi, ir)
        return make_microbatched_value_and_grad(graphdef, phase, cfg, k)(params, stats, vi, ir)

    return value_and_grad


def make_train_step(graphdef, phase: int, cfg) -> Callable:
    """(state, vi, ir, lrs) -> (state, metrics). Pure; jit it with shardings and donation."""
    value_and_grad = make_value_and_grad(graphdef, phase, cfg)
    adam = make_adam(cfg)
    updated = submodels_for(phase)

    def train_step(state, vi, ir, lrs):
        (loss, (terms, new_stats)), grads = value_and_grad(
            state["params"], state["batch_stats"], vi, ir)
        params, opt = dict(state["params"]), dict(state["opt"])
        metrics = {"loss": loss, **terms}
        for sub in updated:
            g, norm = clip_grad_norm(grads[sub], cfg.clip_norm)
            updates, opt[sub] = adam.update(g, opt[sub], params[sub])
            params[sub] = jax.tree.map(lambda p, u: p - lrs[sub] * u, params[sub], updates)
            metrics[f"grad_norm/{sub}"] = norm
            metrics[f"param_norm/{sub}"] = optax.global_norm(params[sub])
            metrics[f"lr/{sub}"] = lrs[sub]
        return {"params": params, "batch_stats": new_stats, "opt": opt}, metrics

    return train_step


def jit_train_step(graphdef, phase: int, cfg, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """The step jitted with the state replicated, the batch split over the mesh's 'data'
    axis, and the state's buffers donated."""
    step = make_train_step(graphdef, phase, cfg)
    if mesh is None:
        return jax.jit(step, donate_argnums=(0,))
    P = jax.sharding.PartitionSpec
    replicated = jax.sharding.NamedSharding(mesh, P())
    batch = jax.sharding.NamedSharding(mesh, P("data"))
    return jax.jit(step, in_shardings=(replicated, batch, batch, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
