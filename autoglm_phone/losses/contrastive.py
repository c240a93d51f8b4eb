"""Image/audio-text contrastive (ITC, InfoNCE) loss.

We use open_clip's ``ClipLoss`` as is: it all-gathers features across processes (with gradient)
so every rank sees the global batch's negatives, and it is the reference CLIP implementation.
"""

from __future__ import annotations

from open_clip.loss import ClipLoss


def itc_loss(rank: int = 0, world_size: int = 1) -> ClipLoss:
    """Symmetric InfoNCE over the global batch; call as ``loss(**model(...))``."""
    return ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)
