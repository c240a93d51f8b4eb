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
SHALLOW = {
    "vision": {"depth": 1},
    "audio": {"depth": 1},
    "text": {"num_layers": 2, "moe": {"layers": [1]}},
}
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


# -- sizes and latency on the tiny preset ------------------------------------------------------


def tiny_model(quick: bool):
    """The tiny preset with random weights (seed 0) and a small BPE tokenizer; shallow if quick."""
    from autoglm_phone import AutoGLMModel
    from autoglm_phone.tokenizer import train_tokenizer

    texts = ["a red circle on the left", "a dog barks twice", "a high beep then silence"] * 20
    tok_dir = Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer = train_tokenizer(texts, tok_dir, vocab_size=320)
    torch.manual_seed(0)
    model = AutoGLMModel.from_pretrained(
        "autoglm-phone-tiny", SHALLOW if quick else {}, tokenizer=tokenizer
    )
    return model.eval(), tokenizer


def memory_bandwidth(nbytes: int = 1 << 28, rounds: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write counted) on one thread."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times)


def roofline_ms(weight_bytes: float, bandwidth: float) -> float:
    """The floor of one weight-bound call: every weight byte read once at ``bandwidth``."""
    return 1e3 * weight_bytes / bandwidth


def decode_row(folder: Path) -> dict | None:
    """Decode tokens/s of an exported folder: not measured yet (None). The generation methods
    exist (``prefill``/``decode``); this benchmark exports and times the retrieval side only."""
    return None


def example_inputs(manifest: dict) -> dict[str, tuple[torch.Tensor, ...]]:
    """One batch-1 input tuple per method at the export's shapes (seeded)."""
    g = torch.Generator().manual_seed(1)
    shapes = manifest["shapes"]
    size = manifest["methods"]["image"]["inputs"][0]["shape"][-1]
    ids = torch.randint(3, 300, (1, shapes["max_text_len"]), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, shapes["max_text_len"] // 2 :] = False
    return {
        "image": (torch.rand(1, 3, size, size, generator=g),),
        "audio": (0.2 * torch.randn(1, shapes["audio_samples"], generator=g),),
        "text": (ids, mask),
    }


def latency_child(model_dir: Path, folders: list[Path], threads: int, rounds: int) -> dict:
    """ms per batch-1 call of each method: eager and every folder, round-robin; median."""
    from autoglm_phone import AutoGLMModel
    from autoglm_phone.export import ExportedModel, read_manifest
    from autoglm_phone.export.methods import METHODS, RETRIEVAL, Shapes

    torch.set_num_threads(threads)
    model = AutoGLMModel.from_pretrained(str(model_dir)).eval()
    manifest = read_manifest(folders[0])
    shapes = Shapes(manifest["shapes"]["max_text_len"], manifest["shapes"]["audio_samples"])
    inputs = example_inputs(manifest)
    runners: dict[str, dict[str, object]] = {name: {} for name in RETRIEVAL}
    for name in RETRIEVAL:  # the methods run_bench exports
        runners[name]["eager"] = METHODS[name](model, shapes, torch.float32).module
    for folder in folders:
        exported = ExportedModel.load(folder, num_threads=threads)
        for name, run in exported.runners.items():
            runners[name][folder.name] = lambda row, run=run: run(list(row))
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in r} for n, r in runners.items()}
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0: warm-up
            for name, by in runners.items():
                for key, call in by.items():
                    start = time.perf_counter()
                    call(*inputs[name]) if key == "eager" else call(inputs[name])
                    if r:
                        times[name][key].append(1e3 * (time.perf_counter() - start))
    return {n: {k: statistics.median(v) for k, v in by.items()} for n, by in times.items()}


