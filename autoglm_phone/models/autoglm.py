"""AutoGLMModel: vision and audio towers, the GLM decoder, adapters between them, a shared space.

Two uses of the same towers and decoder:

- contrastive (ITC) pretraining: ``forward`` returns a dict whose keys are the contrastive loss's
  arguments (open_clip style), so the training glue is one line: ``loss(**model(...))``;
- multimodal generation: :class:`~autoglm_phone.models.adapters.MediaAdapter` turns tower tokens
  into decoder embeddings, :meth:`AutoGLMModel.build_prefix` lays them out with GLM's media
  markers in front of the prompt, and :meth:`AutoGLMModel.generate` decodes from that prefix
  (bidirectional over the prefix, GLM-130B style).

``save_pretrained`` / ``from_pretrained`` write and read a folder holding ``model.safetensors``
and a standalone, versioned ``config.json`` (no pickle, no Hydra; as Hugging Face folders);
``from_pretrained`` also builds the named presets of :mod:`autoglm_phone.models.presets`.
``summary`` counts parameters and weight memory per submodule (convention in
:func:`weight_bytes`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from autoglm_phone.config import DecoderConfig, MultiModalConfig
from autoglm_phone.losses.lm import align_to_prefix
from autoglm_phone.losses.mlm import mask_tokens
from autoglm_phone.models.adapters import LowRankProjection, MediaAdapter
from autoglm_phone.models.glm import AttentionMode, GLMDecoder
from autoglm_phone.models.presets import PRESETS, get_preset
from autoglm_phone.models.towers import AudioTower, VisionTower
from autoglm_phone.objectives.features import clamped_logit_scale

MODALITIES = ("image", "audio")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1  # of config.json; bump when a saved folder stops loading as before


class AutoGLMModel(nn.Module):
    def __init__(self, cfg: MultiModalConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        if torch.get_default_device().type == "meta":
            # torchaudio computes the mel filterbank eagerly, which meta tensors cannot: build
            # the (small) audio tower for real, then drop its storage.
            with torch.device("cpu"):
                self.audio = AudioTower(cfg.audio)
            self.audio.to("meta")
        else:
            self.audio = AudioTower(cfg.audio)
        self.text = GLMDecoder(cfg.text)
        r, e = cfg.proj_rank, cfg.embed_dim
        self.vision_proj = LowRankProjection(self.vision.embed_dim, e, r)
        self.audio_proj = LowRankProjection(self.audio.embed_dim, e, r)
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
        self.vision_adapter = MediaAdapter(
            self.vision.embed_dim, num_tokens=a.image_tokens, grid=True, **shared
        )
        self.audio_adapter = MediaAdapter(self.audio.embed_dim, num_tokens=a.audio_tokens, **shared)
        # ITM: matched / not matched from the fused [media; text] sequence (ALBEF)
        self.itm_head = nn.Linear(c, 2)
        # ALBEF's split: with text_encoder_layers > 0, ITC's text side is its own stack and the
        # decoder only fuses and writes; None: the decoder encodes text for ITC too
        enc = cfg.text_encoder_config()
        self.text_encoder = GLMDecoder(enc) if enc is not None else None

    # -- contrastive space ---------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.vision_proj(self.vision(images).pooled)  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_audio(
        self, wave: torch.Tensor, sample_rate: int | None = None, normalize: bool = True
    ) -> torch.Tensor:
        z = self.audio_proj(self.audio(wave, sample_rate).pooled)  # (B, E)
        return F.normalize(z, dim=-1) if normalize else z

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

    def encode_media(self, modality: str, media: torch.Tensor, **kwargs) -> torch.Tensor:
        if modality == "image":
            return self.encode_image(media, **kwargs)
        if modality == "audio":
            return self.encode_audio(media, **kwargs)
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")

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
        st = self.cfg.special_tokens
        if modality == "image":
            out = self.vision(media)
            proj, adapter = self.vision_proj, self.vision_adapter
            marks = (st.begin_of_image, st.end_of_image)
        elif modality == "audio":
            out = self.audio(media, sample_rate)
            proj, adapter = self.audio_proj, self.audio_adapter
            marks = (st.begin_of_audio, st.end_of_audio)
        else:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        features = F.normalize(proj(out.pooled), dim=-1)
        return features, self._media_block(adapter(out.tokens, out.pooled), *marks)

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

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` -> decoder embeddings ``(B, K, C)``: ``adapter.image_tokens``,
        plus one with ``adapter.summary_token``."""
        out = self.vision(images)
        return self.vision_adapter(out.tokens, out.pooled)

    def embed_audio(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Mono audio ``(B, samples)`` -> ``adapter.audio_tokens`` (+ summary) embeddings."""
        out = self.audio(wave, sample_rate)
        return self.audio_adapter(out.tokens, out.pooled)

    def _media_block(
        self, tokens: torch.Tensor, begin: int | None, end: int | None
    ) -> torch.Tensor:
        """``<begin> tokens <end>``: ``(B, K, C)`` -> ``(B, K + 2, C)``."""
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
        st = self.cfg.special_tokens
        parts: list[torch.Tensor] = []  # (B, n, C) each
        if images is not None:
            parts.append(
                self._media_block(self.embed_image(images), st.begin_of_image, st.end_of_image)
            )
        if audio is not None:
            parts.append(
                self._media_block(
                    self.embed_audio(audio, sample_rate), st.begin_of_audio, st.end_of_audio
                )
            )
        if not parts and input_ids is None:
            raise ValueError("build_prefix needs images, audio or input_ids")
        return self.assemble(parts, input_ids, attention_mask)

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

    # -- files ---------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (``{"format_version", "model"}``)."""
        if any(p.is_meta for p in self.parameters()):
            raise ValueError("a model on the meta device has no weights to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state, _ = _untied_state(self)
        state = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        write_config(self.cfg, folder / CONFIG_NAME)
        return folder

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
        still fit it. ``tokenizer`` sets the vocabulary (if 0) and media markers, as
        :meth:`MultiModalConfig.with_tokenizer`. ``device`` defaults to the CPU for folders and to
        the preset's device for presets (``"meta"`` for the 9B: shapes only, no weights).
        A folder of that name wins over a preset.
        """
        folder = Path(folder_or_preset)
        if folder.is_dir():
            cfg, weights = read_config(folder / CONFIG_NAME), folder / WEIGHTS_NAME
            if not weights.is_file():
                raise FileNotFoundError(f"{weights}: no weights file (written by save_pretrained)")
            device = torch.device(device or "cpu")
        elif str(folder_or_preset) in PRESETS:
            preset = get_preset(str(folder_or_preset))
            cfg, weights = preset.make_config(), None
            device = torch.device(device or preset.device)
        else:
            raise FileNotFoundError(
                f"{str(folder_or_preset)!r} is neither a folder nor a preset; presets: "
                f"{', '.join(sorted(PRESETS))}"
            )
        cfg = override_config(cfg, config)
        if tokenizer is not None:
            cfg = cfg.with_tokenizer(tokenizer)
        with torch.device(device):
            model = cls(cfg)
        if weights is not None and device.type != "meta":
            model._load_weights(weights, device)
        return model

    def _load_weights(self, path: Path, device: torch.device) -> None:
        """Load a :meth:`save_pretrained` safetensors file (strict; tied weights stored once)."""
        state = load_file(str(path), device=str(device))
        expected, _ = _untied_state(self)
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not fit the config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)"
            )
        try:
            self.load_state_dict(state, strict=False)  # only the tied aliases are left out
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{path} does not fit the config: {err}") from err

    # -- size ----------------------------------------------------------------------------------
    def summary(
        self, context_len: int | None = None, *, int4_group_size: int = 128, show: bool = True
    ) -> ModelSummary:
        """Parameters and weight memory per top-level submodule, and the FP16 KV cache of one
        sequence of ``context_len`` tokens (default ``text.max_seq_len``); prints the table."""
        context_len = context_len or self.cfg.text.max_seq_len
        sizes = weight_bytes(self, int4_group_size)
        rows, seen = [], set()
        named = [(n, list(m.parameters())) for n, m in self.named_children()]
        named += [(n, [p]) for n, p in self.named_parameters(recurse=False)]
        for name, params in named:
            params = [p for p in params if id(p) not in seen]
            seen.update(id(p) for p in params)
            rows.append(
                SummaryRow(
                    name=name,
                    params=sum(p.numel() for p in params),
                    trainable=sum(p.numel() for p in params if p.requires_grad),
                    bytes={k: sum(sizes[id(p)][k] for p in params) for k in PRECISIONS},
                )
            )
        dtype = next(self.parameters()).dtype
        precision = (
            "int4" if self.cfg.quantize == "int4" else "fp32" if dtype == torch.float32 else "fp16"
        )
        out = ModelSummary(
            rows=rows,
            precision=precision,
            context_len=context_len,
            kv_cache_bytes=kv_cache_bytes(self.cfg.text, context_len),
            int4_group_size=int4_group_size,
        )
        if show:
            print(out)
        return out


def _untied_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tied tensor (e.g. a tied LM head) once, and alias -> kept name."""
    state, aliases, first = {}, {}, {}
    for name, t in module.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            state[name] = t
    return state, aliases


# -- config files ------------------------------------------------------------------------------
def write_config(cfg: MultiModalConfig, path: str | Path) -> None:
    data = {"format_version": FORMAT_VERSION, "model": cfg.to_dict()}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_config(path: str | Path) -> MultiModalConfig:
    """Read a ``config.json`` written by :func:`write_config`; every failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model config (a save_pretrained folder has one)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or set(data) != {"format_version", "model"}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path}: not an autoglm_phone model config; expected the keys "
            f"'format_version' and 'model', got {got}"
        )
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version} is newer than this autoglm_phone reads "
            f"({FORMAT_VERSION}); upgrade autoglm_phone to load it"
        )
    try:
        return MultiModalConfig.from_dict(data["model"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid model config: {err}") from err


def override_config(
    cfg: MultiModalConfig, override: MultiModalConfig | dict[str, Any] | None
) -> MultiModalConfig:
    """``override`` itself if a config, ``cfg`` with the nested dict's values if a dict.

    The decoder's derived sizes (``head_dim``, ``intermediate_size``) follow new widths unless
    the dict sets them or ``cfg`` had them set to non-derived values.
    """
    if override is None or isinstance(override, MultiModalConfig):
        return override or cfg
    data = _merge(cfg.to_dict(), override)
    text = override.get("text", {})
    if text:
        derived = DecoderConfig(**{**data["text"], **dict.fromkeys(DecoderConfig.DERIVED)})
        base = DecoderConfig(**{**cfg.to_dict()["text"], **dict.fromkeys(DecoderConfig.DERIVED)})
        for name in DecoderConfig.DERIVED:
            if name not in text and getattr(cfg.text, name) == getattr(base, name):
                data["text"][name] = getattr(derived, name)
    return MultiModalConfig.from_dict(data)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- size accounting ---------------------------------------------------------------------------
PRECISIONS = ("fp32", "fp16", "int4")


def weight_bytes(model: nn.Module, int4_group_size: int = 128) -> dict[int, dict[str, float]]:
    """Bytes of each parameter (keyed by ``id``) at FP32, FP16 and INT4.

    INT4 convention (weight-only, as torchao's ``Int4WeightOnlyConfig`` default): the weight
    matrix of every ``nn.Linear`` takes 4 bits per weight plus an FP16 scale and an FP16 zero
    point per ``int4_group_size`` consecutive input weights (group 128: 4.25 bits per weight);
    everything else, i.e. embeddings,
    norms, biases, convolutions, attention-pooler in-projections, learned queries, stays FP16.
    A weight shared by an embedding and a Linear (tied LM head) counts once, as an embedding.
    """
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    linear -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    sizes = {}
    for p in model.parameters():
        n = p.numel()
        int4 = 2 * n
        if id(p) in linear:
            out_features, in_features = p.shape
            int4 = n / 2 + 4 * out_features * math.ceil(in_features / int4_group_size)
        sizes[id(p)] = {"fp32": 4 * n, "fp16": 2 * n, "int4": int4}
    return sizes


def kv_cache_bytes(cfg: DecoderConfig, context_len: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for one sequence: ``2 * L * H_kv * D * T`` values."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context_len * bytes_per_value


@dataclass
class SummaryRow:
    name: str
    params: int
    trainable: int
    bytes: dict[str, float]  # precision -> weight bytes


@dataclass
class ModelSummary:
    """What :meth:`AutoGLMModel.summary` returns; ``str()`` is the table it prints."""

    rows: list[SummaryRow]  # one per top-level submodule (or parameter of the model itself)
    precision: str  # the default column: "int4" when cfg.quantize says so, else the weights' dtype
    context_len: int
    kv_cache_bytes: int  # FP16, batch 1
    int4_group_size: int

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    def weight_bytes(self, precision: str | None = None) -> float:
        return sum(r.bytes[precision or self.precision] for r in self.rows)

    def total_bytes(self, precision: str | None = None) -> float:
        """Weights at ``precision`` (default: the summary's) plus the FP16 KV cache."""
        return self.weight_bytes(precision) + self.kv_cache_bytes

    def __str__(self) -> str:
        head = ["module", "params", "trainable"] + [
            p.upper() + ("*" if p == self.precision else "") for p in PRECISIONS
        ]
        total = SummaryRow(
            "total", self.params, self.trainable, {p: self.weight_bytes(p) for p in PRECISIONS}
        )
        body = [
            [r.name, _count(r.params), f"{100 * r.trainable / max(r.params, 1):.0f}%"]
            + [_bytes(r.bytes[p]) for p in PRECISIONS]
            for r in [*self.rows, total]
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        rule = "-" * len(line(head))
        return "\n".join(
            [
                line(head),
                rule,
                *(line(r) for r in body[:-1]),
                rule,
                line(body[-1]),
                "",
                f"INT4: 4-bit Linear weights + FP16 scale and zero point per {self.int4_group_size}; "
                "embeddings, norms, biases at FP16.",
                f"KV cache, FP16, {self.context_len} tokens, batch 1: "
                f"{_bytes(self.kv_cache_bytes)}",
                f"{self.precision.upper()}* weights + KV cache: {_bytes(self.total_bytes())}",
            ]
        )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
