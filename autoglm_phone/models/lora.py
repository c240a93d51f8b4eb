"""LoRA and DoRA fine-tuning of the towers and the decoder, through peft.

LoRA (Hu et al. 2021) adds a trainable low-rank update ``(alpha / r) * B A`` to a frozen linear
weight, with ``B = 0`` at init so the model starts unchanged; DoRA (Liu et al. 2024) also learns
each output row's magnitude separately from its direction. peft's ``LoraConfig`` and
``inject_adapter_in_model`` do the wrapping in place (the model stays an :class:`AutoGLMModel`);
these helpers only choose the target layers per tower, freeze the rest, merge / unmerge the
updates for inference, and save just the adapter weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft import set_peft_model_state_dict as _set_peft_state
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"  # peft's adapter name; one adapter per model here

# Full-match regexes over ``AutoGLMModel.named_modules()``: the linear layers of each tower.
TARGETS: dict[str, str] = {
    # GLM decoder: attention q/k/v/o and the fused SwiGLU (dense layers; MoE experts are tensors)
    "text": r"text\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate_up|down)_proj|memory_gate)",
    # timm ViT blocks: fused qkv, attention output, MLP
    "vision": r"vision\.vit\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
    # the audio tower's timm blocks (not its conv front end or input projection)
    "audio": r"audio\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
}


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Module name -> peft LoRA layer, for every wrapped layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = ("text",),
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    use_dora: bool = False,
    target_modules: str | Iterable[str] | None = None,
    keep_trainable: Iterable[str] = (),
) -> nn.Module:
    """Wrap the linear layers of the ``targets`` towers in LoRA (or DoRA) adapters, in place.

    ``targets`` picks from :data:`TARGETS` (``"text"``, ``"vision"``, ``"audio"``);
    ``target_modules`` replaces that choice with peft's own (a list of module-name suffixes, or a
    full-match regex), e.g. to adapt a bare tower. Afterwards only the adapter weights train,
    plus every parameter whose name starts with one of ``keep_trainable`` (e.g. ``"text_proj"``,
    ``"logit_scale"``). Apply after loading base weights: wrapped layers keep theirs under
    ``<layer>.base_layer``. Returns ``model``.
    """
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; merge_lora(model, unload=True) first")
    if target_modules is None:
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise ValueError(
                f"unknown LoRA targets {unknown or targets}; choose from {list(TARGETS)}"
            )
        target_modules = "|".join(f"(?:{TARGETS[t]})" for t in targets)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        use_dora=use_dora,
        target_modules=target_modules,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # also freezes the base model
    keep = tuple(keep_trainable)
    if keep:
        matched = [p for name, p in model.named_parameters() if name.startswith(keep)]
        if not matched:
            raise ValueError(f"keep_trainable {list(keep)} matches no parameter")
        for p in matched:
            p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold each adapter's update into its base weight (inference at base-model speed).

    With ``unload=True`` the wrappers are then replaced by their plain base layers, so the
    model's state dict has the original keys again (for ``save_pretrained`` / export); that
    cannot be undone. Otherwise :func:`unmerge_lora` restores the base weights. Returns ``model``.
    """
    layers = _require_lora(model)
    for layer in layers.values():
        if not layer.merged:
            layer.merge()
    if unload:
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract the merged updates again, restoring the base weights (to float rounding)."""
    for layer in _require_lora(model).values():
        if layer.merged:
            layer.unmerge()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (``lora_A`` / ``lora_B``, DoRA magnitudes), peft's key format."""
    _require_lora(model)
    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load :func:`lora_state_dict` output into a model prepared by the same :func:`apply_lora`."""
    _require_lora(model)
    result = _set_peft_state(model, state_dict, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"LoRA state dict does not fit the model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    return model


def trainable_summary(model: nn.Module) -> dict[str, object]:
    """Counts of trainable vs all parameters, in total and per top-level submodule."""
    total = trainable = 0
    per_module: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        row = per_module.setdefault(name.split(".")[0], {"trainable": 0, "total": 0})
        row["total"] += p.numel()
        total += p.numel()
        if p.requires_grad:
            row["trainable"] += p.numel()
            trainable += p.numel()
    return {
        "trainable": trainable,
        "total": total,
        "fraction": trainable / max(total, 1),
        "lora_layers": len(lora_layers(model)),
        "per_module": per_module,
    }


def _require_lora(model: nn.Module) -> dict[str, LoraLayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call apply_lora first")
    return layers
