"""A key/value cache that is written in place instead of growing by concatenation.

transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, which copies the
whole cache every step: on 2 CPU cores that was a third of the decode time for 300-token prompts
(`make bench`). Here each layer's cache is allocated once for the prompt plus the token budget, a
step writes one slice, and attention reads a view of the filled part. Dropping finished rows
(`batch_select_indices`) and taking in newly prefilled ones (`absorb`, for continuous batching)
are the only copies, once per change of the batch rather than once per step; a beginning that every
sequence of a call shares is computed once (`prefix_cache`) and copied into every row that continues it
(`repeat_rows`), by scoring and by the prefill of generation. transformers'
`StaticCache` also avoids the copies but makes every step attend over the whole allocated length.
"""

from __future__ import annotations

import os

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One attention layer's cache with room for `capacity` positions (it doubles if ever exceeded)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[3]))
        self._values = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[3]))
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            self._grow(max(end, 2 * self._keys.shape[-2]))
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def claim_slot(self) -> int:
        """Room for one more position, counted as filled: for a caller that writes it itself (the C decode step,
        decode_layers.c). Returns its index."""
        end = self.length + 1
        if end > self._keys.shape[-2]:
            self._grow(2 * self._keys.shape[-2])
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return end - 1

    def _grow(self, capacity: int) -> None:
        def grown(buffer: torch.Tensor) -> torch.Tensor:
            bigger = buffer.new_empty((*buffer.shape[:2], capacity, buffer.shape[3]))
            bigger[:, :, : self.length] = buffer[:, :, : self.length]
            return bigger

        self._keys, self._values = grown(self._keys), grown(self._values)

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self._keys = self._keys.index_select(0, indices)
        self._values = self._values.index_select(0, indices)
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def absorb(self, others: list[PreallocatedLayer], drop: int, width: int, capacity: int) -> None:
        """Append the rows of `others` below this layer's, all right-aligned in `width` positions (left
        padding, as the rows' attention masks are), in one copy: this layer first loses its leading `drop`
        positions, which no row attends to any more. Padding is zeros, never uninitialised memory: a masked
        position gets exactly zero attention weight, and 0 x NaN would still be NaN."""
        sources = [(self, drop)] + [(other, 0) for other in others]
        shape = (sum(layer._keys.shape[0] for layer, _ in sources), self._keys.shape[1], capacity, self._keys.shape[3])
        keys, values = self._keys.new_zeros(shape), self._values.new_zeros(shape)
        first = 0
        for layer, skip in sources:
            rows, kept = layer._keys.shape[0], layer.length - skip
            keys[first : first + rows, :, width - kept : width] = layer._keys[:, :, skip : layer.length]
            values[first : first + rows, :, width - kept : width] = layer._values[:, :, skip : layer.length]
            first += rows
        self._keys, self._values, self.length = keys, values, width
        self.keys, self.values = self._keys[:, :, :width], self._values[:, :, :width]

    def repeat(self, source: PreallocatedLayer, rows: int) -> None:
        """Hold `rows` copies of the one row of `source`'s filled positions, in this layer's capacity."""
        shape = (rows, source._keys.shape[1], self.capacity, source._keys.shape[3])
        self._keys, self._values = source._keys.new_empty(shape), source._values.new_empty(shape)
        self._keys[:, :, : source.length] = source._keys[:, :, : source.length]
        self._values[:, :, : source.length] = source._values[:, :, : source.length]
        self.dtype, self.device, self.is_initialized, self.length = source.dtype, source.device, True, source.length
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def reset(self) -> None:
        self.length = 0
        super().reset()


def preallocated_cache(model_config, capacity: int) -> DynamicCache:
    """A `DynamicCache` whose plain attention layers are `PreallocatedLayer`s; layer kinds it does not
    know (sliding windows, linear attention) keep transformers' own implementation."""
    cache = DynamicCache(config=model_config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def can_absorb(cache: DynamicCache) -> bool:
    """Whether rows can join `cache` mid-decode: every layer must be a `PreallocatedLayer`."""
    return all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)


def repeat_rows(cache: DynamicCache, model_config, rows: int, capacity: int) -> DynamicCache:
    """A new cache holding `rows` copies of `cache`'s one row (every layer a `PreallocatedLayer`), with room
    for `capacity` positions: a context scored once and then continued by every row of a batch."""
    copy = preallocated_cache(model_config, capacity)
    for mine, source in zip(copy.layers, cache.layers):
        mine.repeat(source, rows)
    return copy


def shared_prefix(sequences: list[list[int]], keep: int = 1) -> int:
    """Leading tokens every sequence has, leaving each at least `keep` tokens of its own after them."""
    if len(sequences) < 2:
        return 0
    common = os.path.commonprefix(sequences)  # any sequences, not only strings
    return max(0, min(len(common), min(len(s) for s in sequences) - keep))


def prefix_cache(model, tokens: list[int], device) -> DynamicCache | None:
    """Keys and values of `tokens` as one cached row, to be copied into every row that continues them
    (`repeat_rows`), or None where the model's cache cannot be copied row by row (sliding-window or
    linear-attention layers)."""
    cache = preallocated_cache(model.config, len(tokens))
    if not can_absorb(cache):
        return None
    ids = torch.tensor([tokens], device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    return cache


def absorb(cache: DynamicCache, others: list[DynamicCache], drop: int, width: int, capacity: int) -> None:
    for index, mine in enumerate(cache.layers):
        mine.absorb([other.layers[index] for other in others], drop, width, capacity)
