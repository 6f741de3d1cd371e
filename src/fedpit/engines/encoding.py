"""Token-level encoding and the target-token loss shared by training and scoring, so both see
identical sequences and compute the loss the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpit.engines.head_loss import HeadCrossEntropy, head_path

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedPair:
    """A context followed by a target; only target tokens carry loss."""

    input_ids: list[int]
    num_context: int

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.num_context + self.input_ids[self.num_context :]


def encode_pair(tokenizer, context: str | None, target: str, max_length: int) -> EncodedPair:
    """Tokenise `context + target + eos`. A `None` context means "no prompt at all": the target is
    scored after a single BOS (or EOS) token, which is how the IFS denominator L(y) is defined.

    Over-long pairs lose context from the left first (the end of a prompt matters most), then
    target from the right.
    """
    eos = tokenizer.eos_token_id
    if context is None:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        context_ids = [start]
    else:
        context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
    target_ids = target_ids[: max(1, max_length - 1)]
    room = max_length - len(target_ids)
    if len(context_ids) > room:
        context_ids = context_ids[len(context_ids) - room :] if room > 0 else context_ids[-1:]
    return EncodedPair(input_ids=context_ids + target_ids, num_context=len(context_ids))


def collate(pairs: list[EncodedPair], pad_id: int, device: torch.device, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest pair in this batch only (never to a global maximum). Left padding puts
    every target at the end of its row, so training and scoring need the logits of the last few
    positions only. `position_ids` count real tokens, so both paddings give the same values."""
    width = max(len(p.input_ids) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, pair in enumerate(pairs):
        n = len(pair.input_ids)
        span = slice(width - n, width) if left else slice(0, n)
        ids[row, span] = torch.tensor(pair.input_ids)
        labels[row, span] = torch.tensor(pair.labels)
        mask[row, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
            "labels": labels.to(device)}


def last_positions(width: int, keep: int, device: torch.device) -> torch.Tensor:
    """`logits_to_keep` for the last `keep` of `width` positions, as an index tensor rather than the
    int transformers also accepts. An int slices the hidden states into a strided view, and
    `F.linear` on a strided 3-D input makes matmul copy the LM head weight once per row (13 rows of
    SmolLM2: 0.7 GB copied, half a second, per prefill); indexing gives a contiguous tensor, and
    the LM head costs 3 ms. Training and scoring pay the same copy in the forward and backward."""
    keep = min(keep, width)
    return torch.arange(width - keep, width, device=device)


def target_token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                        past: object | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every target token of a left-padded batch, and which positions are targets.

    With left padding every target sits at the end of its row, so only the positions from the
    batch's first target on need the LM head (a 49k-wide vocabulary for SmolLM2), not the prompt:
    in training that removes the LM head and the log-softmax over every prompt token, which a plain
    `model(**batch).loss` pays for. Where the model allows it, `head_loss` goes further and runs
    the head on target tokens only, chunk by chunk. Returns (losses, mask), both [batch, keep - 1].
    `past`: a key/value cache of positions before the batch's (a context every row shares, scoring.py);
    the batch's attention mask then covers those positions too."""
    labels = batch["labels"]
    is_target = labels != IGNORE_INDEX
    first = int(is_target.float().argmax(dim=1).min()) if bool(is_target.any()) else labels.shape[1] - 1
    start = max(first, 1)  # the first token of a row is never predicted
    targets = labels[:, start:]
    mask = targets != IGNORE_INDEX
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": past is not None}
    if past is not None:
        inputs["past_key_values"] = past
    path = head_path(model)
    if path is not None:
        decoder, head = path
        hidden = decoder(**inputs).last_hidden_state[:, start - 1 : -1]
        losses = HeadCrossEntropy.apply(hidden[mask], head.weight, targets[mask], head)
        return torch.zeros(targets.shape, dtype=losses.dtype, device=losses.device).masked_scatter(mask, losses), mask
    keep = labels.shape[1] - start + 1
    logits = model(**inputs, logits_to_keep=last_positions(labels.shape[1], keep, labels.device)).logits[:, :-1]
    # Flattened to [tokens, vocab], not transposed to [batch, vocab, tokens]: the softmax then runs over
    # contiguous rows, 3x faster on a CPU for a 49k vocabulary, in the backward pass too (`make bench`).
    losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return losses, mask
