"""ITC on multi-caption data with and without masking other captions of the same item.

BLIP (Li et al. 2022) treats every caption of an image as a positive of that image; CLIP's plain
in-batch loss makes the other captions of the same image negatives. This bench writes a
multi-caption image set from the embedded grammar (each image described by ``--captions`` word
orders of its caption, as COCO's five captions describe one photo), trains ``itc_pretrain`` on it
through the real app (``data=manifest``) once with ``objective.itc_mask_same_item`` on and once
off, and evaluates both with ``eval.py``'s item protocol. It also counts how often a training batch
holds two captions of one image, which bounds how much the masking can matter.

    PYTHONPATH=. python bench/itc_item_mask.py --images 300 --epochs 6

Prints a table and writes ``outputs/bench/itc_item_mask.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from autoglm_phone.app import evaluate
from autoglm_phone.app import train as train_app
from autoglm_phone.app.schema import register_schemas
from autoglm_phone.data.synthetic import (
    COUNT_WORDS,
    POSITION_PHRASES,
    SyntheticSpec,
    generate_sample,
    image_caption,
)

ROOT = Path(__file__).resolve().parents[1]


def word_orders(attrs: dict) -> list[str]:
    """Three captions of one image: the grammar's, and two other word orders of the same facts."""
    count = int(attrs["count"])
    noun = attrs["shape"] + ("s" if count > 1 else "")
    where = POSITION_PHRASES[attrs["position"]]
    number = COUNT_WORDS[count - 1]
    return [
        image_caption(attrs),
        f"{where}, {number} {attrs['size']} {attrs['colour']} {noun}",
        f"{number} {attrs['colour']} {noun}, {attrs['size']}, {where}",
    ]


def write_set(root: Path, images: dict[str, int], captions: int, image_size: int) -> Path:
    """``root/pairs.jsonl``: ``captions`` rows per image (same image path, other text)."""
    spec = SyntheticSpec(image_size=image_size)
    rows = []
    for split, n in images.items():
        for i in range(n):
            sample = generate_sample(spec, "image", split, i)
            path = Path("images") / split / f"{i:05d}.png"
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(sample["image"]).save(root / path)
            for text in word_orders(sample["record"]["attributes"])[:captions]:
                rows.append({"image": str(path), "text": text, "split": split})
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def same_item_share(n_images: int, captions: int, batch: int, seed: int = 0) -> float:
    """Share of shuffled training batches holding two captions of one image."""
    rng = np.random.default_rng(seed)
    items = np.repeat(np.arange(n_images), captions)
    hits = total = 0
    for _ in range(20):
        order = items[rng.permutation(len(items))]
        for b in range(0, len(order) - batch + 1, batch):
            chunk = order[b : b + batch]
            hits += len(np.unique(chunk)) < len(chunk)
            total += 1
    return hits / max(total, 1)


def compose_cfg(name: str, overrides: list[str]):
    register_schemas()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose(config_name=name, overrides=overrides)


def run(args: argparse.Namespace) -> dict:
    work = Path(args.out_dir)
    manifest = write_set(
        work / "data",
        {"train": args.images, "val": args.eval_images, "test": args.eval_images},
        args.captions,
        args.image_size,
    )
    results = {
        "same_item_batches": same_item_share(args.images, args.captions, args.batch_size),
        "runs": {},
    }
    for mask in (True, False):
        name = "masked" if mask else "plain"
        start = time.perf_counter()
        cfg = compose_cfg(
            "train",
            [
                "experiment=itc_pretrain",
                "data=manifest",
                f"data.path={manifest}",
                "data.modalities=[image]",
                f"data.batch_size={args.batch_size}",
                f"objective.itc_mask_same_item={str(mask).lower()}",
                f"trainer.max_epochs={args.epochs}",
                "logger=none",
                "trainer.enable_progress_bar=false",
                f"seed={args.seed}",
                f"paths.output_dir={work / name}",
                f"paths.cache_dir={work / 'cache'}",
            ],
        )
        ckpt = train_app.run(cfg)["ckpt_path"]
        eval_cfg = compose_cfg(
            "eval",
            [
                f"ckpt_path={ckpt}",
                f"paths.output_dir={work / name / 'eval'}",
                f"paths.cache_dir={work / 'cache'}",
            ],
        )
        report = evaluate.run(eval_cfg)["retrieval"]
        results["runs"][name] = {
            "minutes": (time.perf_counter() - start) / 60,
            **{d: {k: m[k] for k in ("R@1", "R@5", "chance_R@1")} for d, m in report.items()},
        }
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="training images")
    p.add_argument("--eval-images", type=int, default=100, help="validation and test images")
    p.add_argument("--captions", type=int, default=3, choices=(2, 3))
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out-dir", default="outputs/bench/itc_item_mask")
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("AUTOGLM_ROOT", str(ROOT))  # what train.py sets for paths.root_dir
    results = run(args)
    print(
        f"\n{args.images} training images x {args.captions} captions, batch {args.batch_size}: "
        f"{100 * results['same_item_batches']:.0f}% of batches hold two captions of one image"
    )
    print(f"{'run':<8}{'direction':<14}{'R@1':>8}{'R@5':>8}{'chance':>8}{'minutes':>9}")
    for name, run_ in results["runs"].items():
        for direction, m in run_.items():
            if direction != "minutes":
                print(
                    f"{name:<8}{direction:<14}{m['R@1']:>8.2f}{m['R@5']:>8.2f}"
                    f"{m['chance_R@1']:>8.2f}{run_['minutes']:>9.1f}"
                )
    out = Path("outputs/bench/itc_item_mask.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
