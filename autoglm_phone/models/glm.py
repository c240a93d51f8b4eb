"""GLM-4-style decoder: the whole text model in one file.

Follows transformers' ``Glm4ForCausalLM`` (GLM-4-0414, https://huggingface.co/THUDM/GLM-4-9B-0414)
layer for layer, with the same parameter names so conversion is a key rename:

- RMSNorm before attention and MLP, plus GLM-4's extra *post*-attention and *post*-MLP norms;
- grouped-query attention (``num_kv_heads`` < ``num_heads``) with bias on q/k/v, none on o;
- partial, interleaved RoPE: only the first ``head_dim * partial_rotary_factor`` channels rotate,
  in adjacent pairs (0,1), (2,3), ... rather than the half-split of Llama;
- a fused ``gate_up_proj`` SwiGLU MLP.

Attention runs through ``F.scaled_dot_product_attention`` with a boolean mask from one builder,
:func:`build_attention_mask`, which makes causal, bidirectional and GLM's prefix-bidirectional
masks (GLM-130B, Zeng et al. 2022: bidirectional over the prefix, causal over the rest), square
for a full forward or rectangular for a cached decoding step.

``GLMDecoder.generate`` / ``stream`` decode with a key/value cache (``generation.py``): the prompt
(token ids or ready-made embeddings, e.g. image/audio tokens + text) is encoded once, in prefix
mode bidirectionally, then each new token attends causally. ``make_ffn`` picks each layer's FFN:
dense SwiGLU, or a mixture of experts (``moe.py``) where ``cfg.moe`` asks for one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from autoglm_phone.config import DecoderConfig
from autoglm_phone.models.generation import (
    KV_BLOCK,
    KVCache,
    LayerKVCache,
    check_generation_args,
    sample_next_token,
)

if TYPE_CHECKING:
    from autoglm_phone.models.memory import MemoryState, SegmentRunner


class AttentionMode(str, Enum):
    CAUSAL = "causal"
    BIDIRECTIONAL = "bidirectional"
    PREFIX = "prefix"


def build_attention_mask(
    padding_mask: torch.Tensor,
    mode: AttentionMode | str = AttentionMode.CAUSAL,
    prefix_lengths: torch.Tensor | None = None,
    *,
    num_queries: int | None = None,
) -> torch.Tensor:
    """Boolean attention mask ``(B, 1, Q, K)``, True where query ``i`` may attend key ``j``.

    ``padding_mask`` is ``(B, K)``, True on real tokens: every key, i.e. the cached tokens plus the
    new ones when decoding with a cache. The queries are the last ``num_queries`` positions (all
    ``K`` by default, the square mask), so a cached step's rectangular mask is exactly the last
    ``Q`` rows of the full square mask. In prefix mode, ``prefix_lengths`` ``(B,)`` counts the
    tokens (from the first real one) that see each other bidirectionally; later tokens are causal.
    Padded query rows attend only to themselves so SDPA never sees an empty row.
    """
    mode = AttentionMode(mode)
    b, k_len = padding_mask.shape
    q_len = k_len if num_queries is None else num_queries
    if not 0 < q_len <= k_len:
        raise ValueError(f"num_queries={num_queries} must be in [1, {k_len}] (the number of keys)")
    device = padding_mask.device
    k_idx = torch.arange(k_len, device=device)  # (K,) key positions
    q_idx = k_idx[k_len - q_len :]  # (Q,) query positions: the last Q keys
    if mode is AttentionMode.BIDIRECTIONAL:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).expand(b, q_len, k_len)
    else:
        allowed = (k_idx[None, :] <= q_idx[:, None]).expand(b, q_len, k_len)  # (B, Q, K) causal
        if mode is AttentionMode.PREFIX:
            if prefix_lengths is None:
                raise ValueError("prefix attention needs prefix_lengths")
            # the prefix starts at the first real token (left padding shifts it)
            start = (~padding_mask).long().cumprod(-1).sum(-1)  # (B,) leading pads
            end = start + prefix_lengths.to(device)
            key = k_idx[None, :]  # (1, K)
            in_prefix = (key >= start[:, None]) & (key < end[:, None])  # (B, K)
            q_in_prefix = in_prefix[:, k_len - q_len :]  # (B, Q)
            allowed = allowed | (q_in_prefix[:, :, None] & in_prefix[:, None, :])
    allowed = allowed & padding_mask[:, None, :]  # keys must be real
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])  # no empty rows
    return allowed[:, None]  # (B, 1, Q, K)


def positions_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token, so left padding changes nothing."""
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, scaled after casting back (as GLM-4/T5)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_frequencies(cfg: DecoderConfig) -> tuple[torch.Tensor, float]:
    """``(inv_freq (rotary_dim / 2,), attention_scaling)`` of ``cfg``'s RoPE.

    Unscaled RoPE is computed here; a ``cfg.rope_scaling`` type goes through transformers' own
    ``ROPE_INIT_FUNCTIONS`` on the equivalent ``Glm4Config``, so it is exactly what
    ``Glm4ForCausalLM`` computes rather than a re-derivation of YaRN or Llama-3 scaling.
    """
    scaling = cfg.rope_scaling
    if scaling.rope_type == "default":
        rot = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))
        return inv_freq, 1.0
    from transformers import Glm4Config  # lazy: only scaled RoPE needs it
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = Glm4Config(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rope_parameters={
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor,
            **scaling.parameters(),
        },
    )
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[scaling.rope_type](hf)
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin for the rotary part of each head (``rotary_dim`` channels), times the scaled
    types' attention factor (YaRN), as transformers applies it."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, rotary_dim / 2)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of the first ``2 * cos.shape[-1]`` channels of ``x``."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]
    pairs = rearrange(x_rot, "b h t (d two) -> b h t d two", two=2)
    x1, x2 = pairs[..., 0], pairs[..., 1]  # (B, H, T, rot / 2)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rot / 2)
    rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    rotated = rearrange(rotated, "b h t d two -> b h t (d two)").to(x.dtype)
    return torch.cat((rotated, x_pass), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention with q/k/v bias and partial RoPE, on SDPA."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """``x`` is ``(B, T, C)``; ``mask`` is ``(B, 1, T, S)`` with ``S`` = cached + ``T`` keys."""
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H_kv, S, D): the cached keys, then the new ones
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, H, T, D)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries ``(B, H, T, D)``, rotated keys and values ``(B, H_kv, T, D)``."""
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class SwiGLU(nn.Module):
    """GLM-4's MLP: one fused gate/up projection, SiLU gate, down projection."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (real tokens) is part of the FFN contract for MoE routing; dense ignores it."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


def make_ffn(cfg: DecoderConfig, layer_idx: int) -> nn.Module:
    """Layer ``layer_idx``'s feed-forward ``(B, T, C) -> (B, T, C)``: GLM-4's dense SwiGLU, or a
    mixture of experts where ``cfg.moe`` has experts and lists this layer (empty list: all)."""
    moe = cfg.moe
    if moe.num_experts > 0 and (not moe.layers or layer_idx in moe.layers):
        from autoglm_phone.models.moe import MoEFeedForward  # lazy: dense models never need it

        return MoEFeedForward(
            cfg.hidden_size, moe.expert_intermediate_size or cfg.intermediate_size, moe
        )
    return SwiGLU(cfg.hidden_size, cfg.intermediate_size)


class Block(nn.Module):
    """Pre-norm block with GLM-4's extra post-attention and post-MLP RMSNorms."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = make_ffn(cfg, layer_idx)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: LayerKVCache | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``token_mask`` ``(B, T)`` marks real tokens so MoE routing skips padding."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + self.post_self_attn_layernorm(attn)
        x = x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x), token_mask))
        return x


