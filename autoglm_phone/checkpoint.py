"""Load a trained model without the training app: :func:`load_model`.

Two sources, one result (:class:`LoadedModel`):

- a training checkpoint (``.ckpt``, written by the Lightning app): plain hyper-parameters
  (``model`` config dict, ``finetune``, ``tokenizer_files``, ``data``, ...) and the weights under
  ``state_dict`` with a ``model.`` prefix, read with ``torch.load(..., weights_only=True)`` (no
  pickled code runs; Lightning is not needed to read it); LoRA layers are merged in;
- a :meth:`~autoglm_phone.models.autoglm.AutoGLMModel.save_pretrained` folder, with its
  ``tokenizer/`` if one was saved.

Either way the weights' shapes are checked against the config on the meta device before the
model is allocated (:mod:`autoglm_phone.models.io`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoglm_phone.config import MultiModalConfig
from autoglm_phone.models import io
from autoglm_phone.models.autoglm import AutoGLMModel
from autoglm_phone.models.lora import apply_lora, lora_layers, merge_lora
from autoglm_phone.tokenizer import load_tokenizer, tokenizer_from_files


@dataclass
class LoadedModel:
    """What :func:`load_model` returns."""

    model: AutoGLMModel  # eval mode, LoRA merged
    tokenizer: Any  # a Hugging Face tokenizer, or None if the source holds none
    config: MultiModalConfig
    hparams: dict[str, Any] | None  # a checkpoint's hyper-parameters (None for a folder)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedModel:
    """The model, tokenizer and config of a training checkpoint file or a saved folder."""
    path = Path(path)
    if path.is_dir():
        model = AutoGLMModel.from_pretrained(path, device=device)
        tokenizer_dir = path / io.TOKENIZER_DIR
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
        return LoadedModel(model.eval(), tokenizer, model.cfg, None)
    state, hp = read_model_state(path)
    model = build_model(hp, state, source=path, init_files=False)
    model.load_state_dict(state)
    if lora_layers(model):
        merge_lora(model, unload=True)
    files = hp.get("tokenizer_files")
    tokenizer = tokenizer_from_files(files) if files else None
    return LoadedModel(model.to(device).eval(), tokenizer, model.cfg, hp)


def read_model_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ``model.*`` weights (prefix removed) and hyper-parameters of a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "hyper_parameters"):
        if not isinstance(ckpt, dict) or key not in ckpt:
            raise ValueError(f"{path}: not a training checkpoint (no {key!r})")
    state = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    return state, ckpt["hyper_parameters"]


def build_model(
    hp: dict[str, Any],
    state: dict[str, torch.Tensor] | None = None,
    *,
    source: str | Path = "checkpoint",
    init_files: bool = True,
) -> AutoGLMModel:
    """The model a checkpoint's hyper-parameters describe, LoRA layers included (not loaded).

    Given the ``state`` it will receive, its keys and shapes are first checked against the
    config on the meta device (the error names ``source``). ``init_files=False`` drops the ViT
    initialisation file the config may name (the checkpoint's weights replace it anyway)."""
    try:
        cfg = MultiModalConfig.from_dict(hp["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: invalid model config in the hyper-parameters: {err}") from err
    if not init_files:
        cfg = io.without_init_files(cfg)
    finetune = hp.get("finetune")
    if state is not None:
        got = io.state_shapes(state)
        expected = io.expected_shapes(
            AutoGLMModel,
            cfg,
            got,
            source,
            untied=False,
            prepare=lambda m: apply_finetune_lora(m, finetune),
        )
        io.check_shapes(expected, got, source)
    model = AutoGLMModel(cfg)
    apply_finetune_lora(model, finetune)
    return model


def apply_finetune_lora(model: AutoGLMModel, finetune: dict[str, Any] | None) -> None:
    """Wrap ``model`` in peft LoRA/DoRA as ``finetune`` asks (nothing if ``lora`` is off)."""
    ft = finetune or {}
    if ft.get("lora"):
        apply_lora(
            model,
            targets=tuple(ft["lora_targets"]),
            r=ft["lora_r"],
            alpha=ft["lora_alpha"],
            dropout=ft["lora_dropout"],
            use_dora=ft["use_dora"],
            keep_trainable=tuple(ft["lora_keep_trainable"]),
        )
