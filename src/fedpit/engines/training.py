"""Supervised fine-tuning of the LoRA slot: one plain loop, read top to bottom.

The caller loads the starting adapter into the slot; this loop updates it in place with AdamW on
the response tokens only (prompt tokens are masked out of the loss, and get no logits at all:
batches are left-padded so the targets end every row, see `target_token_losses`). Batches group
examples of similar length, so they pad little. `extra_loss` lets a method
add a term (a FedProx proximal term, a SCAFFOLD correction) without subclassing anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedpit.engines.encoding import collate, encode_pair, target_token_losses
from fedpit.faults import failpoint
from fedpit.model import ModelHandle
from fedpit.prompts import PromptFormat
from fedpit.types import Example

ExtraLoss = Callable[[dict[str, torch.nn.Parameter]], torch.Tensor]
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainOptions:
    batch_size: int = 8
    learning_rate: float = 3e-4
    epochs: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512


@dataclass
class TrainResult:
    mean_loss: float
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def train_adapter(
    handle: ModelHandle,
    fmt: PromptFormat,
    examples: list[Example],
    options: TrainOptions,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    if not examples:
        return TrainResult(mean_loss=float("nan"), steps=0, tokens=0, seconds=0.0)
    start = time.perf_counter()
    encoded = [
        encode_pair(handle.tokenizer, fmt.render(ex.instruction, ex.input), ex.output, options.max_length)
        for ex in examples
    ]
    params = list(handle.lora_params.values())
    # With a bf16 base the LoRA layers compute in bf16 and AdamW updates fp32 master copies
    # (mixed precision: bf16 would swallow small updates); in fp32 the parameters are the masters.
    masters = [handle.master[k].requires_grad_(True) for k in handle.lora_params] if handle.master else params
    optimizer = torch.optim.AdamW(masters, lr=options.learning_rate, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    steps_per_epoch = math.ceil(len(encoded) / options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    losses: list[float] = []
    tokens = 0
    handle.model.train()
    try:
        for _epoch in range(options.epochs):
            for rows in length_grouped_batches([len(p.input_ids) for p in encoded], options.batch_size, generator):
                batch = collate([encoded[i] for i in rows], handle.tokenizer.pad_token_id, handle.device, left=True)
                token_loss, is_target = target_token_losses(handle.model, batch)
                loss = token_loss.sum() / is_target.sum().clamp(min=1)  # the mean over the batch's target tokens
                if extra_loss is not None:
                    loss = loss + extra_loss(handle.lora_params)
                loss.backward()
                if masters is not params:
                    for master, param in zip(masters, params):
                        master.grad, param.grad = (None if param.grad is None else param.grad.float()), None
                if options.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(masters, options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if masters is not params:
                    handle.sync_from_master()
                losses.append(loss.item())
                failpoint("train_step")
                tokens += int(batch["attention_mask"].sum())
                if on_step is not None:
                    on_step(len(losses), total_steps, losses[-1])
    finally:  # also when a step fails: back to inference mode, masters back to plain tensors
        handle.model.eval()
        if masters is not params:
            for master in masters:
                master.requires_grad_(False)
    return TrainResult(
        mean_loss=sum(losses) / len(losses), steps=len(losses), tokens=tokens,
        seconds=time.perf_counter() - start, losses=losses,
    )


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                           group: int = 8) -> list[list[int]]:
    """Shuffled batches of similar lengths: shuffle, sort each window of `group` batches by length,
    cut it into batches, shuffle the batches. Padding to the longest example in a batch then costs
    little, while which examples meet and the batch order stay random (and seeded)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * group
    batches = []
    for first in range(0, len(order), window):
        chunk = sorted(order[first : first + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def learning_rate_for_round(base: float, minimum: float, schedule: str, round_num: int, rounds: int) -> float:
    """The paper decays the learning rate over rounds (cosine), constant within a round. The decay
    would reach `minimum` one round after the last, so the last round still learns."""
    if schedule == "constant" or rounds <= 1:
        return base
    progress = (round_num - 1) / rounds
    return minimum + 0.5 * (base - minimum) * (1.0 + math.cos(math.pi * progress))
