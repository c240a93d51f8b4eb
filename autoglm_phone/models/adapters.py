"""Low-rank (LoRA-style) projections between widths, and the media adapters into the decoder.

A ``d_in x d_out`` map factored as ``up(down(x))`` with rank ``r`` costs ``r * (d_in + d_out)``
parameters instead of ``d_in * d_out`` (Hu et al. 2021, LoRA). It maps each tower into the shared
contrastive space (:class:`LowRankProjection`) and, inside a :class:`MediaAdapter`, each tower's
tokens into the decoder's ``hidden_size``, LLaVA-style (Liu et al. 2023) but low-rank:

    tokens (B, N, D) -> pool to K tokens (B, K, D) -> project (B, K, C) -> + modality embedding
                                                                  [+ per-slot position embedding]

Pooling fixes the number of decoder tokens per image / clip whatever the tower produced:

- ``"avg"`` (default): adaptive average pooling, parameter-free and order-preserving. Image
  tokens are pooled on their square patch grid (``k x k`` output, neighbours merge with
  neighbours, as PLLaVA, Xu et al. 2024, pools frames); audio tokens over time.
  Averaging commutes with the linear projection, so pooling first only saves compute.
- ``"attn"``: ``K`` learned queries cross-attend to all tokens: CoCa's attentional pooler
  (Yu et al. 2022), open_clip's ``AttentionalPooler`` itself; it learns what to keep.

With ``position_embed`` each of the K slots also gets its own learned embedding, so which grid
cell (or stretch of time) a token came from is in its content, not only in its index. The
decoder's RoPE gives only relative offsets along one axis; a captioner asked "where" must
otherwise infer the 2-D cell from distances to the text (docs/RECIPES.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from open_clip.transformer import AttentionalPooler
from torch import nn


class LowRankProjection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rank: int) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"projection rank must be positive, got {rank}")
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class AvgTokenPool(nn.Module):
    """Adaptive average pooling of ``(B, N, D)`` tokens to ``(B, K, D)``; on a square grid if
    ``grid`` (``N`` and ``K`` squares), else along the sequence."""

    def __init__(self, num_tokens: int, grid: bool = False) -> None:
        super().__init__()
        self.num_tokens, self.grid = num_tokens, grid
        self.side = math.isqrt(num_tokens)
        if grid and self.side**2 != num_tokens:
            raise ValueError(f"grid pooling needs a square number of tokens, got {num_tokens}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.grid:
            x = F.adaptive_avg_pool1d(rearrange(x, "b n d -> b d n"), self.num_tokens)  # (B, D, K)
            return rearrange(x, "b d k -> b k d")
        side = math.isqrt(x.shape[1])
        if side**2 != x.shape[1]:
            raise ValueError(f"grid pooling needs a square patch grid, got {x.shape[1]} tokens")
        x = rearrange(x, "b (h w) d -> b d h w", h=side)
        x = F.adaptive_avg_pool2d(x, self.side)  # (B, D, k, k)
        return rearrange(x, "b d h w -> b (h w) d")


class AttentionTokenPool(AttentionalPooler):
    """``K`` learned queries attend to the tokens ``(B, N, D) -> (B, K, D)``: open_clip's
    ``AttentionalPooler`` (CoCa), 64-wide heads where the width allows, torch's LayerNorm (as
    before it came from open_clip, so saved adapters load unchanged)."""

    def __init__(self, dim: int, num_tokens: int) -> None:
        super().__init__(
            d_model=dim,
            context_dim=dim,
            n_head=dim // 64 if dim % 64 == 0 else 1,
            n_queries=num_tokens,
            norm_layer=nn.LayerNorm,
        )


def build_token_pool(pool: str, dim: int, num_tokens: int, grid: bool = False) -> nn.Module:
    if pool == "avg":
        return AvgTokenPool(num_tokens, grid)
    if pool == "attn":
        return AttentionTokenPool(dim, num_tokens)
    raise ValueError(f"unknown token pool {pool!r}; expected 'avg' or 'attn'")


class MediaAdapter(nn.Module):
    """Tower tokens ``(B, N, D)`` -> ``num_tokens`` decoder embeddings ``(B, K, C)``: pool, project
    at low rank, add the modality's learned embedding to every token and, with
    ``position_embed``, a learned embedding per output slot. With ``summary_token`` the tower's
    pooled feature ``(B, D)`` (the one ITC projects) goes first, through the same projection:
    ``(B, 1 + K, C)``, as ALBEF/BLIP's fusion layers see the ViT's [CLS] beside its patches."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        num_tokens: int,
        pool: str = "avg",
        grid: bool = False,
        position_embed: bool = False,
        summary_token: bool = False,
    ) -> None:
        super().__init__()
        self.summary_token = summary_token
        self.num_tokens = num_tokens + int(summary_token)  # decoder tokens per item
        self.pool = build_token_pool(pool, in_dim, num_tokens, grid)
        self.proj = LowRankProjection(in_dim, out_dim, rank)
        self.modality_embed = nn.Parameter(torch.empty(out_dim))
        nn.init.normal_(self.modality_embed, std=0.02)  # the decoder's token-embedding scale
        self.position_embed = None
        if position_embed:
            self.position_embed = nn.Parameter(torch.empty(self.num_tokens, out_dim))
            nn.init.normal_(self.position_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pool(tokens)  # (B, K, D)
        if self.summary_token:
            if pooled is None:
                raise ValueError(
                    "this adapter has summary_token=True: pass the tower's pooled feature"
                )
            x = torch.cat([pooled[:, None].to(x.dtype), x], dim=1)  # (B, 1 + K, D)
        out = self.proj(x) + self.modality_embed
        return out if self.position_embed is None else out + self.position_embed
