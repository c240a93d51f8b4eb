"""Memory-augmented GLM-4 decoder: long context in memory bounded by segment + memory size.

The sequence is cut into segments of ``cfg.memory.segment_len`` tokens, processed one after the
other. Every layer carries a state of ``num_slots`` memory vectors from segment to segment, as in
the Block-Recurrent Transformer (Hutchins et al. 2022, https://arxiv.org/abs/2203.07852) and
Memformer (Wu et al. 2022, https://arxiv.org/abs/2010.06891):

- **read**: a segment's tokens attend, in one softmax, to the layer's memory slots (extra keys and
  values, as Transformer-XL's cached segment, Dai et al. 2019; plus a learned per-head logit bias)
  and causally to their own segment. The memory holds only what earlier segments wrote, so the
  read is causal-safe; an empty memory (before the first write) is not read at all, which makes
  one segment exactly a ``GLMDecoder``.
- **write**: after the segment, each slot queries the memory and the whole segment (BRT's
  "vertical" cross-attention; a learned bias first points slot ``s`` at the ``s``-th chunk of the
  segment) and is mixed with its old value by a learned, per-channel sigmoid gate (BRT's
  LSTM-style forget gate, biased towards keeping)::

      u  = PostNorm(O · Attn(Q·N(M), K·[N(M); N(X)], V·[N(M); N(X)]))
      f  = sigmoid(W_f [N(M); u] + b_f)
      M' = f * M + (1 - f) * u

Reading and writing reuse the layer's own q/k/v/o projections and norms, so the weights stay
GLM-4-shaped: a trained ``GLMDecoder`` loads with ``from_decoder``; only ``memory_init``,
``memory_gate`` and the two per-head biases are new. Gradients flow through at most
``bptt_segments`` segments (the memory is detached every ``bptt_segments`` segments: truncated
BPTT as in Transformer-XL and the Recurrent Memory Transformer, Bulatov et al. 2022). Rotary
positions restart at 0 in every segment (as each RMT segment is its own forward), so any sequence
length works; memory keys sit at position 0 and the write queries just after the segment.
See docs/MEMORY.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoglm_phone.config import DecoderConfig, MemoryConfig
from autoglm_phone.models.glm import Attention, Block, GLMDecoder, RMSNorm, RotaryEmbedding
from autoglm_phone.models.glm import apply_rotary as rotate


@dataclass
class MemoryState:
    """What one segment hands the next: ``slots[i]`` ``(B, S, C)`` is layer ``i``'s memory."""

    slots: list[torch.Tensor]
    filled: bool = False  # False until a segment wrote it; an unfilled memory is not read

    def detach(self) -> MemoryState:
        return MemoryState([m.detach() for m in self.slots], self.filled)


