"""Prefix language-model loss for captioning and instruction following.

GLM (Du et al. 2022; GLM-130B, Zeng et al. 2022) attends bidirectionally over the prefix (here:
media tokens and the prompt) and causally over the part it generates; SimVLM (Wang et al. 2022)
trains captioning the same way ("PrefixLM"). The loss is next-token cross-entropy on the
response tokens only: the logits at position ``t`` predict the token at ``t + 1``, so a response
token at ``t`` is scored by the logits at ``t - 1`` (the first one by the prefix's last
position, which sees the whole prefix but none of the response).

:func:`align_to_prefix` lays the text's ids and loss mask out like
:meth:`AutoGLMModel.build_prefix` lays out its embeddings, and gives the ``prefix_lengths`` the
decoder's ``"prefix"`` mode needs. A training step on chat batches
(:func:`autoglm_phone.data.instructions.tokenize_chat`)::

    embeds, mask, _ = model.build_prefix(images, audio, batch["input_ids"], batch["attention_mask"])
    ids, loss_mask, prefix_lengths = align_to_prefix(
        batch["input_ids"], batch["attention_mask"], batch["loss_mask"], mask
    )
    logits = model.text(inputs_embeds=embeds, attention_mask=mask, mode="prefix",
                        prefix_lengths=prefix_lengths)                 # (B, P, V)
    loss, accuracy = prefix_lm_loss(logits, ids, loss_mask)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def prefix_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy and accuracy on the tokens where ``loss_mask`` ``(B, T)`` is True.

    ``logits`` ``(B, T, V)`` come from the same ``(B, T)`` positions as ``input_ids``. Both values
    are means over all scored tokens of the batch (fp32); 0, not NaN, when there are none.
    """
    if logits.shape[:2] != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} and loss_mask "
            f"{tuple(loss_mask.shape)} must share (B, T)"
        )
    pred = logits[:, :-1].float()  # (B, T - 1, V): position t predicts token t + 1
    target = input_ids[:, 1:]  # (B, T - 1)
    scored = loss_mask[:, 1:].bool()  # (B, T - 1); a mask on token 0 cannot be scored
    count = scored.sum().clamp(min=1)
    labels = target.masked_fill(~scored, IGNORE_INDEX)
    flat = pred.reshape(-1, pred.shape[-1])  # (B * (T - 1), V)
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    right = (pred.argmax(dim=-1) == target) & scored
    return total / count, right.sum() / count


def align_to_prefix(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    prefix_mask: torch.Tensor,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text ids and loss mask ``(B, T)`` laid out like ``build_prefix``'s output ``(B, P)``.

    ``build_prefix`` puts the media blocks first and the text's real tokens last, left-padded, so
    each row's real text tokens end the row. ``prefix_mask`` is its returned attention mask. The
    media and padding positions get ``pad_id`` and no loss. Returns ``ids`` ``(B, P)``,
    ``loss_mask`` ``(B, P)`` and ``prefix_lengths`` ``(B,)``: the real positions before the first
    response token (media + prompt), which see each other bidirectionally in ``"prefix"`` mode.
    """
    b, t = input_ids.shape
    p = prefix_mask.shape[1]
    if p < t:
        raise ValueError(f"prefix_mask has {p} positions, fewer than the {t} text positions")
    real = attention_mask.bool()
    response = loss_mask.bool() & real
    # a stable sort puts the padding first and keeps the real tokens in order: right-aligned
    order = real.long().argsort(dim=1, stable=True)  # (B, T)
    ids = input_ids.gather(1, order).masked_fill(~real.gather(1, order), pad_id)
    ids = F.pad(ids, (p - t, 0), value=pad_id)  # (B, P)
    scored = F.pad(response.gather(1, order), (p - t, 0), value=False)  # (B, P)
    from_response = real & (response.long().cumsum(dim=1) > 0)  # (B, T) response and after
    prefix_lengths = prefix_mask.sum(dim=1) - from_response.sum(dim=1)  # (B,)
    return ids, scored, prefix_lengths
