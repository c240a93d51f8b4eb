"""LightningModule for every recipe: ITC, ITM, MLM and prefix-LM objectives, fine-tuning, distillation.

One module, composed from ``objective`` weights (:class:`autoglm_phone.objectives.ObjectiveConfig`):
a weight of 0 switches a loss off, so ``itc_pretrain`` runs only the contrastive towers and
``caption_sft`` only the prefix LM. The objectives themselves live in ``autoglm_phone.objectives``
(shared with ``eval.py``); each tower runs once per batch and ITM, MLM and the LM reuse its tokens. ``finetune`` freezes modules,
unfreezes a tower's upper blocks on a schedule, or wraps layers in peft LoRA.

Hyper-parameters are plain dicts (model config, optimiser, objective, fine-tuning, data,
tokenizer files, paths), so checkpoints load with ``torch.load(..., weights_only=True)`` and
rebuild without Hydra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from autoglm_phone.checkpoint import (
    apply_finetune_lora,
    build_model,
    read_model_state,
)
from autoglm_phone.config import MultiModalConfig
from autoglm_phone.metrics import retrieval_metrics
from autoglm_phone.models.autoglm import AutoGLMModel
from autoglm_phone.objectives import (
    Features,
    ObjectiveConfig,
    build_objectives,
    clamped_logit_scale,
    compute,
)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def upper_blocks(tower: nn.Module, n: int) -> list[nn.Module]:
    """A tower's last ``n`` transformer blocks and its final norm (timm ViT or the audio tower)."""
    inner = getattr(tower, "vit", tower)
    blocks = list(inner.blocks)
    if not 0 < n <= len(blocks):
        raise ValueError(f"finetune.unfreeze.blocks={n}: the tower has {len(blocks)} blocks")
    return blocks[-n:] + (
        [inner.norm] if isinstance(getattr(inner, "norm", None), nn.Module) else []
    )


def plain_name(name: str) -> str:
    """A parameter's name without FSDP's wrapper segments (the name the config speaks of)."""
    return name.replace("_fsdp_wrapped_module.", "")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def lr_ratio_lookup(ratios: dict[str, float], model: nn.Module) -> Callable[[str], float]:
    """``name -> LR multiplier`` from ``optim.lr_ratios`` (parameter-name prefixes, the longest
    match wins, 1.0 otherwise); a prefix that names no parameter is an error."""
    names = [plain_name(n) for n, _ in model.named_parameters()]
    for prefix, ratio in ratios.items():
        if not any(_under(n, prefix) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"optim.lr_ratios: {prefix!r} names no parameter; top-level: {tops}")
        if not ratio > 0:
            raise ValueError(f"optim.lr_ratios.{prefix} must be > 0, got {ratio}")
    by_length = sorted(ratios, key=len, reverse=True)

    def ratio_of(name: str) -> float:
        return next((float(ratios[p]) for p in by_length if _under(name, p)), 1.0)

    return ratio_of


class PretrainModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        objective: dict[str, Any],
        data: dict[str, Any] | None = None,
        tokenizer_files: dict[str, str] | None = None,
        finetune: dict[str, Any] | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = AutoGLMModel(MultiModalConfig.from_dict(model))
        if init_from:  # weights before LoRA wraps the layers (peft keeps them as base_layer)
            state, _ = read_model_state(init_from)
            if self.model.text_encoder is None:  # a separate ITC text encoder (ALBEF split) is
                # left behind when the new run has none: caption_sft from itm_mlm_pretrain
                dropped = [k for k in state if k.startswith("text_encoder.")]
                for k in dropped:
                    del state[k]
                if dropped:
                    rank_zero_info(
                        f"init_from={init_from}: the separate ITC text encoder "
                        f"({len(dropped)} tensors) is not part of this model; not loaded"
                    )
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"init_from={init_from}: unexpected weights {unexpected[:5]}")
        apply_finetune_lora(self.model, finetune)
        # decided on the unwrapped shapes: under FSDP every parameter is a flat 1-D shard
        self._no_decay = {
            n for n, p in self.model.named_parameters() if p.dim() < 2 or "embed" in n
        }
        self.objective = ObjectiveConfig.from_dict(objective)  # unknown keys fail by name
        self.weights = self.objective.weights
        self.objectives = build_objectives(self.objective)
        self._val: dict[str, dict[str, list[torch.Tensor]]] = {}
        # modality -> decoder layer -> expert load (E,) of the last training step (dashboards)
        self.moe_load: dict[str, dict[int, torch.Tensor]] = {}
        self._apply_freeze(epoch=0)

    def setup(self, stage: str) -> None:
        # ITC gathers across this run's processes
        self.objectives = build_objectives(
            self.objective, rank=self.global_rank, world_size=self.trainer.world_size
        )
        self.load_teacher()

    def load_teacher(self) -> None:
        """The frozen distillation teacher, if the objective has one (once). Not a submodule:
        it is not trained and not saved in the checkpoint."""
        distill = self.objectives.get("distill")
        if distill is None or distill.teacher is not None:
            return
        teacher_ckpt = self.objective.distill.teacher_ckpt
        if not teacher_ckpt:
            raise ValueError("objective.distill.weight > 0 needs objective.distill.teacher_ckpt")
        state, hp = read_model_state(teacher_ckpt)
        teacher = build_model(hp, state, source=teacher_ckpt)
        teacher.load_state_dict(state)
        if teacher.cfg.vision.img_size != self.model.cfg.vision.img_size:
            raise ValueError(
                f"teacher img_size {teacher.cfg.vision.img_size} != student "
                f"{self.model.cfg.vision.img_size}: both must see the same batches"
            )
        distill.teacher = teacher.eval().requires_grad_(False).to(self.device)

    # -- freezing ------------------------------------------------------------------------------
    def _unfreeze_modules(self) -> list[nn.Module]:
        u = self.hparams.finetune["unfreeze"] if self.hparams.finetune else None
        if not u or u["blocks"] <= 0:
            return []
        return upper_blocks(getattr(self.model, u["tower"]), u["blocks"])

    def _apply_freeze(self, epoch: int) -> None:
        """``finetune.freeze`` modules stay frozen; the unfreeze set thaws from its epoch on."""
        ft = self.hparams.finetune or {}
        for name in ft.get("freeze", []):
            module = getattr(self.model, name, None)
            if not isinstance(module, nn.Module):
                raise ValueError(f"finetune.freeze: the model has no module {name!r}")
            module.requires_grad_(False)
        thaw = bool(self._unfreeze_modules()) and epoch >= ft["unfreeze"]["epoch"]
        for module in self._unfreeze_modules():
            module.requires_grad_(thaw)

    def on_train_epoch_start(self) -> None:
        self._apply_freeze(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # a part with nothing to train runs in eval mode: its batch-norm statistics and dropout
        # stay as they were (frozen towers, LoRA's base model)
        for child in self.model.children():
            child.train(any(p.requires_grad for p in child.parameters()))
        # ... and so does a frozen batch norm inside a part that trains (the conv stem of a
        # ViT whose upper blocks are thawed)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.train(any(p.requires_grad for p in m.parameters()))

    # -- objectives ----------------------------------------------------------------------------
    def _objectives(
        self, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Features]:
        """Unweighted losses, metrics and features of one modality's batch
        (:func:`autoglm_phone.objectives.compute`)."""
        return compute(self.model, batch, self.objectives, self.objective)

    def _total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights.get(k, 1.0) * v for k, v in losses.items())  # moe_aux: weight 1

    # -- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> torch.Tensor:
        total = 0.0
        for modality, sub in batch.items():
            losses, metrics, _ = self._objectives(sub)
            n = len(sub["caption"])
            for name, value in {**losses, **metrics}.items():
                self.log(f"train/{name}_{modality}", value, batch_size=n)
            self._log_moe(modality)
            total = total + self._total(losses)
        self.log("train/loss", total, prog_bar=True)
        self.log("train/temperature", 1.0 / clamped_logit_scale(self.model.logit_scale.detach()))
        return total

    def _log_moe(self, modality: str) -> None:
        """Per-layer expert load (share of routed assignments) and dropped-token counts; nothing
        when the decoder has not run (ITC with a separate text encoder)."""
        for layer, stats in self.model.text.moe_stats().items():
            if "load" not in stats:
                continue
            prefix = f"moe/{modality}/layer{layer}"
            self.moe_load.setdefault(modality, {})[layer] = stats["load"].detach()
            for e, share in enumerate(stats["load"].tolist()):
                self.log(f"{prefix}/load_e{e}", share)
            self.log(f"{prefix}/dropped", stats["dropped"].float())
            self.log(f"{prefix}/aux", self.model.text.layers[layer].mlp.aux_loss.detach())

    def validation_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> Features:
        """Logs the batch's losses and keeps its contrastive features for the epoch's recall;
        returns the features (callbacks' ``outputs``: the dashboards' retrieval examples)."""
        losses, metrics, feats = self._objectives(batch)
        m, n = batch["modality"], len(batch["caption"])
        for name, value in {**losses, **metrics}.items():
            self.log(f"val/{name}_{m}", value, batch_size=n, add_dataloader_idx=False)
        self.log(f"val/total_{m}", self._total(losses), batch_size=n, add_dataloader_idx=False)
        if feats.text is not None:
            store = self._val.setdefault(m, {"media": [], "text": [], "key": []})
            store["media"].append(feats.media)
            store["text"].append(feats.text)
            store["key"].append(batch["caption_id"])
        return feats

    def on_validation_epoch_end(self) -> None:
        for m, store in self._val.items():
            media, text, keys = (self._gather(store[k]) for k in ("media", "text", "key"))
            # media -> caption retrieval over the unique captions of the split (eval.py's metric)
            uniq, first = _unique_first(keys)
            sim = media @ text[first].T  # (N, U)
            if torch.isfinite(sim).all():
                metrics = retrieval_metrics(sim, keys.tolist(), uniq.tolist(), ks=(1, 5))
            else:  # a diverged model: no recall to report, and training goes on to say so
                rank_zero_warn(f"val/{m}: non-finite embeddings, retrieval logged as NaN")
                metrics = {"R@1": math.nan, "R@5": math.nan}
            self.log(f"val/{m}2text_R@1", metrics["R@1"], rank_zero_only=True)
            self.log(f"val/{m}2text_R@5", metrics["R@5"], rank_zero_only=True)
        totals = [v for k, v in self.trainer.callback_metrics.items() if k.startswith("val/total_")]
        if totals:
            self.log("val/loss", torch.stack(totals).sum(), sync_dist=True)
        self._val.clear()

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW; weight decay on matrices only. Parameters unfrozen later get their own groups,
        whose LR is 0 before their epoch and ``lr_ratio`` times the schedule after it."""
        o = self.hparams.optim
        later = {id(p) for mod in self._unfreeze_modules() for p in mod.parameters()}
        ratio_of = lr_ratio_lookup(o.get("lr_ratios") or {}, self.model)
        groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad or id(p) in later:
                name = plain_name(name)
                decay = name not in self._no_decay
                groups.setdefault((id(p) in later, decay, ratio_of(name)), []).append(p)
        keys = sorted(groups)
        opt = torch.optim.AdamW(
            [
                {
                    "params": groups[k],
                    "weight_decay": o["weight_decay"] if k[1] else 0.0,
                    "lr": o["lr"] * k[2],  # LambdaLR scales each group's own initial LR
                }
                for k in keys
            ],
            lr=o["lr"],
            betas=tuple(o["betas"]),
            eps=o["eps"],
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(o["warmup_ratio"] * total))

        def main(s: int) -> float:
            return warmup_cosine(s, total, warmup, o["min_lr_ratio"])

        lambdas = [main if not k[0] else self._thawed_schedule(main, total) for k in keys]
        sched = LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _thawed_schedule(self, main, total: int):
        u = self.hparams.finetune["unfreeze"]
        epochs = max(1, self.trainer.max_epochs or 1)
        start = u["epoch"] * total // epochs  # the first step of the unfreeze epoch

        def thawed(s: int) -> float:
            return u["lr_ratio"] * main(s) if s >= start else 0.0

        return thawed

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
