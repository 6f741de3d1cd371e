"""Self-generation of synthetic instruction data by in-context learning (FedPIT, Zhang et al. 2024).

Two Self-Instruct phases with the current global model and no external API:
1. new instruction: "Task 1 ... Task 8" drawn from the client's own instructions, then "Task 9:";
2. response: a few local (instruction, response) demonstrations, then the new instruction.
Filters drop empty/short/refusal/template-marker outputs, instructions too close to a local one,
and samples that copy private text; a response that fails the format check is retried with
freshly drawn demonstrations up to `max_redraws` times. FedPIT, LocIT+SG and FedMIT share this.

With public demonstrations (`synth.demonstrations = "public"`) both phases draw their demonstrations
from a public pool, novelty is judged against that pool, and the copy filter is off: it reads
private text to decide what is kept, which would make the synthetic data depend on private examples
outside any DP guarantee. Closeness to private text is still recorded (client side) for the report.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fedpit.config import SynthConfig
from fedpit.engines.generation import DecodingOptions, generate
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.textmetrics import max_rouge_l
from fedpit.types import Example, SyntheticSample

REFUSAL = re.compile(
    r"\bas an ai\b|\blanguage model\b|^\s*(i'?m sorry|i am sorry|sorry\b|i apologi[sz]e)|"
    r"\bi (cannot|can't|can not|am unable to|am not able to|won't)\b",
    re.IGNORECASE,
)
FILTER_REASONS = (
    "instruction_empty_or_short", "instruction_repetitive", "instruction_refusal", "instruction_markers",
    "instruction_similar_to_private", "instruction_similar_to_public",
    "instruction_duplicate", "response_format", "copies_private",
)

Progress = Callable[[int, int], None]


def instruction_prompt(instructions: list[str]) -> str:
    tasks = "".join(f"Task {i}: {text}\n" for i, text in enumerate(instructions, start=1))
    return f"Come up with a series of tasks:\n{tasks}Task {len(instructions) + 1}:"


def _one_line(text: str, max_words: int = 80) -> str:
    words = " ".join(text.split()).split(" ")
    return " ".join(words[:max_words])


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: high for degenerate loops
    ("a virus that is a virus that is ..."), which small models fall into under greedy decoding."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _format_problem(text: str, min_words: int, markers: tuple[str, ...], max_repetition: float = 1.0) -> str | None:
    if len(text.split()) < min_words:
        return "empty_or_short"
    if repetition_ratio(text) > max_repetition:
        return "repetitive"
    if REFUSAL.search(text):
        return "refusal"
    if any(m in text for m in markers):
        return "markers"
    return None


def instructions_to_ask(missing: int, generated: int, accepted: int, config: SynthConfig) -> int:
    """How many new instructions the next call asks for, `missing` being still needed.

    The first call asks a full `batch_size`: nothing says yet how many will pass, and a short call that must
    be followed by another pays a second decode of its longest row. Later calls ask for what the pass rate so
    far says is missing (at most `batch_size`): a full batch again for the few still missing wrote
    instructions nobody answered (at the paper's defaults on the bench's first client, 64 instructions for 32
    samples; 58 with this rule: `benchmarks/generation_ab.py --lever ask_by_rate --workload paper_synth`)."""
    want = min(config.batch_size, config.max_instructions - generated)
    if generated and missing > 0:
        rate = max(accepted, 1) / generated
        want = min(want, math.ceil(missing / rate))
    return want


@dataclass
class SynthOutcome:
    samples: list[SyntheticSample]
    generated_instructions: int
    filtered: Counter = field(default_factory=Counter)
    unused_instructions: int = 0
    """Instructions that passed the filters but were not needed: `num_candidates` samples were reached."""

    def counts(self) -> dict[str, int]:
        return {"generated": self.generated_instructions, "passed": len(self.samples),
                "unused": self.unused_instructions,
                **{f"filtered_{r}": self.filtered.get(r, 0) for r in FILTER_REASONS}}


def self_generate(
    handle: ModelHandle,
    fmt: PromptFormat,
    private: list[Example],
    config: SynthConfig,
    *,
    seed: int,
    round_num: int,
    client: str,
    on_progress: Progress | None = None,
    public: list[Example] | None = None,
) -> SynthOutcome:
    """Generate until `num_candidates` samples pass the filters or `max_instructions` are spent, with
    demonstrations from `private` or, when given, from `public`. The adapter is merged once for every
    generation call of the round (see `ModelHandle.inference`)."""
    with handle.inference():
        return _self_generate(handle, fmt, private, config, seed=seed, round_num=round_num, client=client,
                              on_progress=on_progress, public=public)


def _self_generate(handle: ModelHandle, fmt: PromptFormat, private: list[Example], config: SynthConfig, *,
                   seed: int, round_num: int, client: str, on_progress: Progress | None,
                   public: list[Example] | None) -> SynthOutcome:
    rng = random.Random(seed)
    decoding = dict(do_sample=config.decoding == "sample", temperature=config.temperature, top_p=config.top_p,
                    repetition_penalty=config.repetition_penalty)
    instr_opts = DecodingOptions(max_new_tokens=config.max_new_tokens_instruction, stop_strings=("\n",), **decoding)
    resp_opts = DecodingOptions(max_new_tokens=config.max_new_tokens_response,
                                stop_strings=tuple(fmt.stop_strings), **decoding)
    demos = public if public is not None else private
    similar = "instruction_similar_to_public" if public is not None else "instruction_similar_to_private"
    local_instructions = [_one_line(e.instruction) for e in demos]
    local_texts = [f"{e.instruction}\n{e.output}" for e in private]
    local_outputs = [e.output for e in private]
    outcome = SynthOutcome(samples=[], generated_instructions=0)
    accepted_instructions: list[str] = []
    pending: list[tuple[str, list[str]]] = []  # accepted instructions still waiting for a response
    gen_seed = seed
    while len(outcome.samples) < config.num_candidates:
        need = config.num_candidates - len(outcome.samples)
        # Instructions first, until one waits for every candidate still needed: responses cost about ten
        # times an instruction, and one call for all of them keeps the decode batch full, where a call per
        # instruction batch decoded the few rows that batch let through.
        if len(pending) < need and outcome.generated_instructions < config.max_instructions:
            want = instructions_to_ask(need - len(pending), outcome.generated_instructions,
                                       len(accepted_instructions), config)
            draws = [rng.sample(range(len(demos)), min(config.num_instruction_demos, len(demos)))
                     for _ in range(want)]
            prompts = [instruction_prompt([local_instructions[i] for i in d]) for d in draws]
            gen_seed += 1
            raw = generate(handle, prompts, instr_opts, batch_size=config.batch_size, seed=gen_seed)
            outcome.generated_instructions += len(raw)
            for text, draw in zip(raw, draws):
                instruction = text.strip().strip('"').strip()
                problem = _format_problem(instruction, config.min_instruction_words, fmt.markers,
                                          config.max_repetition)
                if problem:
                    outcome.filtered[f"instruction_{problem}"] += 1
                elif max_rouge_l(instruction, local_instructions, config.rouge_threshold) > config.rouge_threshold:
                    outcome.filtered[similar] += 1
                elif max_rouge_l(instruction, accepted_instructions, config.rouge_threshold) > config.rouge_threshold:
                    outcome.filtered["instruction_duplicate"] += 1
                else:
                    accepted_instructions.append(instruction)
                    pending.append((instruction, [demos[i].id for i in draw]))
            continue
        if not pending:
            break
        # Responses only for the instructions still needed: every response beyond `num_candidates` used
        # to be thrown away (a third of them in the demo). Rows that fail a filter are made up from
        # `pending` on the next pass.
        batch, pending = pending[:need], pending[need:]
        gen_seed += 1
        responses = _respond_with_redraws(handle, fmt, demos, batch, config, resp_opts, rng, gen_seed)
        for (instruction, instr_demo_ids), (response, resp_demo_ids, attempts) in zip(batch, responses):
            if response is None:
                outcome.filtered["response_format"] += 1
                continue
            overlap = max(max_rouge_l(f"{instruction}\n{response}", local_texts),
                          max_rouge_l(response, local_outputs))
            if overlap > config.rouge_threshold and public is None:
                outcome.filtered["copies_private"] += 1
                continue
            outcome.samples.append(SyntheticSample(
                instruction=instruction, output=response, round=round_num, client=client,
                instruction_demo_ids=instr_demo_ids, response_demo_ids=resp_demo_ids,
                attempts=attempts, max_rouge_vs_private=round(overlap, 4),
            ))
        if on_progress is not None:
            on_progress(len(outcome.samples), config.num_candidates)
    outcome.unused_instructions = len(pending)
    return outcome


def _respond_with_redraws(
    handle: ModelHandle,
    fmt: PromptFormat,
    private: list[Example],
    pending: list[tuple[str, list[str]]],
    config: SynthConfig,
    options: DecodingOptions,
    rng: random.Random,
    seed: int,
) -> list[tuple[str | None, list[str], int]]:
    """Write a response for each instruction; rows that fail the format check are retried together
    with new demonstrations, at most `max_redraws` more times."""
    results: list[tuple[str | None, list[str], int]] = [(None, [], 0) for _ in pending]
    todo = list(range(len(pending)))
    k = min(config.num_response_demos, len(private))
    for attempt in range(1, config.max_redraws + 2):
        if not todo:
            break
        demos = {row: rng.sample(private, k) for row in todo}
        prompts = [fmt.render_with_demos(demos[row], pending[row][0]) for row in todo]
        texts = generate(handle, prompts, options, batch_size=config.batch_size, seed=seed + attempt)
        still = []
        for row, text in zip(todo, texts):
            ids = [d.id for d in demos[row]]
            if _format_problem(text, config.min_response_words, fmt.markers, config.max_repetition) is None:
                results[row] = (text, ids, attempt)
            else:
                results[row] = (None, ids, attempt)
                still.append(row)
        todo = still
    return results
