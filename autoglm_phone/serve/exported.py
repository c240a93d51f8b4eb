"""The server's backend for an exported folder (docs/EXPORT.md): :class:`ExportedBackend` runs
:class:`~autoglm_phone.export.ExportedModel` behind the same :class:`~autoglm_phone.serve.engine.
Backend` protocol as the eager model.

What differs from :class:`~autoglm_phone.serve.engine.EagerBackend`:

- **One request at a time.** The artifacts take batch 1 (``export/methods.py``) and hold each
  sequence's KV cache as explicit state, so ``max_batch_size = 1``: the engine runs generation
  requests one by one (embedding calls still run between decode steps).
- **The CPU only.** ExecuTorch (XNNPACK) and ONNX Runtime run here on the CPU.
- **Limits from the manifest.** Prompts up to the exported ``prompt_len`` positions (media blocks
  and text), prompt + generated tokens up to ``cache_len + 1`` (with ``text.memory`` the prompt
  goes segment by segment and only the decoder's ``max_seq_len`` bounds it); texts to embed up
  to ``max_text_len`` tokens, audio clips of the exported length.
- **MoE capacity.** The export keeps the decoder's ``capacity_factor`` (a dropless layer cannot
  export), while the eager server runs its MoE layers dropless: where a prompt overflows an
  expert, greedy answers can differ.

Every method the eager server uses (``image``, ``audio``, ``text`` and the generation methods)
must be in the folder, and its tokenizer: a folder without one is refused at start-up, by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from autoglm_phone.export import ExportedModel
from autoglm_phone.export.methods import RETRIEVAL
from autoglm_phone.models.autoglm import MODALITY_TABLE
from autoglm_phone.serve.engine import Prompt, tokenize_texts
from autoglm_phone.serve.media import MediaSpec


class _ExportedDecoding:
    """One sequence: the logits ``(1, V)`` of its next token; ``advance`` runs ``decode``."""

    def __init__(self, logits: torch.Tensor, decode: Callable[[int], torch.Tensor]) -> None:
        self.logits, self.decode = logits, decode

    def advance(self, tokens: torch.Tensor) -> None:
        self.logits = self.decode(int(tokens[0]))


class ExportedBackend:
    """An exported folder's artifacts on the CPU; see the module docstring. ``max_text_len``,
    ``audio_seconds`` and ``context_window`` (as :class:`~autoglm_phone.serve.engine.
    EagerBackend`'s) default to the export's; values it cannot hold are refused."""

    max_batch_size = 1
    device = torch.device("cpu")

    def __init__(
        self,
        model: ExportedModel,
        *,
        max_text_len: int | None = None,
        audio_seconds: float | None = None,
        context_window: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        needed = (*RETRIEVAL, *model.generation_methods())
        missing = [m for m in needed if m not in model.runners]
        if missing:
            raise ValueError(
                f"{model.folder}: the server needs the methods {missing}, which were not "
                f"exported (has: {sorted(model.runners)}); export with methods={list(needed)}"
            )
        if model.tokenizer is None:
            raise ValueError(f"{model.folder} holds no tokenizer; the server needs one")
        self.model, self.tokenizer = model, model.tokenizer
        cfg, shapes = model.config, model.shapes
        if cfg.text.memory.enabled:  # segment by segment: no length limit, eager's default
            self.context_window = context_window or cfg.text.max_seq_len
            self.max_prompt_length = self.context_window - 1
        else:  # one prefill call takes the whole prompt, into a static cache
            limit = shapes["cache_len"] + 1
            if context_window is not None and context_window > limit:
                raise ValueError(
                    f"context_window={context_window}: the exported decoder holds at most "
                    f"{limit} tokens (prompt + generated; export cache_len + 1)"
                )
            self.context_window = context_window or limit
            self.max_prompt_length = min(self.context_window - 1, shapes["prompt_len"])
        (image,) = model.manifest["methods"]["image"]["inputs"]
        self.spec = MediaSpec(
            image_size=image["shape"][-1],
            sample_rate=shapes["sample_rate"],
            num_samples=shapes["audio_samples"],
        )
        self.max_text_len = shapes["max_text_len"]
        if max_text_len is not None and max_text_len != self.max_text_len:
            raise ValueError(
                f"max_text_len={max_text_len}: {model.folder} was exported with "
                f"{self.max_text_len}; re-export to change it"
            )
        rate, clip = self.spec.sample_rate, self.spec.num_samples
        if audio_seconds is not None and round(audio_seconds * rate) != clip:
            raise ValueError(
                f"audio_seconds={audio_seconds}: {model.folder} was exported with "
                f"{clip / rate:g} s clips; re-export to change it"
            )
        eos = cfg.special_tokens.eos
        default = () if eos is None else (eos,)
        self.stop_token_ids = tuple(default if stop_token_ids is None else stop_token_ids)
        self.embed_dim = cfg.embed_dim

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> ExportedBackend:
        """An exported folder, checked against its manifest (a changed file is refused)."""
        return cls(ExportedModel.load(path), **kwargs)

    def media_tokens(self, modality: str) -> int:
        """Decoder positions one item takes: the adapter's tokens and the two markers."""
        (_, tokens) = self.model.manifest["methods"][modality]["outputs"]
        return tokens["shape"][1] + 2

    def prompt_length(self, prompt: Prompt) -> int:
        return len(prompt.ids) + sum(self.media_tokens(kind) for kind, _ in prompt.media)

    @torch.no_grad()
    def _embed_prompt(self, prompt: Prompt) -> torch.Tensor:
        """``(P, C)``: the media blocks (images, then audio, each in request order), the text,
        as :class:`~autoglm_phone.serve.engine.EagerBackend` assembles it."""
        blocks = []
        for name in MODALITY_TABLE:
            items = [x for kind, x in prompt.media if kind == name]
            if items:
                tokens = self.model.embed_media(name, torch.stack(items))  # (n, K, C)
                blocks += list(self.model.media_block(name, tokens))  # n x (K + 2, C)
        return torch.cat([*blocks, self.model.embed_tokens(prompt.ids)])

    @torch.no_grad()
    def start(self, prompts: Sequence[Prompt], max_new_tokens: int) -> _ExportedDecoding:
        if len(prompts) > self.max_batch_size:
            raise ValueError(
                f"{len(prompts)} prompts: the exported decoder runs {self.max_batch_size} at a time"
            )
        (prompt,) = prompts
        return _ExportedDecoding(
            *self.model.begin_decode(self._embed_prompt(prompt), max_new_tokens)
        )

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """Unit vectors ``(N, E)``, tokenized to the exported ``max_text_len``; the number of
        tokens read."""
        ids, mask = tokenize_texts(self.tokenizer, texts, self.max_text_len)
        return self.model.encode_text(ids, mask), int(mask.sum())

    @torch.no_grad()
    def embed_media(self, modality: str, media: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.model.encode_media(modality, torch.stack(list(media)))
