"""Evaluations that run the decoder over media and text together, for ``eval.py``.

- ``itm``: matched / not-matched accuracy on the split's pairs; each item's negative caption and
  each caption's negative item are drawn (seeded) from the ITC similarity as in training, so
  chance is 50% on the balanced accuracy reported beside the plain one.
- ``rerank``: retrieval where the ITC top-``k`` of every query are re-scored by
  ``ITC logit + w * ITM log-odds`` and placed, in that order, above every other candidate
  (ALBEF/BLIP re-rank the ITC top-k with the ITM head; BLIP adds the two scores, ``w = 1``).
  ``eval.py`` fits ``w`` per modality on the validation split (:func:`fit_rerank_weight`, a
  grid from 0, plain ITC, to 8) and reports the test split with it.
- ``mlm``: masked-token accuracy (seeded BERT masking of 15% of caption tokens, media visible)
  beside the unigram baseline: always answering the token most frequent among these very
  targets, the best any context-free guess can do in hindsight.
- ``perplexity``: of the reference description (the split's caption) given the media and the
  describe prompt, under the prefix LM: ``exp`` of the mean NLL per response token.
- ``captioning``: greedy answers to the describe prompt, parsed back into attributes; exact match
  (every attribute right) and per-attribute accuracy (the embedded data only: real captions
  have no grammar to parse).
- ``episode recall`` (``data=episodes``): greedy answers to the question at the end of a
  long-context episode, accuracy by the distance back to the asked item (:func:`episode_report`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from autoglm_phone.data.instructions import DESCRIBE, format_chat, parse_answer, tokenize_chat
from autoglm_phone.data.synthetic import parse_caption
from autoglm_phone.metrics import chance_metrics, retrieval_metrics
from autoglm_phone.models.autoglm import AutoGLMModel
from autoglm_phone.objectives import (
    ITM,
    MLM,
    Features,
    ObjectiveConfig,
    PrefixLM,
    clamped_logit_scale,
    encode_batch,
    match_logits,
    media_kwargs,
)
from autoglm_phone.objectives.episode import layout_episodes

FUSED_TASKS = ("itm", "rerank", "mlm", "perplexity", "captioning")

COMPARED = ("R@1", "R@5", "perplexity", "exact_match")  # the eager-vs-exported comparison's metrics


def tasks_for(objective: dict[str, Any]) -> list[str]:
    """The fused evaluations a checkpoint was trained for (its objective weights)."""
    cfg = ObjectiveConfig.from_dict(objective)
    return [task for name in ("itm", "mlm", "lm") if cfg.active(name) for task in TASKS_OF[name]]


TASKS_OF = {"itm": ("itm", "rerank"), "mlm": ("mlm",), "lm": ("perplexity", "captioning")}


def _pad_cat(parts: list[torch.Tensor], value: int | bool) -> torch.Tensor:
    """Concatenate right-padded ``(B_i, T_i)`` batches into ``(sum B_i, max T_i)``."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, width - p.shape[1]), value=value) for p in parts])


