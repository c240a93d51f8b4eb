"""Formats an artifact can be written in: ExecuTorch (``.pte`` lowered to XNNPACK) and ONNX.

Each :class:`Backend` turns one :class:`~autoglm_phone.export.methods.Method` into one file and
says how each precision is made for it; the runtime side (running a file) is in ``runtime.py``.
Both trace with ``torch.export`` (ONNX through the dynamo exporter), under ``no_grad`` so the
graphs hold inference ops only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoglm_phone.export.methods import Method
from autoglm_phone.export.precision import PRECISIONS, QUANT_METHODS, TORCH_ONLY, Precision
from autoglm_phone.models.autoglm import AutoGLMModel


def _write_executorch(method: Method, path: Path) -> torch.export.ExportedProgram:
    """``torch.export`` -> edge dialect -> XNNPACK delegate where it can, portable kernels for
    the rest (e.g. ``cumsum``) -> ``.pte`` with one method named ``method.name``. The quant
    fusion pass turns torchao's 8-bit embeddings into ``quantized_decomposed.embedding_byte``
    (ExecuTorch's quantized kernel library; the runtime loads it) and folds constants."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    with torch.no_grad():
        program = torch.export.export(method.module, method.example_inputs, strict=False)
    edge = to_edge_transform_and_lower({method.name: program}, partitioner=[XnnpackPartitioner()])
    config = ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)
    path.write_bytes(edge.to_executorch(config).buffer)
    return program


def _write_onnx(method: Method, path: Path) -> torch.export.ExportedProgram:
    """The dynamo exporter, weights inside the file (one file per method)."""
    with torch.no_grad():
        program = torch.onnx.export(
            method.module,
            method.example_inputs,
            dynamo=True,
            input_names=list(method.input_names),
            output_names=list(method.output_names),
            external_data=False,
        )
    program.save(str(path), external_data=False)
    return program.exported_program


def _onnx_matmul_nbits(path: Path, group_size: int) -> None:
    """ONNX Runtime's 4-bit weight-only MatMulNBits on every MatMul with a constant weight,
    except the audio front end's (its filterbank; quantised, real clips gave NaN)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(str(path))
    front = [n.name for n in proto.graph.node if any("frontend" in i for i in n.input)]
    quantizer = MatMulNBitsQuantizer(
        proto, bits=4, block_size=group_size, is_symmetric=True, nodes_to_exclude=front
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)


def _onnx_limits(model: AutoGLMModel, precision: str, methods: Sequence[str]) -> str | None:
    text = model.itc_text_tower.cfg
    if precision == "fp16" and "text" in methods and text.moe.num_experts:
        return (
            "format=onnx precision=fp16 with an MoE text encoder: ONNX Runtime's CPU provider "
            "has no FP16 ScatterElements(reduction='add'), which the MoE dispatch uses; export "
            "the text method at fp32 or int4, or use format=executorch"
        )
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    suffix: str
    write: Callable[[Method, Path], torch.export.ExportedProgram]  # writes, returns the program
    # precision -> (the precision the torch model is prepared at, a pass over the written file)
    precision_overrides: dict[str, tuple[str, Callable[[Path, int], None]]] = field(
        default_factory=dict
    )
    schemes: dict[str, str] = field(default_factory=dict)  # precision -> manifest scheme
    quant_methods: tuple[str, ...] = QUANT_METHODS  # the INT4 grids it can write (rtn, awq)
    embedding_bits: dict[str, int | None] = field(default_factory=dict)  # precision -> override
    # (model, precision, methods) -> why this combination cannot be written, or None
    limits: Callable[[AutoGLMModel, str, Sequence[str]], str | None] = lambda *_: None

    def torch_precision(self, precision: Precision) -> Precision:
        name = self.precision_overrides.get(precision.name, (precision.name, None))[0]
        return {**PRECISIONS, **TORCH_ONLY}[name]

    def export(
        self, method: Method, path: Path, precision: Precision, group_size: int
    ) -> torch.export.ExportedProgram:
        program = self.write(method, path)
        if precision.name in self.precision_overrides:
            self.precision_overrides[precision.name][1](path, group_size)
        return program

    def quantization(self, precision: Precision, group_size: int, quant: str) -> dict | None:
        q = precision.quantization(group_size, quant)
        if q is not None and precision.name in self.schemes:
            q["scheme"] = self.schemes[precision.name]
        if q is not None and precision.name in self.embedding_bits:
            q["embedding_bits"] = self.embedding_bits[precision.name]
        return q


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("executorch", ".pte", _write_executorch),
        Backend(
            "onnx",
            ".onnx",
            _write_onnx,
            precision_overrides={"int4": ("fp32_unstacked", _onnx_matmul_nbits)},
            schemes={"int4": "matmul_nbits_4bit_weight_only"},
            quant_methods=("rtn",),  # AWQ's search targets 8da4w's arithmetic, not MatMulNBits'
            embedding_bits={"int4": None},
            limits=_onnx_limits,
        ),
    )
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown export format {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
