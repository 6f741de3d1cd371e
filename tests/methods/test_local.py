"""LocIT and LocIT+SG with the engines replaced by stand-ins (no model): each client continues
from its own private adapter, self-generates and scores with it, and uploads nothing.
(A real round on the tiny model: test_baselines.py and test_matrix.py.)"""

from __future__ import annotations

import pytest
import torch

from fedpit import config as config_mod
from fedpit.engines.training import TrainResult
from fedpit.methods import ClientContext, build_method
from fedpit.synth import SynthOutcome
from fedpit.types import ClientState, Example, SyntheticSample

GLOBAL = {"w": torch.tensor([0.0, 0.0])}
PRIVATE = [Example(id=f"p{i}", instruction=f"question {i}", output=f"answer {i}") for i in range(4)]


@pytest.fixture
def engines(monkeypatch):
    """Training adds 1 to every weight; generation yields three candidates; IFS prefers candidate 2."""
    calls = {"train": [], "generate": [], "ifs": []}

    def train(self, start, examples, purpose, epochs=None, extra_loss=None):
        calls["train"].append((purpose, start["w"].clone(), [e.id for e in examples]))
        return {k: v + 1.0 for k, v in start.items()}, TrainResult(mean_loss=0.5, steps=1, tokens=1, seconds=0.0)

    def self_generate(self, adapter):
        calls["generate"].append(adapter["w"].clone())
        samples = [SyntheticSample(instruction=f"new {i}", output=f"text {i}", round=self.round, client=self.client,
                                   instruction_demo_ids=[], response_demo_ids=[]) for i in range(3)]
        return SynthOutcome(samples=samples, generated_instructions=3)

    def ifs(self, adapter, examples):
        calls["ifs"].append(adapter["w"].clone())
        return [0.9, 0.8, 0.1][: len(examples)]

    monkeypatch.setattr(ClientContext, "train", train)
    monkeypatch.setattr(ClientContext, "self_generate", self_generate)
    monkeypatch.setattr(ClientContext, "ifs", ifs)
    return calls


def _round(method, config, state, round_num):
    ctx = ClientContext(client="c", round=round_num, examples=PRIVATE, state=state, handle=None, fmt=None,
                        config=config, learning_rate=0.01, seed=0)
    return method.client_update(ctx, GLOBAL)


def test_locit_continues_from_its_private_adapter_and_uploads_nothing(engines):
    config = config_mod.load(None, ["method.name='local'"])
    method = build_method(config)
    first = _round(method, config, ClientState(), 1)
    second = _round(method, config, first.state, 2)
    starts = [start.tolist() for _purpose, start, _ids in engines["train"]]
    assert starts == [[0.0, 0.0], [1.0, 1.0]], "round 2 starts from the client's own adapter, not W_g"
    assert torch.equal(second.state.tensors["private"]["w"], torch.tensor([2.0, 2.0]))
    for result in (first, second):
        assert result.upload.tensors == {} and result.upload.extras == {} and result.upload.num_bytes == 0
        assert result.upload.metrics == {"train_loss_private": 0.5}
    assert method.aggregate(GLOBAL, [first.upload, second.upload], {}) is GLOBAL


def test_locit_sg_generates_and_scores_with_its_own_adapter(engines):
    config = config_mod.load(None, ["method.name='local_sg'", "method.keep=1"])
    method = build_method(config)
    first = _round(method, config, ClientState(), 1)
    second = _round(method, config, first.state, 2)
    assert [w.tolist() for w in engines["generate"]] == [[0.0, 0.0], [1.0, 1.0]]
    assert [w.tolist() for w in engines["ifs"]] == [[1.0, 1.0], [2.0, 2.0]]  # scorer: own adapter + private
    final_purpose, final_start, final_ids = engines["train"][-1]
    assert final_purpose == "private" and final_start.tolist() == [1.0, 1.0]
    assert final_ids == [e.id for e in PRIVATE] + ["synth-r2-c-2"], "private + the lowest-IFS candidate"
    assert [s.selected for s in second.synthetic] == [False, False, True]
    assert second.upload.tensors == {} and second.upload.metrics["synthetic_kept"] == 1