@torch.no_grad()
def fused_report(
    model: AutoGLMModel,
    tokenizer: Any,
    loader,
    modality: str,
    tasks: list[str],
    k: int = 16,
    seed: int = 0,
    max_new_tokens: int = 32,
    batch_size: int = 256,
    rerank_weight: float | None = None,
) -> dict[str, dict[str, float]]:
    """The ``tasks`` (any of :data:`FUSED_TASKS`) for one modality's loader; re-ranking weighs
    the ITM log-odds by ``rerank_weight`` (None: 1, BLIP's plain sum)."""
    unknown = set(tasks) - set(FUSED_TASKS)
    if unknown:
        raise ValueError(f"unknown eval tasks {sorted(unknown)}; available: {FUSED_TASKS}")
    gen = torch.Generator().manual_seed(seed)
    hist = torch.zeros(model.cfg.text.vocab_size, dtype=torch.long)  # MLM target histogram
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name -> [total, count]

    def add(name: str, values: torch.Tensor) -> None:
        sums[name][0] += values.float().sum().item()
        sums[name][1] += values.numel()

    def mean(name: str) -> float:
        total, count = sums[name]
        return total / count if count else float("nan")

    store: dict[str, list] = defaultdict(list)
    itm, mlm, lm = ITM(), MLM(mask_prob=0.15), PrefixLM()
    for batch in tqdm(loader, desc=f"fused eval {modality}", leave=False):
        feats = encode_batch(model, batch, text=True, block=True)
        block = feats.block
        if "rerank" in tasks:
            _keep_for_rerank(store, feats, batch)
        if "itm" in tasks:
            logits, labels = itm.targets(model, batch, feats, gen)
            right = logits.argmax(-1) == labels
            add("itm_pos", right[labels == 1])
            add("itm_neg", right[labels == 0])
            add("itm_all", right[labels >= 0])
        if "mlm" in tasks:
            logits, labels = mlm.targets(model, batch, feats, gen)
            target = labels >= 0
            add("mlm", (logits.argmax(-1) == labels)[target])
            hist = hist + torch.bincount(labels[target], minlength=len(hist))
        if "perplexity" in tasks:
            prompts = [DESCRIBE[modality]] * len(batch["caption"])
            chat = tokenize_chat(tokenizer, prompts, batch["caption"], (modality,))
            nll, _ = lm.score(model, block, chat)
            n = (chat["loss_mask"].bool() & chat["attention_mask"].bool())[:, 1:].sum()
            sums["nll"][0] += (nll * n).item()
            sums["nll"][1] += n.item()
        if "captioning" in tasks:
            store["answers"] += generate_answers(
                model, tokenizer, block, modality, DESCRIBE[modality], batch["caption"],
                max_new_tokens,
            )  # fmt: skip

    report: dict[str, dict[str, float]] = {}
    if "itm" in tasks:
        pos, neg = mean("itm_pos"), mean("itm_neg")
        report[f"{modality} itm"] = {
            "accuracy": 100 * mean("itm_all"),
            "balanced_accuracy": 100 * (pos + neg) / 2,
            "positive_accuracy": 100 * pos,
            "negative_accuracy": 100 * neg,
            "chance_balanced": 50.0,
        }
    if "mlm" in tasks:
        report[f"{modality} mlm"] = {
            "accuracy": 100 * mean("mlm"),
            "unigram_baseline": 100 * hist.max().item() / max(1, hist.sum().item()),
            "targets": sums["mlm"][1],
        }
    if "perplexity" in tasks:
        nll = mean("nll")
        report[f"{modality} perplexity"] = {
            "perplexity": float(torch.tensor(nll).exp()),
            "nll": nll,
            "vocab_size": float(len(tokenizer)),
        }
    if "captioning" in tasks:
        report[f"{modality} captioning"] = captioning_scores(modality, store["answers"])
    if "rerank" in tasks:
        scores = rerank_scores(model, store, modality, k, batch_size)
        report.update(rerank_metrics(scores, 1.0 if rerank_weight is None else rerank_weight))
    return report


@torch.no_grad()
def generate_answers(
    model: AutoGLMModel,
    tokenizer: Any,
    block: torch.Tensor,
    modality: str,
    prompt: str,
    references: list[str],
    max_new_tokens: int = 32,
    thinking: bool = False,
) -> list[tuple[str, str]]:
    """Greedy answers to one ``prompt`` about each media block ``(B, K + 2, C)``, beside their
    ``references`` (the truth): ``[(generated, reference), ...]``."""
    chat = tokenizer([format_chat(prompt, media=(modality,), thinking=thinking)])
    prompt_ids = torch.tensor(chat["input_ids"], device=block.device).expand(len(block), -1)
    embeds, mask, _ = model.assemble([block], prompt_ids)
    eos = model.cfg.special_tokens.eos
    out = model.text.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        mode="prefix",
        max_new_tokens=max_new_tokens,
        stop_token_ids=(eos,),
    )
    return _answers(tokenizer, out, references, eos)


def _answers(
    tokenizer: Any, out: torch.Tensor, captions: list[str], eos: int | None
) -> list[tuple[str, str]]:
    """Generated rows ``(B, N)`` cut at the end-of-text token, decoded, beside their captions."""
    answers = []
    for row, caption in zip(out.tolist(), captions, strict=True):
        row = row[: row.index(eos)] if eos in row else row
        answers.append((tokenizer.decode(row, skip_special_tokens=True).strip(), caption))
    return answers


EXPORTED_TASKS = ("perplexity", "captioning")  # the others need the fused encoder, not exported
MEDIA_ARGUMENT = {"image": "images", "audio": "audio"}  # generate's keyword for each modality


