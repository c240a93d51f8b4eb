"""Named whole-model presets for ``AutoGLMModel.from_pretrained(name)``.

A preset is a config plus the device to build it on. ``autoglm-phone-tiny`` is the CPU model the
experiments train (``conf/model/tiny.yaml``; ``tests/test_api.py`` keeps the two equal).
``autoglm-phone-9b`` has a GLM-4-9B-shaped decoder and is built on the meta device: shapes
only, no memory, so ``summary()`` sizes it anywhere. docs/MODEL.md has both presets' numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from autoglm_phone.config import TEXT_DECODERS, AdapterConfig, MultiModalConfig, VisionConfig


def autoglm_phone_tiny() -> MultiModalConfig:
    """ViT-Ti at 64 px with a convolutional stem and 6 of its 12 blocks, a 4-block audio
    transformer, a 4-layer 256-wide GLM decoder with MoE FFNs, media tokens with slot embeddings
    led by the tower's pooled feature: 13.0M parameters with the 409-token tokenizer the
    experiments train (the vocabulary comes from the tokenizer)."""
    return MultiModalConfig(
        # 6 blocks: trained for twice the steps in ~1.6x the time, image retrieval goes from
        # ~65 to ~78 R@1 (docs/RECIPES.md); at this budget depth costs steps, not capacity
        vision=VisionConfig(stem="conv", depth=6),
        audio_encoder="audio-tiny",
        text_decoder="glm-tiny",
        adapter=AdapterConfig(position_embed=True, summary_token=True),
    )


def autoglm_phone_9b() -> MultiModalConfig:
    """GLM-4-9B's decoder with tied input/output embeddings, ViT-B/16 at 224 px and a
    Whisper-base-sized audio tower: 8.89B parameters, 5.56 GiB at INT4 (group 128) with an 8k FP16 KV cache.

    Memory stays off here (on in the tiny preset): at this width its keep-gates add 1.35B
    parameters, +0.67 GiB at INT4, more than the 0.29 GiB of 8k KV cache it saves (5.95 GiB in
    all, over the 6 GB budget; ``tests/test_api.py`` checks it). Turn it on for contexts past
    ~19k tokens, where the saved cache outweighs the gates."""
    return MultiModalConfig(
        vision_encoder="vit-base",
        audio_encoder="audio-base",
        text=replace(TEXT_DECODERS["glm-4-9b"](), tie_word_embeddings=True),
        adapter=AdapterConfig(rank=256, image_tokens=64, audio_tokens=64),
        embed_dim=512,
        proj_rank=128,
        quantize="int4",
    )


@dataclass(frozen=True)
class Preset:
    name: str
    make_config: Callable[[], MultiModalConfig]
    device: str  # where from_pretrained builds it unless told; "meta": shapes only


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("autoglm-phone-tiny", autoglm_phone_tiny, "cpu"),
        Preset("autoglm-phone-9b", autoglm_phone_9b, "meta"),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
