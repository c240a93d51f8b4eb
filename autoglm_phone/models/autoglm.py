"""AutoGLMModel: vision and audio towers, the GLM decoder, adapters between them, a shared space.

Two uses of the same towers and decoder:

- contrastive (ITC) pretraining: ``forward`` returns a dict whose keys are the contrastive loss's
  arguments (open_clip style), so the training glue is one line: ``loss(**model(...))``;
- multimodal generation: :class:`~autoglm_phone.models.adapters.MediaAdapter` turns tower tokens
  into decoder embeddings, :meth:`AutoGLMModel.build_prefix` lays them out with GLM's media
  markers in front of the prompt, and :meth:`AutoGLMModel.generate` decodes from that prefix
  (bidirectional over the prefix, GLM-130B style).

Each media modality is one :class:`Modality` entry in :data:`MODALITY_TABLE` (its tower, ITC
projection, adapter and markers), so the methods below loop over the table instead of branching.
Saved folders are :mod:`autoglm_phone.models.io`'s business, size accounting
:mod:`autoglm_phone.models.size`'s; ``save_pretrained``, ``from_pretrained`` and ``summary``
delegate there. A training checkpoint loads with :func:`autoglm_phone.load_model`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_phone.config import MultiModalConfig
from autoglm_phone.losses.contrastive import clamped_logit_scale
from autoglm_phone.losses.lm import align_to_prefix
from autoglm_phone.losses.mlm import mask_tokens
from autoglm_phone.models import io
from autoglm_phone.models.adapters import LowRankProjection, MediaAdapter
from autoglm_phone.models.glm import AttentionMode, GLMDecoder
from autoglm_phone.models.io import (  # noqa: F401  (re-exported: the names' old home)
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    override_config,
    read_config,
    write_config,
)
from autoglm_phone.models.size import (  # noqa: F401  (re-exported: the names' old home)
    PRECISIONS,
    ModelSummary,
    SummaryRow,
    kv_cache_bytes,
    model_summary,
    weight_bytes,
)
from autoglm_phone.models.towers import AudioTower, TowerOutput, VisionTower


@dataclass(frozen=True)
class Modality:
    """One media modality: which submodules serve it and how its block is marked.

    The attribute names are the state-dict prefixes, so they are part of the saved format."""

    name: str  # what callers pass: model(modality, ...), encode_media(modality, ...)
    tower: str  # the tower's attribute; also its config's field on MultiModalConfig
    make_tower: Callable[[Any], nn.Module]  # tower from its config (cfg.<tower>)
    proj: str  # ITC projection into the shared space
    adapter: str  # MediaAdapter into the decoder
    tokens: str  # AdapterConfig field: decoder tokens per item
    grid: bool  # the adapter pools on a square patch grid (images) or along time
    begin: str  # SpecialTokens field of the block's opening marker
    end: str  # ... and of its closing one
    takes_sample_rate: bool  # the tower resamples: tower(media, sample_rate)


# in the order of build_prefix's blocks; construction follows it too (initial weights depend on it)
MODALITY_TABLE: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality(
            name="image", tower="vision", make_tower=VisionTower, proj="vision_proj",
            adapter="vision_adapter", tokens="image_tokens", grid=True,
            begin="begin_of_image", end="end_of_image", takes_sample_rate=False,
        ),
        Modality(
            name="audio", tower="audio", make_tower=AudioTower, proj="audio_proj",
            adapter="audio_adapter", tokens="audio_tokens", grid=False,
            begin="begin_of_audio", end="end_of_audio", takes_sample_rate=True,
        ),
    )
}  # fmt: skip
MODALITIES = tuple(MODALITY_TABLE)


def modality_of(name: str) -> Modality:
    if name not in MODALITY_TABLE:
        raise ValueError(f"unknown modality {name!r}; expected one of {MODALITIES}")
    return MODALITY_TABLE[name]


class AutoGLMModel(nn.Module):
    # built from MODALITY_TABLE (names fixed: they are the state-dict prefixes)
    vision: VisionTower
    audio: AudioTower
    vision_proj: LowRankProjection
    audio_proj: LowRankProjection
    vision_adapter: MediaAdapter
    audio_adapter: MediaAdapter

    def __init__(self, cfg: MultiModalConfig) -> None:
        super().__init__()
        self.cfg = cfg
        for m in MODALITY_TABLE.values():  # vision, audio
            setattr(self, m.tower, m.make_tower(getattr(cfg, m.tower)))
        self.text = GLMDecoder(cfg.text)
        r, e = cfg.proj_rank, cfg.embed_dim
        for m in MODALITY_TABLE.values():  # vision_proj, audio_proj
            setattr(self, m.proj, LowRankProjection(self.tower_of(m).embed_dim, e, r))
        self.text_proj = LowRankProjection(self.text.embed_dim, e, r)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        # built last, so the modules above draw the same initial weights as before they existed
        a, c = cfg.adapter, self.text.embed_dim
        shared = dict(
            out_dim=c,
            rank=a.rank,
            pool=a.pool,
            position_embed=a.position_embed,
            summary_token=a.summary_token,
        )
        for m in MODALITY_TABLE.values():  # vision_adapter, audio_adapter
            adapter = MediaAdapter(
                self.tower_of(m).embed_dim, num_tokens=getattr(a, m.tokens), grid=m.grid, **shared
            )
            setattr(self, m.adapter, adapter)
        # ITM: matched / not matched from the fused [media; text] sequence (ALBEF)
        self.itm_head = nn.Linear(c, 2)
        # ALBEF's split: with text_encoder_layers > 0, ITC's text side is its own stack and the
        # decoder only fuses and writes; None: the decoder encodes text for ITC too
        enc = cfg.text_encoder_config()
        self.text_encoder = GLMDecoder(enc) if enc is not None else None

    # -- the table's submodules ----------------------------------------------------------------
    def tower_of(self, m: Modality) -> nn.Module:
        return getattr(self, m.tower)

    def run_tower(
        self, modality: str, media: torch.Tensor, sample_rate: int | None = None
    ) -> TowerOutput:
        """The modality's tower on ``media``: tokens ``(B, N, D)`` and pooled ``(B, D)``;
        ``sample_rate`` reaches only towers that resample (it is ignored for images)."""
        m = modality_of(modality)
        tower = self.tower_of(m)
        return tower(media, sample_rate) if m.takes_sample_rate else tower(media)

    # -- contrastive space ---------------------------------------------------------------------
    def encode_media(
        self,
        modality: str,
        media: torch.Tensor,
        sample_rate: int | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Media in the shared contrastive space ``(B, E)``, unit vectors if ``normalize``."""
        proj = getattr(self, modality_of(modality).proj)
        z = proj(self.run_tower(modality, media, sample_rate).pooled)  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.encode_media("image", images, normalize=normalize)

    def encode_audio(
        self, wave: torch.Tensor, sample_rate: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        return self.encode_media("audio", wave, sample_rate, normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        encoder = self.itc_text_tower
        hidden = encoder.forward_features(
            input_ids, attention_mask, mode=AttentionMode.BIDIRECTIONAL
        )  # (B, T, C)
        z = self.text_proj(encoder.forward_head(hidden, attention_mask, self.cfg.text_pool))
        return F.normalize(z, dim=-1) if normalize else z

    @property
    def itc_text_tower(self) -> GLMDecoder:
        """What encodes text for ITC: the separate text encoder if there is one, else the decoder
        (its ``aux_loss()`` holds the MoE terms of the last :meth:`encode_text`)."""
        return self.text if self.text_encoder is None else self.text_encoder

    def forward(
        self,
        modality: str,
        media: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Features for a contrastive loss: ``image_features`` are the media side (any modality)."""
        return {
            "image_features": self.encode_media(modality, media),
            "text_features": self.encode_text(input_ids, attention_mask),
            "logit_scale": clamped_logit_scale(self.logit_scale),
        }

    # -- media tokens in the decoder -----------------------------------------------------------
    def encode_media_tokens(
        self, modality: str, media: torch.Tensor, sample_rate: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One tower pass for both uses: normalised contrastive features ``(B, E)`` and the
        decoder's media block ``<begin> tokens <end>`` ``(B, K + 2, C)``."""
        m = modality_of(modality)
        out = self.run_tower(modality, media, sample_rate)
        features = F.normalize(getattr(self, m.proj)(out.pooled), dim=-1)
        return features, self.media_block(
            modality, getattr(self, m.adapter)(out.tokens, out.pooled)
        )

    def fuse(
        self,
        media_block: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mode: AttentionMode | str = AttentionMode.BIDIRECTIONAL,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder over ``[media block; text]``: hidden states ``(B, M + T, C)`` and their
        mask. Text is right-padded, so the text's positions are ``[M:]`` and the real ones get
        contiguous positions after the media (what ITM and MLM read)."""
        embeds = torch.cat([media_block, self.text.embed_tokens(input_ids)], dim=1)
        ones = torch.ones(media_block.shape[:2], dtype=torch.bool, device=media_block.device)
        mask = torch.cat([ones, attention_mask.bool()], dim=1)  # (B, M + T)
        hidden = self.text.forward_features(inputs_embeds=embeds, attention_mask=mask, mode=mode)
        return hidden, mask

    def masked_lm(
        self,
        media_block: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask_prob: float = 0.15,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT-mask the text ``(B, T)`` (special tokens never), run the decoder bidirectionally
        over ``[media block; masked text]``; the LM head's logits at the text ``(B, T, V)`` and
        the labels ``(B, T)`` (-100 off target)."""
        st = self.cfg.special_tokens
        masked, labels = mask_tokens(
            input_ids,
            mask_token_id=st.mask,
            vocab_size=self.cfg.text.vocab_size,
            special_ids=st.specials,
            attention_mask=attention_mask,
            mask_prob=mask_prob,
            generator=generator,
        )
        hidden, _ = self.fuse(media_block, masked, attention_mask)
        return self.text.lm_head(hidden[:, media_block.shape[1] :]), labels

    def prefix_lm(
        self,
        media_blocks: list[torch.Tensor],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix-LM logits ``(B, P, V)`` over ``[media blocks; chat text]`` (bidirectional up to
        the response, causal after), with the text's ids and loss mask laid out alike ``(B, P)``:
        the arguments of :func:`autoglm_phone.losses.prefix_lm_loss`."""
        embeds, mask, _ = self.assemble(media_blocks, input_ids, attention_mask)
        target, scored, prefix_lengths = align_to_prefix(
            input_ids, attention_mask, loss_mask, mask, self.cfg.text.pad_token_id
        )
        logits = self.text(
            inputs_embeds=embeds, attention_mask=mask, mode="prefix", prefix_lengths=prefix_lengths
        )
        return logits, target, scored

    def itm_logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Matched / not-matched logits ``(B, 2)`` from mean-pooled fused hidden states."""
        return self.itm_head(self.text.forward_head(hidden, mask, "mean"))

    def embed_media(
        self, modality: str, media: torch.Tensor, sample_rate: int | None = None
    ) -> torch.Tensor:
        """Media -> decoder embeddings ``(B, K, C)``: the adapter's ``K`` tokens (``adapter.
        image_tokens`` / ``audio_tokens``, plus one with ``adapter.summary_token``)."""
        out = self.run_tower(modality, media, sample_rate)
        return getattr(self, modality_of(modality).adapter)(out.tokens, out.pooled)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> decoder embeddings ``(B, K, C)``."""
        return self.embed_media("image", images)

    def embed_audio(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Mono audio ``(B, samples)`` -> decoder embeddings ``(B, K, C)``."""
        return self.embed_media("audio", wave, sample_rate)

    def media_block(self, modality: str, tokens: torch.Tensor) -> torch.Tensor:
        """``<begin> tokens <end>``, the modality's markers around its decoder embeddings:
        ``(B, K, C)`` -> ``(B, K + 2, C)``."""
        m, st = modality_of(modality), self.cfg.special_tokens
        begin, end = getattr(st, m.begin), getattr(st, m.end)
        if begin is None or end is None:
            raise ValueError(
                "the media marker ids are not set (cfg.special_tokens): build the model from "
                "cfg.with_tokenizer(tokenizer), or from_pretrained(..., tokenizer=tokenizer)"
            )
        ids = torch.tensor([begin, end], device=tokens.device)
        marks = self.text.embed_tokens(ids).expand(tokens.shape[0], 2, -1)  # (B, 2, C)
        return torch.cat([marks[:, :1], tokens.to(marks.dtype), marks[:, 1:]], dim=1)

    def build_prefix(
        self,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        sample_rate: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder input for a multimodal prompt, left-padded, as ``generate`` wants it.

        Per row: ``<|begin_of_image|>`` + image tokens + ``<|end_of_image|>``, the same for audio,
        then the prompt's real tokens as tokenized (GLM's ``[gMASK]<sop>`` included if the
        tokenizer added them; the media blocks add none). Returns ``inputs_embeds`` ``(B, P, C)``,
        ``attention_mask`` ``(B, P)`` (bool, True on real positions, padding first) and
        ``prefix_lengths`` ``(B,)``, the real positions per row.
        """
        media = {"image": images, "audio": audio}
        blocks = [  # (B, K + 2, C) each, in the table's order
            self.media_block(name, self.embed_media(name, media[name], sample_rate))
            for name in MODALITY_TABLE
            if media.get(name) is not None
        ]
        if not blocks and input_ids is None:
            raise ValueError("build_prefix needs images, audio or input_ids")
        return self.assemble(blocks, input_ids, attention_mask)

    def assemble(
        self,
        media_blocks: list[torch.Tensor],
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`build_prefix` from media blocks already embedded (``(B, n, C)`` each, e.g.
        from :meth:`encode_media_tokens`), so a training step runs each tower once."""
        parts = list(media_blocks)
        masks = [torch.ones(p.shape[:2], dtype=torch.bool, device=p.device) for p in parts]
        if input_ids is not None:
            parts.append(self.text.embed_tokens(input_ids))  # (B, T, C)
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            masks.append(attention_mask.bool())
        if not parts:
            raise ValueError("nothing to assemble: no media blocks and no input_ids")
        sizes = {p.shape[0] for p in parts}
        if len(sizes) > 1:
            raise ValueError(
                f"images, audio and input_ids have different batch sizes {sorted(sizes)}"
            )
        embeds = torch.cat(parts, dim=1)  # (B, P, C)
        mask = torch.cat(masks, dim=1)  # (B, P)
        # left-pad: a stable sort moves the padding first and keeps the real positions in order
        order = mask.long().argsort(dim=1, stable=True)  # (B, P)
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        mask = mask.gather(1, order)
        return embeds, mask, mask.sum(dim=1)

    def _generation_args(
        self,
        images: torch.Tensor | None,
        audio: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        sample_rate: int | None,
        generation_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        embeds, mask, _ = self.build_prefix(images, audio, input_ids, attention_mask, sample_rate)
        eos = self.cfg.special_tokens.eos
        kwargs = {"stop_token_ids": () if eos is None else (eos,), **generation_kwargs}
        return {"inputs_embeds": embeds, "attention_mask": mask, "mode": "prefix", **kwargs}

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        sample_rate: int | None = None,
        **generation_kwargs: Any,
    ) -> torch.Tensor:
        """New tokens ``(B, N <= max_new_tokens)`` after the :meth:`build_prefix` prompt.

        ``generation_kwargs`` go to :meth:`GLMDecoder.generate` (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``stop_token_ids``, ``generator``);
        ``stop_token_ids`` defaults to the tokenizer's end-of-text token.
        """
        args = self._generation_args(
            images, audio, input_ids, attention_mask, sample_rate, generation_kwargs
        )
        return self.text.generate(**args)

    @torch.no_grad()
    def stream(
        self,
        images: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        sample_rate: int | None = None,
        **generation_kwargs: Any,
    ) -> Iterator[torch.Tensor]:
        """:meth:`generate`, one ``(B,)`` step at a time."""
        args = self._generation_args(
            images, audio, input_ids, attention_mask, sample_rate, generation_kwargs
        )
        yield from self.text.stream(**args)

    # -- files (autoglm_phone.models.io) and size (autoglm_phone.models.size) -------------------
    def save_pretrained(self, folder: str | Path, *, tokenizer: Any = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (``{"format_version", "model"}``) and,
        given a Hugging Face ``tokenizer``, its files in ``tokenizer/``."""
        return io.save_folder(self, self.cfg, folder, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        folder_or_preset: str | Path,
        config: MultiModalConfig | dict[str, Any] | None = None,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
    ) -> AutoGLMModel:
        """A model from a :meth:`save_pretrained` folder, or a fresh one from a preset name.

        ``config`` replaces the stored config (a :class:`MultiModalConfig`) or overrides some of
        its values (a nested dict, e.g. ``{"text": {"num_layers": 2}}``); a folder's weights must
        still fit it, which is checked against the safetensors header before the model is built.
        ``tokenizer`` sets the vocabulary (if 0) and media markers, as
        :meth:`MultiModalConfig.with_tokenizer`. ``device`` defaults to the CPU for folders and to
        the preset's device for presets (``"meta"`` for the 9B: shapes only, no weights).
        A folder of that name wins over a preset.
        """
        return io.load_folder(cls, folder_or_preset, config, tokenizer=tokenizer, device=device)

    def summary(
        self, context_len: int | None = None, *, int4_group_size: int = 128, show: bool = True
    ) -> ModelSummary:
        """Parameters and weight memory per top-level submodule, and the FP16 KV cache of one
        sequence of ``context_len`` tokens (default ``text.max_seq_len``); prints the table."""
        out = model_summary(self, self.cfg, context_len, int4_group_size)
        if show:
            print(out)
        return out
