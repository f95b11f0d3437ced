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
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from smfnet_jax.layers import cast_floats
from smfnet_jax.model import ENCODER_OUTPUTS, SMFNet, split_modalities
from train.phases import PHASES, Phase


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
    # ir before vi here and below: the op order `GR` and the earlier table traced
    r = m.graph.reasoning
    return {"ppm_pre_ir": r.ppm_ir.dilated_convs(v["ir_level1"]),
            "ppm_pre_vi": r.ppm_vi.dilated_convs(v["vi_level1"])}


def _ppm_bn_relu(m: SMFNet, v: dict) -> dict:
    r = m.graph.reasoning
    return {"ppm_ir": r.ppm_ir.bn_relu(v["ppm_pre_ir"]),
            "ppm_vi": r.ppm_vi.bn_relu(v["ppm_pre_vi"])}


def _graph_reasoning(m: SMFNet, v: dict) -> dict:
    gr, r = m.graph, m.graph.reasoning
    nodes_vi, nodes_ir = r.cross_gate(v["ppm_vi"], v["ppm_ir"])
    return {"concat_pre_ir": gr.concat_ir.conv(r.graph_ir(nodes_ir)),
            "concat_pre_vi": gr.concat_vi.conv(r.graph_vi(nodes_vi))}


def _concat_bn_relu(m: SMFNet, v: dict) -> dict:
    return {"ir_graph": m.graph.concat_ir.bn_relu(v["concat_pre_ir"]),
            "vi_graph": m.graph.concat_vi.bn_relu(v["concat_pre_vi"])}


FEATURES = ("vi_base", "ir_base", "vi_detail", "ir_detail")  # what the correlation terms read
_HEAD_INPUTS = FEATURES + ("vi_graph", "ir_graph")
BODY_STAGES = (  # `SMFNet.features`, split at the graph branch's BatchNorms
    Stage("stack_modalities", ("vi", "ir"), False, _stack_modalities),
    Stage("encode", ("images",), True, _encode),
    Stage("split_modalities", ENCODER_OUTPUTS, False, _split_modalities),
    Stage("gr_ppm_convs", ("vi_level1", "ir_level1"), True, _ppm_convs),
    Stage("gr_ppm_batchnorm", ("ppm_pre_vi", "ppm_pre_ir"), False, _ppm_bn_relu),
    Stage("gr_reasoning", ("ppm_vi", "ppm_ir"), True, _graph_reasoning),
    Stage("gr_concat_batchnorm", ("concat_pre_vi", "concat_pre_ir"), False, _concat_bn_relu),
)


def stages_for(phase: int) -> tuple[Stage, ...]:
    """The body, then the phase's head (`Phase.head`) as a per-sample stage."""
    return BODY_STAGES + (Stage("head", _HEAD_INPUTS, True, PHASES[phase].head),)


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


_join = functools.partial(jax.tree.map, join_microbatches)


class _ForwardPass(NamedTuple):
    """What the forward pass leaves for the backward pass."""
    values: dict        # every stage boundary, whole batch
    stats: dict         # BatchNorm statistics after the batch-coupled stages
    batch_vjps: dict    # stage name -> vjp of each batch-coupled stage
    produced: dict      # stage name -> the keys it produced


class _HeadPass(NamedTuple):
    grads: dict         # parameter gradients of the per-sample loss terms, summed
    cotangents: dict    # of the head's inputs, whole batch
    losses: jax.Array   # (k,) each micro-batch's share of the total
    terms: dict         # per-sample terms, (k,) each
    images: dict        # the head's image outputs (`Phase.images`), whole batch


