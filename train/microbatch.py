"""The exact whole-batch gradient, computed a slice of the batch at a time (less memory).

The training forward pass is written here once more as a list of stages, because the
executor must know which parts of the network treat every sample on its own: those run
one micro-batch at a time, the rest (the graph branch's BatchNorms, with batch statistics
in training, and the cheap reshuffles of the two modalities) see the whole batch. Each stage
calls the model's own modules and methods, so the numbers are the model's;
`tests/test_train.py` checks that running the stages equals `SMFNet.phase1` / `phase2`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from smfnet_jax import losses
from smfnet_jax.layers import cast_floats
from smfnet_jax.model import ENCODER_OUTPUTS, SMFNet, split_modalities


# --------------------------------------------------------------------------- the stage table
@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a training forward pass: `apply(model, {k: values[k] for k in inputs})`
    returns new named values.

    `per_sample` stages compute every row of their inputs independently (a sample, or one
    modality's image of it for the encoder), so they may run on any split of those rows;
    the others see the whole batch.
    """
    name: str
    inputs: tuple[str, ...]
    per_sample: bool
    apply: Callable[[SMFNet, dict], dict]


def _stack_modalities(m: SMFNet, v: dict) -> dict:
    return {"images": jnp.concatenate([v["vi"], v["ir"]], axis=0)}


def _encode(m: SMFNet, v: dict) -> dict:
    """The shared encoder on both modalities as one batch of images (one compiled copy)."""
    return dict(zip(ENCODER_OUTPUTS, m.encoder(v["images"])))


def _split_modalities(m: SMFNet, v: dict) -> dict:
    return split_modalities(tuple(v[name] for name in ENCODER_OUTPUTS))


def _ppm_convs(m: SMFNet, v: dict) -> dict:
    r = m.graph.reasoning
    return {"ppm_pre_vi": r.ppm_vi.dilated_convs(v["vi_level1"]),
            "ppm_pre_ir": r.ppm_ir.dilated_convs(v["ir_level1"])}


def _ppm_bn_relu(m: SMFNet, v: dict) -> dict:
    r = m.graph.reasoning
    return {"ppm_vi": r.ppm_vi.bn_relu(v["ppm_pre_vi"]),
            "ppm_ir": r.ppm_ir.bn_relu(v["ppm_pre_ir"])}


def _graph_reasoning(m: SMFNet, v: dict) -> dict:
    gr, r = m.graph, m.graph.reasoning
    nodes_vi, nodes_ir = r.cross_gate(v["ppm_vi"], v["ppm_ir"])
    return {"concat_pre_vi": gr.concat_vi.conv(r.graph_vi(nodes_vi)),
            "concat_pre_ir": gr.concat_ir.conv(r.graph_ir(nodes_ir))}


def _concat_bn_relu(m: SMFNet, v: dict) -> dict:
    return {"vi_graph": m.graph.concat_vi.bn_relu(v["concat_pre_vi"]),
            "ir_graph": m.graph.concat_ir.bn_relu(v["concat_pre_ir"])}


_HEAD_INPUTS = ("vi_base", "ir_base", "vi_detail", "ir_detail", "vi_graph", "ir_graph")
_SHARED_STAGES = (
    Stage("stack_modalities", ("vi", "ir"), False, _stack_modalities),
    Stage("encode", ("images",), True, _encode),
    Stage("split_modalities", ENCODER_OUTPUTS, False, _split_modalities),
    Stage("gr_ppm_convs", ("vi_level1", "ir_level1"), True, _ppm_convs),
    Stage("gr_ppm_batchnorm", ("ppm_pre_vi", "ppm_pre_ir"), False, _ppm_bn_relu),
    Stage("gr_reasoning", ("ppm_vi", "ppm_ir"), True, _graph_reasoning),
    Stage("gr_concat_batchnorm", ("concat_pre_vi", "concat_pre_ir"), False, _concat_bn_relu),
)
PHASE1_STAGES = _SHARED_STAGES + (
    Stage("reconstruct", _HEAD_INPUTS, True, lambda m, v: m.reconstruct(v)),)
PHASE2_STAGES = _SHARED_STAGES + (
    Stage("fuse", _HEAD_INPUTS, True, lambda m, v: m.fusion_head(v)),)


