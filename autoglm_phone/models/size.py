"""Size accounting: parameters and weight memory per submodule at FP32 / FP16 / INT4, and the
FP16 KV cache; what :meth:`AutoGLMModel.summary <autoglm_phone.models.autoglm.AutoGLMModel.summary>`
prints (convention in :func:`weight_bytes`, docs/MODEL.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from autoglm_phone.config import DecoderConfig, MultiModalConfig

PRECISIONS = ("fp32", "fp16", "int4")


def weight_bytes(model: nn.Module, int4_group_size: int = 128) -> dict[int, dict[str, float]]:
    """Bytes of each parameter (keyed by ``id``) at FP32, FP16 and INT4.

    INT4 convention (weight-only, as torchao's ``Int4WeightOnlyConfig`` default): the weight
    matrix of every ``nn.Linear`` takes 4 bits per weight plus an FP16 scale and an FP16 zero
    point per ``int4_group_size`` consecutive input weights (group 128: 4.25 bits per weight);
    everything else, i.e. embeddings,
    norms, biases, convolutions, attention-pooler in-projections, learned queries, stays FP16.
    A weight shared by an embedding and a Linear (tied LM head) counts once, as an embedding.
    """
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    linear -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    sizes = {}
    for p in model.parameters():
        n = p.numel()
        int4 = 2 * n
        if id(p) in linear:
            out_features, in_features = p.shape
            int4 = n / 2 + 4 * out_features * math.ceil(in_features / int4_group_size)
        sizes[id(p)] = {"fp32": 4 * n, "fp16": 2 * n, "int4": int4}
    return sizes


def kv_cache_bytes(cfg: DecoderConfig, context_len: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for one sequence: ``2 * L * H_kv * D * T`` values, where
    ``T`` is the context, or at most one segment with memory on (``memory.SegmentKVCache``)."""
    t = min(context_len, cfg.memory.segment_len) if cfg.memory.enabled else context_len
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * t * bytes_per_value


def memory_state_bytes(cfg: DecoderConfig, bytes_per_value: int = 2) -> int:
    """The recurrent memory of one sequence, ``L * S * C`` values (0 without memory); with the
    KV cache of one segment, all decoding keeps whatever the context length."""
    m = cfg.memory
    return cfg.num_layers * m.num_slots * cfg.hidden_size * bytes_per_value if m.enabled else 0


@dataclass
class SummaryRow:
    name: str
    params: int
    trainable: int
    bytes: dict[str, float]  # precision -> weight bytes


@dataclass
class ModelSummary:
    """What :meth:`AutoGLMModel.summary` returns; ``str()`` is the table it prints."""

    rows: list[SummaryRow]  # one per top-level submodule (or parameter of the model itself)
    precision: str  # the default column: "int4" when cfg.quantize says so, else the weights' dtype
    context_len: int
    kv_cache_bytes: int  # FP16, batch 1
    int4_group_size: int
    memory_state_bytes: int = 0  # FP16, batch 1; 0 without memory

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    def weight_bytes(self, precision: str | None = None) -> float:
        return sum(r.bytes[precision or self.precision] for r in self.rows)

    def total_bytes(self, precision: str | None = None) -> float:
        """Weights at ``precision`` (default: the summary's) plus the FP16 KV cache and memory."""
        return self.weight_bytes(precision) + self.kv_cache_bytes + self.memory_state_bytes

    def __str__(self) -> str:
        head = ["module", "params", "trainable"] + [
            p.upper() + ("*" if p == self.precision else "") for p in PRECISIONS
        ]
        total = SummaryRow(
            "total", self.params, self.trainable, {p: self.weight_bytes(p) for p in PRECISIONS}
        )
        body = [
            [r.name, _count(r.params), f"{100 * r.trainable / max(r.params, 1):.0f}%"]
            + [_bytes(r.bytes[p]) for p in PRECISIONS]
            for r in [*self.rows, total]
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        rule = "-" * len(line(head))
        kv = f"KV cache, FP16, {self.context_len} tokens, batch 1: {_bytes(self.kv_cache_bytes)}"
        if self.memory_state_bytes:
            kv += f" (one segment) + memory state {_bytes(self.memory_state_bytes)}"
        return "\n".join(
            [
                line(head),
                rule,
                *(line(r) for r in body[:-1]),
                rule,
                line(body[-1]),
                "",
                f"INT4: 4-bit Linear weights + FP16 scale and zero point per {self.int4_group_size}; "
                "embeddings, norms, biases at FP16.",
                kv,
                f"{self.precision.upper()}* weights + KV cache: {_bytes(self.total_bytes())}",
            ]
        )


def model_summary(
    model: nn.Module,
    cfg: MultiModalConfig,
    context_len: int | None = None,
    int4_group_size: int = 128,
) -> ModelSummary:
    """Parameters and weight memory per top-level submodule of ``model`` (a parameter shared by
    two submodules counts in the first), and the FP16 KV cache of one sequence of
    ``context_len`` tokens (default ``cfg.text.max_seq_len``)."""
    context_len = context_len or cfg.text.max_seq_len
    sizes = weight_bytes(model, int4_group_size)
    rows, seen = [], set()
    named = [(n, list(m.parameters())) for n, m in model.named_children()]
    named += [(n, [p]) for n, p in model.named_parameters(recurse=False)]
    for name, params in named:
        params = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        rows.append(
            SummaryRow(
                name=name,
                params=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                bytes={k: sum(sizes[id(p)][k] for p in params) for k in PRECISIONS},
            )
        )
    dtype = next(model.parameters()).dtype
    precision = "int4" if cfg.quantize == "int4" else "fp32" if dtype == torch.float32 else "fp16"
    return ModelSummary(
        rows=rows,
        precision=precision,
        context_len=context_len,
        kv_cache_bytes=kv_cache_bytes(cfg.text, context_len),
        int4_group_size=int4_group_size,
        memory_state_bytes=memory_state_bytes(cfg.text),
    )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
