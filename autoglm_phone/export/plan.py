"""The INT4 export's size plan for any preset or config, without building its weights.

``size_plan(cfg)`` builds the model on the meta device (shapes only, no memory) and sizes each
parameter as ``precision.py``'s ``int4`` writes it: a quantised linear (``quantizable``) at
:func:`linear_bits` per weight (4-bit values plus one scale per group), an embedding at 8 bits
plus an FP32 scale per row, everything else (norms, biases, convolutions, position tables, MoE
routers) at FP32. A head tied to the embedding is written twice (the linear quantised, the
embedding at 8 bits), as the export does. The KV cache is FP16 for ``context_len`` tokens
(``size.kv_cache_bytes``). ``python export.py dry_run=true preset=autoglm-phone-9b`` prints it.

:data:`MEASURED_LINEAR_BITS` holds the bits per quantised linear weight measured on a
width-true, 2-layer GLM-4-9B slice exported to ``.pte`` (``python bench/export.py --slice-9b``);
group sizes not measured use the formula ``4 + 16 / group`` (XNNPACK packs the group scales as
bf16; the group-32 measurement, 4.498, agrees).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from autoglm_phone.config import MultiModalConfig
from autoglm_phone.export.precision import quantizable
from autoglm_phone.models.size import _bytes, kv_cache_bytes

BUDGET_BYTES = 6e9  # a 6 GB phone, decimal (so 5.59 GiB)
EMBEDDING_BITS = 8
EMBEDDING_ROW, TIED_SUFFIX = "text embedding (8-bit)", " + tied head (int4)"
# group size -> bits per quantised linear weight in the .pte (file bytes of one GLM-4-9B layer
# / its linear weights, two layers minus one: bench/export.py --slice-9b; docs/EXPORT.md)
# (4.4979 at group 32: 114,750,336 bytes for 203,948,032 linear weights and 20,992 FP32 ones)
MEASURED_LINEAR_BITS: dict[int, float] = {32: 4.4979}


def linear_bits(group_size: int) -> tuple[float, str]:
    """Bits per quantised linear weight and where the figure comes from."""
    if group_size in MEASURED_LINEAR_BITS:
        return MEASURED_LINEAR_BITS[group_size], "measured (9B slice)"
    return 4 + 16 / group_size, "formula (4 + 16/group)"


@dataclass
class PlanRow:
    name: str
    params: int
    bytes: float


@dataclass
class SizePlan:
    rows: list[PlanRow]
    group_size: int
    linear_bits: float
    source: str  # of linear_bits
    context_len: int
    kv_cache_bytes: int
    num_layers: int
    layer_bytes: float  # one decoder layer (the largest)
    budget_bytes: float = BUDGET_BYTES
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> float:
        return sum(r.bytes for r in self.rows)

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_cache_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def __str__(self) -> str:
        lines = [
            f"INT4 export size plan: linears at {self.linear_bits:.3f} bits/weight "
            f"(group {self.group_size}, {self.source}), embeddings at {EMBEDDING_BITS} bits, "
            "the rest FP32",
            f"{'part':<34}{'params':>14}{'bytes':>14}",
        ]
        for r in self.rows:
            lines.append(f"{r.name:<34}{r.params:>14,}{_bytes(r.bytes):>14}")
        kv = f"KV cache FP16, {self.context_len} tokens"
        lines += [
            f"{kv:<34}{'':>14}{_bytes(self.kv_cache_bytes):>14}",
            f"{'total':<34}{'':>14}{_bytes(self.total_bytes):>14}",
            f"per decoder layer: {_bytes(self.layer_bytes)} x {self.num_layers}",
            f"total {self.total_bytes / 1e9:.2f} GB vs budget {self.budget_bytes / 1e9:.2f} GB: "
            + ("fits" if self.fits else "does NOT fit"),
            *self.notes,
        ]
        return "\n".join(lines)


def parameter_bytes(model: nn.Module, group_size: int, bits: float) -> dict[int, float]:
    """Bytes of each parameter (by ``id``) as the INT4 export writes it; a parameter used both
    as an embedding and as a quantised linear (a tied head) counts both copies."""
    keep = quantizable(group_size)
    sizes: dict[int, float] = {}
    for p in model.parameters():
        sizes[id(p)] = 4.0 * p.numel()
    linear = {id(m.weight) for n, m in model.named_modules() if keep(m, n)}
    embedding = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if id(p) in embedding:
            rows, _ = p.shape
            sizes[id(p)] = p.numel() * EMBEDDING_BITS / 8 + 4 * rows
            if id(p) in linear:  # tied head: its own quantised copy
                sizes[id(p)] += p.numel() * bits / 8
        elif id(p) in linear:
            sizes[id(p)] = p.numel() * bits / 8
    return sizes


def size_plan(
    cfg: MultiModalConfig, *, group_size: int = 32, context_len: int | None = None
) -> SizePlan:
    """The INT4 export's bytes per part of the model ``cfg`` describes (built on meta)."""
    from autoglm_phone.models.autoglm import AutoGLMModel

    with torch.device("meta"):
        model = AutoGLMModel(cfg)
    bits, source = linear_bits(group_size)
    sizes = parameter_bytes(model, group_size, bits)
    context_len = context_len or cfg.text.max_seq_len
    decoder = model.text
    tied = decoder.lm_head.weight is decoder.embed_tokens.weight
    parts: list[tuple[str, list[nn.Parameter]]] = [
        (f"text decoder layers ({len(decoder.layers)})", list(decoder.layers.parameters())),
        (EMBEDDING_ROW + (TIED_SUFFIX if tied else ""), [decoder.embed_tokens.weight]),
    ]
    if not tied:
        parts.append(("LM head (int4)", [decoder.lm_head.weight]))
    parts.append(("text decoder other (final norm)", list(decoder.parameters())))
    for name, child in model.named_children():
        if name != "text":
            parts.append((name, list(child.parameters())))
    parts.append(("model's own parameters", list(model.parameters(recurse=False))))
    rows, seen = [], set()
    for name, params in parts:  # a parameter counts in the first part that lists it
        params = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            rows.append(
                PlanRow(name, sum(p.numel() for p in params), sum(sizes[id(p)] for p in params))
            )
    layer_bytes = max(sum(sizes[id(p)] for p in layer.parameters()) for layer in decoder.layers)
    notes = ["tied head: written twice, as an int4 linear and the 8-bit table"] if tied else []
    return SizePlan(
        rows=rows,
        group_size=group_size,
        linear_bits=bits,
        source=source,
        context_len=context_len,
        kv_cache_bytes=kv_cache_bytes(cfg.text, context_len),
        num_layers=len(decoder.layers),
        layer_bytes=layer_bytes,
        notes=notes,
    )
