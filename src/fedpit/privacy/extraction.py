"""Training-data extraction from a model given a training prompt.

- Discoverable memorisation (the FedPIT paper's measure, after Carlini et al. 2023 "Quantifying
  Memorization Across Neural Language Models"): generate greedily from the training prompt and
  take ROUGE-L of the output against the true response.
- Verbatim extraction: the share of examples whose first k response tokens come back exactly, and
  the mean longest common token prefix -- more sensitive on small models, whose outputs rarely
  reach high ROUGE-L.
"""

from __future__ import annotations

from fedpit.engines.generation import DecodingOptions, generate
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.textmetrics import rouge_l
from fedpit.types import Example


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def extraction_attack(
    handle: ModelHandle,
    fmt: PromptFormat,
    members: list[Example],
    prefix_tokens: int = 32,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> dict[str, float]:
    """Greedy continuation of each member's prompt, compared with its true response."""
    if not members:
        return {}
    options = DecodingOptions(max_new_tokens=max(max_new_tokens, prefix_tokens), stop_strings=tuple(fmt.stop_strings))
    outputs = generate(handle, [fmt.render(e.instruction, e.input) for e in members], options, batch_size=batch_size)
    scores = [rouge_l(e.output, out) for e, out in zip(members, outputs)]
    tokenizer = handle.tokenizer
    prefixes, exact = [], []
    for example, output in zip(members, outputs):
        truth = tokenizer(example.output, add_special_tokens=False)["input_ids"]
        guess = tokenizer(output, add_special_tokens=False)["input_ids"]
        shared = common_prefix(truth, guess)
        prefixes.append(shared)
        exact.append(shared >= min(prefix_tokens, len(truth)))
    n = len(members)
    return {
        "memorization_rougeL": sum(scores) / n,
        "memorization_frac_above_0.5": sum(s > 0.5 for s in scores) / n,
        "memorization_frac_above_0.9": sum(s > 0.9 for s in scores) / n,
        "extraction_exact_rate": sum(exact) / n,
        "extraction_mean_prefix_tokens": sum(prefixes) / n,
    }
