"""Which backend serves a path: an exported folder or a checkpoint / saved folder. Apart from
:mod:`~autoglm_phone.serve.engine` so that the exported backend (which builds on the engine's
types) is imported only for an exported folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autoglm_phone.serve.engine import Backend, EagerBackend


def load_backend(path: str | Path, device: str = "cpu", **kwargs: Any) -> Backend:
    """The backend for ``path``: :class:`~autoglm_phone.serve.exported.ExportedBackend` for an
    exported folder (it holds a manifest; the CPU only), else :class:`EagerBackend`; ``kwargs``
    go to its constructor."""
    from autoglm_phone.export.manifest import MANIFEST_NAME

    path = Path(path)
    if not (path.is_dir() and (path / MANIFEST_NAME).is_file()):
        return EagerBackend.from_path(path, device=device, **kwargs)
    from autoglm_phone.serve.exported import ExportedBackend

    if torch.device(device).type != "cpu":
        raise ValueError(
            f"device={device}: an exported folder runs on the CPU (ExecuTorch XNNPACK or ONNX "
            "Runtime); serve its checkpoint for a GPU"
        )
    return ExportedBackend.from_path(path, **kwargs)
