"""Choosing synthetic samples by Instruction-Following Score, shared by FedPIT, FedMIT and LocIT+SG."""

from __future__ import annotations

from fedpit.methods.base import ClientContext
from fedpit.synth import SynthOutcome
from fedpit.types import AdapterState, Example


def select_by_ifs(ctx: ClientContext, scorer: AdapterState, synth: SynthOutcome, keep: int) -> list[Example]:
    """Score every candidate with base + `scorer` (FedPIT: the freshly trained local adapter, as the
    paper reports scoring with the global model collapses), keep the `keep` lowest IFS, and record
    scores and choices in the samples' provenance."""
    candidates = [s.as_example(i) for i, s in enumerate(synth.samples)]
    if not candidates:
        return []
    scores = ctx.ifs(scorer, candidates)
    for sample, score in zip(synth.samples, scores):
        sample.ifs = round(score, 6)
    ranked = sorted(range(len(candidates)), key=lambda i: scores[i])[:keep]
    for i in ranked:
        synth.samples[i].selected = True
    return [candidates[i] for i in ranked]
