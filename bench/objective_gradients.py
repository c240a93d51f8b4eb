"""How the pretraining objectives pull on shared weights: per-objective gradient norms and the
cosine between each objective's gradient and ITC's, per part of the model, at a checkpoint.

A negative or near-zero cosine with a large norm means that objective's update fights or drowns
ITC's on the shared part (the gradient-conflict reading of multi-task training, as in PCGrad,
Yu et al. 2020). Averaged over a few training batches of each modality.

    PYTHONPATH=. python bench/objective_gradients.py --ckpt outputs/itm_mlm/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a script from anywhere

from autoglm_phone.app.datamodule import MultiModalDataModule  # noqa: E402
from autoglm_phone.app.module import PretrainModule  # noqa: E402
from autoglm_phone.app.schema import DataConfig  # noqa: E402
from autoglm_phone.checkpoint import read_model_state  # noqa: E402
from autoglm_phone.tokenizer import tokenizer_from_files  # noqa: E402

PARTS = {  # parameter-name prefix -> part
    "vision.": "vision tower",
    "audio.": "audio tower",
    "vision_adapter.": "adapters",
    "audio_adapter.": "adapters",
    "vision_proj.": "ITC projections",
    "audio_proj.": "ITC projections",
    "text_proj.": "ITC projections",
    "text.": "decoder",
}


def part_of(name: str) -> str | None:
    return next((p for prefix, p in PARTS.items() if name.startswith(prefix)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--batches", type=int, default=4, help="training batches per modality")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache"))
    parser.add_argument("--out", default=str(ROOT / "outputs/bench/objective_gradients.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    state, hp = read_model_state(args.ckpt)
    module = PretrainModule(**{k: v for k, v in hp.items() if k != "init_from"})
    module.model.load_state_dict(state)
    module.train()
    names = [n for n, p in module.model.named_parameters() if p.requires_grad and part_of(n)]
    params = [dict(module.model.named_parameters())[n] for n in names]
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), hp["data"]))
    dm = MultiModalDataModule(
        data_cfg, args.cache_dir, image_size=module.model.cfg.vision.img_size, progress=False
    )
    dm.set_tokenizer(tokenizer_from_files(hp["tokenizer_files"]))
    dm.setup("fit")

    sums: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    for i, batch in enumerate(dm.train_dataloader()):
        if isinstance(batch, tuple):  # CombinedLoader yields (batch, batch_idx, loader_idx)
            batch = batch[0]
        if i == args.batches:
            break
        for modality, sub in batch.items():
            losses, _, _ = module._objectives(sub)
            grads = {}
            for loss_name in ("itc", "itm", "mlm", "lm"):
                if loss_name not in losses or module.weights[loss_name] == 0:
                    continue
                g = torch.autograd.grad(
                    module.weights[loss_name] * losses[loss_name],
                    params,
                    retain_graph=True,
                    allow_unused=True,
                )
                grads[loss_name] = g
            for part in dict.fromkeys(PARTS.values()):
                idx = [j for j, n in enumerate(names) if part_of(n) == part]
                flat = {
                    k: torch.cat(
                        [
                            (
                                g[j] if g[j] is not None else params[j].new_zeros(params[j].shape)
                            ).flatten()
                            for j in idx
                        ]
                    )
                    for k, g in grads.items()
                }
                for k, v in flat.items():
                    key = (modality, part, k)
                    sums[key + ("norm",)] += v.norm().item()
                    if k != "itc" and "itc" in flat:
                        cos = torch.nn.functional.cosine_similarity(v, flat["itc"], dim=0).item()
                        sums[key + ("cos_itc",)] += cos
                    counts[key] += 1

    table: dict = {}  # "modality / part" -> {"<loss> <stat>": mean over batches}
    for (modality, part, k, stat), total in sorted(sums.items()):
        table.setdefault(f"{modality} / {part}", {})[f"{k} {stat}"] = (
            total / counts[(modality, part, k)]
        )
    losses_seen = sorted({key[2] for key in counts})
    columns = [f"{k} norm" for k in losses_seen] + [
        f"{k} cos_itc" for k in losses_seen if k != "itc"
    ]
    print(f"weighted gradient norm per objective and cosine with ITC's, {args.ckpt}")
    print(f"{'modality / part':<28}" + "".join(f"{c:>13}" for c in columns))
    for row, values in table.items():
        cells = "".join(f"{values[c]:>13.4f}" if c in values else f"{'-':>13}" for c in columns)
        print(f"{row:<28}{cells}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ckpt": args.ckpt, "gradients": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
