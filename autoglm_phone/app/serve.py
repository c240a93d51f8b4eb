"""``build(cfg)`` / ``run(cfg)`` for serving: a checkpoint, saved folder or exported folder behind
the OpenAI-compatible app (docs/SERVE.md). An exported folder (it holds a manifest) runs on the
CPU with ``device=auto``.

The Hydra glue only; the server is :mod:`autoglm_phone.serve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from autoglm_phone.export.manifest import MANIFEST_NAME
from autoglm_phone.serve import Engine, MediaLimits, ServeSettings, create_app, load_backend


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
    exported = path.is_dir() and (path / MANIFEST_NAME).is_file()
    device = "cpu" if exported and cfg.device == "auto" else device_of(cfg.device)
    kwargs = {k: cfg[k] for k in ("max_text_len", "audio_seconds") if cfg[k] is not None}
    try:
        backend = load_backend(path, device=device, context_window=cfg.context_window, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        if not exported:
            raise
        raise SystemExit(f"cannot serve the exported folder {path}: {err}") from err
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
