"""Which vision stem can learn the embedded images' attributes? A supervised check.

Each variant of the vision tower is trained from scratch, for the same number of steps, to
predict every caption attribute (count, size, colour, shape, position) from its pooled feature,
one linear head per attribute, on the train split; the table is test-split accuracy per
attribute, wall time per step and parameters. Supervision is the easiest signal an attribute can
get: what a tower cannot learn here, ITC (which sees the attributes only through captions) will
not learn either.

    PYTHONPATH=. python bench/vision_stem.py                      # patch16, conv16, patch8, conv8
    PYTHONPATH=. python bench/vision_stem.py --variants conv16 --steps 600
    PYTHONPATH=. python bench/vision_stem.py --variants conv16 --depth 6   # a shallower ViT

Accuracy on 500 training images is reported beside the test split's, so a gap (memorised, not
learned) reads differently from both being low (not yet optimised).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from anywhere

from autoglm_phone.config import VisionConfig  # noqa: E402
from autoglm_phone.data.synthetic import (  # noqa: E402
    IMAGE_ATTRIBUTES,
    SyntheticSpec,
    build_synthetic,
    load_split,
)
from autoglm_phone.models.towers import VisionTower  # noqa: E402

VARIANTS = {
    "patch16": dict(stem="patch", patch_size=16),
    "conv16": dict(stem="conv", patch_size=16),
    "patch8": dict(stem="patch", patch_size=8),
    "conv8": dict(stem="conv", patch_size=8),
}


def targets(records) -> torch.Tensor:
    """``(N, A)`` class indices, one column per attribute in ``IMAGE_ATTRIBUTES`` order."""
    return torch.tensor(
        [
            [list(values).index(r["attributes"][a]) for a, values in IMAGE_ATTRIBUTES.items()]
            for r in records
        ]
    )


def as_batch(images, index) -> torch.Tensor:
    return torch.from_numpy(images[index.numpy()]).permute(0, 3, 1, 2)  # uint8 (B, 3, H, W)


@torch.no_grad()
def accuracy(tower, heads, images, y, limit: int | None = None) -> dict[str, float]:
    """Per-attribute accuracy (%) on the first ``limit`` items (all when None)."""
    n = len(y) if limit is None else min(limit, len(y))
    correct = torch.zeros(len(IMAGE_ATTRIBUTES))
    for at in range(0, n, 250):
        index = torch.arange(at, min(at + 250, n))
        pooled = tower(as_batch(images, index)).pooled
        for i, h in enumerate(heads):
            correct[i] += (h(pooled).argmax(-1) == y[index, i]).sum()
    return dict(zip(IMAGE_ATTRIBUTES, (100.0 * correct / n).tolist(), strict=True))


def run(variant: str, data, args) -> dict:
    torch.manual_seed(args.seed)
    tower = VisionTower(
        VisionConfig(img_size=args.img_size, depth=args.depth or None, **VARIANTS[variant])
    )
    heads = nn.ModuleList(nn.Linear(tower.embed_dim, len(v)) for v in IMAGE_ATTRIBUTES.values())
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
        ),
    )
    (x_train, y_train), (x_test, y_test) = data
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(y_train), generator=gen)
    tower.train()
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc=variant, leave=False):
        at = (step * args.batch_size) % len(order)
        index = order[at : at + args.batch_size]
        pooled = tower(as_batch(x_train, index)).pooled
        y = y_train[index]
        loss = sum(F.cross_entropy(h(pooled), y[:, i]) for i, h in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = (time.perf_counter() - start) / args.steps
    tower.eval()
    test_accuracy = accuracy(tower, heads, x_test, y_test)
    train_accuracy = accuracy(tower, heads, x_train, y_train, limit=500)
    return {
        "accuracy": test_accuracy,
        "train_accuracy": train_accuracy,
        "seconds_per_step": seconds,
        "parameters": sum(p.numel() for p in tower.parameters()),
        "final_loss": loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=0, help="ViT blocks (0: the architecture's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=str(ROOT / "outputs/bench/vision_stem.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    folder = build_synthetic(SyntheticSpec(image_size=args.img_size), args.cache_dir)
    train, test = load_split(folder, "image", "train"), load_split(folder, "image", "test")
    data = (
        (train["images"], targets(train["records"])),
        (test["images"], targets(test["records"])),
    )
    y_test = data[1][1]
    chance = {
        a: 100.0 * Counter(y_test[:, i].tolist()).most_common(1)[0][1] / len(y_test)
        for i, a in enumerate(IMAGE_ATTRIBUTES)
    }
    results = {v: run(v, data, args) for v in variants}

    names = list(IMAGE_ATTRIBUTES)
    print(
        f"supervised attribute accuracy (%), image test split (train split in brackets), "
        f"{args.steps} steps x {args.batch_size}, depth {args.depth or 'default'}"
    )
    print(f"{'variant':<10}" + "".join(f"{n:>15}" for n in names) + f"{'s/step':>9}{'params':>10}")
    print(f"{'chance':<10}" + "".join(f"{chance[n]:>15.1f}" for n in names))
    for v, r in results.items():
        cells = "".join(f"{r['accuracy'][n]:>8.1f} ({r['train_accuracy'][n]:>5.1f})" for n in names)
        print(f"{v:<10}{cells}{r['seconds_per_step']:>9.3f}{r['parameters'] / 1e6:>9.2f}M")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "chance": chance, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
