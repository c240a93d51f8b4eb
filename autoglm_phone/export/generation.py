"""The generation side as fixed-shape, stateless modules: the decoder's state goes in and out.

The KV cache (and, with ``text.memory``, the memory slots) are explicit inputs and outputs of
every method, not ExecuTorch mutable buffers: each method is its own file (``methods.py``), and
buffers are not shared between programs; explicit state also runs unchanged in ONNX Runtime, lets
the runtime hold one state per sequence, and is what the memory decoder's segment recurrence
needs anyway. The price is a copy of the cache per call (docs/EXPORT.md).

Without memory (``prefill`` / ``decode``, a static cache of ``cache_len`` slots):

- ``prefill``: a right-padded prompt of decoder embeddings ``(1, P, C)`` and its real ``length``
  -> the last real token's logits and the cache of slots ``[0, P)``. GLM's prefix mode: the real
  tokens see each other bidirectionally; padding is masked out (and not routed by MoE layers).
- ``decode``: one token id written at slot ``position`` (= its rotary position: the prompt's
  tokens fill slots ``0..length-1``) attends to slots ``<= position`` -> logits and the cache.

With memory (segment by segment, as ``memory.SegmentRunner``; rotary positions restart in every
segment): ``prefill`` runs one segment of ``segment_len`` embeddings with the slots in and out
(written when the segment is full), ``decode`` one token at its place in the current segment's
cache, and ``memory_write`` writes a full segment's cache into the slots. ``filled`` says whether
a segment has been written yet; before that the learned ``memory_init`` is the memory, so the
runtime starts from zeros.

Each module calls the eager layers (``Block``, ``MemoryBlock.forward_segment`` / ``write``,
``SegmentRunner._segment``); only the cache is new: :class:`ExplicitKVCache` writes a token's
keys and values with one ``index_put`` at a position that is a tensor, so it stays in the graph
(a ``torch.where`` over a mask of the slots did the same on a portable kernel that touched every
slot: 18% of the memory decoder's decode call at 512 slots, docs/EXPORT.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_phone.models.glm import GLMDecoder
from autoglm_phone.models.layers import AttentionMode, build_attention_mask, positions_from_padding
from autoglm_phone.models.memory import SegmentRunner


class ExplicitKVCache:
    """Every layer's keys and values ``(B, H_kv, L, D)``, passed in and returned by a method.

    With ``position`` ``(B,)`` a new token's keys/values are written at that slot and the whole
    buffers are read (positions after it are masked by the caller); without one (a prompt) the
    new keys/values are read as they are and stored zero-padded to ``length`` slots. It serves
    both the plain blocks (``cache[i].update``, as ``LayerKVCache``) and the memory blocks
    (``append(i, ...)``, as ``SegmentKVCache``)."""

    def __init__(
        self,
        k: list[torch.Tensor],
        v: list[torch.Tensor],
        position: torch.Tensor | None,
        length: int,
    ) -> None:
        self.k, self.v, self.position, self.length = k, v, position, length

    @classmethod
    def of(cls, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> ExplicitKVCache:
        """From stacked ``(N, B, H_kv, L, D)`` buffers."""
        return cls(list(k.unbind(0)), list(v.unbind(0)), position, k.shape[3])

    @classmethod
    def empty(cls, num_layers: int, length: int) -> ExplicitKVCache:
        return cls([None] * num_layers, [None] * num_layers, None, length)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position is None:
            pad = (0, 0, 0, self.length - k.shape[2])
            self.k[layer], self.v[layer] = F.pad(k, pad), F.pad(v, pad)
            return k, v
        # the batch-1 slot write as one index_put (a copy of the cache and a row written); a
        # where over a mask of the slots read and wrote every element on portable kernels
        if k.shape[0] != 1:
            raise ValueError(f"the exported cache writes one row, got a batch of {k.shape[0]}")
        at = (None, None, self.position)  # (B, H_kv, L, D): slot `position` of every head
        self.k[layer] = torch.ops.aten.index_put.default(self.k[layer], at, k)
        self.v[layer] = torch.ops.aten.index_put.default(self.v[layer], at, v)
        return self.k[layer], self.v[layer]

    def __getitem__(self, layer: int) -> _LayerView:
        return _LayerView(self, layer)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, B, H_kv, L, D)`` keys and values."""
        return torch.stack(self.k), torch.stack(self.v)


class _LayerView:
    """One layer of an :class:`ExplicitKVCache` with ``LayerKVCache``'s ``update``."""

    def __init__(self, cache: ExplicitKVCache, layer: int) -> None:
        self.cache, self.layer = cache, layer

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.append(self.layer, k, v)


def _keys_up_to(position: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, 1, 1, L)``: the cache slots up to and including ``position`` ``(B,)``."""
    slots = torch.arange(length, device=position.device)
    return (slots[None, :] <= position[:, None])[:, None, None]


def _real(length: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, size)``, True on the first ``length`` ``(B,)`` positions."""
    return torch.arange(size, device=length.device)[None, :] < length[:, None]


