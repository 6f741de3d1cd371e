"""Batched text generation: many prompts per forward pass, left padding, KV cache, early stops.

Rows stop at EOS, at a stop string (e.g. the next "### Instruction:") or at the token budget, and
results come back in the caller's order.

The default backend, `fedpit`, is the decode loop of `engines/continuous.py`: finished rows leave
the batch and waiting prompts take their place. The `hf` backend (transformers' `generate` over
static batches of prompts sorted by length) stays available as the reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from fedpit.engines.continuous import decode
from fedpit.engines.stops import cut_at_stop, has_stop, stop_enders
from fedpit.faults import failpoint
from fedpit.model import ModelHandle

__all__ = ["DecodingOptions", "cut_at_stop", "generate", "stop_enders"]

BatchCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class DecodingOptions:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    max_prompt_tokens: int = 1024
    backend: str = "fedpit"
    """"fedpit" (decode loop that drops finished rows) or "hf" (transformers' generate)."""
    continuous_batching: bool = True
    """`fedpit` backend: waiting prompts join as rows finish; False runs static batches one after another
    (the same outputs; `make bench` measures what joining is worth)."""


class StopOnStrings(StoppingCriteria):
    """Per-row stop strings for the `hf` backend. transformers' own `stop_strings` pre-processes the
    whole vocabulary on every `generate` call (about a second with a 49k vocabulary)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.prompt_length = prompt_length
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in (~self.done).nonzero().flatten().tolist():
            if has_stop(self.tokenizer, input_ids[row, self.prompt_length :].tolist(), self.stops):
                self.done[row] = True
        return self.done.clone()


def _hf_generate(handle: ModelHandle, batch: dict[str, torch.Tensor], options: DecodingOptions) -> list[list[int]]:
    tokenizer = handle.tokenizer
    sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p} if options.do_sample \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    prompt_length = batch["input_ids"].shape[1]
    stopping = StoppingCriteriaList([StopOnStrings(tokenizer, options.stop_strings, prompt_length)]) \
        if options.stop_strings else None
    output = handle.model.generate(
        **batch, max_new_tokens=options.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, stopping_criteria=stopping, use_cache=True,
        repetition_penalty=options.repetition_penalty if options.repetition_penalty != 1.0 else None, **sampling,
    )
    return [[t for t in row if t != tokenizer.pad_token_id and t != tokenizer.eos_token_id]
            for row in output[:, prompt_length:].tolist()]


def generate(
    handle: ModelHandle,
    prompts: list[str],
    options: DecodingOptions,
    batch_size: int = 16,
    seed: int | None = None,
    on_batch: BatchCallback | None = None,
) -> list[str]:
    if not prompts:
        return []
    with handle.inference():
        return _generate(handle, prompts, options, batch_size, seed, on_batch)


def _generate(handle: ModelHandle, prompts: list[str], options: DecodingOptions, batch_size: int,
              seed: int | None, on_batch: BatchCallback | None) -> list[str]:
    tokenizer = handle.tokenizer
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # a prompt's end (the question) matters more than its start
    if seed is not None:
        torch.manual_seed(seed)
    encoded = [tokenizer(p, add_special_tokens=True, truncation=True, max_length=options.max_prompt_tokens)["input_ids"]
               for p in prompts]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    encoded = [ids or [start] for ids in encoded]  # an empty prompt is a start token, not a row of padding
    if options.backend == "hf":
        tokens = _static_batches(handle, encoded, options, batch_size, on_batch)
    else:
        tokens = decode(handle, encoded, options, max_rows=batch_size, on_rows_done=on_batch)
    return [cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), options.stop_strings).strip()
            for ids in tokens]


def _static_batches(handle: ModelHandle, encoded: list[list[int]], options: DecodingOptions, batch_size: int,
                    on_batch: BatchCallback | None) -> list[list[int]]:
    """transformers' `generate` over batches of prompts sorted by length (each batch pads little)."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    tokens: list[list[int]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = handle.tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(handle.device)
        for row, ids in zip(rows, _hf_generate(handle, batch, options)):
            tokens[row] = ids
        failpoint("generation_batch")
        if on_batch is not None:
            on_batch(start + len(rows), len(order))
    return tokens