@dataclasses.dataclass(frozen=True)
class _MicrobatchedGradient:
    """The passes of `make_microbatched_value_and_grad`, in the order `__call__` runs them."""
    train_model: Callable
    batch_stats_of: Callable
    phase: Phase
    cfg: object
    k: int
    policy: object

    def _split(self, tree, rows: int = 1):
        return jax.tree.map(lambda x: split_microbatches(x, self.k * rows), tree)

    def _run(self, stage: Stage, params, stats, inputs):
        m = self.train_model(params, stats)
        return stage.apply(m, inputs), self.batch_stats_of(m)

    @staticmethod
    def _rows_per_sample(inputs, batch: int) -> int:
        # the encoder's rows are images (2 per sample): it runs on half a micro-batch at a time
        return jax.tree.leaves(inputs)[0].shape[0] // batch

    def forward(self, params, stats, values: dict, body) -> _ForwardPass:
        """The body's stages in order: per-sample ones a micro-batch at a time (outputs
        only), batch-coupled ones on the whole batch (keeping their vjp)."""
        batch = values["vi"].shape[0]
        batch_vjps, produced = {}, {}
        for stage in body:
            inputs = {key: values[key] for key in stage.inputs}
            if stage.per_sample:
                r = self._rows_per_sample(inputs, batch)
                out = _join(jax.lax.map(lambda x, st=stage: self._run(st, params, stats, x)[0],
                                        self._split(inputs, r)))
            else:
                out, batch_vjps[stage.name], stats = jax.vjp(
                    lambda p, x, st=stage, s=stats: self._run(st, p, s, x), params, inputs,
                    has_aux=True)
            values = {**values, **out}
            produced[stage.name] = tuple(out)
        return _ForwardPass(values, stats, batch_vjps, produced)

    def _head_loss(self, params, stats, head: Stage, inputs, vi, ir):
        out = cast_floats(self._run(head, params, stats, inputs)[0], jnp.float32)
        terms = self.phase.sample_terms(out, vi, ir, precision=self.policy.precision)
        # the whole-batch terms are 0 here and added once in `batch_pass` (combine is linear)
        total = self.phase.combine(collections.defaultdict(float, terms)) / self.k
        return total, (terms, {key: out[key] for key in self.phase.images})

    def head_pass(self, params, stats, head: Stage, values: dict, vi, ir) -> _HeadPass:
        """The head and its per-sample loss terms, value and gradient, a micro-batch at a
        time; the parameter gradients summed in micro-batch order."""
        head_grad = jax.value_and_grad(self._head_loss, argnums=(0, 3), has_aux=True)

        def step(acc, xs):
            inputs, vi_m, ir_m = xs
            (loss, (terms, images)), (g_params, g_inputs) = head_grad(
                params, stats, head, inputs, vi_m, ir_m)
            return _tree_add(acc, g_params), (loss, terms, images, g_inputs)

        grads, (loss_s, terms_s, images, cot) = jax.lax.scan(
            step, jax.tree.map(jnp.zeros_like, params),
            (self._split({key: values[key] for key in head.inputs}), self._split(vi),
             self._split(ir)))
        return _HeadPass(grads, _join(cot), loss_s, terms_s, _join(images))

    def _batch_loss(self, features, others, vi):
        terms = self.phase.batch_terms({**features, **others}, vi, decomp_grad=self.cfg.decomp_grad,
                                       precision=self.policy.precision)
        return self.phase.combine(collections.defaultdict(float, terms)), terms

    def batch_pass(self, values: dict, head: _HeadPass, vi):
        """The whole-batch loss terms (correlations, seg term) once, from the collected
        outputs: (their total, the terms, the head inputs' cotangents with theirs added)."""
        features = {key: values[key] for key in FEATURES}
        others = jax.lax.stop_gradient({**head.images, "vi_graph": values["vi_graph"],
                                        "ir_graph": values["ir_graph"]})
        (total, terms), g_features = jax.value_and_grad(self._batch_loss, has_aux=True)(
            features, others, vi)
        cot = {key: _tree_add(g, g_features[key]) if key in g_features else g
               for key, g in head.cotangents.items()}
        return total, terms, cot

    def backward(self, params, fwd: _ForwardPass, body, cot: dict, grads):
        """The body's stages in reverse: per-sample ones recompute their forward a
        micro-batch at a time (their vjp), batch-coupled ones apply the kept vjp; parameter
        gradients accumulate into `grads`."""
        cot, batch = dict(cot), fwd.values["vi"].shape[0]
        for stage in reversed(body):
            g_out = {key: cot.pop(key) if key in cot
                     else jax.tree.map(jnp.zeros_like, fwd.values[key])
                     for key in fwd.produced[stage.name]}
            inputs = {key: fwd.values[key] for key in stage.inputs}
            if stage.per_sample:
                def step(acc, xs, st=stage):
                    x, g = xs
                    _, vjp = jax.vjp(lambda p, x_: self._run(st, p, fwd.stats, x_)[0], params, x)
                    g_params, g_x = vjp(g)
                    return _tree_add(acc, g_params), g_x
                r = self._rows_per_sample(inputs, batch)
                grads, g_in = jax.lax.scan(step, grads,
                                           (self._split(inputs, r), self._split(g_out, r)))
                g_in = _join(g_in)
            else:
                g_params, g_in = fwd.batch_vjps[stage.name](g_out)
                grads = _tree_add(grads, g_params)
            for key, g in g_in.items():
                if key not in ("vi", "ir"):
                    cot[key] = _tree_add(cot[key], g) if key in cot else g
        return grads

    def __call__(self, params, stats, vi, ir):
        *body, head = stages_for(self.phase.number)
        compute = self.policy.compute_dtype  # the model's, as the losses' precision
        images = {"vi": vi.astype(compute), "ir": ir.astype(compute)}
        fwd = self.forward(params, stats, images, body)
        head_out = self.head_pass(params, fwd.stats, head, fwd.values, vi, ir)
        batch_total, batch_terms, cot = self.batch_pass(fwd.values, head_out, vi)
        grads = self.backward(params, fwd, body, cot, head_out.grads)
        total = jnp.sum(head_out.losses) + batch_total
        terms = {**{t: jnp.mean(v) for t, v in head_out.terms.items()}, **batch_terms,
                 f"total_phase{self.phase.number}": total}
        return (total, (terms, fwd.stats)), grads


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
    return _MicrobatchedGradient(train_model, batch_stats_of, PHASES[phase], cfg, k, policy)
