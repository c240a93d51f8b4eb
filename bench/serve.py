"""The OpenAI-compatible server under load: time to first token and output tokens per second at
1, 4 and 16 concurrent streaming clients, dynamic batching on (``--batch`` rows) against off
(one request at a time), interleaved in one run.

Each client sends streamed chat requests with one image and a question, over HTTP to the server
running in this process (uvicorn on a thread; the clients share the CPU with it). Every request
generates exactly ``--tokens`` tokens (end-of-text is not a stop here), so both settings do the
same work. Time to first token is from sending the request to the first content delta; output
tokens per second are all tokens generated at that concurrency over the wall time.

    PYTHONPATH=. python bench/serve.py [--quick] [--ckpt outputs/quickstart/checkpoints/last.ckpt]
    PYTHONPATH=. python bench/serve.py --exported <export.py folder>

Without ``--ckpt`` the model is the ``autoglm-phone-tiny`` preset with random weights (speed
does not depend on the weights). ``--exported`` adds a third server, the exported folder
(``ExportedBackend``: the CPU, one request at a time), interleaved with the two eager ones on
its checkpoint (``--ckpt``, else the one its manifest names as ``source``, else the random
preset if that is what it holds); a path that does not exist yet is first written with
``export.py``'s defaults from the served model (``--ckpt`` or the random preset). Writes
``serve.json`` (``serve_quick.json``; ``serve_exported.json`` with ``--exported``) under
``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from autoglm_phone.export import read_manifest
from autoglm_phone.serve import EagerBackend, Engine, ServeSettings, create_app, load_backend
from autoglm_phone.serve.background import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]


def random_model(device: str = "cpu") -> tuple[Any, Any]:
    """The tiny preset with random weights (seed 0) and a small tokenizer."""
    from autoglm_phone import AutoGLMModel
    from autoglm_phone.tokenizer import train_tokenizer

    words = "a red green blue circle square small large left right beep loud quiet high low"
    texts = [" ".join(np.random.default_rng(i).permutation(words.split())) for i in range(200)]
    tok = train_tokenizer(texts, ROOT / "outputs" / "bench" / "serve_tokenizer", vocab_size=409)
    torch.manual_seed(0)
    return AutoGLMModel.from_pretrained("autoglm-phone-tiny", tokenizer=tok).to(device), tok


def export_to(folder: Path, ckpt: str | None) -> None:
    """``export.py``'s defaults (ExecuTorch FP32, every method) for the served model."""
    from autoglm_phone.checkpoint import load_model
    from autoglm_phone.export import export_model

    if ckpt:
        loaded = load_model(ckpt)
        model, tok = loaded.model, loaded.tokenizer
    else:
        model, tok = random_model()
    start = time.perf_counter()
    export_model(model.eval(), folder, tokenizer=tok, source=ckpt)
    print(f"exported to {folder} in {time.perf_counter() - start:.0f} s")


def image_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """Seconds to the first content delta, and the completion tokens."""
    start, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    return (first if first is not None else time.perf_counter() - start), tokens


async def load(server_url: str, clients: int, requests: int, tokens: int) -> dict:
    """``clients`` concurrent clients sending ``requests`` requests each, one after another."""
    url = server_url + "/v1/chat/completions"

    def body(i: int) -> dict:
        content = [
            {"type": "image_url", "image_url": {"url": image_url(i)}},
            {"type": "text", "text": "Describe the image."},
        ]
        return {"model": "bench", "messages": [{"role": "user", "content": content}],
                "max_tokens": tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip

    async def client(c: int, http: httpx.AsyncClient) -> list[tuple[float, int]]:
        return [await one_request(http, url, body(c * requests + i)) for i in range(requests)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    ttft = sorted(t for rows in results for t, _ in rows)
    total = sum(n for rows in results for _, n in rows)
    return {
        "ttft_p50_ms": 1000 * statistics.median(ttft),
        "ttft_p95_ms": 1000 * ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
        "tokens_per_s": total / wall,
        "tokens": total,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens")
    parser.add_argument("--ckpt", default=None, help="a checkpoint or saved folder to serve")
    parser.add_argument(
        "--exported",
        type=Path,
        default=None,
        help="an export.py folder to serve too; a new path: the served model exported there first",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=16, help="max batch size with batching on")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per request")
    parser.add_argument("--repeats", type=int, default=None, help="on/off alternations")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = parser.parse_args()
    tokens = args.tokens or (16 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 2)
    ckpt = args.ckpt
    if args.exported and not args.exported.exists():
        export_to(args.exported, ckpt)
    elif args.exported and ckpt is None:
        ckpt = read_manifest(args.exported)["source"]
    if ckpt:
        backend = EagerBackend.from_path(ckpt, device=args.device, stop_token_ids=())
    else:
        model, tok = random_model(args.device)
        if args.exported and read_manifest(args.exported)["model"] != model.cfg.to_dict():
            parser.error(f"{args.exported} is not the random preset and names no source; --ckpt")
        backend = EagerBackend(model, tok, stop_token_ids=())
    settings = ServeSettings(model_name="bench")
    engines = {
        "off": Engine(backend, max_batch_size=1),
        "on": Engine(backend, max_batch_size=args.batch, batch_wait_s=0.005),
    }
    if args.exported:  # one request at a time (the artifacts take batch 1), on the CPU
        engines["exported"] = Engine(load_backend(args.exported, stop_token_ids=()))
    servers = {k: BackgroundServer(create_app(e, settings)) for k, e in engines.items()}
    rows: dict[str, dict[int, list[dict]]] = {k: {c: [] for c in args.clients} for k in engines}
    try:
        for server in servers.values():  # warm-up
            asyncio.run(load(server.url, 2, 1, 4))
        for clients in args.clients:
            requests = max(1, (16 if args.quick else 32) // clients)
            for _ in range(repeats):
                for mode in engines:  # interleaved: the same machine state for all
                    engines[mode].stats["max_batch"] = 0
                    m = asyncio.run(load(servers[mode].url, clients, requests, tokens))
                    m["max_batch"] = engines[mode].stats["max_batch"]
                    rows[mode][clients].append(m)
    finally:
        for s in servers.values():
            s.stop()
        for e in engines.values():
            e.close()

    def mean(mode: str, clients: int, key: str) -> float:
        return statistics.mean(r[key] for r in rows[mode][clients])

    header = f"{'clients':>7} {'batching':>8} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} {'tok/s':>8} {'x off':>6}"  # fmt: skip
    print(header)
    print("-" * len(header))
    table = []
    for clients in args.clients:
        base = mean("off", clients, "tokens_per_s")
        for mode in engines:
            tps = mean(mode, clients, "tokens_per_s")
            row = {
                "clients": clients,
                "batching": mode,
                "ttft_p50_ms": mean(mode, clients, "ttft_p50_ms"),
                "ttft_p95_ms": mean(mode, clients, "ttft_p95_ms"),
                "tokens_per_s": tps,
                "speedup_vs_off": tps / base,
            }
            table.append(row)
            print(f"{clients:>7} {mode:>8} {row['ttft_p50_ms']:>12.1f} {row['ttft_p95_ms']:>12.1f} {tps:>8.1f} {row['speedup_vs_off']:>6.2f}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "serve_exported" if args.exported else "serve"
    out = args.out / (f"{name}_quick.json" if args.quick else f"{name}.json")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "tokens_per_request": tokens,
              "repeats": repeats, "table": table, "runs": rows}  # fmt: skip
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
