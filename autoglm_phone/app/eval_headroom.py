"""``eval.py headroom=true``: the hard suites of :mod:`autoglm_phone.data.headroom`, scored with
the ITC features, each beside its chance level.

- ``<modality> distractors``: per attribute, the answer is picked among captions differing from
  it in exactly that attribute; accuracy, chance ``1 / #values`` and the confusion table
  (truth x prediction). Ties count against the model (a constant similarity scores 0 unless the
  attribute has one value), as in :mod:`autoglm_phone.metrics`.
- ``image compositional``: two-object scenes, retrieval among the suite's unique captions (both
  directions), and two-way accuracy against the objects-swapped (``relation``) and the
  colours-swapped (``binding``) caption.
- ``audio snr``: audio->text / text->audio retrieval of the clean clips and at each SNR.
- ``audio overlap``: the same with a quieter second sound mixed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from autoglm_phone.app.datamodule import Collate, caption_id
from autoglm_phone.app.eval_tasks import retrieval_report
from autoglm_phone.data.headroom import (
    OVERLAP_GAIN_DB,
    SNRS_DB,
    attribute_choice,
    attributes_of,
    hard_distractors,
    suite_samples,
)
from autoglm_phone.data.synthetic import SyntheticSpec
from autoglm_phone.models.autoglm import AutoGLMModel
from autoglm_phone.objectives import encode_batch


class Embedder:
    """ITC features of media arrays and of captions (deduplicated, cached) with one model."""

    def __init__(
        self, model: AutoGLMModel, tokenizer, max_text_len: int, spec: SyntheticSpec, batch: int
    ):
        self.model, self.tokenizer, self.spec, self.batch = model, tokenizer, spec, batch
        self.max_text_len = max_text_len
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def media(self, modality: str, samples: list[dict[str, Any]]) -> torch.Tensor:
        collate = Collate(
            modality, self.tokenizer, self.max_text_len, self.model.cfg.vision.img_size
        )
        out = []
        for start in range(0, len(samples), self.batch):
            items = [
                {
                    "caption": s["caption"],
                    "index": start + i,
                    "sample_rate": self.spec.sample_rate,
                    modality: torch.from_numpy(
                        np.ascontiguousarray(s["image"].transpose(2, 0, 1))
                        if modality == "image"
                        else s["audio"]
                    ),
                }
                for i, s in enumerate(samples[start : start + self.batch])
            ]
            out.append(encode_batch(self.model, collate(items), text=False).media)
        return torch.cat(out)  # (N, D)

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(c for c in captions if c not in self.cache))
        for start in range(0, len(todo), self.batch):
            chunk = todo[start : start + self.batch]
            tok = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_text_len,
                return_tensors="pt",
            )
            feats = self.model.encode_text(tok["input_ids"], tok["attention_mask"].bool())
            self.cache.update(zip(chunk, feats, strict=True))
        return torch.stack([self.cache[c] for c in captions])  # (N, D)


def pick(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Each row's choice among its candidates ``(Q, K)``: the truth when it scores strictly above
    every other candidate, else the best other one (ties count against)."""
    others = scores.scatter(1, truth[:, None], float("-inf"))
    best_other = others.argmax(1)
    right = scores.gather(1, truth[:, None])[:, 0] > others.max(1).values
    return torch.where(right, truth, best_other)


def distractor_report(emb: Embedder, modality: str, size: int) -> dict[str, Any]:
    samples = suite_samples(emb.spec, "distractors", size, modality=modality)
    media = emb.media(modality, samples)  # (N, D)
    out: dict[str, Any] = {}
    for name, values in attributes_of(modality).items():
        galleries = [hard_distractors(modality, s["attributes"], name) for s in samples]
        text = emb.text([c for g in galleries for c in g]).view(len(samples), len(values), -1)
        scores = torch.einsum("nd,nkd->nk", media, text)  # (N, #values)
        truth = torch.tensor([values.index(s["attributes"][name]) for s in samples])
        choice = attribute_choice(values, truth.tolist(), pick(scores, truth).tolist())
        confused = choice.most_confused()
        out[name] = {
            "accuracy": choice.accuracy,
            "chance": choice.chance,
            "values": [str(v) for v in values],
            "confusion": choice.confusion,  # [truth][prediction] counts
            "most_confused": None if confused is None else [str(confused[0]), str(confused[1])],
            "most_confused_rate": None if confused is None else confused[2],
        }
    out["mean"] = {
        "accuracy": float(np.mean([v["accuracy"] for v in out.values()])),
        "chance": float(np.mean([v["chance"] for v in out.values()])),
    }
    return out


def _retrieval(media: torch.Tensor, text: torch.Tensor, captions: list[str], modality: str):

    keys = torch.tensor([caption_id(c) for c in captions])
    return retrieval_report({"media": media, "text": text, "keys": keys}, modality)


