"""LightningModule for contrastive (ITC) pretraining of image-text and audio-text.

Hyper-parameters are plain dicts (model config, optimiser, objective, data, tokenizer files), so
checkpoints load with ``torch.load(..., weights_only=True)`` and rebuild without Hydra.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from autoglm_phone.config import MultiModalConfig
from autoglm_phone.losses import itc_loss
from autoglm_phone.metrics import retrieval_metrics
from autoglm_phone.models.autoglm import AutoGLMModel


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class PretrainModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        objective: dict[str, Any],
        data: dict[str, Any] | None = None,
        tokenizer_files: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = AutoGLMModel(MultiModalConfig.from_dict(model))
        self.itc = itc_loss()
        self._val: dict[str, dict[str, list[torch.Tensor]]] = {}

    def setup(self, stage: str) -> None:
        self.itc = itc_loss(rank=self.global_rank, world_size=self.trainer.world_size)

    # -- steps ---------------------------------------------------------------------------------
    def _itc(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(
            batch["modality"], batch["media"], batch["input_ids"], batch["attention_mask"]
        )
        return self.itc(**out), out

    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        weight = self.hparams.objective["itc_weight"]
        total = 0.0
        for modality, sub in batch.items():
            loss, _ = self._itc(sub)
            aux = self.model.text.aux_loss()  # MoE balancing terms of this forward (0 if dense)
            self.log(f"train/itc_{modality}", loss, batch_size=len(sub["caption"]))
            self._log_moe(modality)
            total = total + weight * loss + aux
        self.log("train/loss", total, prog_bar=True)
        self.log("train/temperature", 1.0 / self.model.logit_scale.exp().detach())
        return total

    def _log_moe(self, modality: str) -> None:
        """Per-layer expert load (share of routed assignments) and dropped-token counts."""
        for layer, stats in self.model.text.moe_stats().items():
            prefix = f"moe/{modality}/layer{layer}"
            for e, share in enumerate(stats["load"].tolist()):
                self.log(f"{prefix}/load_e{e}", share)
            self.log(f"{prefix}/dropped", stats["dropped"].float())
            self.log(f"{prefix}/aux", self.model.text.layers[layer].mlp.aux_loss.detach())

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        loss, out = self._itc(batch)
        m = batch["modality"]
        self.log(f"val/itc_{m}", loss, batch_size=len(batch["caption"]), add_dataloader_idx=False)
        store = self._val.setdefault(m, {"media": [], "text": [], "key": []})
        store["media"].append(out["image_features"])
        store["text"].append(out["text_features"])
        store["key"].append(batch["caption_id"])

    def on_validation_epoch_end(self) -> None:
        losses = []
        for m, store in self._val.items():
            media, text, keys = (self._gather(store[k]) for k in ("media", "text", "key"))
            # media -> caption retrieval over the unique captions of the split
            uniq, first = _unique_first(keys)
            metrics = retrieval_metrics(
                media @ text[first].T, keys.tolist(), uniq.tolist(), ks=(1, 5)
            )
            self.log(f"val/{m}2text_R@1", metrics["R@1"], rank_zero_only=True)
            self.log(f"val/{m}2text_R@5", metrics["R@5"], rank_zero_only=True)
            losses.append(self.trainer.callback_metrics[f"val/itc_{m}"])
        if losses:
            self.log("val/loss", torch.stack(losses).sum(), sync_dist=True)
        self._val.clear()

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": o["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=o["lr"],
            betas=tuple(o["betas"]),
            eps=o["eps"],
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(o["warmup_ratio"] * total))
        sched = LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup, o["min_lr_ratio"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate this rank's parts, then stack every rank's along dim 0."""
        x = torch.cat(parts)
        return self.all_gather(x).reshape(-1, *x.shape[1:])


def _unique_first(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique keys (sorted) and the index of each one's first occurrence."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long, device=keys.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys), device=keys.device), reduce="amin")
    return uniq, first
