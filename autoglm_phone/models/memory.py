"""Memory-augmented attention: the GLM decoder over any length in memory bounded by one segment.

With ``cfg.memory.enabled`` the :class:`~autoglm_phone.models.glm.GLMDecoder` builds
:class:`MemoryBlock` layers and runs a sequence segment by segment (``cfg.memory.segment_len``
tokens each). Every layer carries a state of ``num_slots`` memory vectors from segment to segment,
as in the Block-Recurrent Transformer (Hutchins et al. 2022, https://arxiv.org/abs/2203.07852)
and Memformer (Wu et al. 2022, https://arxiv.org/abs/2010.06891):

- **read**: a segment's tokens attend, in one softmax, to the layer's memory slots (extra keys and
  values, as Transformer-XL's cached segment, Dai et al. 2019; plus a learned per-head logit bias)
  and, under the segment's own mask (causal, prefix or bidirectional), to their segment. The
  memory holds only what earlier segments wrote; a row whose memory was never written does not
  read it, so a sequence of one segment is exactly the plain ``GLMDecoder``.
- **write**: after a full segment, each slot queries the memory and the whole segment (BRT's
  "vertical" cross-attention; a learned bias first points slot ``s`` at the ``s``-th chunk of the
  segment) and is mixed with its old value by a learned, per-channel sigmoid gate (BRT's
  LSTM-style forget gate, biased towards keeping)::

      u  = PostNorm(O · Attn(Q·N(M), K·[N(M); N(X)], V·[N(M); N(X)]))
      f  = sigmoid(W_f [N(M); u] + b_f)
      M' = f * M + (1 - f) * u

Reading and writing reuse the layer's own q/k/v/o projections and norms, so the weights stay
GLM-4-shaped: a GLM-4 checkpoint loads and only ``memory_init``, ``memory_gate`` and two per-head
biases are new. Segments are counted per row from its first real token (left padding changes
nothing); rotary positions restart at 0 in every segment (each RMT segment is its own forward),
so any length works; memory keys sit at position 0, a write's slot queries just after the
segment. Gradients cross at most ``bptt_segments`` segments (truncated BPTT, Transformer-XL and
the Recurrent Memory Transformer, Bulatov et al. 2022). Generation prefills segment by segment and
decodes with a :class:`SegmentKVCache` of one segment plus the slots. See docs/MEMORY.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoglm_phone.config import DecoderConfig
from autoglm_phone.models.layers import (
    AttentionMode,
    Block,
    apply_rotary,
    build_attention_mask,
)


@dataclass
class MemoryState:
    """What one segment hands the next: ``slots[i]`` ``(B, S, C)`` is layer ``i``'s memory and
    ``filled`` ``(B,)`` says which rows' memory a segment has written (only those are read)."""

    slots: list[torch.Tensor]
    filled: torch.Tensor

    def detach(self) -> MemoryState:
        return MemoryState([m.detach() for m in self.slots], self.filled)

    def select(self, rows: torch.Tensor, new: MemoryState) -> MemoryState:
        """``new`` on the rows where ``rows`` ``(B,)`` is True, ``self`` elsewhere."""
        keep = rows[:, None, None]
        slots = [torch.where(keep, n, o) for n, o in zip(new.slots, self.slots, strict=True)]
        return MemoryState(slots, torch.where(rows, new.filled, self.filled))


