"""Export for device: `python export.py ckpt_path=<ckpt or folder> format=executorch precision=int4`
(`quant=awq` for the calibrated INT4; `dry_run=true preset=autoglm-phone-9b` prints the INT4
size plan and builds nothing). Hydra; see conf/export.yaml and docs/EXPORT.md."""

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

os.environ.setdefault("AUTOGLM_ROOT", str(Path(__file__).resolve().parent))

from autoglm_phone.app.schema import register_schemas  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    from autoglm_phone.app.export import run, summary  # heavy imports after config validation
    from autoglm_phone.export import NotExportable

    try:
        result = run(cfg, output_dir=HydraConfig.get().runtime.output_dir)
    except NotExportable as err:
        raise SystemExit(f"export refused: {err}") from err
    print(summary(result))


if __name__ == "__main__":
    main()
