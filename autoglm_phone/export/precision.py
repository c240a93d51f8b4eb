"""Precisions an export can be written at: a table of how each prepares a copy of the model.

- ``fp32``: the reference, the eager model as trained;
- ``fp16``: every weight in half precision except the audio front end (log-mel power sums
  overflow FP16), which stays float32;
- ``int4``: the whole model's matrices at 4 bits. torchao's ``Int8DynamicActivationIntxWeightConfig``
  (the "8da4w" scheme XNNPACK runs: int8 per-token dynamic activations, symmetric int4 weights
  per group of ``group_size`` input channels) on every ``nn.Linear``, the MoE experts included
  (unstacked into linears first, ``quantize.py``); embeddings at 8 bits per weight (symmetric,
  one scale per row, ExecuTorch's ``embedding_byte``). ``quant`` picks how the 4-bit grid is
  chosen: ``rtn`` (round to nearest) or ``awq`` (per-channel scales searched on calibration
  activations, ``quantize.awq_calibrate``). Left at float32: the audio front end (no
  ``nn.Linear``; quantising its filterbank gave NaN), convolutions, norms, biases, position
  tables and the MoE routers (their float32 ``.float()`` path conflicts with quantised weights).
  For ONNX, ``int4`` is ONNX Runtime's MatMulNBits (4-bit weights, same group size, activations
  float32) applied to the FP32 graph with the experts unstacked, the front end's MatMul excluded
  (``backends.py``); embeddings stay float32 there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from autoglm_phone.export.quantize import unstack_experts
from autoglm_phone.models.autoglm import AutoGLMModel

DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: torch.dtype  # of the weights and activations inside the methods
    prepare: Callable[[AutoGLMModel, int], AutoGLMModel]  # (model copy, group size) -> model
    scheme: str | None  # the quantisation scheme recorded in the manifest
    embedding_bits: int | None = None  # None: embeddings at the precision's dtype

    def quantization(self, group_size: int, quant: str = "rtn") -> dict | None:
        if self.scheme is None:
            return None
        return {
            "scheme": self.scheme,
            "weight_bits": 4,
            "group_size": group_size,
            "embedding_bits": self.embedding_bits,
            "method": quant,
        }


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


def int4_config(group_size: int):
    """torchao's 8da4w config: int8 per-token dynamic activations, int4 symmetric weights per
    group of ``group_size`` input channels."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)
    )


def _unstacked_fp32(model: AutoGLMModel, group_size: int) -> AutoGLMModel:
    """FP32 with the MoE experts as ``nn.Linear`` (the same function): what a weight-only pass
    over the written file (ONNX MatMulNBits) then quantises like every other matrix."""
    return unstack_experts(model.float())


def _int4(model: AutoGLMModel, group_size: int) -> AutoGLMModel:
    """8da4w on every linear (experts unstacked), 8-bit embeddings (module docstring). An AWQ
    calibration, if asked for, has already scaled the linears (``writer.py``)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    model = unstack_experts(model.float())
    quantize_(model, int4_config(group_size), filter_fn=quantizable(group_size))
    embedding = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    quantize_(model, embedding, filter_fn=lambda m, _: isinstance(m, nn.Embedding))
    return model


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32, _fp32, None),
        Precision("fp16", torch.float16, _fp16, None),
        Precision("int4", torch.float32, _int4, "8da4w", embedding_bits=8),
    )
}
# torch-side preparations a backend can ask for (``Backend.precision_overrides``), not offered
# as export precisions themselves
TORCH_ONLY: dict[str, Precision] = {
    "fp32_unstacked": Precision("fp32_unstacked", torch.float32, _unstacked_fp32, None),
}
QUANT_METHODS = ("rtn", "awq")  # how INT4 picks its grid: round to nearest, or AWQ-calibrated


def get_precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def prepared(model: AutoGLMModel, precision: Precision, group_size: int) -> AutoGLMModel:
    """A copy of ``model`` at ``precision`` in eval mode (the caller's model is untouched)."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return precision.prepare(copy.deepcopy(model).eval(), group_size)
