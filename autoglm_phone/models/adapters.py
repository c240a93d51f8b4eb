"""Low-rank (LoRA-style) projections between widths.

A ``d_in x d_out`` map factored as ``up(down(x))`` with rank ``r``: ``r * (d_in + d_out)``
parameters instead of ``d_in * d_out`` (Hu et al. 2021, LoRA), used to map each tower into the
shared contrastive space and, later, into the decoder's width.
"""

from __future__ import annotations

import torch
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
