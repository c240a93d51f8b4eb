"""Benchmark the export: artifact sizes and bits per weight, tower latency against eager, and the
GLM-4-9B slice that sizes the 9B INT4 plan.

    PYTHONPATH=. python bench/export.py [--quick] [--part retrieval|decode] [--out ...json]
    PYTHONPATH=. python bench/export.py --slice-9b [--group-size 32]

Default run: the tiny preset (random weights, seed 0; ``--quick``: at the tests' shallow depth
and short clips) exported as ExecuTorch FP32 / FP16 / INT4 and ONNX FP32 / INT4 (all three
methods; ONNX FP16 has no MoE text kernel). Per artifact: MiB, weights read, bits per weight
(the manifest's), export seconds, and the INT4 / FP32 size ratio. Latency: batch-1 calls of
each method (image, audio, text) for eager PyTorch, ONNX Runtime and ExecuTorch, interleaved
round-robin (one warm-up call each, then the median of rounds) in one child process per
thread count (1 and 2; ExecuTorch's thread pool is process-wide), with every ratio to eager
from the same rounds. A memory-bandwidth roofline (:func:`roofline_ms`): the weight bytes one
call reads over a measured copy bandwidth, the floor for a weight-bound call.

Generation (``--part decode`` runs only it, keeping the rest of an earlier ``--out``): the same
preset with a dense decoder (:data:`DENSE_TEXT`: what ``save_glm4`` / ``Glm4ForCausalLM`` run)
exported with its towers and generation methods at FP32 / FP16 / INT4; a multimodal prompt (one
image, one clip, a 16-token question) then 64 greedy tokens on one thread, round-robin, for eager
``AutoGLMModel``, transformers' ``Glm4ForCausalLM`` on the same decoder weights and each folder
through ``ExportedModel``: time to first token, decode tokens/s, each over eager, the decode step
against its roofline (:func:`decode_row`), and an ETDump profile of each ``decode`` call
(:func:`decode_profile`).

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
from collections.abc import Callable
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


# -- generation: time to first token and decode tokens/s ---------------------------------------

# the decoder Glm4ForCausalLM has: no MoE layer, no memory (save_glm4 refuses both)
DENSE_TEXT = {"moe": {"num_experts": 0, "layers": []}, "memory": {"enabled": False}}
DECODE_SHAPES = dict(prompt_len=64, cache_len=128)  # image and sound blocks, a 16-token question
QUESTION_TOKENS, NEW_TOKENS = 16, 64
DECODE_PRECISIONS = ("fp32", "fp16", "int4")
Start = Callable[[], tuple[torch.Tensor, Callable[[int], torch.Tensor]]]


def dense_model(quick: bool, tokenizer):
    """The tiny preset with a dense decoder (no MoE layer, no memory: the shape ``save_glm4``
    writes and ``Glm4ForCausalLM`` runs), random weights (seed 0); shallow if quick."""
    from autoglm_phone import AutoGLMModel

    towers = {k: v for k, v in SHALLOW.items() if k != "text"} if quick else {}
    text = {"num_layers": SHALLOW["text"]["num_layers"]} if quick else {}
    torch.manual_seed(0)
    model = AutoGLMModel.from_pretrained(
        "autoglm-phone-tiny", {**towers, "text": {**text, **DENSE_TEXT}}, tokenizer=tokenizer
    )
    return model.eval()


def multimodal_prompt(img_size: int, audio_samples: int) -> dict[str, torch.Tensor]:
    """One image, one clip of the export's length and a 16-token question (random ids)."""
    g = torch.Generator().manual_seed(2)
    return {
        "images": torch.rand(1, 3, img_size, img_size, generator=g),
        "audio": 0.2 * torch.randn(1, audio_samples, generator=g),
        "input_ids": torch.randint(3, 300, (1, QUESTION_TOKENS), generator=g),
    }


