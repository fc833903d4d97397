"""The engine's key/value caches: a cache layer that grows into spare room instead of copying at every
decode step (`growing_layer`), and the store of recently prefilled prompt starts (`PrefixStore`)."""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch


@functools.cache
def growing_layer():
    """A transformers DynamicLayer that appends each step's keys/values into spare room at the end
    of its buffer. DynamicLayer concatenates, allocating and copying the whole cache at every decode
    step: 30% of a 16-row step over ~250-token rows, measured here. Built on first use, so importing
    this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        room = 64  # tokens of spare room per reallocation: one copy every 64 steps instead of every step

        def lazy_initialization(self, key_states, value_states):
            self.device, self._k, self._v, self._n = key_states.device, None, None, 0
            self.is_initialized = True

        # `keys`/`values` are the filled part of the buffers; assigning one (as transformers and
        # the engine do when they select or pad rows) makes it the buffer, without room.
        @property
        def keys(self):
            return None if self._k is None else self._k[:, :, : self._n]

        @keys.setter
        def keys(self, tensor):
            self._k, self._n = tensor, (tensor.shape[-2] if tensor is not None and tensor.dim() == 4 else 0)

        @property
        def values(self):
            return None if self._v is None else self._v[:, :, : self._n]

        @values.setter
        def values(self, tensor):
            self._v = tensor

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, end = self._n, self._n + key_states.shape[-2]
            if self._k is None or end > self._k.shape[-2]:
                self._k, self._v = self._grown(self._k, key_states, end), self._grown(self._v, value_states, end)
            self._k[:, :, n:end] = key_states
            self._v[:, :, n:end] = value_states
            self._n = end
            return self.keys, self.values

        def _grown(self, old, new, end):
            buf = new.new_empty((*new.shape[:2], end + self.room, new.shape[-1]))
            if old is not None and self._n:
                buf[:, :, : self._n] = old[:, :, : self._n]
            return buf

        def batch_select_indices(self, indices):
            if self._k is not None:  # the whole buffer, room included
                self._k, self._v = self._k[indices], self._v[indices]

        def truncate(self, length: int) -> None:
            """Forget every position from `length` on (the buffer stays)."""
            self._n = min(self._n, length)

        def drop_left(self, columns: int) -> None:
            """Forget the first `columns` positions of every row (a view: no copy, the room stays)."""
            self._k, self._v, self._n = self._k[:, :, columns:], self._v[:, :, columns:], self._n - columns

        def set_rows(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int, room: int = 0) -> None:
            """Make the cache these rows' keys/values ([rows, heads, len, dim] each), left-padded to
            `width` with zeros (masked out, but finite: a NaN there would survive the mask), with
            room for `room` more positions before the next copy."""
            k0 = parts[0][0]
            rows = sum(k.shape[0] for k, _ in parts)
            self._k = k0.new_zeros((rows, k0.shape[1], width + max(room, self.room), k0.shape[-1]))
            self._v = torch.zeros_like(self._k)
            start = 0
            for k, v in parts:
                stop = start + k.shape[0]
                self._k[start:stop, :, width - k.shape[-2]: width] = k
                self._v[start:stop, :, width - v.shape[-2]: width] = v
                start = stop
            self._n = width
            self.device, self.is_initialized = k0.device, True

    return GrowingLayer


class PrefixStore:
    """Keys/values of recently prefilled prompts, in blocks of `block` tokens, so a prompt that
    starts like an earlier one (synthesis' system line and few-shot examples, a chat template's
    default system prompt) prefills only the rest. A block is found by the adapter and every token
    up to its end, so a hit is always a whole prefix. Least recently used blocks leave first, the
    deepest of a prompt before its first: a chain shortens from its end and stays usable."""

    def __init__(self, budget_bytes: int, block: int = 16):
        self.budget, self.block, self.bytes = budget_bytes, block, 0
        self.blocks: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def _key(self, adapter: str | None, prompt: list[int], i: int) -> tuple:
        return adapter, tuple(prompt[: (i + 1) * self.block])

    def lookup(self, adapter: str | None, prompt: list[int]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The stored blocks that begin `prompt`, leaving at least its last token to prefill
        (its logits give the first new token)."""
        found = []
        for i in range((len(prompt) - 1) // self.block):
            key = self._key(adapter, prompt, i)
            if key not in self.blocks:
                break
            found.append(key)
        for key in reversed(found):
            self.blocks.move_to_end(key)
        return [self.blocks[key] for key in found]

    def store(self, adapter: str | None, prompt: list[int], have: int, block_kv) -> None:
        """Keep blocks `have`.. of `prompt` (whole blocks only); `block_kv(i)` gives block i's
        (keys, values) per layer, each [heads, block, head_dim]."""
        new = range(have, len(prompt) // self.block)
        for i in reversed(new):
            key = self._key(adapter, prompt, i)
            if key in self.blocks:  # an identical prompt prefilled beside this one
                continue
            kv = [(k.clone(), v.clone()) for k, v in block_kv(i)]
            size = sum(k.nbytes + v.nbytes for k, v in kv)
            if size > self.budget:
                return
            self.blocks[key] = kv
            self.bytes += size
        for i in reversed(range(have)):
            key = self._key(adapter, prompt, i)
            if key in self.blocks:  # (another group's store of this admission may have dropped it)
                self.blocks.move_to_end(key)
        while self.bytes > self.budget:
            _, kv = self.blocks.popitem(last=False)
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in kv)
