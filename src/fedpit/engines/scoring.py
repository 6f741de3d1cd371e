"""Sequence scoring: mean token cross-entropy of a target given a context, and the IFS built on it.

Instruction-Following Score (FedPIT, after Li et al.'s IFD): IFS = L(y | x) / L(y), the response's
mean loss given the prompt divided by its loss with no prompt. Lower means the prompt helps the
model predict the response, i.e. the pair is a coherent instruction/answer.
"""

from __future__ import annotations

from fedpit.engines.encoding import EncodedPair, collate, encode_pair, target_token_losses
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.types import Example


def target_losses(handle: ModelHandle, pairs: list[EncodedPair], batch_size: int = 16) -> list[float]:
    """Mean cross-entropy over each pair's target tokens."""
    with handle.inference():
        return _target_losses(handle, pairs, batch_size)


def _target_losses(handle: ModelHandle, pairs: list[EncodedPair], batch_size: int) -> list[float]:
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))  # similar lengths pad less
    results = [0.0] * len(pairs)
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        batch = collate([pairs[i] for i in rows], handle.tokenizer.pad_token_id, handle.device, left=True)
        token_loss, is_target = target_token_losses(handle.model, batch)
        means = token_loss.sum(dim=1) / is_target.sum(dim=1).clamp(min=1)
        for row, value in zip(rows, means.tolist()):
            results[row] = value
    return results


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