@torch.no_grad()
def exported_report(
    exported: Any, tokenizer: Any, loader, modality: str, tasks: list[str], max_new_tokens: int = 32
) -> dict[str, dict[str, float]]:
    """:func:`fused_report`'s ``perplexity`` and ``captioning`` through an exported folder
    (``autoglm_phone.export.ExportedModel``): the same prompts, scored by teacher forcing through
    ``prefill`` + ``decode`` and generated greedily. One row at a time: with MoE layers each token
    routes on its own, where eager shares the experts' capacity within a sequence."""
    sums = [0.0, 0]  # NLL total, scored tokens
    answers: list[tuple[str, str]] = []
    eos = exported.config.special_tokens.eos
    for batch in tqdm(loader, desc=f"exported eval {modality}", leave=False):
        media = {MEDIA_ARGUMENT[modality]: batch["media"], **media_kwargs(batch)}
        if "perplexity" in tasks:
            prompts = [DESCRIBE[modality]] * len(batch["caption"])
            chat = tokenize_chat(tokenizer, prompts, batch["caption"], (modality,))
            for i, (ids, real, scored) in enumerate(
                zip(chat["input_ids"], chat["attention_mask"], chat["loss_mask"], strict=True)
            ):
                ids, scored = ids[real.bool()], scored[real.bool()].bool()  # (T,) real tokens
                first = int(scored.long().argmax())  # the first response token
                row = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in media.items()}
                (prompt,) = exported.build_prompts(**row, input_ids=ids[None, :first])
                logits = exported.continuation_logits(prompt, ids[first:].tolist())  # (R, V)
                nll = F.cross_entropy(logits, ids[first:], reduction="none")[scored[first:]]
                sums[0] += nll.sum().item()
                sums[1] += nll.numel()
        if "captioning" in tasks:
            prompt = tokenizer([format_chat(DESCRIBE[modality], media=(modality,))])
            prompt_ids = torch.tensor(prompt["input_ids"]).expand(len(batch["caption"]), -1)
            out = exported.generate(
                **media, input_ids=prompt_ids, max_new_tokens=max_new_tokens, stop_token_ids=(eos,)
            )
            answers += _answers(tokenizer, out, batch["caption"], eos)
    report: dict[str, dict[str, float]] = {}
    if "perplexity" in tasks:
        nll = sums[0] / max(1, sums[1])
        report[f"{modality} perplexity"] = {
            "perplexity": math.exp(nll),
            "nll": nll,
            "vocab_size": float(len(tokenizer)),
        }
    if "captioning" in tasks:
        report[f"{modality} captioning"] = captioning_scores(modality, answers)
    return report


def _keep_for_rerank(store: dict[str, list], feats: Features, batch: dict[str, Any]) -> None:
    for key, value in (
        ("media", feats.media),
        ("text", feats.text),
        ("block", feats.block),
        ("ids", batch["input_ids"]),
        ("am", batch["attention_mask"]),
        ("keys", batch["caption_id"]),
    ):
        store[key].append(value)


@torch.no_grad()
def fit_rerank_weight_on(
    model: AutoGLMModel, loader, modality: str, k: int = 16, batch_size: int = 256
) -> float:
    """:func:`fit_rerank_weight` on ``loader`` (the validation split)."""
    store: dict[str, list] = defaultdict(list)
    for batch in tqdm(loader, desc=f"fit re-rank weight {modality}", leave=False):
        _keep_for_rerank(store, encode_batch(model, batch, text=True, block=True), batch)
    return fit_rerank_weight(rerank_scores(model, store, modality, k, batch_size))


def captioning_scores(modality: str, answers: list[tuple[str, str]]) -> dict[str, Any]:
    """Exact match and per-attribute accuracy (%) of generated descriptions vs the captions."""
    exact, per_attr, unparsable = 0, defaultdict(int), 0
    for answer, caption in answers:
        truth = parse_caption(modality, caption)
        try:
            stated = parse_answer(modality, DESCRIBE[modality], answer)
        except ValueError:
            stated, unparsable = {}, unparsable + 1
        exact += stated == truth
        for attr, value in truth.items():
            per_attr[attr] += stated.get(attr) == value
    n = max(1, len(answers))
    return {
        "exact_match": 100 * exact / n,
        **{f"{attr}_accuracy": 100 * v / n for attr, v in per_attr.items()},
        "unparsable": 100 * unparsable / n,
        "num_items": float(len(answers)),
        "examples": [{"generated": a, "reference": c} for a, c in answers[:5]],
    }


RERANK_WEIGHTS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # the grid ``fit_rerank_weight`` scans


