"""The decode loop on the embedded SmolLM2 in fp32: continuous batching gives, token for token, what
transformers' `generate` gives each prompt alone, on prompts shaped like self-generation's."""

from __future__ import annotations

import pytest

from fedpit.config import LoraConfig, ModelConfig
from fedpit.engines import continuous
from fedpit.engines.generation import DecodingOptions, generate
from fedpit.model import load_model
from fedpit.prompts import AlpacaFormat
from fedpit.types import Example

pytestmark = pytest.mark.smollm2

QUESTIONS = [
    "What are the symptoms of asthma?", "How is type 2 diabetes diagnosed?", "What causes migraines?",
    "Who is at risk for glaucoma?", "What is the outlook for people with Parkinson's disease?",
    "How can high blood pressure be prevented?", "What are the treatments for psoriasis?",
    "Is celiac disease inherited?",
]
DEMOS = [Example(id="d1", instruction="What is anemia?", input="",
                 output="Anemia is a condition in which the blood has fewer healthy red blood cells than normal."),
         Example(id="d2", instruction="What are the symptoms of the flu?", input="",
                 output="Fever, cough, sore throat, muscle aches, headache and tiredness.")]


def test_continuous_batching_is_token_identical_to_generate_alone_on_smollm2(smollm2_path, monkeypatch):
    joins = []
    real_join = continuous._join
    monkeypatch.setattr(continuous, "_join", lambda *args: (joins.append(len(args[0])), real_join(*args)))
    handle = load_model(ModelConfig(name=smollm2_path, dtype="fp32"), LoraConfig(rank=4, alpha=8))
    fmt = AlpacaFormat()
    prompts = [fmt.render_with_demos(DEMOS[: 1 + i % 2], q) for i, q in enumerate(QUESTIONS)]
    options = DecodingOptions(max_new_tokens=24, stop_strings=fmt.stop_strings)
    ours = generate(handle, prompts, options, batch_size=3)
    assert joins and all(joins), "prompts should have joined rows still decoding"
    handle.merge_for_inference = False
    reference = [generate(handle, [p], DecodingOptions(max_new_tokens=24, stop_strings=fmt.stop_strings,
                                                       backend="hf"), batch_size=1)[0] for p in prompts]
    assert ours == reference
    assert all(ours) and len(set(ours)) == len(ours)
