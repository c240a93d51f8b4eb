"""What an exported folder can run: one registry of methods, each a fixed-shape ``nn.Module``.

A method wraps the eager model's code path (no re-implementation): ``image`` and ``audio`` run
their tower once and return both uses of it, the normalised retrieval embedding
(``encode_image`` / ``encode_audio``) and the adapter's decoder embeddings (``embed_media``);
``text`` is ``encode_text``. Inputs and outputs are float32 / int64 / bool at every precision
(the cast to the artifact's dtype is inside), so an app calls every precision alike.

Shapes are fixed (batch 1, one clip length, one text length, one prompt length): ExecuTorch plans
memory for them, and a dynamic clip length does not export. The runtime loops over a batch
(docs/EXPORT.md). The generation methods (``embed``, ``prefill``, ``decode`` and, with
``text.memory``, ``memory_write``) carry the decoder's state as explicit inputs and outputs
(``generation.py``); ``generate`` names them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_phone.export.generation import (
    Decode,
    MemoryWrite,
    Prefill,
    SegmentDecode,
    SegmentPrefill,
)
from autoglm_phone.models.autoglm import AutoGLMModel, modality_of
from autoglm_phone.models.towers import TowerOutput


@dataclass(frozen=True)
class Shapes:
    """The fixed input sizes the artifacts are exported at."""

    max_text_len: int  # tokens per text (shorter texts are right-padded by the runtime)
    audio_samples: int  # samples per clip at the audio tower's rate
    # generation: prompt embeddings per prefill call and KV cache slots (with text.memory both
    # are memory.segment_len: the prompt goes segment by segment, the cache holds one segment)
    prompt_len: int = 0
    cache_len: int = 0


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the prefix: "float32", "int64", "bool"

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> TensorSpec:
        return cls(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))


@dataclass
class Method:
    """One exportable function: the module, example inputs of the exported shapes, names."""

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def specs(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Input and output specs, the outputs from one eager call."""
        with torch.no_grad():
            outputs = self.module(*self.example_inputs)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        ins = [
            TensorSpec.of(n, t) for n, t in zip(self.input_names, self.example_inputs, strict=True)
        ]
        outs = [TensorSpec.of(n, t) for n, t in zip(self.output_names, outputs, strict=True)]
        return ins, outs


def _image_tower(model: AutoGLMModel, images: torch.Tensor) -> TowerOutput:
    return model.vision(images)


def _audio_tower(model: AutoGLMModel, wave: torch.Tensor) -> TowerOutput:
    """The audio tower with its export front end (:meth:`LogMel.dft_logmel`), kept in float32
    at every precision: log-mel power sums overflow FP16, and quantising the mel filterbank
    gave NaN (docs/EXPORT.md)."""
    tower = model.audio
    mel = tower.frontend.dft_logmel(wave.float())  # (B, n_mels, frames)
    tokens = tower.forward_mel(mel.to(tower.proj.weight.dtype))  # (B, N, D)
    return TowerOutput(tokens=tokens, pooled=tower.forward_head(tokens))


TOWERS: dict[str, Callable[[AutoGLMModel, torch.Tensor], TowerOutput]] = {
    "image": _image_tower,
    "audio": _audio_tower,
}


