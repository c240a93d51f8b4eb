"""An OpenAI-compatible server for the models (docs/SERVE.md): ``create_app(engine, settings)``.

    from autoglm_phone.serve import EagerBackend, Engine, ServeSettings, create_app

    engine = Engine(EagerBackend.from_path("outputs/quickstart/checkpoints/last.ckpt"))
    app = create_app(engine, ServeSettings(model_name="autoglm-phone"))  # run with uvicorn

``load_backend(path)`` picks the backend for a path: an exported folder (``export.py``) runs
through :class:`~autoglm_phone.serve.exported.ExportedBackend` (:mod:`autoglm_phone.export`'s
runtime, imported only then).

The library part: FastAPI, uvicorn and pydantic (the ``serve`` extra), no Lightning or Hydra.
"""

from autoglm_phone.serve.app import ServeSettings, create_app
from autoglm_phone.serve.backends import load_backend
from autoglm_phone.serve.engine import (
    Backend,
    EagerBackend,
    Engine,
    Prompt,
    Sampling,
)
from autoglm_phone.serve.errors import APIError
from autoglm_phone.serve.media import MediaLimits, MediaSpec

__all__ = [
    "APIError",
    "Backend",
    "EagerBackend",
    "Engine",
    "MediaLimits",
    "MediaSpec",
    "Prompt",
    "Sampling",
    "ServeSettings",
    "create_app",
    "load_backend",
]
