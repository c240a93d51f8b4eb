"""Linear probes: what a checkpoint's vision side encodes about each caption attribute.

For the embedded image data (count, size, colour, shape, position), a multinomial logistic
regression is fitted on the train split's features and scored on the test split, at three
points of the image path:

- ``pooled``: the tower's pooled feature (what ITC projects),
- ``tokens``: the tower's patch tokens, concatenated in grid order,
- ``adapter``: the adapter's output, the media tokens the decoder reads.

The same probes on an untrained model of the same architecture (``random init``) are the
baseline: an attribute the trained features do not beat it on was not learned. Chance is the
test split's majority class. A probe is our own ~15 lines (full-batch L-BFGS on standardised
features) rather than a new dependency.

    PYTHONPATH=. python bench/probe_vision.py --ckpt outputs/itc_pretrain/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from anywhere

from autoglm_phone.checkpoint import build_model, load_model  # noqa: E402
from autoglm_phone.data.synthetic import (  # noqa: E402
    IMAGE_ATTRIBUTES,
    SyntheticSpec,
    build_synthetic,
    load_split,
)

SITES = ("pooled", "tokens", "adapter")


@torch.no_grad()
def features(model, images, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """``(N, H, W, 3)`` uint8 images -> one ``(N, F)`` matrix per probe site."""
    out = {site: [] for site in SITES}
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size].copy()).permute(0, 3, 1, 2)
        tower = model.vision(x)
        out["pooled"].append(tower.pooled)
        out["tokens"].append(tower.tokens.flatten(1))
        out["adapter"].append(model.vision_adapter(tower.tokens, tower.pooled).flatten(1))
    return {site: torch.cat(parts).float() for site, parts in out.items()}


def probe(
    x_train, y_train, x_test, y_test, n_classes: int, l2: float = 1e-3, steps: int = 100
) -> float:
    """Test accuracy (%) of an L2-regularised softmax regression fitted on the train split."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ w + b, y_train) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * ((x_test @ w + b).argmax(1) == y_test).float().mean().item()


def labels(records, attribute: str, classes: list) -> torch.Tensor:
    return torch.tensor([classes.index(r["attributes"][attribute]) for r in records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a training checkpoint (last.ckpt)")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=str(ROOT / "outputs/bench/probe_vision.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    loaded = load_model(args.ckpt)
    trained, hp = loaded.model, loaded.hparams
    untrained = build_model(hp).eval()
    folder = build_synthetic(SyntheticSpec(image_size=trained.cfg.vision.img_size), args.cache_dir)
    train, test = load_split(folder, "image", "train"), load_split(folder, "image", "test")

    results = {}
    for name, model in (("trained", trained), ("random init", untrained)):
        f_train, f_test = features(model, train["images"]), features(model, test["images"])
        for attribute in IMAGE_ATTRIBUTES:
            classes = list(IMAGE_ATTRIBUTES[attribute])
            y_train = labels(train["records"], attribute, classes)
            y_test = labels(test["records"], attribute, classes)
            chance = 100.0 * Counter(y_test.tolist()).most_common(1)[0][1] / len(y_test)
            row = results.setdefault(attribute, {"chance": chance})
            for site in SITES:
                row[f"{name} {site}"] = probe(
                    f_train[site], y_train, f_test[site], y_test, len(classes)
                )

    columns = ["chance"] + [f"{n} {s}" for n in ("trained", "random init") for s in SITES]
    print(f"linear probe accuracy (%), image test split, {args.ckpt}")
    print(f"{'attribute':<10}" + "".join(f"{c:>20}" for c in columns))
    for attribute, row in results.items():
        print(f"{attribute:<10}" + "".join(f"{row[c]:>20.1f}" for c in columns))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ckpt": args.ckpt, "probe_accuracy": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
