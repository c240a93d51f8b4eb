"""Precisions an export can be written at: a table of how each prepares a copy of the model.

- ``fp32``: the reference, the eager model as trained;
- ``fp16``: every weight in half precision except the audio front end (log-mel power sums
  overflow FP16), which stays float32;
- ``int4``: torchao's ``Int8DynamicActivationIntxWeightConfig`` (the "8da4w" scheme XNNPACK runs:
  int8 per-token dynamic activations, symmetric int4 weights per group of ``group_size`` input
  channels, plain rounding) on the ``nn.Linear`` layers. Left at float32: the audio front end
  (no ``nn.Linear``; quantising its filterbank gave NaN), convolutions, embeddings, the MoE
  routers (their float32 ``.float()`` path conflicts with quantised weights) and the stacked
  MoE experts (not ``nn.Linear``; their quantisation comes with the generation export).
  For ONNX, ``int4`` is ONNX Runtime's MatMulNBits (4-bit weights, same group size, activations
  float32) applied to the FP32 graph, the front end's MatMul excluded (``backends.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from autoglm_phone.models.autoglm import AutoGLMModel

DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype  # of the weights and activations inside the methods
    prepare: Callable[[AutoGLMModel, int], AutoGLMModel]  # (model copy, group size) -> model
    scheme: str | None  # the quantisation scheme recorded in the manifest

    def quantization(self, group_size: int) -> dict | None:
        if self.scheme is None:
            return None
        return {"scheme": self.scheme, "weight_bits": 4, "group_size": group_size}


def _fp32(model: AutoGLMModel, group_size: int) -> AutoGLMModel:
    return model.float()


def _fp16(model: AutoGLMModel, group_size: int) -> AutoGLMModel:
    model.half()
    model.audio.frontend.float()  # window, filterbank, DFT basis
    return model


def quantizable(group_size: int) -> Callable[[nn.Module, str], bool]:
    """torchao's ``filter_fn``: the ``nn.Linear`` layers INT4 quantises (module docstring)."""

    def keep(module: nn.Module, fqn: str) -> bool:
        return (
            isinstance(module, nn.Linear)
            and module.in_features % group_size == 0
            and "frontend" not in fqn
            and not fqn.endswith("router")
        )

    return keep


def _int4(model: AutoGLMModel, group_size: int) -> AutoGLMModel:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)
    )
    quantize_(model.float(), config, filter_fn=quantizable(group_size))
    return model


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32, _fp32, None),
        Precision("fp16", torch.float16, _fp16, None),
        Precision("int4", torch.float32, _int4, "8da4w"),
    )
}


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def prepared(model: AutoGLMModel, precision: Precision, group_size: int) -> AutoGLMModel:
    """A copy of ``model`` at ``precision`` in eval mode (the caller's model is untouched)."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return precision.prepare(copy.deepcopy(model).eval(), group_size)
