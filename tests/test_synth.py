"""Self-generation filters, with the generation engine replaced by scripted outputs."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import pytest

from fedpit import synth
from fedpit.config import SynthConfig
from fedpit.prompts import AlpacaFormat
from fedpit.types import Example

PRIVATE = [
    Example(id=f"p{i}", instruction=f"What are the symptoms of condition number {i} in adults?",
            output=f"Condition {i} causes fever, fatigue and a persistent cough lasting several weeks in adults.")
    for i in range(10)
]
CONFIG = SynthConfig(num_candidates=10, max_instructions=10, batch_size=10, min_instruction_words=3,
                     min_response_words=5, max_redraws=3)


class ScriptedGenerator:
    """Returns scripted instructions for "Task N:" prompts and scripted responses otherwise."""

    def __init__(self, instructions, respond):
        self.instructions = list(instructions)
        self.respond = respond
        self.response_calls = 0
        self.response_rows: list[int] = []
        self.instruction_rows: list[int] = []

    def __call__(self, handle, prompts, options, batch_size=16, seed=None, on_batch=None):
        if prompts[0].startswith("Come up with a series of tasks"):
            self.instruction_rows.append(len(prompts))
            out, self.instructions = self.instructions[: len(prompts)], self.instructions[len(prompts):]
            return out + [""] * (len(prompts) - len(out))
        self.response_calls += 1
        self.response_rows.append(len(prompts))
        return [self.respond(p, self.response_calls) for p in prompts]


class NoModel:
    """Stands in for the ModelHandle: counts adapter merges and whether generation runs inside one."""

    def __init__(self):
        self.merges = 0
        self.merged = False

    @contextmanager
    def inference(self):
        self.merges += 1
        self.merged = True
        try:
            yield
        finally:
            self.merged = False


def _run(monkeypatch, instructions, respond, config=None, private=PRIVATE):
    config = config or replace(CONFIG, max_instructions=len(instructions), batch_size=len(instructions))
    generator = ScriptedGenerator(instructions, respond)
    handle = NoModel()

    def generate(model, *args, **kwargs):
        assert model.merged, "generation must run inside the round's single inference() block"
        return generator(model, *args, **kwargs)

    monkeypatch.setattr(synth, "generate", generate)
    outcome = synth.self_generate(handle, AlpacaFormat(), private, config, seed=0, round_num=1, client="c")
    assert handle.merges == 1
    return outcome, generator


def _instruction_of(prompt: str) -> str:
    return prompt.rsplit("### Instruction:\n", 1)[1].split("\n\n### Response:")[0]


GOOD_ANSWER = "Drink plenty of water, rest well and see a clinician if symptoms worsen quickly."


def test_good_samples_pass_with_provenance(monkeypatch):
    outcome, _ = _run(monkeypatch, ["How is a sprained ankle treated at home?"], lambda p, n: GOOD_ANSWER)
    assert len(outcome.samples) == 1
    sample = outcome.samples[0]
    assert sample.instruction == "How is a sprained ankle treated at home?"
    assert len(sample.instruction_demo_ids) == 8 and len(sample.response_demo_ids) == 3
    assert sample.round == 1 and sample.client == "c" and sample.attempts == 1


def test_copy_of_private_example_is_dropped(monkeypatch):
    copied = PRIVATE[3].output
    outcome, _ = _run(monkeypatch, ["How is a sprained ankle treated at home?"], lambda p, n: copied)
    assert outcome.samples == []
    assert outcome.filtered["copies_private"] == 1


def test_near_duplicate_instruction_is_dropped(monkeypatch):
    near = "What are the symptoms of condition number 4 in elderly adults?"
    outcome, _ = _run(monkeypatch, [near], lambda p, n: GOOD_ANSWER)
    assert outcome.samples == [] and outcome.filtered["instruction_similar_to_private"] == 1


def test_duplicates_among_generated_instructions_are_dropped(monkeypatch):
    text = "How is a sprained ankle treated at home?"
    outcome, _ = _run(monkeypatch, [text, text], lambda p, n: GOOD_ANSWER)
    assert len(outcome.samples) == 1 and outcome.filtered["instruction_duplicate"] == 1


@pytest.mark.parametrize("text, reason", [
    ("", "instruction_empty_or_short"), ("Why?", "instruction_empty_or_short"),
    ("As an AI language model I cannot write tasks", "instruction_refusal"),
    ("Explain ### Response: something odd here", "instruction_markers"),
])
def test_bad_instructions_are_dropped(monkeypatch, text, reason):
    outcome, _ = _run(monkeypatch, [text], lambda p, n: GOOD_ANSWER)
    assert outcome.samples == [] and outcome.filtered[reason] == 1


def test_refusal_response_is_retried_at_most_three_times(monkeypatch):
    outcome, generator = _run(monkeypatch, ["How is a sprained ankle treated at home?"],
                              lambda p, n: "Sorry, I cannot help with that request.")
    assert outcome.samples == [] and outcome.filtered["response_format"] == 1
    assert generator.response_calls == 1 + 3  # first try plus three re-draws of demonstrations


def test_format_failure_then_success_records_attempts(monkeypatch):
    outcome, generator = _run(monkeypatch, ["How is a sprained ankle treated at home?"],
                              lambda p, n: "too short" if n < 3 else GOOD_ANSWER)
    assert len(outcome.samples) == 1 and outcome.samples[0].attempts == 3


def test_budget_stops_generation(monkeypatch):
    config = replace(CONFIG, num_candidates=50, max_instructions=4, batch_size=2)
    answers = iter(range(1000))
    outcome, _ = _run(monkeypatch, [f"Describe unusual sign {i} of vitamin deficiency please" for i in range(10)],
                      lambda p, n: f"{GOOD_ANSWER} Variant {next(answers)}.", config)
    assert outcome.generated_instructions == 4
    assert len(outcome.samples) <= 4


INSTRUCTIONS = [f"How is {topic} usually treated?" for topic in (
    "a sprained ankle at home", "iron deficiency in pregnancy", "chronic lower back pain", "seasonal hay fever",
    "mild dehydration in toddlers", "tension headache after work", "athlete's foot", "a first-degree burn",
    "motion sickness on boats", "insomnia in shift workers")]


def test_responses_only_for_the_candidates_still_needed(monkeypatch):
    config = replace(CONFIG, num_candidates=3, max_instructions=10, batch_size=10)
    answers = iter(range(1000))
    outcome, generator = _run(monkeypatch, INSTRUCTIONS, lambda p, n: f"{GOOD_ANSWER} Variant {next(answers)}.",
                              config)
    assert len(outcome.samples) == 3 and generator.response_rows == [3]
    assert outcome.counts()["unused"] == 7
    assert [s.instruction for s in outcome.samples] == INSTRUCTIONS[:3]


def test_filtered_responses_are_made_up_from_waiting_instructions(monkeypatch):
    config = replace(CONFIG, num_candidates=3, max_instructions=10, batch_size=10)

    def respond(prompt, call):  # the first instruction's answer copies a private example
        if _instruction_of(prompt) == INSTRUCTIONS[0]:
            return PRIVATE[3].output
        return f"{GOOD_ANSWER} About {_instruction_of(prompt)}."

    outcome, generator = _run(monkeypatch, INSTRUCTIONS, respond, config)
    assert generator.response_rows == [3, 1]  # one more response for the one that was dropped
    assert [s.instruction for s in outcome.samples] == INSTRUCTIONS[1:4]
    assert outcome.filtered["copies_private"] == 1 and outcome.counts()["unused"] == 6


def test_responses_wait_until_instructions_for_every_needed_candidate_are_in(monkeypatch):
    """Instruction batches of 2 with one of each pair rejected: four instruction batches, then all four
    responses in one call (a call per instruction batch would have decoded one row at a time)."""
    config = replace(CONFIG, num_candidates=4, max_instructions=10, batch_size=2)
    mixed = [x for pair in zip(INSTRUCTIONS, ["Why?"] * 5) for x in pair]
    answers = iter(range(1000))
    outcome, generator = _run(monkeypatch, mixed, lambda p, n: f"{GOOD_ANSWER} Variant {next(answers)}.", config)
    assert generator.response_rows == [4]
    assert len(outcome.samples) == 4 and outcome.generated_instructions == 8


def test_later_instruction_calls_ask_for_what_the_pass_rate_says_is_missing(monkeypatch):
    """4 of the first 10 instructions pass (a rate of 0.4) and 6 are needed: the second call asks 2 / 0.4 = 5,
    not another 10, and one response call answers 6 of the 9 that passed."""
    config = replace(CONFIG, num_candidates=6, max_instructions=40, batch_size=10)
    scripted = INSTRUCTIONS[:4] + ["Why?"] * 6 + INSTRUCTIONS[4:]
    answers = iter(range(1000))
    outcome, generator = _run(monkeypatch, scripted, lambda p, n: f"{GOOD_ANSWER} Variant {next(answers)}.", config)
    assert generator.instruction_rows == [10, 5] and generator.response_rows == [6]
    assert outcome.generated_instructions == 15 and len(outcome.samples) == 6 and outcome.counts()["unused"] == 3


@pytest.mark.parametrize(("missing", "generated", "accepted", "want"), [
    (32, 0, 0, 32),    # the first call: a full batch, whatever is missing
    (10, 32, 22, 15),  # 10 / (22 / 32) = 14.5
    (10, 32, 0, 32),   # nothing passed yet: a full batch (the rate counts one pass)
    (30, 32, 8, 32),   # never more than a batch
    (10, 120, 90, 8),  # nor past max_instructions
])
def test_instructions_to_ask(missing, generated, accepted, want):
    config = SynthConfig(batch_size=32, max_instructions=128)
    assert synth.instructions_to_ask(missing, generated, accepted, config) == want


def test_a_spent_instruction_budget_still_answers_what_waits(monkeypatch):
    config = replace(CONFIG, num_candidates=5, max_instructions=4, batch_size=2)
    answers = iter(range(1000))
    outcome, generator = _run(monkeypatch, INSTRUCTIONS, lambda p, n: f"{GOOD_ANSWER} Variant {next(answers)}.",
                              config)
    assert generator.response_rows == [4] and len(outcome.samples) == 4


def test_fewer_than_eight_examples_uses_all(monkeypatch):
    outcome, _ = _run(monkeypatch, ["How is a sprained ankle treated at home?"], lambda p, n: GOOD_ANSWER,
                      private=PRIVATE[:5])
    assert len(outcome.samples[0].instruction_demo_ids) == 5


def test_instruction_prompt_lists_tasks():
    prompt = synth.instruction_prompt(["a b", "c d"])
    assert prompt.endswith("Task 1: a b\nTask 2: c d\nTask 3:")


def test_degenerate_repetition_is_a_format_failure(monkeypatch):
    loop = "HIV is a virus that is a virus that is a virus that is a virus that is a virus that is a virus"
    outcome, generator = _run(monkeypatch, ["How is a sprained ankle treated at home?"], lambda p, n: loop)
    assert outcome.samples == [] and outcome.filtered["response_format"] == 1
    assert synth.repetition_ratio(loop) > 0.5 and synth.repetition_ratio(GOOD_ANSWER) == 0.0


PUBLIC = [
    Example(id=f"pub{i}", instruction=f"How is public topic {i} in children usually managed by doctors?",
            output=f"Public topic {i} is managed with rest, fluids and follow-up visits with a paediatrician.")
    for i in range(6)
]


def test_public_demonstrations_read_no_private_text(monkeypatch):
    """With a public pool the prompts, the novelty filter and the kept samples depend on the public pool
    only: other private examples give the same synthetic data, no prompt shows private text, and the
    copy filter (which reads private text) is off."""
    prompts: list[str] = []
    copy = PRIVATE[0].output  # a response that copies a private answer would be dropped in private mode

    def run(private):
        instructions = ["Describe the treatment of an ear infection in toddlers", "List warning signs of asthma"]
        gen = ScriptedGenerator(instructions, lambda prompt, call: copy)

        def recording(handle, batch, options, batch_size=16, seed=None, on_batch=None):
            prompts.extend(batch)
            return gen(handle, batch, options, batch_size, seed, on_batch)

        monkeypatch.setattr(synth, "generate", recording)
        config = replace(CONFIG, num_candidates=2, max_instructions=2, batch_size=2, num_instruction_demos=4,
                         num_response_demos=2)
        return synth.self_generate(NoModel(), AlpacaFormat(), private, config, seed=3, round_num=1, client="c",
                                   public=PUBLIC)

    first = run(PRIVATE)
    other = run([replace(e, output=e.output + " Other text.", instruction="Other " + e.instruction) for e in PRIVATE])
    assert [(s.instruction, s.output) for s in first.samples] == [(s.instruction, s.output) for s in other.samples]
    assert len(first.samples) == 2 and first.filtered["copies_private"] == 0
    assert all(d.startswith("pub") for s in first.samples for d in s.instruction_demo_ids + s.response_demo_ids)
    assert first.samples[0].max_rouge_vs_private == 1.0, "closeness to private text is still recorded"
    assert not any(e.instruction in p or e.output in p for p in prompts for e in PRIVATE)