class GLMDecoder(nn.Module):
    """Token embeddings, ``num_layers`` blocks, final norm and LM head.

    Used as the text tower (bidirectional, pooled: ``forward_features`` + ``forward_head``), as
    the language model (``forward`` returns logits) and to decode (``generate`` / ``stream``).
    With ``cfg.memory.enabled`` the blocks are ``memory.MemoryBlock`` and a sequence longer than
    ``memory.segment_len`` (or one continuing a ``memory`` state) runs segment by segment with a
    recurrent memory (``memory.py``): the same arguments, any length; shorter ones run exactly as
    without memory.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("text.vocab_size must be set (normally taken from the tokenizer)")
        self.cfg = cfg
        self.embed_dim = cfg.hidden_size
        block = Block
        if cfg.memory.enabled:
            from autoglm_phone.models.memory import MemoryBlock  # lazy: memory.py imports this

            block = MemoryBlock
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)
        self.reset_memory_parameters()
        # recompute each memory segment in backward: a grad-enabled forward then keeps only the
        # segment inputs and outputs, not every segment's activations (gradients are unchanged)
        self.checkpoint_segments = cfg.memory.checkpoint_segments

    def reset_memory_parameters(self) -> None:
        """Initialise the memory weights as documented (docs/MEMORY.md); nothing without memory.
        A GLM-4 checkpoint loaded into a memory decoder keeps these."""
        for layer in self.layers:
            if hasattr(layer, "reset_memory_parameters"):
                layer.reset_memory_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, nn.Parameter):
            module.reset_parameters(std=0.02)  # MoE experts: stacked weights, same init as dense

    def _embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)

    def forward_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        mode: AttentionMode | str = AttentionMode.CAUSAL,
        prefix_lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory: MemoryState | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``(B, T, C)``; ``attention_mask`` ``(B, T)`` is True on tokens.

        With a ``cache`` the ``T`` new tokens also attend to the cached ones, ``attention_mask``
        covers both (``(B, cache.length + T)``, as in transformers) and the cache grows in place.
        Position ids default to :func:`positions_from_padding` over that whole mask. With memory
        on, longer inputs (or a ``memory`` to continue) go segment by segment
        (:meth:`forward_with_memory`).
        """
        x = self._embed(input_ids, inputs_embeds)
        b, t = x.shape[:2]
        if self.cfg.memory.enabled and (t > self.cfg.memory.segment_len or memory is not None):
            if cache is not None or position_ids is not None:
                raise ValueError(
                    "with text.memory on, inputs longer than memory.segment_len take no cache or "
                    "position_ids: positions restart in every segment (use generate to decode)"
                )
            return self._segments().forward(
                x, self._padding(attention_mask, x), mode, prefix_lengths, memory
            )[0]
        past = 0 if cache is None else cache.length
        if past + t > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {past + t} exceeds text.max_seq_len={self.cfg.max_seq_len}"
            )
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.bool, device=x.device)
        attention_mask = attention_mask.bool()
        if attention_mask.shape != (b, past + t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"{(b, past + t)} (cached + new tokens)"
            )
        if position_ids is None:
            position_ids = positions_from_padding(attention_mask)[:, past:]  # (B, T)
        cos, sin = self.rotary(position_ids)
        mask = build_attention_mask(attention_mask, mode, prefix_lengths, num_queries=t)
        token_mask = attention_mask[:, past:]  # (B, T) the new tokens
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], token_mask)
        return self.norm(x)

    def _segments(self) -> SegmentRunner:
        from autoglm_phone.models.memory import SegmentRunner  # lazy: memory.py imports this

        if not self.cfg.memory.enabled:
            raise ValueError("this needs text.memory.enabled=true")
        return SegmentRunner(self)

    @staticmethod
    def _padding(attention_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if attention_mask.shape != x.shape[:2]:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                f"{tuple(x.shape[:2])}"
            )
        return attention_mask.bool()

    def init_memory(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> MemoryState:
        """The empty memory a sequence starts from (the learned slot inits, not yet readable)."""
        return self._segments().init_memory(batch_size, device, dtype)

    def forward_with_memory(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: AttentionMode | str = AttentionMode.CAUSAL,
        prefix_lengths: torch.Tensor | None = None,
        memory: MemoryState | None = None,
    ) -> tuple[torch.Tensor, MemoryState]:
        """Logits ``(B, T, V)`` of any length, segment by segment, and the memory after the last
        segment, to continue a stream (pass it back as ``memory``; a partial last segment is
        written too). A written memory is detached before every ``bptt_segments``-th segment."""
        x = self._embed(input_ids, inputs_embeds)
        hidden, memory = self._segments().forward(
            x, self._padding(attention_mask, x), mode, prefix_lengths, memory
        )
        return self.lm_head(hidden), memory

    def forward_head(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, pool: str = "mean"
    ) -> torch.Tensor:
        """Pool hidden states ``(B, T, C)`` over real tokens into ``(B, C)``."""
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
        if pool == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if pool == "last":
            last = attention_mask.long().cumsum(-1).argmax(-1)  # index of the last real token
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        raise ValueError(f"unknown pool {pool!r}")

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Next-token logits ``(B, T, vocab_size)``."""
        return self.lm_head(self.forward_features(input_ids, **kwargs))

    def aux_loss(self) -> torch.Tensor:
        """Sum of the auxiliary losses (MoE load balancing, ...) that layers set in the last
        forward, as a scalar; zero for a dense model."""
        losses = [
            m.aux_loss
            for m in self.layers.modules()
            if isinstance(getattr(m, "aux_loss", None), torch.Tensor)
        ]
        return sum(losses, self.embed_tokens.weight.new_zeros(()))

    def moe_stats(self) -> dict[int, dict]:
        """Layer index -> the ``stats`` dict its MoE FFN recorded in the last forward."""
        return {
            i: layer.mlp.stats
            for i, layer in enumerate(self.layers)
            if isinstance(getattr(layer.mlp, "stats", None), dict)
        }

    def stream(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        mode: AttentionMode | str = AttentionMode.PREFIX,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Decode with a KV cache, yielding each step's ``(B,)`` new tokens.

        The prompt (``input_ids`` ``(B, T)`` or ``inputs_embeds`` ``(B, T, C)``, left-padded as
        ``attention_mask`` says) is encoded once: in ``"prefix"`` mode bidirectionally (GLM), in
        ``"causal"`` mode causally. Each generated token then attends causally to everything
        before it. A row that emits one of ``stop_token_ids`` emits ``cfg.pad_token_id`` after it;
        decoding ends after ``max_new_tokens`` steps or once every row has stopped. Arguments are
        checked here, before the first step is asked for.
        """
        check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p)
        return self._decode(
            input_ids,
            inputs_embeds,
            attention_mask,
            max_new_tokens,
            dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p),
            stop_token_ids,
            mode,
            generator,
        )

    @torch.no_grad()
    def _decode(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        sampling: dict,
        stop_token_ids: Sequence[int],
        mode: AttentionMode | str,
        generator: torch.Generator | None,
    ) -> Iterator[torch.Tensor]:
        """:meth:`stream`'s loop, on checked arguments."""
        mode = AttentionMode(mode)
        if mode is AttentionMode.BIDIRECTIONAL:
            raise ValueError("generation needs mode 'prefix' or 'causal', not 'bidirectional'")
        x = self._embed(input_ids, inputs_embeds)  # (B, T, C)
        b, t = x.shape[:2]
        if t + max_new_tokens > self.cfg.max_seq_len and not self.cfg.memory.enabled:
            raise ValueError(
                f"prompt ({t}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"text.max_seq_len={self.cfg.max_seq_len}"
            )
        padding = self._padding(attention_mask, x)  # (B, T)
        if (padding.long().cummax(-1).values != padding.long()).any():
            raise ValueError("generation needs left-padded prompts (no padding after a real token)")
        prefix_lengths = padding.sum(-1) if mode is AttentionMode.PREFIX else None  # whole prompt
        hidden, step = self._prefill(x, padding, mode, prefix_lengths, max_new_tokens)  # (B, C)
        stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=x.device)
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        for _ in range(max_new_tokens):
            token = sample_next_token(self.lm_head(hidden), **sampling, generator=generator)  # (B,)
            token = token.masked_fill(done, self.cfg.pad_token_id)
            done = done | torch.isin(token, stop)
            yield token
            if done.all():
                return
            hidden = step(self.embed_tokens(token[:, None]))  # (B, 1, C) -> (B, C)

    def _prefill(
        self,
        x: torch.Tensor,
        padding: torch.Tensor,
        mode: AttentionMode,
        prefix_lengths: torch.Tensor | None,
        max_new_tokens: int,
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """Encode the prompt: the last token's hidden state ``(B, C)`` and the step function that
        takes the next token's embedding ``(B, 1, C)`` to its hidden state. Without memory a KV
        cache of the prompt and what follows; with memory the prompt goes segment by segment and
        the cache holds one segment (``memory.SegmentRunner``)."""
        if self.cfg.memory.enabled:
            runner = self._segments()
            hidden, memory, cache = runner.prefill(x, padding, mode, prefix_lengths)

            def step_memory(new: torch.Tensor) -> torch.Tensor:
                nonlocal memory
                out, memory = runner.decode_step(new, memory, cache)
                return out

            return hidden, step_memory
        b, t = x.shape[:2]
        kv = KVCache.from_config(
            self.cfg, b, t + max_new_tokens, capacity=t + KV_BLOCK, dtype=x.dtype, device=x.device
        )  # grows as tokens come, up to t + max_new_tokens
        state = {"padding": padding}  # grows by one column per step

        def features(new: torch.Tensor) -> torch.Tensor:
            return self.forward_features(
                inputs_embeds=new,
                attention_mask=state["padding"],
                mode=mode,
                prefix_lengths=prefix_lengths,
                cache=kv,
            )[:, -1]  # (B, C)

        def step_cached(new: torch.Tensor) -> torch.Tensor:
            ones = state["padding"].new_ones(b, 1)
            state["padding"] = torch.cat([state["padding"], ones], dim=1)
            return features(new)

        return features(x), step_cached

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        mode: AttentionMode | str = AttentionMode.PREFIX,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The new tokens ``(B, N)``, ``N <= max_new_tokens``; same arguments as :meth:`stream`."""
        steps = list(
            self.stream(
                input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop_token_ids=stop_token_ids,
                mode=mode,
                generator=generator,
            )
        )
        return torch.stack(steps, dim=1)  # (B, N), N >= 1
