"""``run(cfg)`` for evaluation: retrieval Recall@1/5/10 and median rank beside chance.

The model, tokenizer and data spec all come from the checkpoint (plain values, loaded with
``weights_only=True``); ``data.*`` overrides given on the command line are applied on top.
Two protocols, named in the printed table and the JSON (``retrieval_protocol``):

- ``caption`` (synthetic data): m->text retrieves among the split's unique captions, text->m among
  its media; an answer is correct when its caption text equals the query's.
- ``item`` (real sources; COCO and AudioCaps/Clotho have several captions per item): each item's
  media once and every caption once. m->text is correct when any caption of the query's item is
  retrieved; text->m has each caption's own item as the one positive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from autoglm_phone.app.datamodule import MultiModalDataModule
from autoglm_phone.app.eval_tasks import (
    COMPARED,
    EXPORTED_TASKS,
    PROTOCOLS,
    episode_report,
    exported_report,
    fit_rerank_weight_on,
    format_episode,
    fused_report,
    retrieval_report,
    tasks_for,
)
from autoglm_phone.app.schema import DataConfig
from autoglm_phone.checkpoint import load_model
from autoglm_phone.data.records import format_summary, summarize
from autoglm_phone.export import ExportedModel
from autoglm_phone.metrics import KS
from autoglm_phone.models.autoglm import MODALITY_TABLE, AutoGLMModel
from autoglm_phone.objectives import encode_batch, media_kwargs


def load_checkpoint(path: str | Path) -> tuple[AutoGLMModel, Any, dict[str, Any]]:
    """Model (eval mode, LoRA merged), tokenizer and hyper-parameters: :func:`load_model`."""
    loaded = load_model(path)
    return loaded.model, loaded.tokenizer, loaded.hparams


def _features(model: AutoGLMModel | ExportedModel, batch: dict) -> tuple[torch.Tensor, ...]:
    """Media and text features of a batch, eager or through an exported folder."""
    if isinstance(model, ExportedModel):
        media = model.encode_media(batch["modality"], batch["media"], **media_kwargs(batch))
        return media, model.encode_text(batch["input_ids"], batch["attention_mask"])
    feats = encode_batch(model, batch, text=True)  # the batch's sample rate reaches the tower
    return feats.media, feats.text


@torch.no_grad()
def embed_split(
    model: AutoGLMModel | ExportedModel, loader, modality: str, split: str
) -> dict[str, torch.Tensor]:
    """Contrastive features of a split, one row per loaded pair (media and caption), with the
    caption and item ids; refuses non-finite features (a diverged model has no recall)."""
    media, text, keys, items, skipped = [], [], [], [], []
    for batch in tqdm(loader, desc=f"embed {modality}", leave=False):
        features = _features(model, batch)
        media.append(features[0])
        text.append(features[1])
        keys.append(batch["caption_id"])
        items.append(batch["item_id"])
        skipped += batch["skipped"]
    emb = {"media": torch.cat(media), "text": torch.cat(text)}
    for side, name in (("media", modality), ("text", "text")):
        bad = (~torch.isfinite(emb[side])).any(dim=1)  # (N,)
        if bad.any():
            raise ValueError(
                f"the {name} embeddings of the {split} split ({modality} pairs) hold NaN or inf "
                f"in {int(bad.sum())} of {len(bad)} rows: the model has diverged; no retrieval "
                "numbers are reported"
            )
    return {**emb, "keys": torch.cat(keys), "items": torch.cat(items), "skipped": skipped}


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


def format_fused(fused: dict[str, dict[str, Any]]) -> str:
    """One line per fused evaluation: its numbers as ``name value`` pairs."""
    lines = []
    for name, metrics in fused.items():
        cells = [f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)]
        lines.append(f"{name:<28}" + "  ".join(cells))
        for example in metrics.get("examples", [])[:3]:
            lines.append(f"{'':<28}{example['generated']!r} (reference {example['reference']!r})")
    return "\n".join(lines) + "\n"


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


def plot_episode(report: dict[str, Any], path: Path) -> None:
    """Accuracy by segments back (bars) with chance (black caps) and the number of episodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["by_segments_back"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(range(len(names)), [rows[n]["accuracy"] for n in names])
    ax.scatter(range(len(names)), [rows[n]["chance"] for n in names], marker="_", s=300, c="k")
    for i, n in enumerate(names):
        ax.annotate(f"n={int(rows[n]['count'])}", (i, 102), ha="center", fontsize="small")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(f"segments back ({int(report['segment_len'])} tokens each)")
    ax.set_ylabel("answer accuracy (%)  — black: chance")
    ax.set_ylim(0, 110)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_comparison(eager: dict[str, dict], exported: dict[str, dict]) -> str:
    """Eager beside exported: R@1 / R@5 per direction and the fused tasks' headline numbers."""
    head = f"{'metric':<36}{'eager':>10}{'exported':>10}{'diff':>10}"
    lines = [head, "-" * len(head)]
    for name, metrics in exported.items():
        for key, value in metrics.items():
            if key not in COMPARED or name not in eager:
                continue
            ref = eager[name][key]
            lines.append(f"{name + ' ' + key:<36}{ref:>10.2f}{value:>10.2f}{value - ref:>+10.2f}")
    return "\n".join(lines)


def _source(cfg: DictConfig, exported: ExportedModel | None) -> str | None:
    """The checkpoint to evaluate eagerly: ``ckpt_path``, else the one the export came from
    (its manifest's ``source``) if it is still there; None: the exported folder alone."""
    if cfg.ckpt_path:
        return cfg.ckpt_path
    if exported is None:
        raise ValueError(
            "ckpt_path is required: python eval.py ckpt_path=path/to/last.ckpt (or "
            "exported=path/to/exported/folder)"
        )
    source = exported.manifest.get("source")
    if source and Path(source).is_file():
        return source
    print(
        f"the export's source ({source}) is not a checkpoint file here: the exported folder "
        "alone, on the eval config's data"
    )
    return None


def run_headroom(
    cfg: DictConfig, model: AutoGLMModel, tokenizer: Any, data_cfg: DataConfig
) -> dict[str, Any]:
    """The hard suites (:mod:`autoglm_phone.app.eval_headroom`) with the checkpoint's data spec."""
    from autoglm_phone.app.eval_headroom import format_headroom, headroom_report
    from autoglm_phone.data.synthetic import SyntheticSpec

    spec = SyntheticSpec(
        seed=data_cfg.seed,
        image_size=data_cfg.image_size,
        sample_rate=data_cfg.sample_rate,
        audio_seconds=data_cfg.audio_seconds,
    )
    report = headroom_report(
        model, tokenizer, spec, list(data_cfg.modalities), cfg.headroom_size,
        data_cfg.max_text_len, data_cfg.eval_batch_size,
    )  # fmt: skip
    print(f"\nheadroom suites ({cfg.headroom_size} samples each, {cfg.ckpt_path})\n"
          f"{format_headroom(report)}\n")  # fmt: skip
    return report


def run(cfg: DictConfig, data_overrides: list[str] | None = None) -> dict[str, Any]:
    """Evaluate ``ckpt_path``; with ``exported`` (an ``export.py`` folder) that folder too, on the
    same split and tasks, printed beside the eager model (its checkpoint: ``ckpt_path``, else the
    manifest's ``source``)."""
    exported = ExportedModel.load(cfg.exported) if cfg.exported else None
    source = _source(cfg, exported)
    torch.manual_seed(cfg.seed)
    model, tokenizer, hp = load_checkpoint(source) if source else (None, exported.tokenizer, None)
    if hp is None and source is not None:
        raise ValueError(f"{source}: a saved folder has no data or objective; give a checkpoint")
    data = OmegaConf.merge(
        OmegaConf.structured(DataConfig), hp["data"] if hp else OmegaConf.to_container(cfg.data)
    )
    if data_overrides:
        data = OmegaConf.merge(
            data, OmegaConf.from_dotlist([o.removeprefix("data.") for o in data_overrides])
        )
    data_cfg: DataConfig = OmegaConf.to_object(data)
    if cfg.headroom and data_cfg.name != "synthetic":  # before any data loads
        raise ValueError(
            f"headroom=true needs the embedded data (data=synthetic), not {data_cfg.name!r}"
        )
    model_cfg = model.cfg if model is not None else exported.config
    dm = MultiModalDataModule(data_cfg, cfg.paths.cache_dir, image_size=model_cfg.vision.img_size)
    dm.set_tokenizer(tokenizer)
    loaders = dm.test_dataloader() if cfg.split == "test" else dm.val_dataloader()
    by_modality = dict(zip(data_cfg.modalities, loaders, strict=True))
    if hp is not None and cfg.tasks is None:
        tasks = tasks_for(hp["objective"])
    else:
        tasks = list(EXPORTED_TASKS) if cfg.tasks is None else list(cfg.tasks)
    if not dm.source.captioning_gradable and "captioning" in tasks:
        tasks.remove("captioning")  # scored by parsing the embedded data's caption grammar
        print("captioning accuracy needs the embedded data's grammar: skipped (perplexity kept)")

    result: dict[str, Any] = {
        "ckpt_path": None if source is None else str(source),
        "split": cfg.split,
        "retrieval_protocol": {"name": dm.protocol, "rule": PROTOCOLS[dm.protocol]},
    }
    if model is not None:
        result.update(_evaluate_eager(cfg, model, tokenizer, dm, by_modality, tasks))
    if exported is not None:
        result["exported"] = _evaluate_exported(cfg, exported, tokenizer, dm, by_modality, tasks)
        if model is None:  # the folder alone: its numbers are the run's
            result.update({k: result["exported"][k] for k in ("retrieval", "skipped", "fused")})
        else:
            eager = {**result["retrieval"], **result.get("fused", {})}
            folder = {**result["exported"]["retrieval"], **result["exported"]["fused"]}
            print(
                f"\neager ({source}) beside exported ({cfg.exported}), {cfg.split} split\n"
                f"{format_comparison(eager, folder)}\n"
            )
    if not result.get("fused"):
        result.pop("fused", None)
    if cfg.headroom:
        if model is None:
            raise ValueError("headroom=true evaluates a checkpoint: give ckpt_path")
        result["headroom"] = run_headroom(cfg, model, tokenizer, data_cfg)

    out_json = Path(cfg.output_json or Path(cfg.paths.output_dir) / "metrics.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2))
    plots = [out_json.with_suffix(".png")]
    if "episode" in result:
        plot_episode(result["episode"]["episode recall"], plots[0])
    else:
        plot_report(result["retrieval"], plots[0])
    if "headroom" in result:
        from autoglm_phone.app.eval_headroom import plot_headroom

        plots.append(out_json.with_name(out_json.stem + "_headroom.png"))
        plot_headroom(result["headroom"], plots[-1])
    print(f"wrote {out_json} and {plots[0]}")
    if cfg.log_to_run and source is not None:
        from autoglm_phone.app.dashboards import log_eval

        name = f"eval-{cfg.split}" + ("-exported" if exported is not None else "")
        for where in log_eval(source, result, plots, name):
            print(f"logged the report to {where}")
    return result


def _retrieval(cfg: DictConfig, model, dm, by_modality: dict, name: str) -> dict[str, Any]:
    """Retrieval on every media loader of ``by_modality``, printed; ``retrieval`` and
    ``skipped`` (the bad samples per modality)."""
    report: dict[str, dict[str, float]] = {}
    skipped: dict[str, dict[str, Any]] = {}
    for modality, loader in by_modality.items():
        emb = embed_split(model, loader, modality, cfg.split)
        report.update(retrieval_report(emb, modality, dm.protocol))
        skipped[modality] = summarize(emb["skipped"])
        if skipped[modality]["total"]:
            print(format_summary(skipped[modality], f"{cfg.split} {modality}"))
    if report:
        print(
            f"\nretrieval on the {cfg.split} split ({name})\n"
            f"protocol: {dm.protocol} ({PROTOCOLS[dm.protocol]})\n{format_table(report)}\n"
        )
    return {"retrieval": report, "skipped": skipped}


def _evaluate_eager(
    cfg: DictConfig, model: AutoGLMModel, tokenizer: Any, dm, by_modality: dict, tasks: list[str]
) -> dict[str, Any]:
    """The checkpoint: episode recall (``data=episodes``), retrieval and the fused tasks."""
    by_modality = dict(by_modality)
    out: dict[str, Any] = {}
    if "episode" in by_modality:
        segment_len = model.cfg.text.memory.segment_len
        out["episode"] = episode_report(model, tokenizer, by_modality.pop("episode"), segment_len)
        print(
            f"\nepisode recall on the {cfg.split} split ({cfg.ckpt_path}), "
            f"{out['episode']['episode recall']['decoding']}\n"
            f"{format_episode(out['episode']['episode recall'])}\n"
        )
    out.update(_retrieval(cfg, model, dm, by_modality, str(cfg.ckpt_path)))
    media_modalities = [m for m in by_modality if m in MODALITY_TABLE]
    fused: dict[str, dict[str, Any]] = {}
    if tasks:
        weights = {m: cfg.rerank_weight for m in media_modalities}
        if "rerank" in tasks and cfg.rerank_weight is None and cfg.split == "test":
            val = dm.val_dataloader()  # fitted on validation, reported on test
            for modality, loader in zip(dm.cfg.modalities, val, strict=True):
                if modality in weights:
                    weights[modality] = fit_rerank_weight_on(model, loader, modality, cfg.rerank_k)
            print(f"ITM re-rank weight fitted on the validation split: {weights}")
        for modality, loader in by_modality.items():
            fused.update(
                fused_report(
                    model,
                    tokenizer,
                    loader,
                    modality,
                    tasks,
                    cfg.rerank_k,
                    cfg.seed,
                    rerank_weight=weights[modality],
                )
            )
        print(format_fused(fused))
    out["fused"] = fused
    return out


def _evaluate_exported(
    cfg: DictConfig, exported: ExportedModel, tokenizer: Any, dm, by_modality: dict, tasks: list
) -> dict[str, Any]:
    """The exported folder: retrieval through its towers and text encoder; of the fused tasks
    those generation serves (perplexity, captioning; the others need the fused encoder)."""
    by_modality = {m: loader for m, loader in by_modality.items() if m != "episode"}
    out = {"folder": str(cfg.exported), **_retrieval(cfg, exported, dm, by_modality, cfg.exported)}
    left = [t for t in tasks if t not in EXPORTED_TASKS]
    if left:
        print(f"not exported, skipped for the exported folder: {left}")
    served = [t for t in tasks if t in EXPORTED_TASKS]
    out["fused"] = {}
    for modality, loader in by_modality.items():
        if served and modality in MODALITY_TABLE:
            out["fused"].update(exported_report(exported, tokenizer, loader, modality, served))
    if out["fused"]:
        print(format_fused(out["fused"]))
    return out