class MediaMethod(nn.Module):
    """Media ``(1, ...)`` float32 -> ``<modality>_embedding`` ``(1, E)`` (unit norm, what
    ``encode_media`` returns) and ``<modality>_tokens`` ``(1, K, C)`` (``embed_media``'s). The
    output names carry the method's name: ONNX refuses an output named like an inner value."""

    def __init__(self, model: AutoGLMModel, modality: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.modality, self.dtype = model, modality_of(modality), dtype

    def forward(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.modality
        out = TOWERS[m.name](self.model, media.to(self.dtype))
        embedding = F.normalize(getattr(self.model, m.proj)(out.pooled), dim=-1)  # (1, E)
        tokens = getattr(self.model, m.adapter)(out.tokens, out.pooled)  # (1, K, C)
        return embedding.float(), tokens.float()


class TextMethod(nn.Module):
    """``input_ids`` ``(1, T)`` int64 and ``attention_mask`` ``(1, T)`` bool -> ``text_embedding``
    ``(1, E)``: ``encode_text`` (bidirectional, pooled over the real tokens)."""

    def __init__(self, model: AutoGLMModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids, attention_mask).float()


def image_method(model: AutoGLMModel, shapes: Shapes, dtype: torch.dtype) -> Method:
    size = model.cfg.vision.img_size
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return Method(
        "image",
        MediaMethod(model, "image", dtype),
        (example,),
        ("images",),
        ("image_embedding", "image_tokens"),
    )


def audio_method(model: AutoGLMModel, shapes: Shapes, dtype: torch.dtype) -> Method:
    g = torch.Generator().manual_seed(0)
    example = 0.1 * torch.randn(1, shapes.audio_samples, generator=g)
    return Method(
        "audio",
        MediaMethod(model, "audio", dtype),
        (example,),
        ("wave",),
        ("audio_embedding", "audio_tokens"),
    )


def text_method(model: AutoGLMModel, shapes: Shapes, dtype: torch.dtype) -> Method:
    ids = torch.full((1, shapes.max_text_len), model.cfg.text.pad_token_id, dtype=torch.long)
    mask = torch.zeros(1, shapes.max_text_len, dtype=torch.bool)
    ids[0, :2] = torch.tensor([1, 2])
    mask[0, :2] = True  # padded, so the masked paths (MoE limit, pooling) are traced
    return Method(
        "text", TextMethod(model), (ids, mask), ("input_ids", "attention_mask"), ("text_embedding",)
    )


class TokenEmbed(nn.Module):
    """``input_ids`` ``(1, P)`` -> ``inputs_embeds`` ``(1, P, C)`` float32: the decoder's token
    embeddings, for the runtime to place text and media markers beside media tokens."""

    def __init__(self, model: AutoGLMModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text.embed_tokens(input_ids).float()


def _state(model: AutoGLMModel, shapes: Shapes, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Example decoder state at the export's shapes: memory slots, KV caches."""
    cfg = model.cfg.text
    kv = (cfg.num_layers, 1, cfg.num_kv_heads, shapes.cache_len, cfg.head_dim)
    state = {"k_cache": torch.zeros(kv, dtype=dtype), "v_cache": torch.zeros(kv, dtype=dtype)}
    if cfg.memory.enabled:
        slots = (cfg.num_layers, 1, cfg.memory.num_slots, cfg.hidden_size)
        state["filled"] = torch.ones(1, dtype=torch.bool)
        state["memory"] = 0.02 * torch.randn(slots, generator=torch.Generator().manual_seed(0))
        state["memory"] = state["memory"].to(dtype)
    return state


def embed_method(model: AutoGLMModel, shapes: Shapes, dtype: torch.dtype) -> Method:
    ids = torch.zeros(1, shapes.prompt_len, dtype=torch.long)
    return Method("embed", TokenEmbed(model), (ids,), ("input_ids",), ("inputs_embeds",))


def prefill_method(model: AutoGLMModel, shapes: Shapes, dtype: torch.dtype) -> Method:
    c = model.cfg.text.hidden_size
    g = torch.Generator().manual_seed(0)
    embeds = 0.02 * torch.randn(1, shapes.prompt_len, c, generator=g)
    length = torch.tensor([max(1, shapes.prompt_len - 3)])  # padded: the masks are traced
    if not model.cfg.text.memory.enabled:
        module = Prefill(model.text, dtype, shapes.cache_len)
        return Method(
            "prefill",
            module,
            (embeds, length),
            ("inputs_embeds", "length"),
            ("logits", "k_cache", "v_cache"),
        )
    state = _state(model, shapes, dtype)
    return Method(
        "prefill",
        SegmentPrefill(model.text, dtype),
        (embeds, length, state["filled"], state["memory"]),
        ("inputs_embeds", "length", "filled", "memory"),
        ("logits", "memory_out", "filled_out", "k_cache", "v_cache"),
    )


def decode_method(model: AutoGLMModel, shapes: Shapes, dtype: torch.dtype) -> Method:
    token, position = torch.tensor([[1]]), torch.tensor([min(2, shapes.cache_len - 1)])
    state = _state(model, shapes, dtype)
    caches = (state["k_cache"], state["v_cache"])
    outputs = ("logits", "k_cache_out", "v_cache_out")
    if not model.cfg.text.memory.enabled:
        inputs = ("input_ids", "position", "k_cache", "v_cache")
        return Method(
            "decode", Decode(model.text, dtype), (token, position, *caches), inputs, outputs
        )
    return Method(
        "decode",
        SegmentDecode(model.text, dtype),
        (token, position, state["filled"], state["memory"], *caches),
        ("input_ids", "position", "filled", "memory", "k_cache", "v_cache"),
        outputs,
    )


def memory_write_method(model: AutoGLMModel, shapes: Shapes, dtype: torch.dtype) -> Method:
    state = _state(model, shapes, dtype)
    return Method(
        "memory_write",
        MemoryWrite(model.text, dtype),
        (state["filled"], state["memory"], state["k_cache"], state["v_cache"]),
        ("filled", "memory", "k_cache", "v_cache"),
        ("memory_out",),
    )


# name -> builder(model, shapes, dtype); every artifact file holds one method of this name
METHODS: dict[str, Callable[[AutoGLMModel, Shapes, torch.dtype], Method]] = {
    "image": image_method,
    "audio": audio_method,
    "text": text_method,
    "embed": embed_method,
    "prefill": prefill_method,
    "decode": decode_method,
    "memory_write": memory_write_method,
}
RETRIEVAL = ("image", "audio", "text")


def generation_methods(model: AutoGLMModel) -> tuple[str, ...]:
    """What ``generate`` names for ``model``: ``memory_write`` only with ``text.memory``."""
    extra = ("memory_write",) if model.cfg.text.memory.enabled else ()
    return ("embed", "prefill", "decode", *extra)


def expand_methods(model: AutoGLMModel, methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` with ``generate`` replaced by :func:`generation_methods`, in order, once each."""
    out: list[str] = []
    for name in methods:
        for m in generation_methods(model) if name == "generate" else (name,):
            if m not in out:
                out.append(m)
    return tuple(out)
