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
masks (GLM-130B, Zeng et al. 2022: bidirectional over the prefix, causal over the rest).
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from autoglm_phone.config import DecoderConfig


class AttentionMode(str, Enum):
    CAUSAL = "causal"
    BIDIRECTIONAL = "bidirectional"
    PREFIX = "prefix"


def build_attention_mask(
    padding_mask: torch.Tensor,
    mode: AttentionMode | str = AttentionMode.CAUSAL,
    prefix_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean attention mask ``(B, 1, T, T)``, True where query ``i`` may attend key ``j``.

    ``padding_mask`` is ``(B, T)``, True on real tokens. In prefix mode, ``prefix_lengths`` ``(B,)``
    counts the tokens (from the first real one) that see each other bidirectionally; later tokens
    are causal. Padded query rows attend only to themselves so SDPA never sees an empty row.
    """
    mode = AttentionMode(mode)
    b, t = padding_mask.shape
    device = padding_mask.device
    idx = torch.arange(t, device=device)
    if mode is AttentionMode.BIDIRECTIONAL:
        allowed = torch.ones(t, t, dtype=torch.bool, device=device).expand(b, t, t)
    else:
        allowed = (idx[None, :] <= idx[:, None]).expand(b, t, t)  # (B, T, T) causal
        if mode is AttentionMode.PREFIX:
            if prefix_lengths is None:
                raise ValueError("prefix attention needs prefix_lengths")
            # the prefix starts at the first real token (left padding shifts it)
            start = (~padding_mask).long().cumprod(-1).sum(-1)  # (B,) leading pads
            end = start + prefix_lengths.to(device)
            in_prefix = (idx[None, :] >= start[:, None]) & (idx[None, :] < end[:, None])  # (B, T)
            allowed = allowed | (in_prefix[:, :, None] & in_prefix[:, None, :])
    allowed = allowed & padding_mask[:, None, :]  # keys must be real
    allowed = allowed | torch.eye(t, dtype=torch.bool, device=device)  # no empty rows
    return allowed[:, None]  # (B, 1, T, T)


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


class RotaryEmbedding(nn.Module):
    """Frequencies for the rotary part of each head (``rotary_dim`` channels)."""

    def __init__(self, rotary_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, rotary_dim / 2)
        return freqs.cos(), freqs.sin()


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
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, H, T, D)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    """GLM-4's MLP: one fused gate/up projection, SiLU gate, down projection."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class Block(nn.Module):
    """Pre-norm block with GLM-4's extra post-attention and post-MLP RMSNorms."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        x = x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))
        return x


class GLMDecoder(nn.Module):
    """Token embeddings, ``num_layers`` blocks, final norm and LM head.

    Used both as the text tower (bidirectional, pooled: ``forward_features`` + ``forward_head``)
    and as the language model (``forward`` returns logits).
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("text.vocab_size must be set (it is normally taken from the tokenizer)")
        self.cfg = cfg
        self.embed_dim = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        mode: AttentionMode | str = AttentionMode.CAUSAL,
        prefix_lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``(B, T, hidden_size)``; ``attention_mask`` is ``(B, T)`` padding."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        b, t = x.shape[:2]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds text.max_seq_len={self.cfg.max_seq_len}")
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
        attention_mask = attention_mask.bool()
        if position_ids is None:
            position_ids = positions_from_padding(attention_mask)
        cos, sin = self.rotary(position_ids)
        mask = build_attention_mask(attention_mask, mode, prefix_lengths)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

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
