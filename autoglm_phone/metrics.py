"""Retrieval metrics with exact chance levels.

A retrieved item counts as correct when its key (caption text) equals the query's key, so
duplicate captions in the gallery are all correct answers. Chance levels follow from the gallery's
key counts: with ``c`` correct items among ``n``, a random ranking puts one in the top ``k`` with
probability ``1 - C(n - c, k) / C(n, k)``.

Ties count against the query: the *pessimistic* rank (PyKEEN's name, Berrendorf et al. 2020,
"Interpretable and Fair Comparison of Link Prediction or Entity Alignment Methods") places the
best correct item after every incorrect item that scores at least as high. Sun et al. (ACL 2020,
"A Re-evaluation of Knowledge Graph Completion Methods") showed that placing it first among ties
lets a model that scores everything alike look perfect. So a collapsed model (constant
similarity) scores 0 at R@1 whenever the gallery holds an incorrect item, at or below chance,
never above; NaN or infinite similarities raise instead of ranking.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from math import comb

import torch

KS = (1, 5, 10)


def first_correct_rank(
    similarity: torch.Tensor, query_keys: Sequence, gallery_keys: Sequence
) -> torch.Tensor:
    """1-based pessimistic rank of the best correct gallery item for each query, ``(Q,)``:
    one plus the number of incorrect items scoring at least as high (ties count against)."""
    bad = ~torch.isfinite(similarity)
    if bool(bad.any()):
        raise ValueError(
            f"similarity holds {int(bad.sum())} non-finite values (NaN or inf) in "
            f"{int(bad.any(1).sum())} of {similarity.shape[0]} query rows: no ranking is defined"
        )
    ids = {k: i for i, k in enumerate(dict.fromkeys(list(query_keys) + list(gallery_keys)))}
    q = torch.tensor([ids[k] for k in query_keys], device=similarity.device)
    g = torch.tensor([ids[k] for k in gallery_keys], device=similarity.device)
    correct = q[:, None] == g[None, :]  # (Q, G)
    if not bool(correct.any(1).all()):
        raise ValueError("every query needs at least one correct gallery item")
    best_correct = similarity.masked_fill(~correct, float("-inf")).max(1).values  # (Q,)
    return ((similarity >= best_correct[:, None]) & ~correct).sum(1) + 1


def retrieval_metrics(
    similarity: torch.Tensor, query_keys: Sequence, gallery_keys: Sequence, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Recall@k (in %) and median rank for a ``(Q, G)`` similarity matrix."""
    ranks = first_correct_rank(similarity.float(), query_keys, gallery_keys).float()
    out = {f"R@{k}": 100.0 * (ranks <= k).float().mean().item() for k in ks}
    out["median_rank"] = ranks.median().item()
    return out


def chance_metrics(
    query_keys: Sequence, gallery_keys: Sequence, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Expected Recall@k (in %) of a random ranking, and its median rank (approximate)."""
    counts = Counter(gallery_keys)
    n = len(gallery_keys)
    out = {}
    for k in ks:
        kk = min(k, n)  # a gallery smaller than k is always fully "retrieved"
        p = [1 - comb(n - counts[q], kk) / comb(n, kk) for q in query_keys]
        out[f"R@{k}"] = 100.0 * sum(p) / len(p)
    # the first of c correct items among n sits at rank ~ (n + 1) / (c + 1) on average
    mid = sorted((n + 1) / (counts[q] + 1) for q in query_keys)
    out["median_rank"] = float(mid[len(mid) // 2])
    return out
