"""Masked language modelling (MLM) on captions, with BERT's masking recipe.

BERT (Devlin et al. 2019, Sec. 3.1 and Appendix C.2) picks 15% of the tokens as targets and
replaces 80% of those with ``[MASK]``, 10% with a random token and leaves 10% unchanged, so the
encoder cannot learn that only ``[MASK]`` positions matter. ALBEF uses the same recipe for its
multimodal MLM. We keep it, with three choices of our own:

- special tokens (``[gMASK]``, ``<sop>``, padding, media markers, ...) are never targets, and the
  random replacement is drawn from the ordinary (non-special) ids only;
- every row with at least one maskable token gets at least one target, so each caption
  contributes to the loss. Captions here are ~10 tokens, so this raises the effective rate on
  an ``n``-token caption to ``0.15 + 0.85**n / n`` (~18% at ``n = 8``);
- the targets are the input positions themselves (no shift): the text runs through the decoder
  in bidirectional mode, as :meth:`AutoGLMModel.encode_text` does, and ``lm_head`` reads each
  position's own token.

Masking is cheapest in the data loader's collate function (CPU, in the workers)::

    masked_ids, labels = mask_tokens(
        input_ids, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
        special_ids=tok.all_special_ids, attention_mask=attention_mask, generator=g,
    )
    hidden = model.text.forward_features(masked_ids, attention_mask, mode="bidirectional")
    logits = model.text.lm_head(hidden)                               # (B, T, V)
    loss, acc = mlm_loss(logits, labels), masked_accuracy(logits, labels)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _ordinary_ids(
    vocab_size: int, special_ids: Sequence[int], device: torch.device
) -> torch.Tensor:
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    specials = [i for i in special_ids if 0 <= i < vocab_size]
    if specials:
        allowed[torch.tensor(specials, dtype=torch.long)] = False
    if not allowed.any():
        raise ValueError("every id is special: nothing to draw random replacements from")
    return allowed.nonzero().squeeze(1).to(device)  # (V',) on the host, then copied once


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    special_tokens_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``input_ids`` ``(B, T)``: returns ``(masked_ids, labels)``, both ``(B, T)``.

    A position can be a target unless its id is in ``special_ids``, ``special_tokens_mask`` is
    True there, or ``attention_mask`` is False there. ``labels`` holds the original id on targets
    and -100 elsewhere. ``vocab_size`` bounds the random replacements (use ``len(tokenizer)``, not
    a padded embedding size). The same ``generator`` state gives the same output.
    """
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    device = input_ids.device
    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    if special_ids:
        maskable &= ~torch.isin(input_ids, torch.tensor(list(special_ids), device=device))
    if special_tokens_mask is not None:
        maskable &= ~special_tokens_mask.bool()
    if attention_mask is not None:
        maskable &= attention_mask.bool()

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)  # (B, T)

    chosen = (uniform() < mask_prob) & maskable
    # rows left without a target get one, uniformly among their maskable positions
    pick = torch.where(maskable, uniform(), -1.0).argmax(dim=1)  # (B,)
    empty = maskable.any(dim=1) & ~chosen.any(dim=1)  # (B,)
    chosen |= F.one_hot(pick, input_ids.shape[1]).bool() & empty[:, None]

    split = uniform()  # 80% [MASK], 10% random token, 10% unchanged
    to_mask = chosen & (split < 0.8)
    to_random = chosen & (split >= 0.8) & (split < 0.9)
    pool = _ordinary_ids(vocab_size, special_ids, device)
    draw = torch.randint(len(pool), input_ids.shape, generator=generator, device=device)
    masked_ids = torch.where(to_mask, mask_token_id, input_ids)
    masked_ids = torch.where(to_random, pool[draw], masked_ids)
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    return masked_ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the targets: ``logits`` ``(..., V)``, ``labels`` ``(...)`` with -100
    off target. Mean over targets (fp32); 0, not NaN, when there are none."""
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (B * T, V)
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def masked_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of targets whose argmax is the original token (a tensor: no host sync)."""
    keep = labels != IGNORE_INDEX
    right = (logits.argmax(dim=-1) == labels) & keep
    return right.sum() / keep.sum().clamp(min=1)


def token_counts(
    input_ids: torch.Tensor,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """How often each id ``(V,)`` occurs among the maskable tokens of ``input_ids`` (the training
    captions), i.e. the unigram distribution of MLM targets."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    if special_ids:
        keep &= ~torch.isin(input_ids, torch.tensor(list(special_ids), device=input_ids.device))
    if attention_mask is not None:
        keep &= attention_mask.bool()
    return torch.bincount(input_ids[keep], minlength=vocab_size)


def unigram_baseline_accuracy(
    labels: torch.Tensor, train_token_counts: torch.Tensor
) -> torch.Tensor:
    """Accuracy on ``labels``' targets of always predicting the most frequent training token.

    The floor an MLM head must beat: it uses no context at all. ``train_token_counts`` ``(V,)``
    is :func:`token_counts` over the training captions.
    """
    top = train_token_counts.argmax().to(labels.device)
    keep = labels != IGNORE_INDEX
    return ((labels == top) & keep).sum() / keep.sum().clamp(min=1)
