"""The decode loop of the `fedpit` generation backend, with continuous batching.

A row leaves the batch (and the KV cache) as soon as it ends: self-generation stops most rows well
before the token budget, and `model.generate` computes every row to the end of the longest. When
enough rows have left, the next waiting prompts are prefilled together and join the batch
(`kvcache.absorb`), so a call with more prompts than `max_rows` keeps the batch full instead of
running each static batch's tail of a few rows: evaluation answers its whole set `eval.batch_size` at a
time, and self-generation `synth.batch_size` prompts at a time where it has more of them.

Prompts are prefilled in groups of similar length (`prefill_groups`), each group padded only to its own
longest prompt, and the groups join the batch in one copy of the cache. One padded forward over the bench's
32 self-generation prompts (241 to 338 tokens) spent 14% of its work on padding, four groups 3%: 1.06x per
call (`python benchmarks/generation_ab.py --lever prefill_groups`).

Rows are right-aligned (left padding): a row's mask is zeros then ones, its positions count its own
tokens, and rows that join are padded on the left to the batch's width; positions no row attends to
any more are dropped when rows join. Each row's output is what it would get decoded alone (greedy,
fp32; tested), and what static batches give (`continuous_batching=False`). On the bench's workload
(32 prompts, 16 rows, an AVX2 CPU in fp32) joining measured 1.00x static batches: decode steps there are
bound by reading the weights, which a step of 12 rows pays as fully as one of 16.

Each one-token step is `handle.decode_step()` where that applies (decode_step.py: bf16 on a CPU,
Llama-family models; the model's forward without its per-module cost) and the model's forward elsewhere.

The repetition penalty sees a row's own tokens only. Padding is not text: transformers' processor,
given a left-padded batch, also penalises the pad token, which for SmolLM2 is EOS, so a row's chance
to stop depended on the length of the longest prompt in its batch. Here the padded positions of a
row's history repeat its first token, which the rule already counts once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from fedpit.engines.encoding import last_positions
from fedpit.engines.kvcache import absorb, can_absorb, preallocated_cache, prefix_cache, repeat_rows, shared_prefix
from fedpit.engines.stops import has_stop, stop_enders
from fedpit.faults import failpoint

RowsCallback = Callable[[int, int], None]


@dataclass
class Rows:
    """The rows being decoded: which prompt each is, and what the next step needs of them."""

    prompts: list[int]
    mask: torch.Tensor  # [rows, width], the cache's positions each row attends to
    next_position: torch.Tensor  # [rows]
    history: torch.Tensor  # [rows, width'] the row's tokens, padding replaced by its first token
    logits: torch.Tensor  # [rows, vocab] for the next token

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, keep: torch.Tensor, kept: list[int]) -> None:
        self.prompts = [self.prompts[i] for i in kept]
        self.mask, self.next_position = self.mask[keep], self.next_position[keep]
        self.history, self.logits = self.history[keep], self.logits[keep]


def processors(options) -> LogitsProcessorList:
    chain = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.do_sample:
        chain.append(TemperatureLogitsWarper(options.temperature))
        if options.top_p < 1.0:
            chain.append(TopPLogitsWarper(options.top_p))
    return chain


def _left_pad(rows: list[list[int]], pad: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) right-aligned; with `pad=None` each row is padded with its own first token."""
    width = max(len(r) for r in rows)
    ids = torch.empty((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : width - len(row)] = row[0] if pad is None else pad
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _widen(t: torch.Tensor, width: int, fill: torch.Tensor | int) -> torch.Tensor:
    """`t` [rows, w] right-aligned in `width` columns, the new left columns `fill` (a scalar or [rows])."""
    if t.shape[1] == width:
        return t
    left = t.new_empty((t.shape[0], width - t.shape[1]))
    left[:] = fill if isinstance(fill, int) else fill[:, None]
    return torch.cat([left, t], dim=1)


def decode(handle, encoded: list[list[int]], options, max_rows: int,
           on_rows_done: RowsCallback | None = None) -> list[list[int]]:
    """New tokens for every prompt of `encoded`, at most `max_rows` decoded together.

    Prompts join longest first (similar lengths pad little); more join whenever a quarter of the
    rows have finished. If a model's cache cannot take rows mid-decode (sliding-window or
    linear-attention layers), or `options.continuous_batching` is off, batches follow each other."""
    model, tokenizer = handle.model, handle.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if options.max_new_tokens <= 0:
        return [[] for _ in encoded]
    step = handle.decode_step()  # None: the model's forward computes each step
    chain = processors(options)
    enders = stop_enders(tokenizer, options.stop_strings) if options.stop_strings else frozenset()
    waiting = deque(sorted(range(len(encoded)), key=lambda i: -len(encoded[i])))
    generated: list[list[int]] = [[] for _ in encoded]
    refill_below = max_rows - max(1, max_rows // 4)
    rows: Rows | None = None
    cache = None
    done = 0
    while waiting or rows is not None:
        joinable = options.continuous_batching and rows is not None and can_absorb(cache)
        if waiting and (rows is None or (joinable and len(rows) <= refill_below)):
            take = [waiting.popleft() for _ in range(min(max_rows - (len(rows) if rows else 0), len(waiting)))]
            groups = _prefill(model, [encoded[i] for i in take], take, pad, options, handle.device)
            if rows is None:
                (rows, cache), groups = groups[0], groups[1:]
            if groups:
                _join(rows, cache, groups, options.max_new_tokens)
            failpoint("generation_batch")
        scores = chain(rows.history, rows.logits.float())
        if options.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        kept = []
        for i, (prompt, token) in enumerate(zip(rows.prompts, tokens.tolist())):
            if token == eos:
                continue
            out = generated[prompt]
            out.append(token)
            if len(out) >= options.max_new_tokens:
                continue
            if token in enders and has_stop(tokenizer, out[-16:], options.stop_strings):
                continue
            kept.append(i)
        if len(kept) < len(rows):
            done += len(rows) - len(kept)
            if on_rows_done is not None:
                on_rows_done(done, len(encoded))
            if not kept:
                rows, cache = None, None
                continue
            keep = torch.tensor(kept, device=tokens.device)
            cache.batch_select_indices(keep)
            rows.select(keep, kept)
            tokens = tokens[keep]
        rows.history = torch.cat([rows.history, tokens[:, None]], dim=1)
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones((len(rows), 1))], dim=1)
        if step is not None:
            rows.logits = step(tokens, rows.mask, rows.next_position, cache)
        else:
            rows.logits = model(input_ids=tokens[:, None], attention_mask=rows.mask,
                                position_ids=rows.next_position[:, None], past_key_values=cache,
                                use_cache=True).logits[:, -1, :]
        rows.next_position = rows.next_position + 1
    return generated


