"""Incremental decoding helpers: a key/value cache, argument checks and next-token sampling.

The cache holds one ``(B, H_kv, capacity, D)`` key buffer and one value buffer per layer, as in
gpt-fast and litgpt's ``KVCache``; ``update`` writes the new keys/values in place and returns views
of the filled part, so most decoding steps allocate nothing and copy only the new token. Unlike
theirs it is not allocated for the prompt plus every token that *may* be generated: it starts at
the prompt plus :data:`KV_BLOCK` positions and doubles (up to ``max_len``) when full, so a
generation that stops early never pays for ``max_new_tokens`` (amortised O(1) copies per token).

Sampling follows transformers' logits processors in order: temperature, then top-k, then top-p
(nucleus, Holtzman et al. 2019), then a multinomial draw; ``do_sample=False`` is greedy argmax.
"""

from __future__ import annotations

import torch

from autoglm_phone.config import DecoderConfig

KV_BLOCK = 64  # positions a cache holds beyond the prompt before it first grows


def check_generation_args(
    max_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float
) -> None:
    """Raise a ``ValueError`` naming the first invalid decoding argument."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if do_sample and not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be > 0 (and finite) when sampling, got {temperature!r}")


class LayerKVCache:
    """Keys and values of one attention layer, ``(B, H_kv, capacity, D)``, filled left to right.

    ``capacity`` positions are allocated (``max_len`` by default); ``update`` doubles it, never
    past ``max_len``, when new positions do not fit.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        capacity: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        capacity = max_len if capacity is None else min(capacity, max_len)
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # filled positions, the same for every row

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _grow(self, needed: int) -> None:
        """Reallocate to ``min(max_len, max(needed, 2 * capacity))`` positions, keeping the filled
        part."""
        new = min(self.max_len, max(needed, 2 * self.capacity))
        b, h, _, d = self.k.shape
        k = self.k.new_zeros(b, h, new, d)  # (B, H_kv, new, D)
        v = self.v.new_zeros(b, h, new, d)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H_kv, T, D)`` keys/values; return all so far, ``(B, H_kv, S, D)``."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len={self.max_len}")
        if end > self.capacity:
            self._grow(end)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One :class:`LayerKVCache` per decoder layer; ``cache[i]`` goes to layer ``i``."""

    def __init__(self, layers: list[LayerKVCache]) -> None:
        self.layers = layers

    @classmethod
    def from_config(
        cls,
        cfg: DecoderConfig,
        batch_size: int,
        max_len: int,
        *,
        capacity: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Empty caches for ``cfg``'s layers, ``capacity`` positions allocated (growing to
        ``max_len``)."""
        return cls(
            [
                LayerKVCache(
                    batch_size,
                    cfg.num_kv_heads,
                    max_len,
                    cfg.head_dim,
                    capacity=capacity,
                    dtype=dtype,
                    device=device,
                )
                for _ in range(cfg.num_layers)
            ]
        )

    def __getitem__(self, layer_idx: int) -> LayerKVCache:
        return self.layers[layer_idx]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def length(self) -> int:
        """Cached positions (every layer holds the same number after a full forward)."""
        return self.layers[0].length


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p support to ``-inf``; ``logits`` is ``(B, V)``.

    ``top_k=0`` and ``top_p=1.0`` disable each filter. Top-k keeps every logit at least as large as
    the k-th largest (ties may keep more). Top-p keeps the smallest set of most likely tokens whose
    probability sums to at least ``top_p``, and always the most likely token.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of strictly more likely tokens
        drop_sorted = before >= top_p  # the first token has before == 0 and is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row ``(B,)`` from ``(B, V)`` logits: greedy argmax, or a filtered sample.

    A ``generator`` must live on the logits' device.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]
