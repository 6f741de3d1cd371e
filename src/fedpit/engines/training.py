"""Supervised fine-tuning of the LoRA slot: one plain loop, read top to bottom.

The caller loads the starting adapter into the slot; this loop updates it in place with AdamW on
the response tokens only (prompt tokens are masked out of the loss, and get no logits at all:
batches are left-padded so the targets end every row, see `target_token_losses`). Batches group
examples of similar length, so they pad little. `extra_loss` lets a method
add a term (a FedProx proximal term, a SCAFFOLD correction) without subclassing anything.

With `private` set, the same loop is record-level DP-SGD (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016): Poisson-sampled batches, every example's gradient clipped to
`max_grad_norm`, Gaussian noise of std noise_multiplier * max_grad_norm added to their sum, which is
divided by the expected batch size. Per-example gradients come from one backward pass per example:
no hooks on the model, any layer type and dtype; a DP epoch runs at 0.75x plain training and 0.91x
Opacus's per-sample hooks on the same batches (`make bench BENCH_ARGS="--only dp"`). Noise and
sampling draw from the caller's secret seed.
The extra loss term depends on no example, so its gradient is added after the noise.
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
    max_steps: int = 0
    """Stop after this many optimiser steps (0: whole epochs)."""


@dataclass(frozen=True)
class PrivateSGD:
    """DP-SGD settings for one training call. `seed` must be secret to the client: the noise and the
    Poisson sampling are drawn from it, and anyone who knows it can subtract the noise."""

    noise_multiplier: float
    max_grad_norm: float
    seed: int

    def sample_rate(self, batch_size: int, num_examples: int) -> float:
        return min(1.0, batch_size / max(num_examples, 1))


@dataclass
class TrainResult:
    mean_loss: float
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    gradient_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    """Mean over steps of the data-loss gradient each step used (the noised one under DP), when asked for."""
    sample_rate: float = 1.0
    """Poisson sampling rate of a DP-SGD run (batch_size / examples); 1 otherwise."""
    batches: list[list[int]] = field(default_factory=list)
    """Rows of each step's batch under DP-SGD (client-side only, like everything here)."""


