"""``run(cfg)`` for export: a checkpoint or saved folder -> an exported folder (docs/EXPORT.md).

The Hydra glue only; the work is :func:`autoglm_phone.export.export_model`. The fixed text
length and clip duration default to what the checkpoint trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from autoglm_phone.checkpoint import load_model
from autoglm_phone.export import export_model
from autoglm_phone.export.writer import DEFAULT_AUDIO_SECONDS, DEFAULT_MAX_TEXT_LEN


def _from_data(cfg: DictConfig, hparams: dict[str, Any] | None, key: str, default: Any) -> Any:
    """``cfg.<key>`` if set, else the checkpoint's ``data.<key>``, else ``default``."""
    if cfg[key] is not None:
        return cfg[key]
    return ((hparams or {}).get("data") or {}).get(key, default)


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``; returns ``{"out_dir", "manifest"}``."""
    loaded = load_model(cfg.ckpt_path)
    out_dir = cfg.out_dir or Path(output_dir or ".") / f"{cfg.format}_{cfg.precision}"
    manifest = export_model(
        loaded.model,
        out_dir,
        format=cfg.format,
        precision=cfg.precision,
        tokenizer=loaded.tokenizer,
        methods=tuple(cfg.methods),
        max_text_len=_from_data(cfg, loaded.hparams, "max_text_len", DEFAULT_MAX_TEXT_LEN),
        audio_seconds=_from_data(cfg, loaded.hparams, "audio_seconds", DEFAULT_AUDIO_SECONDS),
        group_size=cfg.group_size,
        prompt_len=cfg.prompt_len,
        cache_len=cfg.cache_len,
        source=cfg.ckpt_path,
    )
    return {"out_dir": str(out_dir), "manifest": manifest}


def summary(result: dict[str, Any]) -> str:
    """One line per artifact: method, size, export seconds."""
    m = result["manifest"]
    lines = [f"{result['out_dir']}: {m['format']} {m['precision']}"]
    for name, entry in m["methods"].items():
        size = m["files"][entry["file"]]["size"] / 2**20
        lines.append(f"  {entry['file']:<14} {size:8.2f} MiB  {m['export_seconds'][name]:6.1f} s")
    return "\n".join(lines)
