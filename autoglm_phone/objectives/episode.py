"""Long-context episodes (``autoglm_phone.data.episodes``) laid out for the decoder, and their
prefix-LM objective: next-token loss on the answer only, everything before it the prefix.

A row is ``[gMASK]<sop>``, then per item its media block (``<begin> tokens <end>``,
:meth:`AutoGLMModel.media_block`) and its caption's tokens, then the question's chat turn and
the answer (+ end of text)::

    [gMASK]<sop> <boi> img <eoi> " the first image: ..." <boa> aud <eoa> " the first sound: ..."
    ... <|user|>\\nWhat colour was the first image?<|assistant|>\\n | blue<|endoftext|>
    |<------------------------------ prefix (bidirectional) ------------------------>| causal

Training rows are right-padded (the prefix starts at position 0); generation rows are
left-padded, as :meth:`AutoGLMModel.assemble` pads, so ``model.text.generate(...,
mode="prefix")`` continues every row after its last real token. :func:`layout_episodes` also
returns where the asked item's caption ends and where the question ends: their difference is
the distance, in tokens, the answer has to travel (eval.py buckets accuracy by it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from autoglm_phone.losses.lm import IGNORE_INDEX
from autoglm_phone.objectives.features import Features, ObjectiveOutput

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel

EPISODE = "episode"  # the modality name of episode batches (data.modalities=[episode])


@dataclass
class EpisodeLayout:
    """One batch of episodes as decoder input, padded to ``P`` positions."""

    inputs_embeds: torch.Tensor  # (B, P, C)
    attention_mask: torch.Tensor  # (B, P) bool, True on real positions
    input_ids: torch.Tensor  # (B, P) text ids (the pad id at media and padding positions)
    loss_mask: torch.Tensor  # (B, P) True on the answer tokens (and their end of text)
    prefix_lengths: torch.Tensor  # (B,) real positions before the answer
    asked_end: torch.Tensor  # (B,) position of the asked item's last caption token
    question_end: torch.Tensor  # (B,) position of the last prefix token (predicts the answer)

    @property
    def labels(self) -> torch.Tensor:
        """``input_ids`` with ``-100`` everywhere but the answer tokens ``(B, P)``."""
        return self.input_ids.masked_fill(~self.loss_mask, IGNORE_INDEX)

    @property
    def distance(self) -> torch.Tensor:
        """Tokens from the asked item's caption to the question's end ``(B,)``."""
        return self.question_end - self.asked_end


def _rows(
    batch: dict[str, Any], block_len: dict[str, int], answers: bool
) -> list[tuple[list[int], list[bool], int, int]]:
    """Per episode: ids (0 where media go), media flags, the prefix length and the asked item's
    last caption position."""
    rows = []
    for head, items, question, answer, asked in zip(
        batch["head_ids"],
        batch["items"],
        batch["question_ids"],
        batch["answer_ids"],
        batch["asked"].tolist(),
        strict=True,
    ):
        ids, media = list(head), [False] * len(head)
        asked_end = -1
        for k, (modality, _, text) in enumerate(items):
            ids += [0] * block_len[modality] + list(text)
            media += [True] * block_len[modality] + [False] * len(text)
            if k == asked:
                asked_end = len(ids) - 1
        ids += list(question)
        media += [False] * len(question)
        prefix = len(ids)
        tail = list(answer) if answers else []
        rows.append((ids + tail, media + [False] * len(tail), prefix, asked_end))
    return rows


def layout_episodes(
    model: AutoGLMModel, batch: dict[str, Any], *, answers: bool = True, left_pad: bool = False
) -> EpisodeLayout:
    """Embed a collated episode batch (``app/datamodule.py``'s ``EpisodeCollate``): every
    modality's media through its tower in one pass, blocks and caption embeddings interleaved.
    ``answers=False`` stops each row after the question (the generation prompt)."""
    kwargs = {"sample_rate": int(batch["sample_rate"])} if batch.get("sample_rate") else {}
    blocks = {  # modality -> (M, K + 2, C), one row per item of that modality in the batch
        m: model.media_block(m, model.embed_media(m, media, **kwargs))
        for m, media in batch["media"].items()
    }
    block_len = {m: b.shape[1] for m, b in blocks.items()}
    rows = _rows(batch, block_len, answers)
    width = max(len(ids) for ids, *_ in rows)
    pad = model.cfg.text.pad_token_id
    b = len(rows)
    input_ids = torch.full((b, width), pad, dtype=torch.long)
    is_media = torch.zeros(b, width, dtype=torch.bool)
    mask = torch.zeros(b, width, dtype=torch.bool)
    loss_mask = torch.zeros(b, width, dtype=torch.bool)
    prefix_lengths, asked_end, question_end = (torch.zeros(b, dtype=torch.long) for _ in range(3))
    order: list[torch.Tensor] = []  # media blocks in row-major order of their positions
    for i, ((ids, media, prefix, asked), items) in enumerate(
        zip(rows, batch["items"], strict=True)
    ):
        start = width - len(ids) if left_pad else 0
        span = slice(start, start + len(ids))
        input_ids[i, span] = torch.tensor(ids)
        is_media[i, span] = torch.tensor(media, dtype=torch.bool)
        mask[i, span] = True
        loss_mask[i, start + prefix : start + len(ids)] = True
        prefix_lengths[i], asked_end[i], question_end[i] = prefix, start + asked, start + prefix - 1
        order += [blocks[m][r] for m, r, _ in items]
    embeds = model.text.embed_tokens(input_ids)  # (B, P, C)
    input_ids = input_ids.masked_fill(is_media, pad)
    if order:
        media_tokens = torch.cat(order).to(embeds.dtype)  # (sum of block lengths, C)
        embeds = embeds.masked_scatter(is_media[..., None].to(embeds.device), media_tokens)
    device = embeds.device
    return EpisodeLayout(
        embeds,
        mask.to(device),
        input_ids.to(device),
        loss_mask.to(device),
        prefix_lengths.to(device),
        asked_end.to(device),
        question_end.to(device),
    )


def answer_logits(model: AutoGLMModel, layout: EpisodeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, V)`` at the positions that predict an answer token, and those tokens
    ``(N,)``: the prefix LM over the whole row, the LM head only where it is scored."""
    hidden = model.text.forward_features(
        inputs_embeds=layout.inputs_embeds,
        attention_mask=layout.attention_mask,
        mode="prefix",
        prefix_lengths=layout.prefix_lengths,
    )  # (B, P, C)
    scored = layout.loss_mask[:, 1:]  # (B, P - 1): position t predicts token t + 1
    logits = model.text.lm_head(hidden[:, :-1][scored])  # (N, V)
    return logits, layout.input_ids[:, 1:][scored]


class EpisodeLM:
    """Prefix-LM loss on the answers of episode batches; metrics: token accuracy and the share
    of episodes whose every answer token is right (``episode_acc``, teacher-forced argmax)."""

    name = "episode"

    def __call__(
        self, model: AutoGLMModel, batch: dict[str, Any], feats: Features
    ) -> ObjectiveOutput:
        if batch.get("modality") != EPISODE:
            raise ValueError("objective.episode_weight > 0 needs episode batches (data=episodes)")
        layout = layout_episodes(model, batch)
        logits, target = answer_logits(model, layout)
        loss = F.cross_entropy(logits.float(), target)
        right = logits.argmax(-1) == target  # (N,)
        # per episode: all of its answer tokens right (rows own consecutive runs of N)
        per_row = layout.loss_mask[:, 1:].sum(1)  # (B,)
        row_of = torch.repeat_interleave(torch.arange(len(per_row), device=right.device), per_row)
        wrong = torch.zeros(len(per_row), device=right.device).index_add(
            0, row_of, (~right).float()
        )
        metrics = {
            "episode_tok_acc": right.float().mean(),
            "episode_acc": (wrong == 0).float().mean(),
        }
        return ObjectiveOutput(loss, metrics, model.text.aux_loss())
