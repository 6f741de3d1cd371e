"""Sequence scoring: mean token cross-entropy of a target given a context, and the IFS built on it.

Instruction-Following Score (FedPIT, after Li et al.'s IFD): IFS = L(y | x) / L(y), the response's
mean loss given the prompt divided by its loss with no prompt. Lower means the prompt helps the
model predict the response, i.e. the pair is a coherent instruction/answer.
"""

from __future__ import annotations

import torch

from fedpit.engines.encoding import EncodedPair, collate, encode_pair, last_positions, target_token_losses
from fedpit.engines.kvcache import prefix_cache, repeat_rows, shared_prefix
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.types import Example

SHARED_CONTEXT_MIN = 8
"""Tokens of context every pair must share before it is computed once for all of them (below that, the
one-row forward and the copies of its keys and values into each batch cost about what they save)."""


def target_losses(handle: ModelHandle, pairs: list[EncodedPair], batch_size: int = 16) -> list[float]:
    """Mean cross-entropy over each pair's target tokens.

    A context that begins every pair (the prompt template's header; for canary exposure, the whole question
    and answer prefix before 1,001 candidate secrets) is computed once, and each batch continues from a copy
    of its keys and values: canary exposure then computes 9 tokens a candidate instead of 65."""
    with handle.inference():
        return _target_losses(handle, pairs, batch_size)


def _target_losses(handle: ModelHandle, pairs: list[EncodedPair], batch_size: int) -> list[float]:
    shared = _shared_context(pairs)
    past = prefix_cache(handle.model, pairs[0].input_ids[:shared], handle.device) \
        if shared >= SHARED_CONTEXT_MIN else None
    if past is None:
        shared = 0
    else:
        pairs = [EncodedPair(input_ids=p.input_ids[shared:], num_context=p.num_context - shared) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))  # similar lengths pad less
    results = [0.0] * len(pairs)
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        batch = collate([pairs[i] for i in rows], handle.tokenizer.pad_token_id, handle.device, left=True)
        cache = None
        if past is not None:
            width = batch["input_ids"].shape[1]
            cache = repeat_rows(past, handle.model.config, len(rows), shared + width)
            batch["attention_mask"] = torch.cat([batch["attention_mask"].new_ones((len(rows), shared)),
                                                 batch["attention_mask"]], dim=1)
            batch["position_ids"] = batch["position_ids"] + shared
        token_loss, is_target = target_token_losses(handle.model, batch, past=cache)
        means = token_loss.sum(dim=1) / is_target.sum(dim=1).clamp(min=1)
        for row, value in zip(rows, means.tolist()):
            results[row] = value
    return results


def _shared_context(pairs: list[EncodedPair]) -> int:
    """Leading tokens that every pair has, all of them context, leaving each pair at least one context token
    of its own (its last context position predicts its first target)."""
    return shared_prefix([p.input_ids[: p.num_context] for p in pairs])


def reference_nll(handle: ModelHandle, fmt: PromptFormat, examples: list[Example],
                  max_length: int, batch_size: int = 16) -> list[float]:
    pairs = [encode_pair(handle.tokenizer, fmt.render(e.instruction, e.input), e.output, max_length) for e in examples]
    return target_losses(handle, pairs, batch_size)


def ifs_scores(handle: ModelHandle, fmt: PromptFormat, examples: list[Example],
               max_length: int, batch_size: int = 16) -> list[float]:
    with handle.inference():  # one adapter merge for both passes (each costs ~0.1 s on SmolLM2)
        conditional = reference_nll(handle, fmt, examples, max_length, batch_size)
        alone = target_losses(handle, [encode_pair(handle.tokenizer, None, e.output, max_length) for e in examples],
                              batch_size)
    return [c / a if a > 0 else float("inf") for c, a in zip(conditional, alone)]


def option_logprobs(handle: ModelHandle, prompts: list[str], options: tuple[str, ...], max_length: int,
                    batch_size: int = 16) -> list[list[float]]:
    """log P(the response starts with option k | prompt), one prefill per prompt: how a multiple-choice
    answer (PubMedQA's yes / no / maybe) is read from a model that does not say it in words. An option
    counts in every spelling a response could start with (yes, Yes, " yes", ...): their probabilities add."""
    tokenizer = handle.tokenizer
    spellings = [{tokenizer(variant, add_special_tokens=False)["input_ids"][0]
                  for variant in (option, option.capitalize(), f" {option}", f" {option.capitalize()}")}
                 for option in options]
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"][-max_length:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[float]] = [[] for _ in prompts]
    with handle.inference(), torch.no_grad():
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            pairs = [EncodedPair(input_ids=encoded[i], num_context=len(encoded[i])) for i in rows]
            batch = collate(pairs, tokenizer.pad_token_id, handle.device, left=True)
            width = batch["input_ids"].shape[1]
            logits = handle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"],
                                  logits_to_keep=last_positions(width, 1, handle.device)).logits[:, -1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, values in zip(rows, logprobs):
                results[row] = [float(torch.logsumexp(values[sorted(ids)], dim=0)) for ids in spellings]
    return results
