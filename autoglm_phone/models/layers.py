"""The GLM-4 decoder's layers: attention masks, RMSNorm, RoPE, attention, SwiGLU and the block.

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
for a full forward or rectangular for a cached decoding step. ``make_ffn`` picks each layer's FFN:
dense SwiGLU, or a mixture of experts (``moe.py``) where ``cfg.moe`` asks for one. The decoder
that stacks these is ``glm.py``; the memory variant of the block is ``memory.py``.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from autoglm_phone.config import DecoderConfig
from autoglm_phone.models.generation import LayerKVCache


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
            start = leading_pads(padding_mask)  # (B,)
            end = start + prefix_lengths.to(device)
            key = k_idx[None, :]  # (1, K)
            in_prefix = (key >= start[:, None]) & (key < end[:, None])  # (B, K)
            q_in_prefix = in_prefix[:, k_len - q_len :]  # (B, Q)
            allowed = allowed | (q_in_prefix[:, :, None] & in_prefix[:, None, :])
    allowed = allowed & padding_mask[:, None, :]  # keys must be real
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])  # no empty rows
    return allowed[:, None]  # (B, 1, Q, K)


def leading_pads(padding_mask: torch.Tensor) -> torch.Tensor:
    """Padded positions before each row's first real token ``(B,)``: those where the running
    count of real tokens is still 0 (a cumsum; ExecuTorch has no ``cumprod`` kernel)."""
    return (padding_mask.long().cumsum(-1) == 0).sum(-1)


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
