"""Accuracy by distance of several ``long_context_sft`` runs, side by side (docs/LONG_CONTEXT.md).

Each argument is ``name=metrics.json``, the JSON ``eval.py ckpt_path=...`` writes for a run of
``experiment=long_context_sft``; a name given several times pools its JSONs (e.g. the same model
evaluated with ``data.num_items=8``, ``12`` and ``16``, to spread the distances). The table
(markdown) has one row per distance bucket, one column per run, and chance beside them; ``--out``
also draws the bars::

    PYTHONPATH=. python bench/long_context.py memory=outputs/lc_memory/metrics.json \\
        no_memory=outputs/lc_no_memory/metrics.json full=outputs/lc_full/metrics.json \\
        --out outputs/bench/long_context.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(spec: str) -> tuple[str, dict[str, Any]]:
    name, sep, path = spec.partition("=")
    if not sep:
        raise SystemExit(f"expected name=metrics.json, got {spec!r}")
    result = json.loads(Path(path).read_text())
    if "episode" not in result:
        raise SystemExit(f"{path}: no episode report (was it a long_context_sft run?)")
    return name, result["episode"]["episode recall"]


def pool(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several evaluations of a model: counts add up, accuracy and chance are
    means over all their episodes."""
    if len(reports) == 1:
        return reports[0]
    out = {k: reports[0][k] for k in ("segment_len",)}
    n = sum(r["num_episodes"] for r in reports)
    out["num_episodes"] = n
    for key in ("accuracy", "chance"):
        out[key] = sum(r[key] * r["num_episodes"] for r in reports) / n
    for by in ("by_segments_back", "by_items_back"):
        buckets = {b for r in reports for b in r[by]}
        out[by] = {}
        for b in sorted(buckets, key=lambda b: float(b.split("-")[0].rstrip("+"))):
            rows = [r[by][b] for r in reports if b in r[by] and r[by][b]["count"]]
            count = sum(x["count"] for x in rows)
            mean = {k: sum(x[k] * x["count"] for x in rows) / count if count else float("nan")
                    for k in ("accuracy", "chance")}  # fmt: skip
            out[by][b] = {**mean, "count": float(count)}
    return out


def table(runs: dict[str, dict[str, Any]], key: str = "by_segments_back") -> str:
    """Markdown: bucket | n | accuracy per run | chance; the last row is every episode."""
    first = next(iter(runs.values()))
    head = ["segments back", "episodes", *[f"{n} %" for n in runs], "chance %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bucket, row in first[key].items():
        if not row["count"]:
            continue
        cells = [f"{r[key][bucket]['accuracy']:.1f}" for r in runs.values()]
        lines.append(
            f"| {bucket} | {int(row['count'])} | " + " | ".join(cells) + f" | {row['chance']:.1f} |"
        )
    cells = [f"**{r['accuracy']:.1f}**" for r in runs.values()]
    total = int(first["num_episodes"])
    lines.append(f"| all | {total} | " + " | ".join(cells) + f" | {first['chance']:.1f} |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, Any]], path: Path, key: str = "by_segments_back") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(runs.values()))
    buckets = [b for b, row in first[key].items() if row["count"]]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(1.6 * len(buckets) + 2, 3.5))
    for j, (name, r) in enumerate(runs.items()):
        xs = [i + (j - (len(runs) - 1) / 2) * width for i in range(len(buckets))]
        ax.bar(xs, [r[key][b]["accuracy"] for b in buckets], width, label=name)
    ax.scatter(range(len(buckets)), [first[key][b]["chance"] for b in buckets], marker="_",
               s=600, c="k", zorder=3, label="chance")  # fmt: skip
    ax.set_xticks(range(len(buckets)), buckets)
    ax.set_xlabel(f"segments back ({int(first['segment_len'])} tokens each)")
    ax.set_ylabel("answer accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="name=metrics.json")
    parser.add_argument("--out", type=Path, default=None, help="a .png of the bars")
    args = parser.parse_args()
    loaded: dict[str, list[dict[str, Any]]] = {}
    for spec in args.runs:
        name, report = load(spec)
        loaded.setdefault(name, []).append(report)
    runs = {name: pool(reports) for name, reports in loaded.items()}
    print(table(runs))
    print()
    print(table(runs, "by_items_back").replace("segments back", "items back"))
    if args.out:
        plot(runs, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
