"""INT4 for the whole model: the MoE experts as linears, the embeddings at 8 bits, and an
AWQ-style calibrated scale search (Lin et al. 2023, https://arxiv.org/abs/2306.00978).

- :func:`unstack_experts`: torchao's ``quantize_`` works on ``nn.Linear`` layers, and the MoE
  experts are stacked parameters ``(E, C, 2F)`` / ``(E, F, C)``. Each MoE layer becomes a
  :class:`LinearExpertsMoE`: the same routing and dispatch, each expert two ``nn.Linear`` run on
  its rows of the ``(E, capacity, C)`` buffer, so the experts quantise and lower (XNNPACK's
  dynamically quantised GEMM) exactly like every other linear layer.
- :func:`awq_calibrate`: per linear layer, a per-input-channel scale ``s = mean|x| ** a``
  (normalised), ``a`` searched on a grid for the least output error of the *quantised* layer
  on calibration activations; the weight is multiplied by ``s`` and the input by ``1 / s``
  (:class:`PreScaledLinear`, one elementwise multiply in the graph). ``a = 0`` is plain rounding,
  so per layer the calibrated error on the calibration set is never above rounding's. torchao's
  own ``AWQConfig`` needs a weight tensor with ``act_pre_scale``, which its 8da4w
  (``IntxUnpackedToInt8Tensor``) does not have in 0.18, hence this small version of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from autoglm_phone.models.moe import MoEFeedForward

AWQ_GRID = 20  # exponents a = 0, 1/20, ..., 19/20 (torchao's AWQ default)


class LinearExpertsMoE(MoEFeedForward):
    """:class:`MoEFeedForward` with each expert as two ``nn.Linear`` (``gate_up[e]``,
    ``down[e]``) instead of the stacked parameters; bit-for-bit the same function in FP32
    up to matmul summation order. Built by :meth:`from_stacked`, for export only."""

    gate_up: nn.ModuleList
    down: nn.ModuleList

    @classmethod
    def from_stacked(cls, moe: MoEFeedForward) -> LinearExpertsMoE:
        """The same layer (its settings and router shared, not copied) with the stacked
        weights copied into per-expert linears; ``moe`` is left as it was."""
        gate_up, down = moe.gate_up_proj.detach(), moe.down_proj.detach()  # (E, C, 2F), (E, F, C)
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        skip = {"_parameters", "_modules", "_buffers", "training"}
        out.__dict__.update({k: v for k, v in moe.__dict__.items() if k not in skip})
        out.training = moe.training
        out.router = moe.router
        out.gate_up = nn.ModuleList(_linear(w.T) for w in gate_up)  # weight (2F, C)
        out.down = nn.ModuleList(_linear(w.T) for w in down)  # weight (C, F)
        return out

    def experts(self, h: torch.Tensor) -> torch.Tensor:
        """``(E, M, C) -> (E, M, C)``, one expert's SwiGLU per row block. Each block keeps a
        leading 1 ``(1, M, C)``: a 2-D input exports to ONNX as ``Gemm``, which ONNX Runtime's
        4-bit pass (``MatMulNBits``, on ``MatMul`` only) would leave in FP32."""
        outs = []
        for e, (gate_up, down) in enumerate(zip(self.gate_up, self.down, strict=True)):
            gate, up = gate_up(h[e : e + 1]).chunk(2, dim=-1)  # (1, M, F) each
            outs.append(down(up * F.silu(gate)))  # (1, M, C)
        return torch.cat(outs)

    def expert_segments(self, h: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The sorted dispatch's experts (eager on CPU): ``(M, C) -> (M, C)``, expert ``e`` on
        its ``sizes[e]`` rows, through the per-expert linears."""
        out = []
        for rows, gate_up, down in zip(h.split(sizes), self.gate_up, self.down, strict=True):
            if rows.shape[0]:
                gate, up = gate_up(rows).chunk(2, dim=-1)  # (m, F) each
                out.append(down(up * F.silu(gate)))  # (m, C)
        return torch.cat(out) if out else h.new_zeros(0, self.hidden_size)


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``(out, in)`` (a copy), no bias."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    return layer


def unstack_experts(model: nn.Module) -> nn.Module:
    """Replace every :class:`MoEFeedForward` in ``model`` by a :class:`LinearExpertsMoE`
    (in place); returns ``model``."""
    for name, child in list(model.named_children()):
        if isinstance(child, MoEFeedForward) and not isinstance(child, LinearExpertsMoE):
            setattr(model, name, LinearExpertsMoE.from_stacked(child))
        else:
            unstack_experts(child)
    return model


class PreScaledLinear(nn.Module):
    """``linear(x * inv_scale)``: an AWQ-scaled layer whose weight already holds the scale."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        with torch.no_grad():
            linear.weight.mul_(scale)  # (out, in) * (in,)
        self.register_buffer("inv_scale", 1.0 / scale)

    @property
    def weight(self) -> torch.Tensor:  # read by code that asks a layer its dtype
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)


def quantized_weight(weight: torch.Tensor, config) -> torch.Tensor:
    """``weight`` quantised as torchao's ``quantize_`` would with ``config`` (a tensor
    subclass that ``F.linear`` runs with the scheme's arithmetic, activations included)."""
    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER
    from torchao.utils import DummyModule

    return _QUANTIZE_CONFIG_HANDLER[type(config)](DummyModule(weight), config).weight


@torch.no_grad()
def awq_scale(
    weight: torch.Tensor, inputs: torch.Tensor, config, grid: int = AWQ_GRID
) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale ``(in,)`` with the least mean squared error of the quantised
    layer's output on ``inputs`` ``(N, in)``, and that error and plain rounding's (``a = 0``)."""
    ref = F.linear(inputs, weight)
    act = inputs.abs().mean(0)  # (in,)
    best, best_err, rtn_err = torch.ones_like(act), float("inf"), float("inf")
    for i in range(grid):
        s = act.pow(i / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = (F.linear(inputs / s, quantized_weight(weight * s, config)) - ref).pow(2).mean()
        if i == 0:
            rtn_err = err.item()
        if err.item() < best_err:
            best, best_err = s, err.item()
    return best, best_err, rtn_err


@torch.no_grad()
def awq_calibrate(
    model: nn.Module,
    keep: Callable[[nn.Module, str], bool],
    run_calibration: Callable[[], None],
    config,
) -> dict[str, tuple[float, float]]:
    """Scale every linear layer of ``model`` that ``keep(module, name)`` selects, in place: the
    layers' inputs are recorded while ``run_calibration()`` runs the model, then each gets its
    :func:`awq_scale` as a :class:`PreScaledLinear`. Returns per layer (calibrated MSE, rounding
    MSE) on the calibration activations."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(m, n)}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, args, n=n: seen[n].append(args[0].reshape(-1, args[0].shape[-1]).float())
        )
        for n, m in layers.items()
    ]
    try:
        run_calibration()
    finally:
        for h in hooks:
            h.remove()
    errors = {}
    for name, layer in layers.items():
        if not seen[name]:
            continue  # not on the exported path
        scale, err, rtn = awq_scale(layer.weight.float(), torch.cat(seen[name]), config)
        errors[name] = (err, rtn)
        _set_module(model, name, PreScaledLinear(layer, scale.to(layer.weight.dtype)))
    return errors


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
