"""Evaluate: `python eval.py ckpt_path=outputs/.../checkpoints/last.ckpt` (see conf/eval.yaml)."""

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

os.environ.setdefault("AUTOGLM_ROOT", str(Path(__file__).resolve().parent))

from autoglm_phone.app.schema import register_schemas  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from autoglm_phone.app.evaluate import run
    from autoglm_phone.app.train import exit_on_data_error

    overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("data.")]
    with exit_on_data_error():
        run(cfg, data_overrides=overrides)


if __name__ == "__main__":
    main()
