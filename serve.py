"""Serve a model over an OpenAI-compatible API: `python serve.py ckpt_path=<ckpt or folder>`, a
checkpoint, saved folder or exported folder (Hydra; see conf/serve.yaml and docs/SERVE.md). The
default is the quickstart checkpoint."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("AUTOGLM_ROOT", str(Path(__file__).resolve().parent))

from autoglm_phone.app.schema import register_schemas  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    from autoglm_phone.app.serve import run  # heavy imports after config validation

    run(cfg)


if __name__ == "__main__":
    main()
