"""autoglm_phone: small multimodal (vision, audio, text) GLM-style models for phones.

    from autoglm_phone import AutoGLMModel, MultiModalConfig

The model classes load lazily (PEP 562), so ``import autoglm_phone.config`` stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autoglm_phone.config import MultiModalConfig

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel, ModelSummary
    from autoglm_phone.models.presets import PRESETS

__all__ = ["AutoGLMModel", "ModelSummary", "MultiModalConfig", "PRESETS"]
_LAZY = {
    "AutoGLMModel": "autoglm_phone.models.autoglm",
    "ModelSummary": "autoglm_phone.models.autoglm",
    "PRESETS": "autoglm_phone.models.presets",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoglm_phone' has no attribute {name!r}")