class MemoryAttention(Attention):
    """GLM-4 attention that also reads from and writes to a set of memory slots.

    Two learned per-head logit biases make the memory path learnable (docs/MEMORY.md):

    - ``memory_read_bias`` ``(H,)`` is added to every memory key when tokens read, so a token puts
      most of its attention on the slots instead of sharing it with ``T`` local keys (without it
      the recall benchmark stays at chance);
    - ``memory_write_bias`` ``(H,)`` is added, when slot ``s`` writes, to the tokens of the
      ``s``-th of ``S`` equal chunks of the segment, so each slot starts as an attention-pooled
      summary of its own ``T / S`` tokens (the Compressive Transformer's compression, Rae et al.
      2020) rather than all slots starting as the same average of the whole segment.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg)
        self.memory_read_bias = nn.Parameter(torch.zeros(cfg.num_heads))
        self.memory_write_bias = nn.Parameter(torch.zeros(cfg.num_heads))

    def _heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return rearrange(proj(x), "b t (h d) -> b h t d", d=self.head_dim)

    def forward_memory(
        self,
        x: torch.Tensor,
        mem: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        write_rope: tuple[torch.Tensor, torch.Tensor],
        read: bool,
        write: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normed segment ``x`` ``(B, T, C)`` and memory ``mem`` ``(B, S, C)`` -> the tokens'
        attention output ``(B, T, C)`` and the slots' write update ``(B, S, C)`` (or None)."""
        t, s = x.shape[1], mem.shape[1]
        gqa = self.num_kv_heads != self.num_heads
        q = rotate(self._heads(self.q_proj, x), *rope)  # (B, H, T, D)
        k = rotate(self._heads(self.k_proj, x), *rope)  # (B, H_kv, T, D)
        v = self._heads(self.v_proj, x)  # (B, H_kv, T, D)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # (T, T)
        if read or write:  # memory slots: keys/values at position 0, i.e. unrotated
            mem_k = torch.cat((self._heads(self.k_proj, mem), k), dim=2)  # (B, H_kv, S + T, D)
            mem_v = torch.cat((self._heads(self.v_proj, mem), v), dim=2)  # (B, H_kv, S + T, D)
        if read:  # every token sees all slots (+ memory_read_bias) and its causal past
            local = torch.zeros(t, t, dtype=q.dtype, device=x.device).masked_fill(
                ~causal, -torch.inf
            )
            bias = rearrange(self.memory_read_bias.to(q.dtype), "h -> h 1 1").expand(-1, t, s)
            mask = torch.cat((bias, local.expand(self.num_heads, t, t)), dim=-1)  # (H, T, S + T)
            out = F.scaled_dot_product_attention(q, mem_k, mem_v, attn_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=gqa)
        out = self.o_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, C)
        if not write:
            return out, None
        # write: slots query the memory and the whole (finished) segment from just after it
        slot_q = rotate(self._heads(self.q_proj, mem), *write_rope)  # (B, H, S, D)
        chunk = torch.arange(t, device=x.device) * s // t  # (T,) the slot each token starts in
        own = chunk[None, :] == torch.arange(s, device=x.device)[:, None]  # (S, T)
        own = torch.cat((own.new_zeros(s, s), own), dim=1)  # (S, S + T), slots unbiased
        bias = rearrange(self.memory_write_bias.to(q.dtype), "h -> h 1 1")
        write_mask = own * bias  # (H, S, S + T)
        update = F.scaled_dot_product_attention(
            slot_q, mem_k, mem_v, attn_mask=write_mask, enable_gqa=gqa
        )
        return out, self.o_proj(rearrange(update, "b h s d -> b s (h d)"))  # (B, S, C)


class MemoryBlock(Block):
    """A GLM-4 block whose attention reads a per-layer memory, followed by a gated memory write."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        self.self_attn = MemoryAttention(cfg)  # same parameter names and shapes as Attention
        c, s = cfg.hidden_size, cfg.memory.num_slots
        self.memory_init = nn.Parameter(torch.empty(s, c))  # distinct slots, distinct queries
        self.memory_gate = nn.Linear(2 * c, c)
        m = cfg.memory
        self.gate_bias_init = 1.0 if m.gate_bias is None else m.gate_bias  # keep sigmoid(1): 73%
        # mid-segment, the slots then get 2e^2 / (2e^2 + 1) = 94% of a token's attention at init
        default_read = math.log(cfg.memory.segment_len / s) + 2.0
        self.read_bias_init = default_read if m.read_bias is None else m.read_bias
        # a slot's own chunk then gets e^2 / (e^2 + 1 + S / T) = 88% of its write attention
        self.write_bias_init = math.log(s) + 2.0 if m.write_bias is None else m.write_bias

    def reset_memory_parameters(self) -> None:
        # small: the read normalises the memory, so the first write then dominates a slot
        nn.init.normal_(self.memory_init, std=0.02)
        nn.init.normal_(self.memory_gate.weight, std=0.02)
        nn.init.constant_(self.memory_gate.bias, self.gate_bias_init)
        nn.init.constant_(self.self_attn.memory_read_bias, self.read_bias_init)
        nn.init.constant_(self.self_attn.memory_write_bias, self.write_bias_init)

    def forward_memory(
        self,
        x: torch.Tensor,
        mem: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        write_rope: tuple[torch.Tensor, torch.Tensor],
        read: bool,
        write: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment ``x`` ``(B, T, C)``, memory ``mem`` ``(B, S, C)`` -> new ``x`` and memory."""
        h, h_mem = self.input_layernorm(x), self.input_layernorm(mem)
        attn, update = self.self_attn.forward_memory(h, h_mem, rope, write_rope, read, write)
        x = x + self.post_self_attn_layernorm(attn)
        x = x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))
        if update is None:
            return x, mem
        update = self.post_self_attn_layernorm(update)  # on the scale of what attention adds
        keep = torch.sigmoid(self.memory_gate(torch.cat((h_mem, update), dim=-1)))  # (B, S, C)
        return x, keep * mem + (1 - keep) * update


