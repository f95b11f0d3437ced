"""The two training phases of the reference, as one record each: what differs between them.

Phase I trains the encoder, the graph branch and the decoder to reconstruct each modality;
phase II adds the fusion layers and the graph's fused head and trains the fused image. The
train step, the micro-batched gradient and the benchmark read a phase's parts from here
(`PHASES[n]`) rather than branching on its number.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from smfnet_jax import losses
from smfnet_jax.model import SUBMODELS

FUSION_SUBMODELS = ("base_fuse", "detail_fuse")  # trained, and scheduled, in phase II only


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase.

    `unused`: parameters its forward never reads, as (sub-model, path prefix; () for all of
    it): torch.optim.Adam skips them (their .grad is None), so their value, moments and step
    count stay put. `forward(model, vi, ir)` and `head(model, features)` call the model's
    methods (looked up on the model, so a subclass's override is the one used): the whole
    training forward, and its part after the graph branch (what the micro-batched gradient
    runs last). `images`: the head's outputs the losses read as images.
    The loss is `loss(outputs, vi, ir, ...)` whole, or in parts: `sample_terms` (batch means
    of per-sample quantities), `batch_terms` (of the whole batch) and `combine` (terms ->
    total, linear in each term).
    """
    number: int
    unused: tuple[tuple[str, tuple[str, ...]], ...]
    forward: Callable
    head: Callable
    images: tuple[str, ...]
    loss: Callable
    sample_terms: Callable
    batch_terms: Callable  # (outputs, vi, *, decomp_grad, precision) -> terms
    combine: Callable
    first_epoch: Callable  # cfg -> the epoch the phase starts at

    @property
    def submodels(self) -> tuple[str, ...]:
        """The sub-models the phase trains (clips, steps and logs)."""
        return tuple(s for s in SUBMODELS if (s, ()) not in self.unused)


def _phase2_batch_terms(outputs, vi, **kwargs):
    return losses.phase2_batch_terms(outputs, **kwargs)  # phase II's need no input image


PHASES = {
    1: Phase(1, unused=tuple((sub, ()) for sub in FUSION_SUBMODELS)
             + (("graph", ("fuse",)),),  # C_cls: the fused graph feature, phase II's
             forward=lambda m, vi, ir: m.phase1(vi, ir), head=lambda m, f: m.reconstruct(f),
             images=("vi_hat", "ir_hat"),
             loss=losses.phase1_loss, sample_terms=losses.phase1_sample_terms,
             batch_terms=losses.phase1_batch_terms, combine=losses.combine_phase1_terms,
             first_epoch=lambda cfg: 0),
    2: Phase(2, unused=(), forward=lambda m, vi, ir: m.phase2(vi, ir),
             head=lambda m, f: m.fusion_head(f), images=("fused",),
             loss=losses.phase2_loss, sample_terms=losses.phase2_sample_terms,
             batch_terms=_phase2_batch_terms, combine=losses.combine_phase2_terms,
             first_epoch=lambda cfg: cfg.phase1_epochs),
}
