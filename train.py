"""Train: `python train.py experiment=itc_pretrain` (Hydra; see conf/train.yaml)."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("AUTOGLM_ROOT", str(Path(__file__).resolve().parent))

from autoglm_phone.app.schema import register_schemas  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from autoglm_phone.app.train import main as run  # heavy imports after config validation

    result = run(cfg)
    print(f"checkpoint: {result['ckpt_path']}")


if __name__ == "__main__":
    main()
