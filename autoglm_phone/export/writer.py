"""``export_model``: a model (and its tokenizer) -> a folder of artifacts and ``manifest.json``.

What cannot be exported is refused by name before anything is written (:func:`check_exportable`),
never dropped silently. The manifest records, per method and for the folder, the weights the
artifact holds (the parameters its program reads, counted at their FP32 shapes) and the bits
per weight its file takes (file bits / weights: scales, buffers and the program included).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch.export.graph_signature import InputKind

from autoglm_phone.export.backends import get_backend
from autoglm_phone.export.manifest import write_manifest
from autoglm_phone.export.methods import METHODS, RETRIEVAL, Shapes, expand_methods
from autoglm_phone.export.precision import (
    DEFAULT_GROUP_SIZE,
    QUANT_METHODS,
    Precision,
    get_precision,
    int4_config,
    prepared,
    quantizable,
)
from autoglm_phone.export.quantize import awq_calibrate, unstack_experts
from autoglm_phone.models.autoglm import AutoGLMModel

TOKENIZER_DIR = "tokenizer"
DEFAULT_MAX_TEXT_LEN = 32  # the synthetic data's max_text_len
DEFAULT_AUDIO_SECONDS = 1.0  # the synthetic data's clips
DEFAULT_PROMPT_LEN = 128  # prefill embeddings: an image and a sound block and a question
DEFAULT_NEW_TOKENS = 128  # cache slots after the prompt (cache_len = prompt_len + this)
DEFAULT_METHODS = (*RETRIEVAL, "generate")


class NotExportable(ValueError):
    """A requested method or a model feature that this exporter cannot write (yet)."""


def check_exportable(model: AutoGLMModel, methods: Sequence[str], shapes: Shapes) -> None:
    """Refuse, naming it, what would not export or would export as something else."""
    for name in methods:
        if name not in METHODS:
            raise NotExportable(
                f"unknown method {name!r}; exportable: {', '.join(METHODS)} (or generate)"
            )
    if {"prefill", "decode", "memory_write"} & set(methods):
        check_generation(model, methods, shapes)
    if "text" not in methods:
        return
    text = model.itc_text_tower.cfg
    if text.moe.num_experts and text.moe.capacity_factor <= 0:
        raise NotExportable(
            "text.moe.capacity_factor <= 0 (dropless MoE) sizes its buffer from the data; it "
            "cannot export: set a capacity factor > 0"
        )
    if text.memory.enabled and shapes.max_text_len > text.memory.segment_len:
        raise NotExportable(
            f"max_text_len={shapes.max_text_len} > text.memory.segment_len="
            f"{text.memory.segment_len}: the memory segments are not exported yet"
        )
    if shapes.max_text_len > text.max_seq_len:
        raise NotExportable(
            f"max_text_len={shapes.max_text_len} exceeds text.max_seq_len={text.max_seq_len}"
        )


def _check_quant(
    backend: str,
    supported: Sequence[str],
    precision: Precision,
    quant: str,
    calibration: Calibration | None,
) -> None:
    if quant not in QUANT_METHODS:
        raise ValueError(f"unknown quant {quant!r}; expected one of {', '.join(QUANT_METHODS)}")
    if quant != "rtn" and precision.scheme is None:
        raise NotExportable(f"quant={quant} applies to int4 only, not precision={precision.name}")
    if quant not in supported:
        raise NotExportable(f"quant={quant} is not available for format={backend}")
    if quant == "awq" and not calibration:
        raise ValueError("quant=awq needs calibration inputs (method -> input tuples)")


def _folder_bits(out: Path, entries: dict[str, dict[str, Any]]) -> float:
    """Bits per weight over every artifact of the folder: their file bits / their weights."""
    size = sum((out / e["file"]).stat().st_size for e in entries.values())
    return round(8 * size / max(sum(e["weights"] for e in entries.values()), 1), 3)


def check_generation(model: AutoGLMModel, methods: Sequence[str], shapes: Shapes) -> None:
    """Refuse, naming it, a decoder whose generation methods would not export as eager runs."""
    text = model.text.cfg
    if text.moe.num_experts and text.moe.capacity_factor <= 0:
        raise NotExportable(
            "text.moe.capacity_factor <= 0 (dropless MoE) in the decoder sizes its buffer from "
            "the data; prefill/decode cannot export: set a capacity factor > 0"
        )
    memory = text.memory
    if memory.enabled and not memory.carry:
        raise NotExportable(
            "text.memory.carry=false (the no-memory ablation) is not exported: its segments "
            "neither read nor write; export the model with carry on, or without memory"
        )
    if memory.enabled and "decode" in methods and "memory_write" not in methods:
        raise NotExportable(
            "text.memory.enabled: decode needs memory_write (a full segment is written to the "
            "memory slots); ask for both, or for generate"
        )
    if not memory.enabled and "memory_write" in methods:
        raise NotExportable("memory_write: this decoder has no memory (text.memory.enabled=false)")
    if not memory.enabled and not 1 <= shapes.prompt_len <= shapes.cache_len <= text.max_seq_len:
        raise NotExportable(
            f"prompt_len={shapes.prompt_len} and cache_len={shapes.cache_len} must satisfy "
            f"1 <= prompt_len <= cache_len <= text.max_seq_len={text.max_seq_len}"
        )


def generation_shapes(
    model: AutoGLMModel, prompt_len: int, cache_len: int | None
) -> tuple[int, int]:
    """``(prompt_len, cache_len)``: one segment each with ``text.memory``; else as asked, the
    cache defaulting to the prompt plus :data:`DEFAULT_NEW_TOKENS`, within ``max_seq_len``."""
    text = model.text.cfg
    if text.memory.enabled:
        return text.memory.segment_len, text.memory.segment_len
    if cache_len is None:
        cache_len = min(prompt_len + DEFAULT_NEW_TOKENS, text.max_seq_len)
    return prompt_len, cache_len


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "executorch", "torchao", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def program_weights(program: torch.export.ExportedProgram) -> int:
    """Weights a program reads: the element counts of the parameters its graph uses (a
    quantised parameter counts its logical shape; the lifted but unused ones, e.g. the other
    towers of the model a method wraps, do not count)."""
    used = {n.name for n in program.graph.nodes if n.op == "placeholder" and n.users}
    return sum(
        program.state_dict[spec.target].numel()
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.PARAMETER and spec.arg.name in used
    )


Calibration = Mapping[str, Sequence[tuple[torch.Tensor, ...]]]  # method -> its input tuples


def calibrated(
    model: AutoGLMModel, shapes: Shapes, calibration: Calibration, group_size: int
) -> tuple[AutoGLMModel, dict[str, Any]]:
    """A float copy of ``model`` (experts unstacked) whose linears carry AWQ scales searched on
    the activations of each method run on its ``calibration`` inputs (batch 1, the export's
    shapes); and a summary of the search (layers, mean squared error calibrated and rounded)."""
    unknown = set(calibration) - set(METHODS)
    if unknown:
        raise ValueError(f"calibration for unknown methods {sorted(unknown)}")
    scaled = unstack_experts(copy.deepcopy(model).eval().float())
    modules = {name: METHODS[name](scaled, shapes, torch.float32).module for name in calibration}

    def run() -> None:
        with torch.no_grad():
            for name, rows in calibration.items():
                for row in rows:
                    modules[name](*row)

    errors = awq_calibrate(scaled, quantizable(group_size), run, int4_config(group_size))
    n = max(len(errors), 1)
    return scaled, {
        "samples": {name: len(rows) for name, rows in calibration.items()},
        "layers": len(errors),
        "mean_mse_awq": sum(e for e, _ in errors.values()) / n,
        "mean_mse_rtn": sum(r for _, r in errors.values()) / n,
    }


def export_model(
    model: AutoGLMModel,
    out_dir: str | Path,
    *,
    format: str = "executorch",
    precision: str = "fp32",
    tokenizer: Any = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    audio_seconds: float = DEFAULT_AUDIO_SECONDS,
    group_size: int = DEFAULT_GROUP_SIZE,
    quant: str = "rtn",
    calibration: Calibration | None = None,
    prompt_len: int = DEFAULT_PROMPT_LEN,
    cache_len: int | None = None,
    source: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``methods`` of ``model`` to ``out_dir`` (``<method><suffix>`` each, the tokenizer
    in ``tokenizer/``, ``manifest.json``); returns the manifest. ``out_dir`` must be empty or
    new. The model itself is not changed (each precision works on a copy). ``quant`` (INT4
    only): ``rtn`` rounds to nearest, ``awq`` searches per-channel scales on ``calibration``
    (per method, a sequence of input tuples at the export's shapes, batch 1). ``generate`` in
    ``methods`` names the generation methods; ``prompt_len`` / ``cache_len`` are their fixed
    prompt length and KV cache slots (:func:`generation_shapes`). ``source``: the checkpoint
    it came from, recorded for ``eval.py exported=...``."""
    backend, prec = get_backend(format), get_precision(precision)
    _check_quant(backend.name, backend.quant_methods, prec, quant, calibration)
    methods = expand_methods(model, methods)
    shapes = Shapes(
        max_text_len,
        round(model.cfg.audio.sample_rate * audio_seconds),
        *generation_shapes(model, prompt_len, cache_len),
    )
    if max_text_len < 1 or shapes.audio_samples <= model.cfg.audio.n_fft // 2:
        raise ValueError(f"export shapes too small: {shapes}")
    check_exportable(model, methods, shapes)
    refused = backend.limits(model, prec.name, methods)
    if refused is not None:
        raise NotExportable(refused)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; export writes into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)

    torch_prec = backend.torch_precision(prec)
    weights_from, calibration_summary = model, None
    if quant == "awq":
        weights_from, calibration_summary = calibrated(model, shapes, calibration or {}, group_size)
    ready = prepared(weights_from, torch_prec, group_size)
    entries, seconds = {}, {}
    for name in methods:
        method = METHODS[name](ready, shapes, torch_prec.dtype)
        method.module.eval()
        inputs, outputs = method.specs()
        path = out / f"{name}{backend.suffix}"
        start = time.perf_counter()
        program = backend.export(method, path, prec, group_size)
        seconds[name] = round(time.perf_counter() - start, 2)
        weights = program_weights(program)
        entries[name] = {
            "file": path.name,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "weights": weights,
            "bits_per_weight": round(8 * path.stat().st_size / max(weights, 1), 3),
        }
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    manifest = {
        "format": backend.name,
        "backend": "xnnpack" if backend.name == "executorch" else "onnxruntime",
        "precision": prec.name,
        "quantization": backend.quantization(prec, group_size, quant),
        "calibration": calibration_summary,
        "bits_per_weight": _folder_bits(out, entries),
        "model": model.cfg.to_dict(),
        "source": None if source is None else str(Path(source).resolve()),
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
        "shapes": {**asdict(shapes), "sample_rate": model.cfg.audio.sample_rate},
        "methods": entries,
        "export_seconds": seconds,
        "versions": _versions(),
    }
    return write_manifest(out, manifest)
