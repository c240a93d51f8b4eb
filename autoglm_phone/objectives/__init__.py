"""Training objectives: each takes the model, a batch and the batch's :class:`Features` and
returns its loss and metrics; the Lightning module and ``eval.py`` both use them.

| objective | file | loss functions |
|---|---|---|
| ITC (contrastive) | ``itc.py`` | ``losses/contrastive.py`` (open_clip ``ClipLoss``) |
| ITM (matching, hard negatives) | ``itm.py`` | ``losses/itm.py`` |
| MLM (masked caption tokens) | ``mlm.py`` | ``losses/mlm.py`` |
| prefix LM (instructions) | ``lm.py`` | ``losses/lm.py`` |
| prefix LM (long-context episodes) | ``episode.py`` | cross-entropy on the answers |
| distillation | ``distill.py`` | |

``losses/`` keeps the tensor-level maths (no model, tested against references); an objective
is the glue from a model and a batch to those functions. :func:`compute` runs a step: one tower
pass (:func:`encode_batch`), then every objective that is switched on. Episode batches (many
media per row) have no single media tensor: their objective runs the towers itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch

from autoglm_phone.objectives.config import NAMES, DistillConfig, ObjectiveConfig
from autoglm_phone.objectives.distill import Distill
from autoglm_phone.objectives.episode import EPISODE, EpisodeLM
from autoglm_phone.objectives.features import (
    Features,
    ObjectiveOutput,
    clamped_logit_scale,
    encode_batch,
    media_kwargs,
)
from autoglm_phone.objectives.itc import ITC
from autoglm_phone.objectives.itm import ITM, match_logits
from autoglm_phone.objectives.lm import PrefixLM
from autoglm_phone.objectives.mlm import MLM

if TYPE_CHECKING:
    from autoglm_phone.models.autoglm import AutoGLMModel


class Objective(Protocol):
    name: str

    def __call__(
        self, model: AutoGLMModel, batch: dict[str, Any], feats: Features
    ) -> ObjectiveOutput: ...


# name -> factory(cfg, rank, world_size); the order is the order a step runs them in
FACTORIES: dict[str, Callable[[ObjectiveConfig, int, int], Objective]] = {
    "itc": lambda cfg, rank, world: ITC(rank, world, mask_same_item=cfg.itc_mask_same_item),
    "distill": lambda cfg, rank, world: Distill(cfg.distill.temperature),
    "itm": lambda cfg, rank, world: ITM(),
    "mlm": lambda cfg, rank, world: MLM(cfg.mlm_prob),
    "lm": lambda cfg, rank, world: PrefixLM(),
    "episode": lambda cfg, rank, world: EpisodeLM(),
}


def build_objectives(
    cfg: ObjectiveConfig, rank: int = 0, world_size: int = 1
) -> dict[str, Objective]:
    """The objectives ``cfg`` switches on (weight > 0), in running order."""
    return {
        name: make(cfg, rank, world_size) for name, make in FACTORIES.items() if cfg.active(name)
    }


def compute(
    model: AutoGLMModel,
    batch: dict[str, Any],
    objectives: dict[str, Objective],
    cfg: ObjectiveConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Features]:
    """Unweighted losses (plus ``moe_aux``, the MoE balancing terms of every decoder pass),
    metrics and features of one modality's batch."""
    if batch["modality"] == EPISODE:
        others = [name for name in objectives if name != "episode"]
        if others:
            raise ValueError(
                f"episode batches (data=episodes) train only objective.episode_weight; set "
                f"{', '.join(f'objective.{n}_weight' for n in others)} to 0"
            )
        scale = clamped_logit_scale(model.logit_scale)
        feats = Features(media=scale.new_zeros(0), scale=scale)  # no single media tensor
    else:
        feats = encode_batch(model, batch, text=cfg.needs_text, block=cfg.needs_block)
    losses: dict[str, torch.Tensor] = {}
    metrics: dict[str, torch.Tensor] = {}
    aux = list(feats.aux)
    for name, objective in objectives.items():
        out = objective(model, batch, feats)
        losses[name] = out.loss
        metrics.update(out.metrics)
        if out.aux is not None:
            aux.append(out.aux)
    losses["moe_aux"] = torch.stack(aux).sum() if aux else feats.media.new_zeros(())
    return losses, metrics, feats


__all__ = [
    "FACTORIES",
    "ITC",
    "ITM",
    "MLM",
    "NAMES",
    "Distill",
    "EpisodeLM",
    "DistillConfig",
    "Features",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "PrefixLM",
    "build_objectives",
    "clamped_logit_scale",
    "compute",
    "encode_batch",
    "match_logits",
    "media_kwargs",
]
