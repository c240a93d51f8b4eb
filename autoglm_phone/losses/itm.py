"""Image/audio-text matching (ITM) with contrastive hard negatives, as ALBEF.

ALBEF (Li et al. 2021, "Align before Fuse", Sec. 3.2) trains a binary matched / not-matched head
on the fused media + text representation. Each media item gets one negative caption and each
caption one negative media item, drawn with probability ``softmax(ITC similarity)`` over the
in-batch non-positives, so the negatives are the ones the contrastive space finds confusable.
Like BLIP (Li et al. 2022) we mark positives by a caption id (``keys``) rather than by the
diagonal, because the synthetic data repeats captions: two items with the same caption text are
both positives and never each other's negatives.

Sampling is one ``argmax(w / q)`` with ``q ~ Exp(1)`` per row (the exponential race, i.e. the
Gumbel-max trick): the same draw as ``torch.multinomial(w, 1)``, bit for bit, but without the
validity checks that make ``torch.multinomial`` call ``.item()`` (a host sync on CUDA), and
without failing on rows whose weights are all zero. Such rows (every candidate is a positive:
batch size 1, or a batch of one caption) come back with ``valid`` False; :func:`itm_targets`
turns them into ignored labels, so the shapes stay static and the loss never sees a NaN.

Typical step, one process (``sim = logit_scale * media_features @ text_features.T``)::

    keys = caption_keys(captions)                                          # (B,)
    neg_text, ok_text = sample_hard_negatives(sim, keys, keys)             # a caption per item
    neg_media, ok_media = sample_hard_negatives(sim.T, keys, keys)         # an item per caption
    media_idx, text_idx, labels = itm_targets(neg_text, neg_media, ok_text, ok_media)  # (3B,)
    logits = itm_head(fuse(media_tokens[media_idx], input_ids[text_idx]))  # (3B, 2)
    loss = itm_loss(logits, labels)

Across ranks, see :func:`sample_hard_negatives_across_ranks`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of a pair without a valid negative (``F.cross_entropy``'s default)


def caption_keys(captions: Sequence[str]) -> torch.Tensor:
    """Caption ids ``(B,)`` int64: equal exactly when the caption texts are equal.

    A stable hash (not Python's per-process salted ``hash``), so ids agree across ranks and runs.
    """
    ids = [
        int.from_bytes(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest(), "little") >> 1
        for c in captions
    ]  # 63 bits: fits int64
    return torch.tensor(ids, dtype=torch.long)


def hard_negative_weights(
    sim: torch.Tensor, keys_row: torch.Tensor, keys_col: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's sampling weights: ``softmax`` over each row's non-positives, zero on positives.

    ``sim`` ``(B, N)`` holds similarity logits (any float dtype; read in fp32, without gradient,
    NaN as 0); candidate ``j`` is a positive for row ``i`` when ``keys_row[i] == keys_col[j]``.
    Returns the weights ``(B, N)`` (rows sum to 1, or to 0 where no negative exists) and
    ``valid`` ``(B,)``.
    """
    if sim.dim() != 2 or sim.shape != (keys_row.shape[0], keys_col.shape[0]):
        raise ValueError(
            f"sim has shape {tuple(sim.shape)}, expected (len(keys_row), len(keys_col)) = "
            f"({keys_row.shape[0]}, {keys_col.shape[0]})"
        )
    keys_row, keys_col = keys_row.to(sim.device), keys_col.to(sim.device)
    negative = keys_row[:, None] != keys_col[None, :]  # (B, N)
    valid = negative.any(dim=1)  # (B,)
    logits = sim.detach().float().nan_to_num(0.0)  # +-inf -> the largest finite values
    # finfo.min rather than -inf: a row of positives only gives a uniform softmax, never NaN
    logits = logits.masked_fill(~negative, torch.finfo(torch.float32).min)
    weights = logits.softmax(dim=1) * negative  # (B, N) exactly 0 on positives
    return weights, valid


def sample_hard_negatives(
    sim: torch.Tensor,
    keys_row: torch.Tensor,
    keys_col: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative column per row, drawn with :func:`hard_negative_weights`.

    Returns ``neg_index`` ``(B,)`` int64 in ``[0, N)`` and ``valid`` ``(B,)`` bool. Where ``valid``
    is False (every candidate shares the row's key) ``neg_index`` is 0 and means nothing.
    ``generator`` must live on ``sim``'s device. No Python loop over rows, no host sync.
    """
    weights, valid = hard_negative_weights(sim, keys_row, keys_col)
    q = torch.empty_like(weights).exponential_(1.0, generator=generator)  # (B, N) ~ Exp(1)
    # argmax(w / q) ~ Categorical(w) (what torch.multinomial does for one sample); positives are
    # pinned below every candidate so that even a q of 0 (0 / 0 = NaN) cannot select one
    scores = torch.where(weights > 0, weights / q, -1.0)  # (B, N)
    neg_index = scores.argmax(dim=1)
    return torch.where(valid, neg_index, 0), valid


def sample_hard_negatives_across_ranks(
    sim: torch.Tensor,
    keys: torch.Tensor | None,
    offset: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_hard_negatives` with candidates from every rank (BLIP style).

    ``sim`` ``(B, N)``: this rank's ``B`` rows against all ``N = world_size * B`` candidates,
    gathered in rank order (what ``torch.distributed.all_gather`` + ``torch.cat`` give), e.g.
    ``logit_scale * media_features @ all_text_features.T``. ``keys`` ``(N,)`` are the gathered
    caption ids (None: every item is its own and only positive), and ``offset`` (``rank * B``) is
    where this rank's rows sit among the candidates, so row ``i``'s keys are
    ``keys[offset + i]``. The returned indices point into the gathered batch: select the
    negatives' tokens from gathered tensors (with gradient, e.g. open_clip's ``gather_features``)
    and use ``offset`` in :func:`itm_targets`. Every rank must hold the same ``B``.
    """
    b, n = sim.shape
    if not 0 <= offset <= n - b:
        raise ValueError(f"offset={offset} leaves no room for {b} rows among {n} candidates")
    if keys is None:
        keys = torch.arange(n, device=sim.device)
    return sample_hard_negatives(sim, keys[offset : offset + b], keys, generator)


def itm_targets(
    neg_text: torch.Tensor,
    neg_media: torch.Tensor,
    valid_text: torch.Tensor,
    valid_media: torch.Tensor,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``3B`` ITM pairs in ALBEF's order and their labels (1 = matched).

    Rows are ``[B positive pairs, B media with a negative caption, B captions with a negative
    media item]``. Returns ``media_index`` ``(3B,)`` and ``text_index`` ``(3B,)`` (indices into the
    batch, or into the gathered batch with ``offset = rank * B``) and ``labels`` ``(3B,)``:
    1, 0, 0, with :data:`IGNORE_INDEX` on negatives that are not ``valid``.
    """
    b = neg_text.shape[0]
    own = torch.arange(b, device=neg_text.device) + offset  # (B,) this rank's items
    media_index = torch.cat([own, own, neg_media])
    text_index = torch.cat([own, neg_text, own])
    ones = torch.ones(b, dtype=torch.long, device=own.device)
    negative = torch.zeros_like(ones)
    labels = torch.cat(
        [
            ones,
            negative.masked_fill(~valid_text.to(own.device), IGNORE_INDEX),
            negative.masked_fill(~valid_media.to(own.device), IGNORE_INDEX),
        ]
    )
    return media_index, text_index, labels


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ``(M, 2)`` matched / not-matched logits, mean over labelled pairs.

    Pairs labelled :data:`IGNORE_INDEX` are left out; with none left the loss is 0 (not NaN).
    """
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def itm_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of labelled pairs whose argmax is right (a tensor: no host sync)."""
    keep = labels != IGNORE_INDEX
    right = (logits.argmax(dim=-1) == labels) & keep
    return right.sum() / keep.sum().clamp(min=1)
