"""``export_model``: a model (and its tokenizer) -> a folder of artifacts and ``manifest.json``.

What cannot be exported is refused by name before anything is written (:func:`check_exportable`),
never dropped silently.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from autoglm_phone.export.backends import get_backend
from autoglm_phone.export.manifest import write_manifest
from autoglm_phone.export.methods import METHODS, NOT_YET, Shapes
from autoglm_phone.export.precision import DEFAULT_GROUP_SIZE, get_precision, prepared
from autoglm_phone.models.autoglm import AutoGLMModel

TOKENIZER_DIR = "tokenizer"
DEFAULT_MAX_TEXT_LEN = 32  # the synthetic data's max_text_len
DEFAULT_AUDIO_SECONDS = 1.0  # the synthetic data's clips


class NotExportable(ValueError):
    """A requested method or a model feature that this exporter cannot write (yet)."""


def check_exportable(model: AutoGLMModel, methods: Sequence[str], shapes: Shapes) -> None:
    """Refuse, naming it, what would not export or would export as something else."""
    for name in methods:
        if name in NOT_YET:
            raise NotExportable(f"method {name!r}: {NOT_YET[name]}")
        if name not in METHODS:
            raise NotExportable(f"unknown method {name!r}; exportable: {', '.join(METHODS)}")
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


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "executorch", "torchao", "onnx", "onnxruntime", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def export_model(
    model: AutoGLMModel,
    out_dir: str | Path,
    *,
    format: str = "executorch",
    precision: str = "fp32",
    tokenizer: Any = None,
    methods: Sequence[str] = tuple(METHODS),
    max_text_len: int = DEFAULT_MAX_TEXT_LEN,
    audio_seconds: float = DEFAULT_AUDIO_SECONDS,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> dict[str, Any]:
    """Write ``methods`` of ``model`` to ``out_dir`` (``<method><suffix>`` each, the tokenizer
    in ``tokenizer/``, ``manifest.json``); returns the manifest. ``out_dir`` must be empty or
    new. The model itself is not changed (each precision works on a copy)."""
    backend, prec = get_backend(format), get_precision(precision)
    shapes = Shapes(max_text_len, round(model.cfg.audio.sample_rate * audio_seconds))
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
    ready = prepared(model, torch_prec, group_size)
    entries, seconds = {}, {}
    for name in methods:
        method = METHODS[name](ready, shapes, torch_prec.dtype)
        method.module.eval()
        inputs, outputs = method.specs()
        path = out / f"{name}{backend.suffix}"
        start = time.perf_counter()
        backend.export(method, path, prec, group_size)
        seconds[name] = round(time.perf_counter() - start, 2)
        entries[name] = {
            "file": path.name,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
        }
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    manifest = {
        "format": backend.name,
        "backend": "xnnpack" if backend.name == "executorch" else "onnxruntime",
        "precision": prec.name,
        "quantization": backend.quantization(prec, group_size),
        "model": model.cfg.to_dict(),
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
        "shapes": {**asdict(shapes), "sample_rate": model.cfg.audio.sample_rate},
        "methods": entries,
        "export_seconds": seconds,
        "versions": _versions(),
    }
    return write_manifest(out, manifest)