class MemoryGLMDecoder(nn.Module):
    """``GLMDecoder``'s layout (embeddings, blocks, norm, LM head) run segment by segment with a
    per-layer recurrent memory; ``cfg.memory.enabled=False`` runs the segments independently."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("text.vocab_size must be set (normally taken from the tokenizer)")
        self.cfg = cfg
        self.embed_dim = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MemoryBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(GLMDecoder._init_weights)
        for layer in self.layers:
            layer.reset_memory_parameters()
        # recompute each segment in backward: a grad-enabled forward then keeps only the segment
        # inputs and logits, not every segment's activations (gradients are unchanged)
        self.checkpoint_segments = cfg.memory.checkpoint_segments

    @classmethod
    def from_decoder(
        cls, decoder: GLMDecoder, memory: MemoryConfig | None = None
    ) -> MemoryGLMDecoder:
        """A memory decoder holding ``decoder``'s weights; the memory parameters start fresh."""
        cfg = decoder.cfg if memory is None else dataclasses.replace(decoder.cfg, memory=memory)
        model = cls(cfg).to(decoder.embed_tokens.weight.device)
        missing, unexpected = model.load_state_dict(decoder.state_dict(), strict=False)
        new = {k for k in model.state_dict() if ".memory_" in k}
        if unexpected or set(missing) != new:
            raise ValueError(f"not a GLM-4 decoder: missing {missing}, unexpected {unexpected}")
        return model

    def init_memory(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState:
        """The empty memory a sequence starts from (the learned slot inits, not yet readable)."""
        slots = [
            layer.memory_init.to(device=device, dtype=dtype).expand(batch_size, -1, -1)
            for layer in self.layers
        ]  # each (B, S, C)
        return MemoryState(slots, filled=False)

    def step(
        self,
        input_ids: torch.Tensor | None = None,
        memory: MemoryState | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MemoryState]:
        """One segment (at most ``segment_len`` tokens): logits ``(B, T, V)`` and the new memory."""
        x = self._embed(input_ids, inputs_embeds)  # (B, T, C)
        if x.shape[1] > self.cfg.memory.segment_len:
            raise ValueError(
                f"a step takes at most memory.segment_len={self.cfg.memory.segment_len} tokens, "
                f"got {x.shape[1]}; use forward for longer sequences"
            )
        if memory is None:
            memory = self.init_memory(x.shape[0], x.device, x.dtype)
        read = memory.filled and self.cfg.memory.enabled
        write = self.cfg.memory.enabled
        if self.checkpoint_segments and torch.is_grad_enabled():
            logits, *slots = checkpoint(
                self._segment, x, read, write, *memory.slots, use_reentrant=False
            )
        else:
            logits, *slots = self._segment(x, read, write, *memory.slots)
        return logits, MemoryState(slots, filled=memory.filled or write)

    def _segment(
        self, x: torch.Tensor, read: bool, write: bool, *slots: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        t = x.shape[1]
        positions = torch.arange(t + 1, device=x.device)[None]  # (1, T + 1), from 0 each segment
        cos, sin = self.rotary(positions)  # (1, T + 1, rotary_dim / 2)
        rope, write_rope = (cos[:, :t], sin[:, :t]), (cos[:, t:], sin[:, t:])
        new_slots = []
        for layer, mem in zip(self.layers, slots, strict=True):
            x, mem = layer.forward_memory(x, mem, rope, write_rope, read, write)
            new_slots.append(mem)
        return (self.lm_head(self.norm(x)), *new_slots)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        memory: MemoryState | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``(B, T, vocab_size)`` for a sequence of any length."""
        return self.forward_with_memory(input_ids, inputs_embeds=inputs_embeds, memory=memory)[0]

    def forward_with_memory(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        memory: MemoryState | None = None,
    ) -> tuple[torch.Tensor, MemoryState]:
        """Logits ``(B, T, V)`` and the memory after the last segment (to continue a stream).

        A written memory is detached before every ``bptt_segments``-th segment (counting from the
        first one here, whose incoming memory is detached too), so no gradient crosses those
        borders; the learned ``memory_init`` keeps its gradient.
        """
        x = self._embed(input_ids, inputs_embeds)  # (B, T, C)
        seg, bptt = self.cfg.memory.segment_len, max(1, self.cfg.memory.bptt_segments)
        if memory is None:
            memory = self.init_memory(x.shape[0], x.device, x.dtype)
        logits = []
        for i, start in enumerate(range(0, x.shape[1], seg)):
            if i % bptt == 0 and memory.filled:
                memory = memory.detach()
            out, memory = self.step(inputs_embeds=x[:, start : start + seg], memory=memory)
            logits.append(out)
        return torch.cat(logits, dim=1), memory

    def _embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
