"""Lightning callbacks of the training app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from autoglm_phone.data.records import format_summary, summarize


def _skipped(batch: Any) -> list[dict[str, str]]:
    """The ``skipped`` entries of a modality batch or of a ``{modality: batch}`` dict."""
    if not isinstance(batch, dict):
        return []
    if "skipped" in batch:
        return list(batch["skipped"])
    return [e for sub in batch.values() if isinstance(sub, dict) for e in sub.get("skipped", ())]


class SkippedSamples(Callback):
    """Per-epoch summary of the bad samples the loaders skipped (``autoglm_phone.data.records``).

    Each stage's epoch (train, val, test) gathers the skipped entries of every rank, prints the
    counts per reason with each file and row, logs ``data/skipped_<stage>`` (and one count per
    reason) and appends the summary as a JSON line to ``path``.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._entries["train"] += _skipped(batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self._entries["val"] += _skipped(batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._entries["test"] += _skipped(batch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            self._entries["val"].clear()
            return
        self._flush(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(trainer, pl_module, "test")

    def _flush(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        entries, self._entries[stage] = self._entries[stage], []
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, entries)
            entries = [e for part in parts for e in part]
        summary = summarize(entries)
        pl_module.log(f"data/skipped_{stage}", float(summary["total"]))
        for reason, n in summary["by_reason"].items():
            pl_module.log(f"data/skipped_{stage}/{reason}", float(n))
        if trainer.is_global_zero:
            print(format_summary(summary, f"epoch {trainer.current_epoch} {stage}"), flush=True)
            if self.path is not None:
                line = {"stage": stage, "epoch": trainer.current_epoch, **summary}
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