def eager_start(model, prompt: dict) -> Start:
    """Eager ``AutoGLMModel``: ``build_prefix`` (the towers) and the decoder's own KV-cache loop
    (``GLMDecoder.begin_decode``, GLM's prefix mode)."""
    text = model.text

    def start():
        embeds, mask, _ = model.build_prefix(**prompt)  # (1, n, C)
        hidden, step = text.begin_decode(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS + 1
        )
        return text.lm_head(hidden), lambda t: text.lm_head(step(text.embed_tokens(ids(t))))

    return start


def transformers_start(model, glm4, prompt: dict) -> Start:
    """transformers' ``Glm4ForCausalLM`` on the same decoder weights (``save_glm4``), its
    ``DynamicCache`` loop; the prompt's embeddings from the eager towers. Causal over the
    prompt (GLM-4's own mode) where ours is prefix: the same work, different tokens."""

    def start():
        embeds, _, _ = model.build_prefix(**prompt)
        out = glm4(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        state = {"cache": out.past_key_values}

        def step(token: int) -> torch.Tensor:
            o = glm4(input_ids=ids(token), past_key_values=state["cache"], use_cache=True)
            state["cache"] = o.past_key_values
            return o.logits[:, -1]

        return out.logits[:, -1], step

    return start


def exported_start(exported, prompt: dict) -> Start:
    """An exported folder: ``build_prompts`` (the ``image``/``audio``/``embed`` methods), then
    ``prefill`` and one ``decode`` call per token (``ExportedModel.begin_decode``)."""

    def start():
        (row,) = exported.build_prompts(**prompt)  # (n, C)
        return exported.begin_decode(row, NEW_TOKENS + 1)

    return start


def ids(token: int) -> torch.Tensor:
    return torch.tensor([[token]])


def time_generation(start: Start) -> tuple[float, float, list[int]]:
    """Greedy: ms to the first token (prompt built and prefilled), ms per decoded token over
    :data:`NEW_TOKENS` more, and the tokens."""
    begin = time.perf_counter()
    logits, step = start()
    tokens = [int(logits.argmax())]
    first = time.perf_counter()
    for _ in range(NEW_TOKENS):
        tokens.append(int(step(tokens[-1]).argmax()))
    end = time.perf_counter()
    return 1e3 * (first - begin), 1e3 * (end - first) / NEW_TOKENS, tokens


def decode_profile(folder: Path, calls: int = 20, top: int = 6) -> dict:
    """Where one ``decode`` call of ``folder`` spends its time, from ExecuTorch's ETDump (the
    process's thread pool, one thread here), in mean ms per call over ``calls``: the whole
    ``Method::execute``, its XNNPACK delegate calls and its portable operators (the two add up
    to it), and the ``top`` operators."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    from autoglm_phone.export import read_manifest

    specs = read_manifest(folder)["methods"]["decode"]["inputs"]
    inputs = [torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in specs]
    inputs[1] = torch.tensor([DECODE_SHAPES["prompt_len"]])  # position: past a full prompt
    program = portable_lib._load_for_executorch(str(folder / "decode.pte"), enable_etdump=True)
    for _ in range(calls):
        program.run_method("decode", inputs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "etdump.etdp"
        program.write_etdump_result_to_file(str(path))
        events = [e for b in Inspector(etdump_path=str(path)).event_blocks for e in b.events]
    ms: dict[str, float] = {}
    for e in events:  # one event per instruction (and per delegated op), one time per call
        if e.perf_data is not None and len(e.perf_data.raw) == calls:
            name = e.name.removeprefix("native_call_")
            ms[name] = ms.get(name, 0.0) + sum(e.perf_data.raw) / calls
    frames = ("Method::execute", "OPERATOR_CALL", "DELEGATE_CALL")
    ops = sorted(((k, v) for k, v in ms.items() if k not in frames), key=lambda kv: -kv[1])
    return {
        "execute_ms": ms.get("Method::execute", 0.0),
        "delegate_ms": ms.get("DELEGATE_CALL", 0.0),
        "portable_ms": ms.get("OPERATOR_CALL", 0.0),
        "top_ms": dict(ops[:top]),
    }


def decode_child(
    model_dir: Path, glm4_dir: Path, folders: list[Path], rounds: int, audio_samples: int
) -> dict:
    """Per row (eager, transformers, every folder), one thread, round-robin (round 0 warms up):
    the medians of time to first token and ms per decoded token, and whether the greedy tokens
    equal eager's."""
    from transformers import Glm4ForCausalLM

    from autoglm_phone import AutoGLMModel
    from autoglm_phone.export import ExportedModel

    torch.set_num_threads(1)
    model = AutoGLMModel.from_pretrained(str(model_dir)).eval()
    glm4 = Glm4ForCausalLM.from_pretrained(str(glm4_dir), dtype=torch.float32).eval()
    prompt = multimodal_prompt(model.cfg.vision.img_size, audio_samples)
    starts = {
        "eager": eager_start(model, prompt),
        "transformers": transformers_start(model, glm4, prompt),
    }
    for folder in folders:
        starts[folder.name] = exported_start(ExportedModel.load(folder, num_threads=1), prompt)
    ttft: dict[str, list[float]] = {k: [] for k in starts}
    per_token: dict[str, list[float]] = {k: [] for k in starts}
    tokens: dict[str, list[int]] = {}
    with torch.no_grad():
        for r in range(rounds + 1):
            for key, start in starts.items():
                first, step, tokens[key] = time_generation(start)
                if r:
                    ttft[key].append(first)
                    per_token[key].append(step)
        positions = model.build_prefix(**prompt)[0].shape[1]
    profiles = {folder.name: decode_profile(folder) for folder in folders}
    rows = {
        k: {
            "ttft_ms": statistics.median(ttft[k]),
            "ms_per_token": statistics.median(per_token[k]),
            "same_tokens_as_eager": tokens[k] == tokens["eager"],
        }
        for k in starts
    }
    return {"prompt_positions": positions, "rows": rows, "profiles": profiles}


def decode_row(timing: dict, weight_bytes: int, bandwidth: float, eager: dict) -> dict:
    """One row of the decode table: TTFT and tokens/s, each over eager's, and the decode step
    against its roofline (``weight_bytes`` read once per token at ``bandwidth``)."""
    roofline = roofline_ms(weight_bytes, bandwidth)
    return {
        **timing,
        "tokens_per_s": 1e3 / timing["ms_per_token"],
        "ttft_vs_eager": eager["ttft_ms"] / timing["ttft_ms"],
        "decode_vs_eager": eager["ms_per_token"] / timing["ms_per_token"],
        "weight_bytes": weight_bytes,
        "roofline_ms": roofline,
        "roofline_fraction": roofline / timing["ms_per_token"],
    }


def decode_bench(quick: bool, tokenizer, work: Path, bandwidth: float) -> dict:
    """Export the dense-decoder model's ``image``/``audio`` and generation methods at every
    :data:`DECODE_PRECISIONS`, time generation in a one-thread child, one row per runner."""
    from autoglm_phone.export import export_model
    from autoglm_phone.models.convert import save_glm4

    model = dense_model(quick, tokenizer)
    model_dir = model.save_pretrained(work / "dense", tokenizer=tokenizer)
    glm4_dir = save_glm4(model.text, work / "glm4")
    audio_seconds = 0.25 if quick else 1.0
    samples = round(model.cfg.audio.sample_rate * audio_seconds)
    folders, weights, state, seconds = [], {}, {}, {}
    for precision in DECODE_PRECISIONS:
        folder = work / "decode" / f"executorch_{precision}"
        start = time.perf_counter()
        manifest = export_model(
            model, folder, precision=precision, tokenizer=tokenizer,
            methods=("image", "audio", "generate"), audio_seconds=audio_seconds, **DECODE_SHAPES,
        )  # fmt: skip
        seconds[folder.name] = round(time.perf_counter() - start, 1)
        print(f"exported {folder.name} (generation) in {seconds[folder.name]} s", flush=True)
        folders.append(folder)
        weights[folder.name] = manifest["files"]["decode.pte"]["size"]
        state[folder.name] = state_bytes(manifest["methods"]["decode"]["inputs"])
    dense = sum(p.numel() * p.element_size() for p in model.text.parameters())
    weights["eager"] = weights["transformers"] = dense
    cmd = [
        sys.executable, __file__, "--decode-child", str(model_dir), "--glm4", str(glm4_dir),
        "--rounds", "3" if quick else "5", "--audio-samples", str(samples), *map(str, folders),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if done.returncode:
        raise RuntimeError(f"decode timing failed:\n{done.stderr[-3000:]}")
    timed = json.loads(done.stdout.strip().splitlines()[-1])
    eager = timed["rows"]["eager"]
    cfg = model.cfg.text
    return {
        "decoder": {
            "layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            "parameters": sum(p.numel() for p in model.text.parameters()),
        },
        "prompt_positions": timed["prompt_positions"],
        "question_tokens": QUESTION_TOKENS,
        "new_tokens": NEW_TOKENS,
        "export_seconds": seconds,
        "state_bytes": state,
        "profiles": timed["profiles"],
        "rows": {
            k: decode_row(t, weights[k], bandwidth, eager) for k, t in timed["rows"].items()
        },
    }  # fmt: skip


def state_bytes(inputs: list[dict]) -> int:
    """Bytes of a ``decode`` call's state inputs (the KV caches; with memory the slots): what
    goes in, and comes out again, on every call."""
    state = {"k_cache", "v_cache", "memory"}
    return sum(
        torch.Size(i["shape"]).numel() * getattr(torch, i["dtype"]).itemsize
        for i in inputs
        if i["name"] in state
    )


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


def retrieval_bench(quick: bool, model, tokenizer, work: Path) -> dict:
    """Export the retrieval methods in every :data:`ARTIFACTS`; sizes and per-call latency."""
    from autoglm_phone.export import export_model
    from autoglm_phone.export.methods import RETRIEVAL

    shapes = dict(max_text_len=12, audio_seconds=0.25) if quick else {}
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
    return {
        "artifacts": {
            k: {kk: vv for kk, vv in a.items() if kk != "folder"} for k, a in artifacts.items()
        },
        "latency_ms": latency,
    }


PARTS = ("retrieval", "decode")


def run_bench(quick: bool, out: Path, parts: tuple[str, ...] = PARTS) -> dict:
    """Run ``parts`` and write ``out``; a part not run keeps what ``out`` held (so ``--part
    decode`` adds the decode rows to an earlier run's JSON)."""
    model, tokenizer = tiny_model(quick)
    work = Path(tempfile.mkdtemp())
    bandwidth = memory_bandwidth()
    kept = json.loads(out.read_text()) if out.is_file() and set(parts) != set(PARTS) else {}
    result = {
        **kept,
        "quick": quick,
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
        },
    }
    if "retrieval" in parts:
        result.update(retrieval_bench(quick, model, tokenizer, work))
    if "decode" in parts:
        result["decode"] = decode_bench(quick, tokenizer, work, bandwidth)
    result = json.loads(json.dumps(result, default=str))  # as written: thread counts as str
    print(table(result, bandwidth))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def table(result: dict, bandwidth: float) -> str:
    """One markdown table: per artifact and method, size, bits/weight, size ratio to the
    format's FP32, latency at 1 and 2 threads with its ratio to eager, and the roofline."""
    if "decode" in result:
        decode = "\n\n" + decode_table(result["decode"], bandwidth)
    else:
        decode = ""
    if "artifacts" not in result:
        return decode.strip()
    arts, lat = result["artifacts"], result["latency_ms"]
    head = (
        "| artifact | method | MiB | bits/weight | size / fp32 | ms 1T | x eager 1T | ms 2T "
        "| x eager 2T | roofline ms |"
    )
    lines = [head, "|" + "---|" * 10]
    for name in ("image", "audio", "text"):
        e1, e2 = lat["1"][name]["eager"], lat["2"][name]["eager"]
        lines.append(f"| eager | {name} | | | | {e1:.2f} | 1.00 | {e2:.2f} | 1.00 | |")
        for key, a in arts.items():
            if name not in a["methods"]:
                continue
            m = a["methods"][name]
            fp32 = arts[f"{a['format']}_fp32"]["methods"][name]["bytes"]
            t1, t2 = lat["1"][name][key], lat["2"][name][key]
            lines.append(
                f"| {key} | {name} | {m['bytes'] / 2**20:.2f} | {m['bits_per_weight']:.2f} "
                f"| {m['bytes'] / fp32:.3f} | {t1:.2f} | {e1 / t1:.2f} | {t2:.2f} "
                f"| {e2 / t2:.2f} | {roofline_ms(m['bytes'], bandwidth):.3f} |"
            )
    whole = ", ".join(f"{k} {a['bits_per_weight']:.2f}" for k, a in arts.items())
    lines += ["", f"bits per weight over all artifacts: {whole}"]
    lines.append(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (roofline = file bytes / bandwidth)")
    lines.append("x eager: eager ms / artifact ms in the same rounds (> 1: faster than eager)")
    return "\n".join(lines) + decode


def decode_table(decode: dict, bandwidth: float) -> str:
    """Per runner: time to first token, decode tokens/s, each over eager's, and the decode step
    against the roofline of its weight bytes."""
    d = decode["decoder"]
    lines = [
        f"generation: dense decoder ({d['layers']} layers, {d['hidden']} wide, "
        f"{d['parameters'] / 1e6:.2f}M parameters), a {decode['prompt_positions']}-position "
        f"prompt (one image, one sound, {decode['question_tokens']} tokens), then "
        f"{decode['new_tokens']} greedy tokens, 1 thread",
        "",
        "| runner | TTFT ms | x eager | tokens/s | ms/token | x eager | weight MiB/token "
        "| roofline ms | % of roofline | tokens = eager |",
        "|" + "---|" * 10,
    ]
    for key, r in decode["rows"].items():
        lines.append(
            f"| {key} | {r['ttft_ms']:.1f} | {r['ttft_vs_eager']:.2f} | {r['tokens_per_s']:.0f} "
            f"| {r['ms_per_token']:.2f} | {r['decode_vs_eager']:.2f} "
            f"| {r['weight_bytes'] / 2**20:.2f} | {r['roofline_ms']:.3f} "
            f"| {100 * r['roofline_fraction']:.1f} | {r['same_tokens_as_eager']} |"
        )
    state = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in decode["state_bytes"].items())
    lines += [
        "",
        f"weight bytes: eager / transformers the decoder's parameters, .pte rows decode.pte's file;"
        f" roofline = weight bytes / {bandwidth / 1e9:.1f} GB/s",
        f"decode state copied in and out per call (KV caches): {state}",
    ]
    for key, prof in decode.get("profiles", {}).items():
        top = ", ".join(f"{k} {v:.3f}" for k, v in prof["top_ms"].items())
        lines.append(
            f"{key} decode call (ETDump, mean ms): execute {prof['execute_ms']:.3f} = XNNPACK "
            f"{prof['delegate_ms']:.3f} + portable ops {prof['portable_ms']:.3f}; top: {top}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--slice-9b", action="store_true")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--latency-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--decode-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--glm4", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--audio-samples", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=20, help=argparse.SUPPRESS)
    parser.add_argument("folders", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latency_child is not None:
        print(
            json.dumps(latency_child(args.latency_child, args.folders, args.threads, args.rounds))
        )
        return
    if args.decode_child is not None:
        timed = decode_child(
            args.decode_child, args.glm4, args.folders, args.rounds, args.audio_samples
        )
        print(json.dumps(timed))
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
    parts = PARTS if args.part == "all" else (args.part,)
    run_bench(args.quick, args.out or ROOT / "outputs/bench/export.json", parts)


if __name__ == "__main__":
    main()
