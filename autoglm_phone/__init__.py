"""autoglm_phone: small multimodal (vision, audio, text) GLM-style models for phones.

    from autoglm_phone import AutoGLMModel, MultiModalConfig, load_model

The model classes and :func:`load_model` (a training checkpoint or a saved folder -> model,
tokenizer, config) load lazily (PEP 562), so ``import autoglm_phone.config`` stays free of torch;
nothing here imports Lightning, Hydra or wandb.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autoglm_phone.config import MultiModalConfig

if TYPE_CHECKING:
    from autoglm_phone.checkpoint import LoadedModel, load_model
    from autoglm_phone.models.autoglm import AutoGLMModel
    from autoglm_phone.models.presets import PRESETS
    from autoglm_phone.models.size import ModelSummary

__all__ = [
    "AutoGLMModel",
    "LoadedModel",
    "ModelSummary",
    "MultiModalConfig",
    "PRESETS",
    "load_model",
]
_LAZY = {
    "AutoGLMModel": "autoglm_phone.models.autoglm",
    "LoadedModel": "autoglm_phone.checkpoint",
    "ModelSummary": "autoglm_phone.models.size",
    "load_model": "autoglm_phone.checkpoint",
    "PRESETS": "autoglm_phone.models.presets",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoglm_phone' has no attribute {name!r}")