def train_adapter(
    handle: ModelHandle,
    fmt: PromptFormat,
    examples: list[Example],
    options: TrainOptions,
    seed: int,
    extra_loss: ExtraLoss | None = None,
    on_step: StepCallback | None = None,
    private: PrivateSGD | None = None,
    record_gradient: bool = False,
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
    if options.max_steps > 0:
        total_steps = min(total_steps, options.max_steps)
    if private is not None:
        batches = poisson_batches(len(encoded), private.sample_rate(options.batch_size, len(encoded)), total_steps,
                                  torch.Generator().manual_seed(private.seed))
    else:
        batches = [rows for _ in range(options.epochs) for rows in
                   length_grouped_batches([len(p.input_ids) for p in encoded], options.batch_size, generator)]
    batches = batches[:total_steps]
    noise = torch.Generator().manual_seed(private.seed + 1) if private is not None else None
    gradient_sums = {k: torch.zeros_like(m, dtype=torch.float32) for k, m in zip(handle.lora_params, masters)} \
        if record_gradient else {}
    losses: list[float] = []
    tokens = 0
    handle.model.train()
    try:
        for rows in batches:
            if private is None:
                loss, step_tokens = _batch_gradient(handle, [encoded[i] for i in rows], masters, params)
            else:
                loss, step_tokens = _private_gradient(handle, [encoded[i] for i in rows], masters, params, private,
                                                      options.batch_size, len(encoded), noise)
            for (key, _), master in zip(handle.lora_params.items(), masters):
                if record_gradient and master.grad is not None:
                    gradient_sums[key] += master.grad.detach().float().cpu()
            if extra_loss is not None:
                extra = extra_loss(handle.lora_params)
                extra.backward()
                _move_grads_to_masters(masters, params, accumulate=True)
                loss = loss + extra.item()
            if options.max_grad_norm > 0 and private is None:
                torch.nn.utils.clip_grad_norm_(masters, options.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if masters is not params:
                handle.sync_from_master()
            losses.append(loss)
            failpoint("train_step")
            tokens += step_tokens
            if on_step is not None:
                on_step(len(losses), total_steps, losses[-1])
    finally:  # also when a step fails: back to inference mode, masters back to plain tensors
        handle.model.eval()
        if masters is not params:
            for master in masters:
                master.requires_grad_(False)
    finite = [v for v in losses if not math.isnan(v)]
    return TrainResult(
        mean_loss=sum(finite) / len(finite) if finite else float("nan"), steps=len(losses), tokens=tokens,
        seconds=time.perf_counter() - start, losses=losses,
        gradient_mean={k: v / max(len(losses), 1) for k, v in gradient_sums.items()},
        sample_rate=private.sample_rate(options.batch_size, len(encoded)) if private is not None else 1.0,
        batches=batches if private is not None else [],
    )


def _move_grads_to_masters(masters: list, params: list, accumulate: bool = False) -> None:
    """The LoRA layers' gradients (bf16 under a bf16 base) into the fp32 masters the optimiser steps."""
    if masters is params:
        return
    for master, param in zip(masters, params):
        if param.grad is None:
            continue
        grad = param.grad.float()
        master.grad = grad if not accumulate or master.grad is None else master.grad + grad
        param.grad = None


def _batch_gradient(handle: ModelHandle, pairs: list, masters: list, params: list) -> tuple[float, int]:
    """The mean loss over the batch's target tokens, backpropagated; its gradient left on the masters."""
    batch = collate(pairs, handle.tokenizer.pad_token_id, handle.device, left=True)
    token_loss, is_target = target_token_losses(handle.model, batch)
    loss = token_loss.sum() / is_target.sum().clamp(min=1)
    loss.backward()
    _move_grads_to_masters(masters, params)
    return loss.item(), int(batch["attention_mask"].sum())


def _private_gradient(handle: ModelHandle, pairs: list, masters: list, params: list, private: PrivateSGD,
                      batch_size: int, num_examples: int, noise: torch.Generator) -> tuple[float, int]:
    """DP-SGD's gradient: each example's gradient of its mean token loss, clipped in L2 norm over every
    LoRA tensor together, summed, plus N(0, (sigma*C)^2) per coordinate, over the expected batch size."""
    clipped = [torch.zeros_like(m, dtype=torch.float32) for m in masters]
    losses, tokens = [], 0
    for pair in pairs:
        batch = collate([pair], handle.tokenizer.pad_token_id, handle.device, left=True)
        token_loss, is_target = target_token_losses(handle.model, batch)
        loss = token_loss.sum() / is_target.sum().clamp(min=1)
        grads = [g.float() for g in torch.autograd.grad(loss, params)]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        factor = min(1.0, private.max_grad_norm / (float(norm) + 1e-12))
        for total, grad in zip(clipped, grads):
            total.add_(grad, alpha=factor)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    expected = private.sample_rate(batch_size, num_examples) * num_examples
    std = private.noise_multiplier * private.max_grad_norm
    for master, total in zip(masters, clipped):
        draw = torch.randn(total.shape, generator=noise, dtype=torch.float32) * std
        master.grad = ((total.cpu() + draw) / expected).to(master.device)
    return (sum(losses) / len(losses) if losses else float("nan")), tokens


def poisson_batches(num_examples: int, rate: float, steps: int, generator: torch.Generator) -> list[list[int]]:
    """Each step's batch takes every example independently with probability `rate` (Poisson sampling,
    what the RDP and PRV accountants assume); batches vary in size and may be empty."""
    return [torch.nonzero(torch.rand(num_examples, generator=generator) < rate).flatten().tolist()
            for _ in range(steps)]


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