PREFILL_GROUP_COST = 96
"""Padded tokens that one more prefill forward is worth: its fixed cost (Python and kernel set-up over every
layer, and joining its cache to the batch's; estimated at ~60 ms on 2 CPU cores, not swept) at the prefill
rate (~1,500 tokens/s)."""


def prefill_groups(lengths: list[int], cost: int | None = None) -> list[int]:
    """Sizes of the consecutive groups into which prompts of `lengths` (longest first) are prefilled: those
    that minimise the tokens computed (each group is padded to its longest prompt) plus `cost` per group.

    One padded forward over the bench's prompts (241 to 338 tokens) spends 14% of its work on padding, and a
    prefill is half of self-generation. Exact by dynamic programming over the cut points (n² for n rows).
    `cost` defaults to `PREFILL_GROUP_COST`, read at each call."""
    cost = PREFILL_GROUP_COST if cost is None else cost
    best, cut = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        for start in range(end):
            total = best[start] + (end - start) * lengths[start] + cost
            if best[end] is None or total < best[end]:
                best[end], cut[end] = total, start
    sizes, end = [], len(lengths)
    while end > 0:
        sizes.append(end - cut[end])
        end = cut[end]
    return sizes[::-1]


SHARED_PREFIX_MIN = 8
"""Tokens every prompt of a prefill must begin with before they are computed once for all of them (below that,
the one-row forward and the copies of its keys and values cost about what they save)."""


