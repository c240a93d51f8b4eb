"""Benchmark the export: artifact sizes and bits per weight, tower latency against eager, and the
GLM-4-9B slice that sizes the 9B INT4 plan.

    PYTHONPATH=. python bench/export.py [--quick] [--out outputs/bench/export.json]
    PYTHONPATH=. python bench/export.py --slice-9b [--group-size 32]

Default run: the tiny preset (random weights, seed 0; ``--quick``: at the tests' shallow depth
and short clips) exported as ExecuTorch FP32 / FP16 / INT4 and ONNX FP32 / INT4 (all three
methods; ONNX FP16 has no MoE text kernel). Per artifact: MiB, weights read, bits per weight
(the manifest's), export seconds, and the INT4 / FP32 size ratio. Latency: batch-1 calls of
each method (image, audio, text) for eager PyTorch, ONNX Runtime and ExecuTorch, interleaved
round-robin (one warm-up call each, then the median of rounds) in one child process per
thread count (1 and 2; ExecuTorch's thread pool is process-wide), with every ratio to eager
from the same rounds. A memory-bandwidth roofline (:func:`roofline_ms`): the weight bytes one
call reads over a measured copy bandwidth, the floor for a weight-bound call; decode tokens/s
joins it when the generation methods exist (``decode_row`` is the hook).

``--slice-9b``: the same export code on a width-true, depth-reduced GLM-4-9B decoder (hidden
4096, 32 heads, 2 KV heads, MLP 13696; 1 and 2 layers, a 1024-token vocabulary, random
weights), its text method at INT4: the per-layer ``.pte`` bytes (two layers minus one) and the
bits per quantised linear weight that ``export/plan.py`` uses for the 40-layer plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHALLOW = {"vision": {"depth": 1}, "audio": {"depth": 1}, "text": {"num_layers": 2, "moe": {"layers": [1]}}}
ARTIFACTS = [  # (format, precision)
    ("executorch", "fp32"),
    ("executorch", "fp16"),
    ("executorch", "int4"),
    ("onnx", "fp32"),
    ("onnx", "int4"),
]


# -- the 9B slice ------------------------------------------------------------------------------


def slice_config(num_layers: int, vocab_size: int = 1024):
    """The tiny preset's towers with a GLM-4-9B-wide decoder of ``num_layers`` layers."""
    from dataclasses import replace

    from autoglm_phone.config import TEXT_DECODERS, VisionConfig
    from autoglm_phone.models.presets import autoglm_phone_tiny

    text = replace(
        TEXT_DECODERS["glm-4-9b"](), num_layers=num_layers, vocab_size=vocab_size, pad_token_id=0
    )
    return replace(autoglm_phone_tiny(), vision=VisionConfig(stem="conv", depth=1), text=text)


def slice_9b(group_size: int, out_dir: Path) -> dict:
    """Export the text method of 1- and 2-layer 9B-wide slices at INT4; per-layer bytes."""
    from autoglm_phone.export import export_model
    from autoglm_phone.export.plan import parameter_bytes
    from autoglm_phone.export.precision import quantizable
    from autoglm_phone.models.autoglm import AutoGLMModel

    sizes, seconds, linear = {}, {}, {}
    for layers in (1, 2):
        torch.manual_seed(0)
        model = AutoGLMModel(slice_config(layers)).eval()
        keep = quantizable(group_size)
        linear[layers] = sum(
            m.weight.numel() for n, m in model.text.layers.named_modules() if keep(m, n)
        )
        start = time.perf_counter()
        manifest = export_model(
            model,
            out_dir / f"slice_{layers}",
            precision="int4",
            methods=("text",),
            max_text_len=32,
            group_size=group_size,
        )
        seconds[layers] = round(time.perf_counter() - start, 1)
        sizes[layers] = manifest["files"]["text.pte"]["size"]
        del model
    layer = model_layer = sizes[2] - sizes[1]
    per_linear = linear[2] - linear[1]
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = AutoGLMModel(slice_config(1))
    other = sum(  # the layer's non-linear parameters (norms), FP32
        p.numel() * 4 for p in meta.text.layers[0].parameters()
    ) - sum(
        m.weight.numel() * 4
        for n, m in meta.text.layers.named_modules()
        if quantizable(group_size)(m, n)
    )
    bits = 8 * (model_layer - other) / per_linear
    planned = sum(parameter_bytes(meta.text.layers[0], group_size, bits).values())
    return {
        "group_size": group_size,
        "pte_bytes": sizes,
        "export_seconds": seconds,
        "layer_bytes": layer,
        "layer_linear_weights": per_linear,
        "bits_per_linear_weight": round(bits, 4),
        "plan_layer_bytes": planned,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--slice-9b", action="store_true")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.slice_9b:
        out = args.out or ROOT / "outputs/bench/export_9b_slice.json"
        with tempfile.TemporaryDirectory() as tmp:
            result = slice_9b(args.group_size, Path(tmp))
        result["machine"] = {"platform": platform.platform(), "torch": torch.__version__}
        print(json.dumps(result, indent=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        return


if __name__ == "__main__":
    main()
