"""``run(cfg)`` for export: a checkpoint or saved folder -> an exported folder (docs/EXPORT.md).

The Hydra glue only; the work is :func:`autoglm_phone.export.export_model`. The fixed text
length and clip duration default to what the checkpoint trained on. ``quant=awq`` calibrates on
the first ``calibration_samples`` items of each modality of the checkpoint's training split;
``dry_run=true`` prints the INT4 size plan (``export/plan.py``) of the checkpoint or ``preset``
and builds nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from autoglm_phone.checkpoint import LoadedModel, load_model
from autoglm_phone.config import MultiModalConfig
from autoglm_phone.export import NotExportable, export_model
from autoglm_phone.export.plan import SizePlan, size_plan
from autoglm_phone.export.writer import DEFAULT_AUDIO_SECONDS, DEFAULT_MAX_TEXT_LEN, Calibration


def _from_data(cfg: DictConfig, hparams: dict[str, Any] | None, key: str, default: Any) -> Any:
    """``cfg.<key>`` if set, else the checkpoint's ``data.<key>``, else ``default``."""
    if cfg[key] is not None:
        return cfg[key]
    return ((hparams or {}).get("data") or {}).get(key, default)


def calibration_set(
    loaded: LoadedModel, cfg: DictConfig, max_text_len: int, audio_seconds: float
) -> Calibration:
    """Per exported method, input rows (batch 1, the export's shapes) from the first
    ``cfg.calibration_samples`` training items of each media modality in the checkpoint's data
    (the texts are those items' captions)."""
    from itertools import islice

    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from autoglm_phone.app.datamodule import Collate, MultiModalDataModule
    from autoglm_phone.app.schema import DataConfig
    from autoglm_phone.models.towers import resample

    if not (loaded.hparams or {}).get("data"):
        raise NotExportable(
            "quant=awq calibrates on the training data: give a training checkpoint (a saved "
            "folder has no data config)"
        )
    model, tokenizer = loaded.model, loaded.tokenizer
    data = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(DataConfig), loaded.hparams["data"])
    )
    size, rate = model.cfg.vision.img_size, model.cfg.audio.sample_rate
    dm = MultiModalDataModule(data, cfg.paths.cache_dir, image_size=size)
    dm.set_tokenizer(tokenizer)
    samples = round(rate * audio_seconds)
    rows: dict[str, list] = {m: [] for m in cfg.methods}
    for modality in (m for m in data.modalities if m in ("image", "audio")):
        items = list(islice(iter(dm.dataset(modality, "train")), cfg.calibration_samples))
        batch = Collate(modality, tokenizer, max_text_len, size)(items)
        media = batch["media"]
        if modality == "image":
            media = media.float() / 255.0 if media.dtype == torch.uint8 else media.float()
        else:
            media = resample(media.float(), batch["sample_rate"], rate)[:, :samples]
            media = F.pad(media, (0, samples - media.shape[1]))
        if modality in rows:
            rows[modality] += [(m[None],) for m in media]
        if "text" in rows:
            pad = max_text_len - batch["input_ids"].shape[1]
            ids = F.pad(batch["input_ids"], (0, pad), value=model.cfg.text.pad_token_id)
            mask = F.pad(batch["attention_mask"], (0, pad), value=False)
            rows["text"] += [(i[None], m[None]) for i, m in zip(ids, mask, strict=True)]
    return {name: r for name, r in rows.items() if r}


def plan(cfg: DictConfig) -> SizePlan:
    """The INT4 size plan of ``cfg.ckpt_path`` (its config) or ``cfg.preset``."""
    from dataclasses import replace

    from autoglm_phone.models.presets import get_preset

    if cfg.preset is not None:
        model_cfg: MultiModalConfig = get_preset(cfg.preset).make_config()
    elif cfg.ckpt_path is not None:
        model_cfg = load_model(cfg.ckpt_path).config
    else:
        raise ValueError("dry_run=true needs ckpt_path=<ckpt or folder> or preset=<name>")
    if cfg.vocab_size:
        model_cfg = replace(model_cfg, text=replace(model_cfg.text, vocab_size=cfg.vocab_size))
    if not model_cfg.text.vocab_size:
        raise ValueError(
            f"preset {cfg.preset!r} takes its vocabulary from a tokenizer: give vocab_size=<n>"
        )
    return size_plan(model_cfg, group_size=cfg.group_size, context_len=cfg.context_len)


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Export ``cfg.ckpt_path``; returns ``{"out_dir", "manifest"}`` (``{"plan"}`` for a
    dry run)."""
    if cfg.dry_run:
        return {"plan": plan(cfg)}
    if cfg.ckpt_path is None:
        raise ValueError("ckpt_path is required: python export.py ckpt_path=<ckpt or folder>")
    loaded = load_model(cfg.ckpt_path)
    out_dir = cfg.out_dir or Path(output_dir or ".") / f"{cfg.format}_{cfg.precision}"
    max_text_len = _from_data(cfg, loaded.hparams, "max_text_len", DEFAULT_MAX_TEXT_LEN)
    audio_seconds = _from_data(cfg, loaded.hparams, "audio_seconds", DEFAULT_AUDIO_SECONDS)
    calibration = None
    if cfg.quant == "awq" and cfg.precision == "int4":
        calibration = calibration_set(loaded, cfg, max_text_len, audio_seconds)
    manifest = export_model(
        loaded.model,
        out_dir,
        format=cfg.format,
        precision=cfg.precision,
        tokenizer=loaded.tokenizer,
        methods=tuple(cfg.methods),
        max_text_len=max_text_len,
        audio_seconds=audio_seconds,
        group_size=cfg.group_size,
        quant=cfg.quant,
        calibration=calibration,
    )
    return {"out_dir": str(out_dir), "manifest": manifest}


def summary(result: dict[str, Any]) -> str:
    """One line per artifact: method, size, bits per weight, export seconds (or the plan)."""
    if "plan" in result:
        return str(result["plan"])
    m = result["manifest"]
    lines = [f"{result['out_dir']}: {m['format']} {m['precision']}"]
    for name, entry in m["methods"].items():
        size = m["files"][entry["file"]]["size"] / 2**20
        bits = entry.get("bits_per_weight", float("nan"))
        lines.append(
            f"  {entry['file']:<14} {size:8.2f} MiB  {bits:6.2f} bits/weight  "
            f"{m['export_seconds'][name]:6.1f} s"
        )
    if "bits_per_weight" in m:
        lines.append(f"  all artifacts: {m['bits_per_weight']:.2f} bits per weight")
    return "\n".join(lines)