class _DecoderMethod(nn.Module):
    """A generation method over ``decoder`` computing in ``dtype``; logits leave as float32."""

    def __init__(self, decoder: GLMDecoder, dtype: torch.dtype) -> None:
        super().__init__()
        self.decoder, self.dtype = decoder, dtype

    def blocks(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        cache: ExplicitKVCache,
        token_mask: torch.Tensor,
    ) -> torch.Tensor:
        """The plain blocks and the final norm, as ``GLMDecoder.forward_features``."""
        cos, sin = self.decoder.rotary(position_ids)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, cos, sin, mask, cache[i], token_mask)
        return self.decoder.norm(x)

    def logits(self, hidden: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """The logits ``(1, V)`` of the last real token of ``hidden`` ``(1, T, C)``."""
        last = hidden.index_select(1, length - 1)[:, 0]  # (1, C)
        return self.decoder.lm_head(last).float()


class Prefill(_DecoderMethod):
    """``inputs_embeds`` ``(1, P, C)`` float32 (right-padded), ``length`` ``(1,)`` int64 ->
    ``logits`` ``(1, V)`` and ``k_cache`` / ``v_cache`` ``(N, 1, H_kv, cache_len, D)``."""

    def __init__(self, decoder: GLMDecoder, dtype: torch.dtype, cache_len: int) -> None:
        super().__init__(decoder, dtype)
        self.cache_len = cache_len

    def forward(self, inputs_embeds: torch.Tensor, length: torch.Tensor):
        x = inputs_embeds.to(self.dtype)
        real = _real(length, x.shape[1])  # (1, P)
        mask = build_attention_mask(real, AttentionMode.PREFIX, length)  # (1, 1, P, P)
        cache = ExplicitKVCache.empty(len(self.decoder.layers), self.cache_len)
        hidden = self.blocks(x, positions_from_padding(real), mask, cache, real)
        return (self.logits(hidden, length), *cache.stacked())


class Decode(_DecoderMethod):
    """``input_ids`` ``(1, 1)`` int64, ``position`` ``(1,)`` int64, the caches -> ``logits``
    ``(1, V)`` and the caches with the token's keys/values at slot ``position``."""

    def forward(self, input_ids, position, k_cache, v_cache):
        x = self.decoder.embed_tokens(input_ids)  # (1, 1, C)
        cache = ExplicitKVCache.of(k_cache, v_cache, position)
        mask = _keys_up_to(position, cache.length)  # (1, 1, 1, L)
        ones = torch.ones_like(input_ids, dtype=torch.bool)
        hidden = self.blocks(x, position[:, None], mask, cache, ones)
        return (self.logits(hidden, ones.sum(1)), *cache.stacked())


class _MemoryMethod(_DecoderMethod):
    """With ``text.memory``: the slots ``memory`` ``(N, 1, S, C)`` and ``filled`` ``(1,)`` in;
    an unwritten memory is the learned ``memory_init``."""

    def slots(self, memory: torch.Tensor, filled: torch.Tensor) -> list[torch.Tensor]:
        init = SegmentRunner(self.decoder).init_memory(1, memory.device, memory.dtype).slots
        keep = filled[:, None, None]
        return [torch.where(keep, m, i) for m, i in zip(memory.unbind(0), init, strict=True)]


class SegmentPrefill(_MemoryMethod):
    """One prompt segment: ``inputs_embeds`` ``(1, L, C)`` (``L = segment_len``, right-padded),
    ``length`` ``(1,)``, ``filled`` ``(1,)`` bool, ``memory`` ``(N, 1, S, C)`` -> ``logits``
    ``(1, V)`` of its last real token, ``memory`` (written if the segment is full), ``filled``,
    and the segment's ``k_cache`` / ``v_cache`` ``(N, 1, H_kv, L, D)``."""

    def forward(self, inputs_embeds, length, filled, memory):
        x = inputs_embeds.to(self.dtype)
        write = length == x.shape[1]  # (1,) a full segment is written (prefill: not a partial)
        runner = SegmentRunner(self.decoder)
        slots = self.slots(memory.to(self.dtype), filled)
        hidden, slots, kv = runner._segment(
            x, length, AttentionMode.PREFIX, length, write, filled, *slots
        )
        k, v = (torch.stack(t) for t in zip(*kv, strict=True))
        return self.logits(hidden, length), torch.stack(slots), filled | write, k, v


class SegmentDecode(_MemoryMethod):
    """``input_ids`` ``(1, 1)``, ``position`` ``(1,)`` (its place in the current segment),
    ``filled``, ``memory``, the segment caches -> ``logits`` and the caches."""

    def forward(self, input_ids, position, filled, memory, k_cache, v_cache):
        x = self.decoder.embed_tokens(input_ids)  # (1, 1, C)
        cache = ExplicitKVCache.of(k_cache, v_cache, position)
        rope = self.decoder.rotary(position[:, None])
        mask = _keys_up_to(position, cache.length)
        ones = torch.ones_like(input_ids, dtype=torch.bool)
        for i, (layer, mem) in enumerate(zip(self.decoder.layers, memory.unbind(0), strict=True)):
            x, _, _ = layer.forward_segment(x, rope, mask, ones, mem, filled, (cache, i))
        return (self.decoder.lm_head(self.decoder.norm(x)[:, -1]).float(), *cache.stacked())


class MemoryWrite(_MemoryMethod):
    """A full segment's caches written into the slots: ``filled``, ``memory``, ``k_cache``,
    ``v_cache`` -> ``memory`` (then filled)."""

    def forward(self, filled, memory, k_cache, v_cache):
        slots = self.slots(memory, filled)
        counts = torch.full_like(filled, k_cache.shape[3], dtype=torch.long)  # (1,)
        rope = SegmentRunner(self.decoder).rope
        written = [
            layer.write(mem, k, v, counts, rope)
            for layer, mem, k, v in zip(
                self.decoder.layers, slots, k_cache.unbind(0), v_cache.unbind(0), strict=True
            )
        ]
        return torch.stack(written)
