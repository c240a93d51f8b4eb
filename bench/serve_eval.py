"""A checkpoint evaluated through the server's API, as apps would use it, on a held-out split.

- ``retrieval``: the split's images (PNG) and clips (WAV, float32: lossless) and their captions
  go to ``/v1/embeddings``; the vectors are scored by ``eval.py``'s own
  :func:`~autoglm_phone.app.evaluate.retrieval_report`, beside the same report from ``eval.py``'s
  in-process embeddings of the same batches (they should be equal).
- ``chat``: each item's instruction questions (``autoglm_phone/data/instructions.py``: "How many
  shapes are there?", ...) asked with its image or clip through the ``openai`` client, streamed,
  greedy; accuracy is an exact match with the grammar's answer, per question and overall, with
  thinking off and (``--thinking``) on. Meaningful for checkpoints trained on instructions
  (``caption_sft``).

    PYTHONPATH=. python bench/serve_eval.py --ckpt outputs/<run>/checkpoints/last.ckpt \
        [--tasks retrieval chat] [--chat-items 100] [--thinking]

Prints the tables; writes ``serve_eval.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
from collections import defaultdict
from pathlib import Path

import httpx
import openai
import soundfile as sf
import torch
from omegaconf import OmegaConf
from PIL import Image

from autoglm_phone.app.datamodule import MultiModalDataModule
from autoglm_phone.app.evaluate import embed_split, retrieval_report
from autoglm_phone.app.schema import DataConfig
from autoglm_phone.data.instructions import QUESTIONS, instructions_for
from autoglm_phone.serve import EagerBackend, Engine, ServeSettings, create_app
from autoglm_phone.serve.background import BackgroundServer

ROOT = Path(__file__).resolve().parents[1]


def media_part(modality: str, x: torch.Tensor, rate: int) -> dict:
    buf = io.BytesIO()
    if modality == "image":  # uint8 (3, S, S)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"type": "image_url", "image_url": {"url": url}}
    sf.write(buf, x.numpy(), rate, format="WAV", subtype="FLOAT")
    data = base64.b64encode(buf.getvalue()).decode()
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


def embed(http: httpx.Client, url: str, inputs: list) -> torch.Tensor:
    r = http.post(url, json={"model": "autoglm-phone", "input": inputs})
    r.raise_for_status()
    return torch.tensor([d["embedding"] for d in r.json()["data"]])


def retrieval(base_url: str, backend: EagerBackend, loader, modality: str, dm, split: str) -> dict:
    """R@1 per direction from ``eval.py``'s embeddings and from the API's."""
    direct = retrieval_report(
        embed_split(backend.model, loader, modality, split), modality, dm.protocol
    )
    media, text, keys, items = [], [], [], []
    url = base_url + "/v1/embeddings"
    with httpx.Client(timeout=600) as http:
        for batch in loader:
            rate = int(batch["sample_rate"])
            parts = [media_part(modality, x, rate) for x in batch["media"]]
            media.append(embed(http, url, parts))
            text.append(embed(http, url, list(batch["caption"])))
            keys.append(batch["caption_id"])
            items.append(batch["item_id"])
    emb = {"media": torch.cat(media), "text": torch.cat(text),
           "keys": torch.cat(keys), "items": torch.cat(items)}  # fmt: skip
    api = retrieval_report(emb, modality, dm.protocol)
    return {name: {"eval_R@1": direct[name]["R@1"], "api_R@1": api[name]["R@1"]} for name in direct}


async def chat(
    base_url: str, loader, modality: str, items: int, thinking: bool, concurrency: int = 16
) -> dict:
    """Exact-match accuracy (%) of streamed greedy answers to every instruction question."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    extra = {"chat_template_kwargs": {"enable_thinking": True}} if thinking else {}

    async def ask(part: dict, question: str) -> str:
        async with gate:
            stream = await client.chat.completions.create(
                model="autoglm-phone", temperature=0, max_tokens=64, stream=True,
                messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
                extra_body=extra,
            )  # fmt: skip
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    asked = []  # (question, expected, pending answer)
    for batch in loader:
        rate = int(batch["sample_rate"])
        for x, caption in zip(batch["media"], batch["caption"], strict=True):
            if len(asked) >= items * len(QUESTIONS[modality]):
                break
            part = media_part(modality, x, rate)
            for question, expected in instructions_for(modality, {"caption": caption}):
                asked.append((question, expected, ask(part, question)))
    answers = await asyncio.gather(*(a for _, _, a in asked))
    right: dict[str, list[bool]] = defaultdict(list)
    for (question, expected, _), answer in zip(asked, answers, strict=True):
        right[question].append(answer.strip() == expected)
    table = {q: 100 * sum(r) / len(r) for q, r in right.items()}
    table["all"] = 100 * sum(sum(r) for r in right.values()) / max(1, len(answers))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=str(ROOT / "outputs/quickstart/checkpoints/last.ckpt"))
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--tasks", nargs="+", default=["retrieval"], choices=["retrieval", "chat"])
    parser.add_argument("--chat-items", type=int, default=100, help="items per modality")
    parser.add_argument("--thinking", action="store_true", help="chat with thinking on as well")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    args = parser.parse_args()
    backend = EagerBackend.from_path(args.ckpt)
    hp = torch.load(args.ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), hp["data"]))
    dm = MultiModalDataModule(
        data_cfg, str(ROOT / ".cache"), image_size=backend.model.cfg.vision.img_size
    )
    dm.set_tokenizer(backend.tokenizer)
    loaders = dm.test_dataloader() if args.split == "test" else dm.val_dataloader()
    engine = Engine(backend, max_batch_size=16)
    result: dict = {"retrieval": {}, "chat": {}}
    with BackgroundServer(create_app(engine, ServeSettings())) as server:
        for modality, loader in zip(data_cfg.modalities, loaders, strict=True):
            if modality not in QUESTIONS:
                continue
            if "retrieval" in args.tasks:
                result["retrieval"].update(
                    retrieval(server.url, backend, loader, modality, dm, args.split)
                )
            if "chat" in args.tasks:
                for thinking in (False, True) if args.thinking else (False,):
                    key = f"{modality}, thinking {'on' if thinking else 'off'}"
                    result["chat"][key] = asyncio.run(
                        chat(server.url, loader, modality, args.chat_items, thinking)
                    )
    engine.close()
    if result["retrieval"]:
        print(f"{'direction':<14} {'eval.py R@1':>12} {'API R@1':>10}")
        for name, r in result["retrieval"].items():
            print(f"{name:<14} {r['eval_R@1']:>12.2f} {r['api_R@1']:>10.2f}")
        diff = max(abs(r["eval_R@1"] - r["api_R@1"]) for r in result["retrieval"].values())
        print(f"largest difference: {diff:.2f} points")
    for key, table in result["chat"].items():
        print(f"\nchat accuracy (%), {key}")
        for question, acc in table.items():
            print(f"  {question:<42} {acc:6.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_eval.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
