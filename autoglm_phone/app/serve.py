"""``build(cfg)`` / ``run(cfg)`` for serving: a checkpoint or saved folder behind the
OpenAI-compatible app (docs/SERVE.md).

The Hydra glue only; the server is :mod:`autoglm_phone.serve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from autoglm_phone.export.manifest import MANIFEST_NAME
from autoglm_phone.serve import EagerBackend, Engine, MediaLimits, ServeSettings, create_app


def device_of(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build(cfg: DictConfig) -> tuple[Any, Engine]:
    """The app and its engine for ``cfg`` (not started)."""
    path = Path(cfg.ckpt_path)
    if not path.exists():
        raise SystemExit(
            f"nothing to serve at {path}: train one first (make quickstart) or pass ckpt_path="
        )
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        raise SystemExit(
            f"{path} is an exported folder; serving exported artifacts is not built yet"
        )
    kwargs = {k: cfg[k] for k in ("max_text_len", "audio_seconds") if cfg[k] is not None}
    backend = EagerBackend.from_path(
        path, device=device_of(cfg.device), context_window=cfg.context_window, **kwargs
    )
    engine = Engine(
        backend,
        max_batch_size=cfg.max_batch_size,
        batch_wait_s=cfg.batch_wait_ms / 1000,
        max_queue=cfg.max_queue,
    )
    settings = ServeSettings(
        model_name=cfg.model_name,
        api_key=cfg.api_key or None,
        max_body_bytes=int(cfg.max_body_mb * 2**20),
        limits=MediaLimits(cfg.max_image_pixels, cfg.max_audio_seconds, cfg.max_media),
        request_timeout_s=cfg.request_timeout_s,
        default_max_tokens=cfg.default_max_tokens,
        default_temperature=cfg.default_temperature,
    )
    return create_app(engine, settings), engine


def run(cfg: DictConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    app, engine = build(cfg)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    finally:
        engine.close()
