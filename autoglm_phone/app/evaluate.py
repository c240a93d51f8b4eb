"""``run(cfg)`` for evaluation: retrieval Recall@1/5/10 and median rank beside chance.

The model, tokenizer and data spec all come from the checkpoint (plain values, loaded with
``weights_only=True``); ``data.*`` overrides given on the command line are applied on top.
For each modality m: m->text retrieves among the split's unique captions, text->m among its
media; an answer is correct when its caption text equals the query's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from autoglm_phone.app.datamodule import MultiModalDataModule
from autoglm_phone.app.schema import DataConfig
from autoglm_phone.config import MultiModalConfig
from autoglm_phone.metrics import KS, chance_metrics, retrieval_metrics
from autoglm_phone.models.autoglm import AutoGLMModel
from autoglm_phone.tokenizer import load_tokenizer


def load_checkpoint(path: str | Path) -> tuple[AutoGLMModel, Any, dict[str, Any]]:
    """Model (eval mode), tokenizer and hyper-parameters from a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    model = AutoGLMModel(MultiModalConfig.from_dict(hp["model"]))
    state = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    model.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in hp["tokenizer_files"].items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        tokenizer = load_tokenizer(tmp)
    return model.eval(), tokenizer, hp


@torch.no_grad()
def embed_split(model: AutoGLMModel, loader, desc: str) -> dict[str, torch.Tensor]:
    media, text, keys = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        out = model(batch["modality"], batch["media"], batch["input_ids"], batch["attention_mask"])
        media.append(out["image_features"])
        text.append(out["text_features"])
        keys.append(batch["caption_id"])
    return {"media": torch.cat(media), "text": torch.cat(text), "keys": torch.cat(keys)}


def retrieval_report(emb: dict[str, torch.Tensor], modality: str) -> dict[str, dict[str, float]]:
    keys = emb["keys"].tolist()
    uniq: dict[int, int] = {}
    for i, k in enumerate(keys):
        uniq.setdefault(k, i)
    gallery_keys, first = list(uniq), list(uniq.values())
    captions = emb["text"][first]  # (G, E) one embedding per unique caption
    sim = emb["media"] @ captions.T  # (N, G)
    report = {}
    for name, s, q, g in (
        (f"{modality}->text", sim, keys, gallery_keys),
        (f"text->{modality}", sim.T, gallery_keys, keys),
    ):
        metrics = retrieval_metrics(s, q, g)
        chance = chance_metrics(q, g)
        report[name] = {
            **metrics,
            **{f"chance_{k}": v for k, v in chance.items()},
            "R@1_over_chance": metrics["R@1"] / chance["R@1"],
            "num_queries": len(q),
            "gallery_size": len(g),
        }
    return report


def format_table(report: dict[str, dict[str, float]]) -> str:
    cols = [f"R@{k}" for k in KS] + ["median_rank"]
    head = (
        f"{'direction':<14}"
        + "".join(f"{c:>12}" for c in cols)
        + f"{'R@1 chance':>12}{'x chance':>10}"
    )
    lines = [head, "-" * len(head)]
    for name, m in report.items():
        row = f"{name:<14}" + "".join(f"{m[c]:>12.2f}" for c in cols)
        lines.append(row + f"{m['chance_R@1']:>12.3f}{m['R@1_over_chance']:>10.1f}")
    return "\n".join(lines)


def plot_report(report: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars of Recall@k per direction, with the chance level drawn as a dark cap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.5))
    width = 0.8 / len(KS)
    for j, k in enumerate(KS):
        xs = [i + (j - (len(KS) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [report[n][f"R@{k}"] for n in names], width, label=f"R@{k}")
        ax.scatter(
            xs, [report[n][f"chance_R@{k}"] for n in names], marker="_", s=200, c="k", zorder=3
        )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("recall (%)  — black: chance")
    ax.set_ylim(0, 115)
    ax.legend(ncols=len(KS), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DictConfig, data_overrides: list[str] | None = None) -> dict[str, Any]:
    if not cfg.ckpt_path:
        raise ValueError("ckpt_path is required: python eval.py ckpt_path=path/to/last.ckpt")
    torch.manual_seed(cfg.seed)
    model, tokenizer, hp = load_checkpoint(cfg.ckpt_path)
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), hp["data"])
    if data_overrides:
        data = OmegaConf.merge(
            data, OmegaConf.from_dotlist([o.removeprefix("data.") for o in data_overrides])
        )
    data_cfg: DataConfig = OmegaConf.to_object(data)
    dm = MultiModalDataModule(data_cfg, cfg.paths.cache_dir, image_size=model.cfg.vision.img_size)
    dm.set_tokenizer(tokenizer)
    loaders = dm.test_dataloader() if cfg.split == "test" else dm.val_dataloader()

    report: dict[str, dict[str, float]] = {}
    for modality, loader in zip(data_cfg.modalities, loaders, strict=True):
        report.update(retrieval_report(embed_split(model, loader, f"embed {modality}"), modality))
    print(f"\nretrieval on the {cfg.split} split ({cfg.ckpt_path})\n{format_table(report)}\n")

    out_json = Path(cfg.output_json or Path(cfg.paths.output_dir) / "metrics.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    result = {"ckpt_path": str(cfg.ckpt_path), "split": cfg.split, "retrieval": report}
    out_json.write_text(json.dumps(result, indent=2))
    plot_report(report, out_json.with_suffix(".png"))
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")
    return result