def compositional_report(emb: Embedder, size: int) -> dict[str, Any]:
    samples = suite_samples(emb.spec, "compositional", size)
    media = emb.media("image", samples)
    captions = [s["caption"] for s in samples]
    out = _retrieval(media, emb.text(captions), captions, "image")
    truth = torch.zeros(len(samples), dtype=torch.long)
    for name, key in (("relation", "swapped"), ("binding", "rebound")):
        pair = emb.text([c for s in samples for c in (s["caption"], s[key])])
        scores = torch.einsum("nd,nkd->nk", media, pair.view(len(samples), 2, -1))
        right = pick(scores, truth) == truth
        out[f"{name} (vs {key})"] = {
            "accuracy": 100.0 * right.float().mean().item(),
            "chance": 50.0,
        }
    return out


def audio_report(emb: Embedder, size: int) -> dict[str, Any]:
    out = {}
    suites = [("clean", "distractors", {"modality": "audio"})]
    suites += [(f"snr {snr:g} dB", "snr", {"snr_db": snr}) for snr in SNRS_DB]
    suites += [(f"overlap {OVERLAP_GAIN_DB:g} dB", "overlap", {})]
    for label, suite, kw in suites:
        samples = suite_samples(emb.spec, suite, size, **kw)
        captions = [s["caption"] for s in samples]
        out[label] = _retrieval(emb.media("audio", samples), emb.text(captions), captions, "audio")
    return out


def headroom_report(
    model: AutoGLMModel,
    tokenizer,
    spec: SyntheticSpec,
    modalities: list[str],
    size: int = 200,
    max_text_len: int = 32,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Every suite for the ``image``/``audio`` modalities among ``modalities``."""
    emb = Embedder(model, tokenizer, max_text_len, spec, batch_size)
    report: dict[str, Any] = {"size": size}
    for modality in ("image", "audio"):
        if modality in modalities:
            report[f"{modality} distractors"] = distractor_report(emb, modality, size)
    if "image" in modalities:
        report["image compositional"] = compositional_report(emb, size)
    if "audio" in modalities:
        report["audio snr"] = audio_report(emb, size)
    return report


def headroom_summary(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(name, score %, chance %)`` rows: the headline numbers of :func:`headroom_report`."""
    rows = []
    for modality in ("image", "audio"):
        for attr, m in report.get(f"{modality} distractors", {}).items():
            rows.append((f"{modality} distractors: {attr}", m["accuracy"], m["chance"]))
    for name, m in report.get("image compositional", {}).items():
        if "R@1" in m:
            rows.append((f"compositional {name} R@1", m["R@1"], m["chance_R@1"]))
        else:
            rows.append((f"compositional {name}", m["accuracy"], m["chance"]))
    for label, directions in report.get("audio snr", {}).items():
        m = directions["audio->text"]
        rows.append((f"audio->text R@1, {label}", m["R@1"], m["chance_R@1"]))
    return rows


def format_headroom(report: dict[str, Any]) -> str:
    """The summary table, then each distractor suite's confusion tables (% of each true row)."""
    head = f"{'headroom suite':<40}{'score %':>10}{'chance %':>10}"
    lines = [head, "-" * len(head)]
    lines += [f"{n:<40}{s:>10.1f}{c:>10.1f}" for n, s, c in headroom_summary(report)]
    for modality in ("image", "audio"):
        suite = report.get(f"{modality} distractors")
        if not suite:
            continue
        lines.append(f"\n{modality} distractors: confusion (rows: truth, columns: prediction, %)")
        for attr, m in suite.items():
            if attr == "mean":
                continue
            width = max(7, *(len(v) + 1 for v in m["values"]))
            lines.append(f"{attr:<10}" + "".join(f"{v:>{width}}" for v in m["values"]))
            for value, row in zip(m["values"], m["confusion"], strict=True):
                total = sum(row)  # no sample with this true value: a row of dashes
                cells = "".join(
                    f"{100 * n / total:>{width}.0f}" if total else f"{'-':>{width}}" for n in row
                )
                lines.append(f"  {value:<8}" + cells)
    return "\n".join(lines)


def plot_headroom(report: dict[str, Any], path) -> None:
    """Horizontal bars of every headline score of :func:`headroom_summary`, chance as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = headroom_summary(report)[::-1]  # first row on top
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1))
    ys = range(len(rows))
    ax.barh(ys, [score for _, score, _ in rows])
    ax.scatter([chance for *_, chance in rows], ys, marker="|", s=120, c="k", zorder=3)
    ax.set_yticks(ys, [name for name, *_ in rows], fontsize="small")
    ax.set_xlabel("score (%)  — black: chance")
    ax.set_xlim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