def _prefill(model, prompts: list[list[int]], ids: list[int], pad: int, options, device) -> list[tuple[Rows, object]]:
    """The prompts prefilled in groups of similar length (`prefill_groups`), longest first, each with its own
    cache; `decode` joins them into one. A lone group's cache has room for the new tokens (it is the batch's);
    several are copied into a new one anyway. One group where the model's cache cannot take rows in
    (sliding-window or linear-attention layers).

    A beginning that every prompt shares (self-generation's "Come up with a series of tasks:" and the Alpaca
    header: 13 and 24 of SmolLM2's tokens) is computed once, as one row, and each group continues from a copy
    of its keys and values: a row is then [shared][padding][its own tokens], its mask and positions saying so."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    prompts, ids = [prompts[i] for i in order], [ids[i] for i in order]
    groupable = can_absorb(preallocated_cache(model.config, 1))
    shared = shared_prefix(prompts) if groupable else 0
    prefix = prefix_cache(model, prompts[0][:shared], device) if shared >= SHARED_PREFIX_MIN else None
    shared = shared if prefix is not None else 0
    sizes = prefill_groups([len(p) - shared for p in prompts]) if groupable else [len(prompts)]
    room = options.max_new_tokens if len(sizes) == 1 else 0
    groups, first = [], 0
    for size in sizes:
        groups.append(_prefill_group(model, prompts[first : first + size], ids[first : first + size], pad, device,
                                     capacity=len(prompts[first]) + room, prefix=prefix, shared=shared))
        first += size
    return groups


def _prefill_group(model, prompts: list[list[int]], ids: list[int], pad: int, device, capacity: int,
                   prefix=None, shared: int = 0) -> tuple[Rows, object]:
    """One forward over `prompts`, left-padded; with a `prefix` cache, over their tokens after the first
    `shared`, which every one of them begins with and which that cache holds."""
    input_ids, mask = _left_pad([p[shared:] for p in prompts], pad, device)
    history, _ = _left_pad(prompts, None, device)
    if prefix is None:
        cache = preallocated_cache(model.config, capacity)
    else:
        cache = repeat_rows(prefix, model.config, len(prompts), capacity)
        mask = torch.cat([mask.new_ones((len(prompts), shared)), mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, logits_to_keep=last_positions(input_ids.shape[1], 1, device))
    return Rows(prompts=ids, mask=mask, next_position=positions[:, -1] + 1, history=history,
                logits=out.logits[:, -1, :]), cache


def _join(rows: Rows, cache, groups: list[tuple[Rows, object]], max_new_tokens: int) -> None:
    """The `groups` (just prefilled, each with its cache) join `rows` in one cache, all right-aligned in a
    common width: one copy of every row's keys and values, however many groups."""
    attended = rows.mask.any(dim=0)
    drop = int(attended.float().argmax())  # leading positions no row attends to any more
    mask = rows.mask[:, drop:]
    width = max([mask.shape[1]] + [group.mask.shape[1] for group, _ in groups])
    absorb(cache, [group_cache for _, group_cache in groups], drop, width, width + max_new_tokens)
    everyone = [rows] + [group for group, _ in groups]
    rows.mask = torch.cat([_widen(mask, width, 0)] + [_widen(group.mask, width, 0) for group, _ in groups])
    history_width = max(r.history.shape[1] for r in everyone)
    rows.history = torch.cat([_widen(r.history, history_width, r.history[:, 0]) for r in everyone])
    rows.next_position = torch.cat([r.next_position for r in everyone])
    rows.logits = torch.cat([r.logits for r in everyone])
    rows.prompts = [prompt for r in everyone for prompt in r.prompts]