def run_bench(quick: bool, out: Path) -> dict:
    from autoglm_phone.export import export_model
    from autoglm_phone.export.methods import RETRIEVAL

    model, tokenizer = tiny_model(quick)
    shapes = dict(max_text_len=12, audio_seconds=0.25) if quick else {}
    work = Path(tempfile.mkdtemp())
    model_dir = model.save_pretrained(work / "model", tokenizer=tokenizer)
    artifacts = {}
    for fmt, precision in ARTIFACTS:
        folder = work / f"{fmt}_{precision}"
        start = time.perf_counter()
        manifest = export_model(
            model, folder, format=fmt, precision=precision, tokenizer=tokenizer,
            methods=RETRIEVAL, **shapes,
        )  # fmt: skip
        artifacts[folder.name] = {
            "format": fmt,
            "precision": precision,
            "folder": folder,
            "seconds": round(time.perf_counter() - start, 1),
            "bits_per_weight": manifest["bits_per_weight"],
            "methods": {
                name: {
                    "bytes": manifest["files"][e["file"]]["size"],
                    "weights": e["weights"],
                    "bits_per_weight": e["bits_per_weight"],
                }
                for name, e in manifest["methods"].items()
            },
        }
        print(f"exported {folder.name} in {artifacts[folder.name]['seconds']} s", flush=True)
    latency = {}
    for threads in (1, 2):
        cmd = [
            sys.executable,
            __file__,
            "--latency-child",
            str(model_dir),
            "--threads",
            str(threads),
            "--rounds",
            "10" if quick else "20",
            *[str(a["folder"]) for a in artifacts.values()],
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:  # the child's own error, not only its exit status
            raise RuntimeError(f"latency at {threads} thread(s) failed:\n{done.stderr[-3000:]}")
        latency[threads] = json.loads(done.stdout.strip().splitlines()[-1])
    bandwidth = memory_bandwidth()
    result = {
        "quick": quick,
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "artifacts": {
            k: {**{kk: vv for kk, vv in a.items() if kk != "folder"}} for k, a in artifacts.items()
        },
        "latency_ms": latency,
        "decode": {k: decode_row(a["folder"]) for k, a in artifacts.items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
    }
    print(table(result, bandwidth))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return result


def table(result: dict, bandwidth: float) -> str:
    """One markdown table: per artifact and method, size, bits/weight, size ratio to the
    format's FP32, latency at 1 and 2 threads with its ratio to eager, and the roofline."""
    arts, lat = result["artifacts"], result["latency_ms"]
    head = (
        "| artifact | method | MiB | bits/weight | size / fp32 | ms 1T | x eager 1T | ms 2T "
        "| x eager 2T | roofline ms |"
    )
    lines = [head, "|" + "---|" * 10]
    for name in ("image", "audio", "text"):
        e1, e2 = lat[1][name]["eager"], lat[2][name]["eager"]
        lines.append(f"| eager | {name} | | | | {e1:.2f} | 1.00 | {e2:.2f} | 1.00 | |")
        for key, a in arts.items():
            if name not in a["methods"]:
                continue
            m = a["methods"][name]
            fp32 = arts[f"{a['format']}_fp32"]["methods"][name]["bytes"]
            t1, t2 = lat[1][name][key], lat[2][name][key]
            lines.append(
                f"| {key} | {name} | {m['bytes'] / 2**20:.2f} | {m['bits_per_weight']:.2f} "
                f"| {m['bytes'] / fp32:.3f} | {t1:.2f} | {e1 / t1:.2f} | {t2:.2f} "
                f"| {e2 / t2:.2f} | {roofline_ms(m['bytes'], bandwidth):.3f} |"
            )
    whole = ", ".join(f"{k} {a['bits_per_weight']:.2f}" for k, a in arts.items())
    lines += ["", f"bits per weight over all artifacts: {whole}"]
    lines.append(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (roofline = file bytes / bandwidth)")
    lines.append("x eager: eager ms / artifact ms in the same rounds (> 1: faster than eager)")
    if all(v is None for v in result["decode"].values()):
        lines.append("decode tokens/s: not measured yet (the retrieval side only)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--slice-9b", action="store_true")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--latency-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("folders", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latency_child is not None:
        print(
            json.dumps(latency_child(args.latency_child, args.folders, args.threads, args.rounds))
        )
        return
    if args.slice_9b:
        out = args.out or ROOT / "outputs/bench/export_9b_slice.json"
        with tempfile.TemporaryDirectory() as tmp:
            result = slice_9b(args.group_size, Path(tmp))
        result["machine"] = {"platform": platform.platform(), "torch": torch.__version__}
        print(json.dumps(result, indent=2))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        return
    run_bench(args.quick, args.out or ROOT / "outputs/bench/export.json")


if __name__ == "__main__":
    main()
