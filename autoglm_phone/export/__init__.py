"""Export for device: ExecuTorch (XNNPACK) and ONNX artifacts, a manifest, and a runtime.

    from autoglm_phone.export import export_model, ExportedModel

    export_model(model, "outputs/export", format="executorch", precision="int4", tokenizer=tok)
    exported = ExportedModel.load("outputs/export")
    exported.encode_image(images)  # as AutoGLMModel.encode_image

The methods (``methods.py``), precisions (``precision.py``) and formats (``backends.py``) are
tables; ``writer.py`` writes a folder, ``manifest.py`` describes and checks it, ``runtime.py``
runs it. docs/EXPORT.md has the methods' signatures and the measured parity. Nothing here
imports Lightning, Hydra or wandb; executorch, torchao, onnx and onnxruntime (the ``export``
extra) are imported only when a format needs them.
"""

from __future__ import annotations

from autoglm_phone.export.manifest import MANIFEST_NAME, read_manifest
from autoglm_phone.export.methods import METHODS
from autoglm_phone.export.runtime import ExportedModel
from autoglm_phone.export.writer import NotExportable, export_model

__all__ = [
    "METHODS",
    "MANIFEST_NAME",
    "ExportedModel",
    "NotExportable",
    "export_model",
    "read_manifest",
]
