"""Retrieval through the server's ``/v1/embeddings`` against ``eval.py``'s, on the same split.

The test split's images (PNG) and clips (WAV, float32: lossless) and their captions go to the
server over HTTP, as an app doing cross-modal search would send them; the returned vectors are
scored by ``eval.py``'s own :func:`~autoglm_phone.app.evaluate.retrieval_report`, beside the same
report from ``eval.py``'s in-process embeddings of the same batches.

    PYTHONPATH=. python bench/serve_retrieval.py --ckpt outputs/quickstart/checkpoints/last.ckpt

Prints both tables' R@1 and their largest difference; writes ``serve_retrieval.json`` under
``--out``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import httpx
import soundfile as sf
import torch
from omegaconf import OmegaConf
from PIL import Image

from autoglm_phone.app.datamodule import MultiModalDataModule
from autoglm_phone.app.evaluate import embed_split, retrieval_report
from autoglm_phone.app.schema import DataConfig
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=str(ROOT / "outputs/quickstart/checkpoints/last.ckpt"))
    parser.add_argument("--split", default="test", choices=["test", "val"])
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
    engine = Engine(backend)
    result: dict = {}
    with (
        BackgroundServer(create_app(engine, ServeSettings())) as server,
        httpx.Client(timeout=600) as http,
    ):
        url = server.url + "/v1/embeddings"
        for modality, loader in zip(data_cfg.modalities, loaders, strict=True):
            if modality not in ("image", "audio"):
                continue
            direct = retrieval_report(
                embed_split(backend.model, loader, modality, args.split), modality, dm.protocol
            )
            media, text, keys, items = [], [], [], []
            for batch in loader:
                rate = int(batch["sample_rate"])
                media.append(embed(http, url, [media_part(modality, x, rate) for x in batch["media"]]))  # fmt: skip
                text.append(embed(http, url, list(batch["caption"])))
                keys.append(batch["caption_id"])
                items.append(batch["item_id"])
            emb = {"media": torch.cat(media), "text": torch.cat(text),
                   "keys": torch.cat(keys), "items": torch.cat(items)}  # fmt: skip
            api = retrieval_report(emb, modality, dm.protocol)
            for name in direct:
                result[name] = {"eval_R@1": direct[name]["R@1"], "api_R@1": api[name]["R@1"]}
    engine.close()
    print(f"{'direction':<14} {'eval.py R@1':>12} {'API R@1':>10}")
    for name, r in result.items():
        print(f"{name:<14} {r['eval_R@1']:>12.2f} {r['api_R@1']:>10.2f}")
    diff = max(abs(r["eval_R@1"] - r["api_R@1"]) for r in result.values())
    print(f"largest difference: {diff:.2f} points")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_retrieval.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