def stages_for(phase: int) -> tuple[Stage, ...]:
    return PHASE1_STAGES if phase == 1 else PHASE2_STAGES


def run_stages(model: SMFNet, stages: tuple[Stage, ...], vi, ir) -> dict:
    """Every value the stages produce, run in order on the whole batch."""
    values = {"vi": vi, "ir": ir}
    for stage in stages:
        values.update(stage.apply(model, {k: values[k] for k in stage.inputs}))
    return values


# --------------------------------------------------------------------------- the executor
def split_microbatches(x, k: int):
    """(B, ...) -> (k, B // k, ...); micro-batch i holds samples i, i + k, i + 2k, ...

    Strided rather than contiguous so that a batch split over devices in contiguous blocks
    stays split the same way inside every micro-batch (no data moves between devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def join_microbatches(x):
    """Inverse of `split_microbatches`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_microbatched_value_and_grad(train_model: Callable, batch_stats_of: Callable, phase: int,
                                     cfg, k: int, policy) -> Callable:
    """The same ((loss, (terms, batch_stats)), grads) as the whole-batch
    `jax.value_and_grad(train.step.make_loss_fn(...), has_aux=True)`, computed k slices of
    the batch at a time wherever the network allows it.

    `train_model(params, batch_stats)` builds the model in train mode (in the compute
    dtype); `batch_stats_of(model)` reads its BatchNorm statistics back.

    Exact up to float rounding, not an approximation. Per-sample stages run one micro-batch
    at a time inside `lax.map` / `lax.scan`, keeping only their outputs; the batch-coupled
    ones run on the whole batch. The head's loss terms are batch means of per-sample
    quantities, so each micro-batch contributes its value / k; the whole-batch terms
    (correlations, seg term) are computed once from the collected outputs. The backward
    pass walks the stages in reverse, recomputing each per-sample stage's forward one
    micro-batch at a time (its vjp) and accumulating parameter gradients. The encoder's rows
    are images, so it runs on half a micro-batch (with one sample per micro-batch: one
    image) at a time. Peak memory is then one such encoder forward + backward plus the stage
    boundaries of the whole batch; the price is one more forward of the per-sample stages
    except the head (about +20% compute in phase II).
    """
    *body, head = stages_for(phase)
    compute = policy.compute_dtype  # the model's (`smfnet_jax.policy`), as the losses' precision
    image_keys = ("vi_hat", "ir_hat") if phase == 1 else ("fused",)
    sample_terms = losses.phase1_sample_terms if phase == 1 else losses.phase2_sample_terms
    combine = losses.combine_phase1_terms if phase == 1 else losses.combine_phase2_terms
    join = functools.partial(jax.tree.map, join_microbatches)

    def split(tree, rows: int = 1):
        return jax.tree.map(lambda x: split_microbatches(x, k * rows), tree)

    def rows_per_sample(inputs, batch: int) -> int:
        # the encoder's rows are images (2 per sample): it runs on half a micro-batch at a time
        return jax.tree.leaves(inputs)[0].shape[0] // batch

    def run(stage, params, stats, inputs):
        m = train_model(params, stats)
        return stage.apply(m, inputs), batch_stats_of(m)

    def head_loss(params, stats, inputs, vi, ir):
        out = cast_floats(run(head, params, stats, inputs)[0], jnp.float32)
        terms = sample_terms(out, vi, ir, precision=policy.precision)
        # the whole-batch terms are 0 here and added once below (combine is linear in them)
        total = combine(collections.defaultdict(float, terms)) / k
        return total, (terms, {key: out[key] for key in image_keys})

    def batch_loss(features, images, vi):
        outputs = {**features, **images}
        if phase == 1:
            terms = losses.phase1_batch_terms(outputs, vi, decomp_grad=cfg.decomp_grad,
                                              precision=policy.precision)
        else:
            terms = losses.phase2_batch_terms(outputs, decomp_grad=cfg.decomp_grad,
                                              precision=policy.precision)
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
        others = jax.lax.stop_gradient({**join(images), "vi_graph": values["vi_graph"],
                                        "ir_graph": values["ir_graph"]})
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