@torch.no_grad()
def rerank_scores(
    model: AutoGLMModel, store: dict[str, list], modality: str, k: int, batch_size: int
) -> dict[str, dict[str, Any]]:
    """Per direction, the ITC logits of every query against the gallery of unique captions and
    the ITM log-odds of each query's ITC top-``k``; ``rerank_metrics`` combines them."""
    media, text = torch.cat(store["media"]), torch.cat(store["text"])
    block = torch.cat(store["block"])
    ids, am = _pad_cat(store["ids"], 0), _pad_cat(store["am"], False)
    keys = torch.cat(store["keys"]).tolist()
    first: dict[int, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    gallery_keys, cap = list(first), torch.tensor(list(first.values()))
    sim = clamped_logit_scale(model.logit_scale) * media @ text[cap].T  # (N, G) ITC logits
    out = {}
    for name, s, q_keys, g_keys, pairs in (
        (f"{modality}->text", sim, keys, gallery_keys, lambda q, g: (q, cap[g])),
        (f"text->{modality}", sim.T, gallery_keys, keys, lambda q, g: (g, cap[q])),
    ):
        top = s.topk(min(k, s.shape[1]), dim=1).indices  # (Q, k)
        q_idx = torch.arange(s.shape[0])[:, None].expand_as(top).reshape(-1)
        m_idx, t_idx = pairs(q_idx, top.reshape(-1))
        itm = []
        for start in range(0, len(m_idx), batch_size):
            mi, ti = m_idx[start : start + batch_size], t_idx[start : start + batch_size]
            logits = match_logits(model, block, ids, am, mi, ti)
            itm.append(logits[:, 1] - logits[:, 0])  # ITM log-odds of "matched"
        out[name] = {
            "itc": s,
            "top": top,
            "itm": torch.cat(itm).view_as(top),
            "query_keys": q_keys,
            "gallery_keys": g_keys,
        }
    return out


def reranked(direction: dict[str, Any], weight: float) -> torch.Tensor:
    """Scores with the ITC top-k first, ordered by ``ITC logit + weight * ITM log-odds``."""
    s, top = direction["itc"], direction["top"]
    combined = s.gather(1, top) + weight * direction["itm"]
    return (s - 1e4).scatter(1, top, combined)


def fit_rerank_weight(scores: dict[str, dict[str, Any]], grid=RERANK_WEIGHTS) -> float:
    """The ``weight`` in ``grid`` with the best R@1 averaged over both directions (ties: the
    smaller weight); meant for the validation split, applied to the test split."""

    def r1(weight: float) -> float:
        return sum(
            retrieval_metrics(reranked(d, weight), d["query_keys"], d["gallery_keys"])["R@1"]
            for d in scores.values()
        )

    return max(grid, key=lambda w: (r1(w), -w))


def rerank_metrics(scores: dict[str, dict[str, Any]], weight: float) -> dict[str, dict[str, float]]:
    """ITC retrieval and ITM-re-ranked retrieval (``weight`` on the ITM log-odds)."""
    report = {}
    for name, d in scores.items():
        q_keys, g_keys = d["query_keys"], d["gallery_keys"]
        after = retrieval_metrics(reranked(d, weight), q_keys, g_keys)
        before = retrieval_metrics(d["itc"], q_keys, g_keys)
        chance = chance_metrics(q_keys, g_keys)
        report[f"{name} itm-rerank@{d['top'].shape[1]}"] = {
            **after,
            "itm_weight": weight,
            **{f"itc_{key}": v for key, v in before.items()},
            **{f"chance_{key}": v for key, v in chance.items()},
        }
    return report


# -- retrieval ---------------------------------------------------------------------------
PROTOCOLS = {
    "caption": "an answer is correct when its caption text equals the query's",
    "item": "media->text is correct when any caption of the query's item is retrieved; "
    "text->media when the caption's own item is",
}


def _first(keys: list) -> dict:
    """Each distinct key and the index of its first occurrence."""
    first: dict = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return first


def retrieval_report(
    emb: dict[str, torch.Tensor], modality: str, protocol: str = "caption"
) -> dict[str, dict[str, float]]:
    if protocol == "caption":
        keys = emb["keys"].tolist()
        uniq = _first(keys)
        media_keys, text_keys = keys, list(uniq)
        media, text = emb["media"], emb["text"][list(uniq.values())]  # one per unique caption
    elif protocol == "item":
        # rows repeated by bad-sample replacement (or a repeated row) collapse to one
        # (item, caption) pair; every index below is a row of ``emb``
        item_ids = emb["items"].tolist()
        pairs = _first(list(zip(item_ids, emb["keys"].tolist(), strict=True)))
        text_keys = [item for item, _ in pairs]  # (T,) every caption once, keyed by its item
        media_rows = _first(item_ids)  # item -> its first row
        media_keys = list(media_rows)  # (M,) every item once
        media = emb["media"][list(media_rows.values())]
        text = emb["text"][list(pairs.values())]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
    sim = media @ text.T  # (M, T)
    report = {}
    for name, s, q, g in (
        (f"{modality}->text", sim, media_keys, text_keys),
        (f"text->{modality}", sim.T, text_keys, media_keys),
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


# -- long-context episodes (autoglm_phone/data/episodes.py) ----------------------------------
SEGMENT_BUCKETS = (0.0, 1.0, 2.0, 4.0, 8.0)  # lower edges, in segments back; the last is open
ITEM_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0)  # lower edges, in items back (1: the last item)


def bucket_label(edges: tuple[float, ...], value: float) -> str:
    """The ``[lo, hi)`` bucket of ``value`` as ``"lo-hi"`` (``"lo+"`` for the open last one)."""
    lo_index = max(i for i, e in enumerate(edges) if value >= e) if value >= edges[0] else 0
    lo = edges[lo_index]
    fmt = "{:g}".format
    return f"{fmt(lo)}+" if lo_index == len(edges) - 1 else f"{fmt(lo)}-{fmt(edges[lo_index + 1])}"


def accuracy_by_distance(
    distances: list[float],
    correct: list[bool],
    chances: list[float],
    edges: tuple[float, ...] = SEGMENT_BUCKETS,
) -> dict[str, dict[str, float]]:
    """Accuracy (%) per distance bucket, beside chance (%, the mean over the bucket's questions
    of a uniform guess among the asked attribute's answers) and the number of questions; every
    bucket listed, empty ones with NaN accuracy."""
    out = {}
    labels = [bucket_label(edges, e) for e in edges]
    for label in labels:
        rows = [
            (c, p)
            for d, c, p in zip(distances, correct, chances, strict=True)
            if bucket_label(edges, d) == label
        ]
        n = len(rows)
        out[label] = {
            "accuracy": 100 * sum(c for c, _ in rows) / n if n else math.nan,
            "chance": 100 * sum(p for _, p in rows) / n if n else math.nan,
            "count": float(n),
        }
    return out


@torch.no_grad()
def episode_report(
    model: AutoGLMModel, tokenizer: Any, loader, segment_len: int, max_new_tokens: int = 4
) -> dict[str, dict[str, Any]]:
    """Answer accuracy on long-context episodes: greedy generation after the question (left-
    padded prompt, ``model.text.generate(..., mode="prefix")``), exact match with the answer
    word, overall and by distance between the asked item's caption and the question, in
    segments of ``segment_len`` tokens (``text.memory.segment_len``, whether or not memory is
    on, so runs with and without memory share buckets) and in items back."""
    eos = model.cfg.special_tokens.eos
    dist, items_back, correct, chances, examples = [], [], [], [], []
    for batch in tqdm(loader, desc="episode recall", leave=False):
        layout = layout_episodes(model, batch, answers=False, left_pad=True)
        out = model.text.generate(
            inputs_embeds=layout.inputs_embeds,
            attention_mask=layout.attention_mask,
            mode="prefix",
            max_new_tokens=max_new_tokens,
            stop_token_ids=(eos,),
        )
        for i, row in enumerate(out.tolist()):
            row = row[: row.index(eos)] if eos in row else row
            said = tokenizer.decode(row, skip_special_tokens=True).strip()
            correct.append(said == batch["answer"][i])
            if len(examples) < 5:
                examples.append({"question": batch["question"][i], "generated": said,
                                 "reference": batch["answer"][i]})  # fmt: skip
        dist += (layout.distance.float() / segment_len).tolist()
        items_back += batch["items_back"].tolist()
        chances += (1.0 / batch["num_choices"].float()).tolist()
    n = max(1, len(correct))
    return {
        "episode recall": {
            "accuracy": 100 * sum(correct) / n,
            "chance": 100 * sum(chances) / n,
            "num_episodes": float(len(correct)),
            "segment_len": float(segment_len),
            "mean_segments_back": sum(dist) / n,
            "by_segments_back": accuracy_by_distance(dist, correct, chances),
            "by_items_back": accuracy_by_distance(items_back, correct, chances, ITEM_BUCKETS),
            "decoding": "greedy generation, exact match of the answer word",
            "examples": examples,
        }
    }


def format_episode(report: dict[str, Any]) -> str:
    """The accuracy-by-distance table of :func:`episode_report` (segments back)."""
    lines = [f"{'segments back':<16}{'accuracy %':>12}{'chance %':>10}{'episodes':>10}"]
    for label, row in report["by_segments_back"].items():
        lines.append(
            f"{label:<16}{row['accuracy']:>12.1f}{row['chance']:>10.1f}{int(row['count']):>10}"
        )
    lines.append(
        f"{'all':<16}{report['accuracy']:>12.1f}{report['chance']:>10.1f}"
        f"{int(report['num_episodes']):>10}"
    )
    return "\n".join(lines)
