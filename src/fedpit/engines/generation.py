"""Batched text generation: many prompts per forward pass, left padding, KV cache, early stops.

Prompts are sorted by length so each batch pads little, then results are put back in the
caller's order. Rows stop at EOS or at a stop string (e.g. the next "### Instruction:").

The default backend is a plain decode loop over the model's KV cache that *removes finished rows
from the batch* (and from the cache): self-generation stops most rows well before the token
budget, and `model.generate` keeps computing every row to the end of the longest one. The
`hf` backend (transformers' `generate`) stays available as the reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from fedpit.engines.encoding import last_positions
from fedpit.engines.kvcache import preallocated_cache
from fedpit.faults import failpoint
from fedpit.model import ModelHandle

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


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


_STOP_ENDERS: dict[tuple[int, tuple[str, ...]], frozenset[int]] = {}


def stop_enders(tokenizer, stops: tuple[str, ...]) -> frozenset[int]:
    """Token ids whose text contains the last character of a stop string: a stop string can only be
    completed by one of them, so the decode loop decodes a row's tail only after such a token
    instead of at every step. Built once per tokenizer and stop set (one pass over the vocabulary)."""
    key = (id(tokenizer), stops)
    if key not in _STOP_ENDERS:
        finals = {stop[-1] for stop in stops if stop}
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        _STOP_ENDERS[key] = frozenset(i for i, piece in enumerate(pieces) if any(c in piece for c in finals))
    return _STOP_ENDERS[key]


def _has_stop(tokenizer, tokens: list[int], stops: tuple[str, ...]) -> bool:
    if not stops:
        return False
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(stop in text for stop in stops if stop)


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
            if _has_stop(self.tokenizer, input_ids[row, self.prompt_length :].tolist(), self.stops):
                self.done[row] = True
        return self.done.clone()


def _processors(options: DecodingOptions) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.do_sample:
        processors.append(TemperatureLogitsWarper(options.temperature))
        if options.top_p < 1.0:
            processors.append(TopPLogitsWarper(options.top_p))
    return processors


def _decode_loop(handle: ModelHandle, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 options: DecodingOptions) -> list[list[int]]:
    """Greedy or sampled decoding; a row leaves the batch (and the KV cache) as soon as it ends."""
    tokenizer = handle.tokenizer
    eos = tokenizer.eos_token_id
    processors = _processors(options)
    cache = preallocated_cache(handle.model.config, input_ids.shape[1] + options.max_new_tokens)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = handle.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       past_key_values=cache, use_cache=True,
                       logits_to_keep=last_positions(input_ids.shape[1], 1, input_ids.device))
    alive = torch.arange(input_ids.shape[0], device=input_ids.device)
    sequences, mask, next_position = input_ids, attention_mask, positions[:, -1] + 1
    generated: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    enders = stop_enders(tokenizer, options.stop_strings) if options.stop_strings else frozenset()
    for _ in range(options.max_new_tokens):
        scores = processors(sequences, out.logits[:, -1, :].float())
        if options.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        keep = []
        for i, (row, token) in enumerate(zip(alive.tolist(), tokens.tolist())):
            if token == eos:
                continue
            generated[row].append(token)
            if token in enders and _has_stop(tokenizer, generated[row][-16:], options.stop_strings):
                continue
            keep.append(i)
        if not keep:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=alive.device)
            cache.batch_select_indices(index)
            alive, tokens, sequences = alive[index], tokens[index], sequences[index]
            mask, next_position = mask[index], next_position[index]
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        out = handle.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
                           past_key_values=cache, use_cache=True)
        next_position = next_position + 1
    return generated


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
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for done, rows in enumerate(batches, start=1):
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt").to(handle.device)
        if options.backend == "hf":
            tokens = _hf_generate(handle, batch, options)
        else:
            tokens = _decode_loop(handle, batch["input_ids"], batch["attention_mask"], options)
        for row, ids in zip(rows, tokens):
            outputs[row] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), options.stop_strings).strip()
        failpoint("generation_batch")
        if on_batch is not None:
            on_batch(done, len(batches))
    return outputs