class SegmentKVCache:
    """Keys and values of every layer for the current segment only, ``(B, H_kv, L, D)`` with
    ``L = segment_len``, filled per row (``count`` ``(B,)``): rows reach a segment's end at
    different steps, so each writes at its own position and is emptied when its segment is
    written to memory. Memory is ``O(segment_len + num_slots)``, whatever the prompt's length."""

    def __init__(
        self, cfg: DecoderConfig, batch_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, cfg.memory.segment_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (N, B, H_kv, L, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)  # filled positions

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> None:
        """Store a segment's first keys/values ``(B, H_kv, T, D)`` on ``rows`` ``(B,)``."""
        t = k.shape[2]
        keep = rows[:, None, None, None]
        self.k[layer, :, :, :t] = torch.where(keep, k, self.k[layer, :, :, :t])
        self.v[layer, :, :, :t] = torch.where(keep, v, self.v[layer, :, :, :t])

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token's ``(B, H_kv, 1, D)`` at each row's ``count``; return the layer's
        whole buffers (positions past ``count`` are masked by :meth:`key_mask`)."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer, rows, :, self.count] = k[:, :, 0]
        self.v[layer, rows, :, self.count] = v[:, :, 0]
        return self.k[layer], self.v[layer]

    def key_mask(self) -> torch.Tensor:
        """``(B, 1, 1, L)``: the positions up to and including the token being decoded."""
        pos = torch.arange(self.k.shape[3], device=self.count.device)
        return (pos[None, :] <= self.count[:, None])[:, None, None]


class MemoryGate(nn.Linear):
    """The write's keep-gate ``W_f``: a linear layer built without drawing random numbers (the
    decoder's init skips it; :meth:`MemoryBlock.reset_memory_parameters` initialises it)."""

    def reset_parameters(self) -> None:
        pass


class MemoryBlock(Block):
    """A GLM-4 block whose attention also reads a per-layer memory, plus the memory write.

    Two learned per-head logit biases make the memory path learnable (docs/MEMORY.md):

    - ``self_attn.memory_read_bias`` ``(H,)`` is added to every memory key when tokens read, so a
      token puts most of its attention on the slots instead of sharing it with ``T`` local keys
      (without it the recall benchmark stays at chance);
    - ``self_attn.memory_write_bias`` ``(H,)`` is added, when slot ``s`` writes, to the tokens of
      the ``s``-th of ``S`` equal chunks of the segment, so each slot starts as an attention-pooled
      summary of its own ``T / S`` tokens (the Compressive Transformer's compression, Rae et al.
      2020) rather than all slots starting as the same average of the whole segment.
    """

    def __init__(self, cfg: DecoderConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        m, c, s = cfg.memory, cfg.hidden_size, cfg.memory.num_slots
        self.self_attn.memory_read_bias = nn.Parameter(torch.zeros(cfg.num_heads))
        self.self_attn.memory_write_bias = nn.Parameter(torch.zeros(cfg.num_heads))
        # built without drawing random numbers: reset_memory_parameters draws them from the memory's
        # own stream, so every other weight of the model initialises exactly as without memory
        self.memory_init = nn.Parameter(torch.empty(s, c))  # distinct slots, distinct queries
        self.memory_gate = MemoryGate(2 * c, c)
        self.chrono_segments = m.chrono_segments
        self.gate_bias_init = 1.0 if m.gate_bias is None else m.gate_bias  # keep sigmoid(1): 73%
        # mid-segment, the slots then get 2e^2 / (2e^2 + 1) = 94% of a token's attention at init
        self.read_bias_init = (
            math.log(m.segment_len / s) + 2.0 if m.read_bias is None else m.read_bias
        )
        # a slot's own chunk then gets e^2 / (e^2 + 1 + S / T) = 88% of its write attention
        self.write_bias_init = math.log(s) + 2.0 if m.write_bias is None else m.write_bias
        self._keep_sum: list[torch.Tensor] = []  # running [sum of write means, writes]: gate_stats

    @torch.no_grad()
    def gate_stats(self, reset: bool = True) -> dict[str, torch.Tensor]:
        """Detached gate statistics, for dashboards: ``keep_prior`` (the keep-gate at its bias
        alone, ``sigmoid(b_f)`` ``(C,)``), ``read_bias`` and ``write_bias`` ``(H,)``, and, if the
        layer wrote since the last reset, ``keep`` (the mean keep-gate ``f`` over those writes) and
        ``writes`` (how many). Reading does not change the model's numbers."""
        stats = {
            "keep_prior": torch.sigmoid(self.memory_gate.bias).detach(),
            "read_bias": self.self_attn.memory_read_bias.detach(),
            "write_bias": self.self_attn.memory_write_bias.detach(),
        }
        if self._keep_sum:
            total, writes = self._keep_sum
            stats.update(keep=total / writes, writes=writes)
        if reset:
            self._keep_sum = []
        return stats

    @torch.no_grad()
    def reset_memory_parameters(self, generator: torch.Generator | None = None) -> None:
        """The documented init of the memory weights (also what a loaded GLM-4 checkpoint gets),
        drawn from ``generator`` (CPU) when given."""

        def draw(p: torch.Tensor, fill: Callable[[torch.Tensor], torch.Tensor]) -> None:
            p.copy_(fill(torch.empty(p.shape)))

        # small: the read normalises the memory, so the first write then dominates a slot
        draw(self.memory_init, lambda t: t.normal_(0.0, 0.02, generator=generator))
        draw(self.memory_gate.weight, lambda t: t.normal_(0.0, 0.02, generator=generator))
        if self.chrono_segments:  # chrono init (Tallec & Ollivier 2018): keep-times up to N
            n = self.chrono_segments
            draw(self.memory_gate.bias, lambda t: t.uniform_(1.0, n - 1, generator=generator).log())
        else:
            nn.init.constant_(self.memory_gate.bias, self.gate_bias_init)
        nn.init.constant_(self.self_attn.memory_read_bias, self.read_bias_init)
        nn.init.constant_(self.self_attn.memory_write_bias, self.write_bias_init)

    def _heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return rearrange(proj(x), "b t (h d) -> b h t d", d=self.self_attn.head_dim)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor,
        mem: torch.Tensor,
        filled: torch.Tensor,
    ) -> torch.Tensor:
        """Queries ``(B, H, Q, D)`` over the memory ``mem`` ``(B, S, C)`` (normed; rows whose
        ``filled`` is False skip it) and the local keys/values ``(B, H_kv, K, D)`` allowed by
        ``mask`` ``(B, 1, Q, K)`` -> ``(B, Q, C)``."""
        attn = self.self_attn
        gqa = attn.num_kv_heads != attn.num_heads
        # nothing written yet: exactly the GLM-4 attention (an export traces the general path;
        # its slots are then masked out)
        if not torch.compiler.is_exporting() and not filled.any():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:  # memory keys at position 0, i.e. unrotated
            mem_k, mem_v = self._heads(attn.k_proj, mem), self._heads(attn.v_proj, mem)
            b, h, nq, s = q.shape[0], q.shape[1], q.shape[2], mem.shape[1]
            bias = attn.memory_read_bias.to(q.dtype)[None, :, None, None]  # (1, H, 1, 1)
            slots = torch.where(filled[:, None, None, None], bias, -torch.inf).expand(b, h, nq, s)
            local = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~mask, -torch.inf
            )  # (B, 1, Q, K)
            full = torch.cat((slots, local.expand(b, h, nq, -1)), dim=-1)  # (B, H, Q, S + K)
            out = F.scaled_dot_product_attention(
                q,
                torch.cat((mem_k, k), 2),
                torch.cat((mem_v, v), 2),
                attn_mask=full,
                enable_gqa=gqa,
            )
        return attn.o_proj(rearrange(out, "b h t d -> b t (h d)"))

    def forward_segment(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        token_mask: torch.Tensor,
        mem: torch.Tensor,
        filled: torch.Tensor,
        cache: tuple[SegmentKVCache, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment ``x`` ``(B, T, C)`` reading memory ``mem`` ``(B, S, C)`` -> the new ``x`` and
        the segment's rotated keys and values ``(B, H_kv, T, D)`` (what a write needs). With a
        ``cache`` (decoding one token) the keys/values are appended to it and read from it."""
        q, k, v = self.self_attn.project(self.input_layernorm(x), *rope)
        if cache is not None:
            seg_cache, layer = cache
            k, v = seg_cache.append(layer, k, v)  # (B, H_kv, L, D)
        attn = self.attend(q, k, v, mask, self.input_layernorm(mem), filled)
        x = x + self.post_self_attn_layernorm(attn)
        x = x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x), token_mask))
        return x, k, v

    def write(
        self,
        mem: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        counts: torch.Tensor,
        rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """The memory after a segment: slots ``mem`` ``(B, S, C)`` read themselves and the
        segment's keys/values ``(B, H_kv, T, D)``, of which each row's first ``counts`` ``(B,)``
        are real; slot queries sit at position ``counts`` (``rope`` maps positions to cos/sin)."""
        attn, s, t = self.self_attn, mem.shape[1], k.shape[2]
        h_mem = self.input_layernorm(mem)
        slot_q = apply_rotary(self._heads(attn.q_proj, h_mem), *rope(counts[:, None]))
        # (B, H, S, D)
        pos = torch.arange(t, device=mem.device)
        n = counts.clamp(min=1)[:, None]  # (B, 1)
        chunk = pos[None, :] * s // n  # (B, T) the slot whose chunk holds each token
        own = chunk[:, None, :] == torch.arange(s, device=mem.device)[None, :, None]  # (B, S, T)
        bias = attn.memory_write_bias.to(mem.dtype)[None, :, None, None]  # (1, H, 1, 1)
        local = (own[:, None] * bias).masked_fill(~(pos < n)[:, None, None, :], -torch.inf)
        mask = torch.cat((local.new_zeros(*local.shape[:3], s), local), dim=-1)  # (B, H, S, S+T)
        keys = torch.cat((self._heads(attn.k_proj, h_mem), k), dim=2)  # (B, H_kv, S + T, D)
        values = torch.cat((self._heads(attn.v_proj, h_mem), v), dim=2)
        update = F.scaled_dot_product_attention(
            slot_q, keys, values, attn_mask=mask, enable_gqa=attn.num_kv_heads != attn.num_heads
        )
        update = self.post_self_attn_layernorm(
            attn.o_proj(rearrange(update, "b h s d -> b s (h d)"))
        )
        keep = torch.sigmoid(self.memory_gate(torch.cat((h_mem, update), dim=-1)))  # (B, S, C)
        if not torch.compiler.is_exporting():  # the exported program is the pure function
            mean = keep.detach().float().mean()
            total, writes = self._keep_sum or (mean.new_zeros(()), mean.new_zeros(()))
            self._keep_sum = [total + mean, writes + 1]
        return keep * mem + (1 - keep) * update


def pack_left(
    x: torch.Tensor, padding_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front (stable): ``x`` ``(B, T, ...)`` -> packed ``x``,
    the ``order`` ``(B, T)`` that packed it and the real-token ``counts`` ``(B,)``. Segments are
    then the same columns for every row, counted from its first real token."""
    order = (~padding_mask).long().argsort(dim=1, stable=True)  # (B, T), real positions first
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index), order, padding_mask.sum(dim=1)


def unpack(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Undo :func:`pack_left` on ``x`` ``(B, T, C)``."""
    return torch.empty_like(x).scatter_(1, order[..., None].expand_as(x), x)


class SegmentRunner:
    """Runs a :class:`~autoglm_phone.models.glm.GLMDecoder` with memory segment by segment:
    :meth:`forward` for training and scoring, :meth:`prefill` + :meth:`decode_step` for
    generation with a :class:`SegmentKVCache`. Holds nothing but the decoder."""

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder
        self.cfg: DecoderConfig = decoder.cfg
        self.seg = self.cfg.memory.segment_len

    def init_memory(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState:
        slots = [
            layer.memory_init.to(device=device, dtype=dtype).expand(batch_size, -1, -1)
            for layer in self.decoder.layers
        ]  # each (B, S, C)
        return MemoryState(slots, torch.zeros(batch_size, dtype=torch.bool, device=device))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.rotary(positions)

    def _segment(
        self,
        x: torch.Tensor,
        counts: torch.Tensor,
        mode: AttentionMode,
        prefix: torch.Tensor | None,
        write: torch.Tensor,
        filled: torch.Tensor,
        *slots: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        """One packed segment ``x`` ``(B, T, C)`` with ``counts`` real tokens per row -> hidden
        states, the slots after writing on rows ``write``, and every layer's keys/values."""
        t = x.shape[1]
        token_mask = torch.arange(t, device=x.device)[None, :] < counts[:, None]  # (B, T)
        mask = build_attention_mask(token_mask, mode, prefix)  # (B, 1, T, T)
        rope = self.rope(torch.arange(t, device=x.device)[None])  # positions restart at 0
        new_slots, kv = [], []
        for layer, mem in zip(self.decoder.layers, slots, strict=True):
            x, k, v = layer.forward_segment(x, rope, mask, token_mask, mem, filled)
            kv.append((k, v))
            if torch.compiler.is_exporting() or write.any():  # export: a static graph
                mem = torch.where(
                    write[:, None, None], layer.write(mem, k, v, counts, self.rope), mem
                )
            new_slots.append(mem)
        return self.decoder.norm(x), new_slots, kv

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor,
        mode: AttentionMode,
        prefix_lengths: torch.Tensor | None,
        memory: MemoryState | None,
        *,
        write_partial: bool = True,
        on_segment: Callable[[int, torch.Tensor, list], None] | None = None,
        keep_hidden: bool = True,
    ) -> tuple[torch.Tensor | None, MemoryState]:
        """Hidden states ``(B, T, C)`` of any length and the memory after the last segment.

        Each row's segments start at its first real token. A segment is written to memory when
        it is full, and also when partial if ``write_partial`` (a stream continues after it;
        generation keeps a partial segment in its cache instead). ``memory.carry=False`` never
        reads nor writes (the no-memory ablation). ``on_segment(start, hidden, kv)`` sees every
        packed segment (generation's prefill takes its cache from it); with ``keep_hidden=False``
        nothing else keeps the hidden states and ``None`` is returned for them (memory then
        stays one segment's, not ``(B, T, C)``).
        """
        m = self.cfg.memory
        b, t = x.shape[:2]
        xp, order, counts = pack_left(x, attention_mask)  # (B, T, C), (B, T), (B,)
        if memory is None:
            memory = self.init_memory(b, x.device, x.dtype)
        bptt = max(1, m.bptt_segments)
        hidden, num_segments = [], 0
        # auxiliary losses (MoE balance) are set per forward: average them over the segments
        aux = [mod for mod in self.decoder.layers.modules() if hasattr(mod, "aux_loss")]
        aux_sums = [0.0] * len(aux)
        for i, start in enumerate(range(0, t, self.seg)):
            if i % bptt == 0 and memory.filled.any():  # an unwritten memory_init keeps its grad
                memory = memory.detach()
            seg = xp[:, start : start + self.seg]
            n = (counts - start).clamp(0, seg.shape[1])  # (B,) real tokens in this segment
            write = (n == self.seg) | ((n > 0) & write_partial)
            if not m.carry:
                write = torch.zeros_like(write)
            prefix = None if prefix_lengths is None else (prefix_lengths - start).clamp(0, self.seg)
            filled = memory.filled if m.carry else torch.zeros_like(memory.filled)
            args = (seg, n, AttentionMode(mode), prefix, write, filled, *memory.slots)
            if self.decoder.checkpoint_segments and torch.is_grad_enabled():
                h, slots, kv = checkpoint(self._segment, *args, use_reentrant=False)
            else:
                h, slots, kv = self._segment(*args)
            memory = MemoryState(slots, memory.filled | write)
            if on_segment is not None:
                on_segment(start, h, kv)
            if keep_hidden:
                hidden.append(h)
            num_segments += 1
            aux_sums = [total + mod.aux_loss for total, mod in zip(aux_sums, aux, strict=True)]
        for total, mod in zip(aux_sums, aux, strict=True):
            mod.aux_loss = total / num_segments
        return (unpack(torch.cat(hidden, dim=1), order) if keep_hidden else None), memory

    def prefill(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor,
        mode: AttentionMode,
        prefix_lengths: torch.Tensor | None,
    ) -> tuple[torch.Tensor, MemoryState, SegmentKVCache]:
        """Encode a prompt: the last real token's hidden state ``(B, C)``, the memory of every
        full segment, and a cache holding each row's partial last segment."""
        b = x.shape[0]
        counts = attention_mask.sum(dim=1)  # (B,)
        current = counts // self.seg * self.seg  # (B,) where each row's unfinished segment starts
        cache = SegmentKVCache(self.cfg, b, x.dtype, x.device)
        cache.count = counts - current
        last = x.new_zeros(b, x.shape[-1])
        rows = torch.arange(b, device=x.device)

        def take(start: int, hidden: torch.Tensor, kv: list) -> None:
            nonlocal last
            here = current == start  # (B,) rows whose cache this segment is
            for i, (k, v) in enumerate(kv):
                cache.put(i, k, v, here)
            end = counts - 1 - start  # the last real token, if it is in this segment
            inside = (end >= 0) & (end < hidden.shape[1])
            picked = hidden[rows, end.clamp(0, hidden.shape[1] - 1)]  # (B, C)
            last = torch.where(inside[:, None], picked, last)

        _, memory = self.forward(
            x,
            attention_mask,
            mode,
            prefix_lengths,
            None,
            write_partial=False,
            on_segment=take,
            keep_hidden=False,  # only the last token's hidden state is needed
        )
        return last, memory, cache

    def decode_step(
        self, x: torch.Tensor, memory: MemoryState, cache: SegmentKVCache
    ) -> tuple[torch.Tensor, MemoryState]:
        """One new token per row ``x`` ``(B, 1, C)`` -> its hidden state ``(B, C)``; a row whose
        segment this token completes writes it to memory and starts an empty one."""
        m = self.cfg.memory
        rope = self.rope(cache.count[:, None])  # (B, 1, ...) each row's position in its segment
        mask = cache.key_mask()  # (B, 1, 1, L)
        token_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        filled = memory.filled if m.carry else torch.zeros_like(memory.filled)
        for i, (layer, mem) in enumerate(zip(self.decoder.layers, memory.slots, strict=True)):
            x, _, _ = layer.forward_segment(x, rope, mask, token_mask, mem, filled, (cache, i))
        cache.count = cache.count + 1
        full = cache.count == self.seg  # (B,)
        if full.any():
            if m.carry:
                slots = [
                    layer.write(mem, cache.k[i], cache.v[i], cache.count, self.rope)
                    for i, (layer, mem) in enumerate(
                        zip(self.decoder.layers, memory.slots, strict=True)
                    )
                ]
                memory = memory.select(full, MemoryState(slots, torch.ones_like(full)))
            cache.count = cache.count.masked_fill(full, 0)
        return self.decoder.norm(x)[:, -1], memory
