"""The saved-folder format of :class:`~autoglm_phone.models.autoglm.AutoGLMModel`.

A folder holds ``model.safetensors`` (tensors only, no pickle; a tied weight stored once), a
standalone, versioned ``config.json`` (``{"format_version", "model"}``, plain values, no Hydra),
as Hugging Face folders do, and optionally the tokenizer in ``tokenizer/``.

Before anything large is allocated the config is checked against the safetensors header: the
model's state shapes are built on the meta device (under a budget of parameter tensors, so a
config asking for ``num_layers: 100000`` stops early) and compared, key by key, with the shapes
in the file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from autoglm_phone.config import DecoderConfig, MultiModalConfig
from autoglm_phone.models.presets import PRESETS, get_preset

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1  # of config.json; bump when a saved folder stops loading as before

Shapes = dict[str, tuple[int, ...]]


# -- state dicts -------------------------------------------------------------------------------
def untied_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tied tensor (e.g. a tied LM head) once, and alias -> kept name.

    Tied means the same tensor object, or (off the meta device, where storage has no address)
    the same storage, offset, shape and stride."""
    state, aliases, first = {}, {}, {}
    for name, t in module.state_dict(keep_vars=True).items():
        key = (
            id(t)
            if t.is_meta
            else (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
        )
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            state[name] = t
    return state, aliases


def check_shapes(expected: Shapes, got: Shapes, source: str | Path) -> None:
    """Refuse ``got`` (what a file holds) unless it has exactly ``expected``'s keys and shapes;
    the error names ``source``, the keys and both shapes."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit the config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(missing)} and {len(unexpected)} in all)"
        )
    wrong = [k for k in expected if tuple(expected[k]) != tuple(got[k])]
    if wrong:
        details = "; ".join(
            f"{k}: config {tuple(expected[k])}, file {tuple(got[k])}" for k in wrong[:5]
        )
        raise ValueError(
            f"{source} does not fit the config: {len(wrong)} shape(s) differ: {details}"
        )


class _OverBudget(Exception):
    pass


@contextmanager
def _parameter_budget(limit: int) -> Iterator[None]:
    """Raise :class:`_OverBudget` as soon as the modules built inside register more than
    ``limit`` parameters: on the meta device sizes cost nothing, but every layer costs time."""
    count = 0

    def hook(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise _OverBudget

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def expected_shapes(
    build: Callable[[MultiModalConfig], nn.Module],
    cfg: MultiModalConfig,
    got: Shapes,
    source: str | Path,
    untied: bool = True,
    prepare: Callable[[nn.Module], None] | None = None,
) -> Shapes:
    """The state shapes ``build(cfg)`` would have (after ``prepare``, e.g. LoRA wrapping), built
    on the meta device; refused early, naming ``source``, if the config asks for far more
    parameters than ``got`` has tensors (a tied weight registers twice: budget twice the file)."""
    limit = 2 * len(got) + 100
    try:
        with _parameter_budget(limit), torch.device("meta"):
            model = build(cfg)
            if prepare is not None:
                prepare(model)
    except _OverBudget:
        raise ValueError(
            f"{source} does not fit the config: the config describes a model of more than "
            f"{limit:,} parameter tensors, the file holds {len(got):,} (check the depths: "
            "text.num_layers, text_encoder_layers, vision.depth, audio.depth)"
        ) from None
    state = untied_state(model)[0] if untied else model.state_dict(keep_vars=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def without_init_files(cfg: MultiModalConfig) -> MultiModalConfig:
    """``cfg`` without the ViT initialisation file: saved weights replace it, so a path read from
    a saved config is never opened."""
    if not cfg.vision.pretrained_path:
        return cfg
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained_path=None))


# -- folders -----------------------------------------------------------------------------------
def save_folder(
    model: nn.Module, cfg: MultiModalConfig, folder: str | Path, tokenizer: Any = None
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and, given a Hugging Face ``tokenizer``,
    ``tokenizer/``."""
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("a model on the meta device has no weights to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in untied_state(model)[0].items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    write_config(cfg, folder / CONFIG_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    return folder


def header_shapes(path: str | Path) -> Shapes:
    """Each tensor's shape in a safetensors file, from its header only (no tensor data read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def load_folder(
    build: Callable[[MultiModalConfig], nn.Module],
    folder_or_preset: str | Path,
    config: MultiModalConfig | dict[str, Any] | None = None,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """What :meth:`AutoGLMModel.from_pretrained` does, with ``build`` the model class."""
    folder = Path(folder_or_preset)
    if folder.is_dir():
        cfg, weights = read_config(folder / CONFIG_NAME), folder / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no weights file (written by save_pretrained)")
        device = torch.device(device or "cpu")
    elif str(folder_or_preset) in PRESETS:
        preset = get_preset(str(folder_or_preset))
        cfg, weights = preset.make_config(), None
        device = torch.device(device or preset.device)
    else:
        raise FileNotFoundError(
            f"{str(folder_or_preset)!r} is neither a folder nor a preset; presets: "
            f"{', '.join(sorted(PRESETS))}"
        )
    cfg = override_config(cfg, config)
    if tokenizer is not None:
        cfg = cfg.with_tokenizer(tokenizer)
    if weights is not None:
        cfg = without_init_files(cfg)
    load = weights is not None and device.type != "meta"  # on meta: shapes only, no weights
    if load:  # before allocating anything: the config must describe the file's tensors
        got = header_shapes(weights)
        check_shapes(expected_shapes(build, cfg, got, weights), got, weights)
    with torch.device(device):
        model = build(cfg)
    if load:
        load_weights(model, weights, device)
    return model


def load_weights(model: nn.Module, path: Path, device: torch.device) -> None:
    """Load a saved safetensors file into ``model`` (strict; tied weights stored once)."""
    state = load_file(str(path), device=str(device))
    check_shapes(
        {k: tuple(v.shape) for k, v in untied_state(model)[0].items()}, state_shapes(state), path
    )
    model.load_state_dict(state, strict=False)  # only the tied aliases are left out


def state_shapes(state: Mapping[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in state.items()}


# -- config files ------------------------------------------------------------------------------
def write_config(cfg: MultiModalConfig, path: str | Path) -> None:
    data = {"format_version": FORMAT_VERSION, "model": cfg.to_dict()}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_config(path: str | Path) -> MultiModalConfig:
    """Read a ``config.json`` written by :func:`write_config`; every failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model config (a save_pretrained folder has one)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or set(data) != {"format_version", "model"}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path}: not an autoglm_phone model config; expected the keys "
            f"'format_version' and 'model', got {got}"
        )
    version = data["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path}: unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version} is newer than this autoglm_phone reads "
            f"({FORMAT_VERSION}); upgrade autoglm_phone to load it"
        )
    try:
        return MultiModalConfig.from_dict(data["model"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid model config: {err}") from err


def override_config(
    cfg: MultiModalConfig, override: MultiModalConfig | dict[str, Any] | None
) -> MultiModalConfig:
    """``override`` itself if a config, ``cfg`` with the nested dict's values if a dict.

    The decoder's derived sizes (``head_dim``, ``intermediate_size``) follow new widths unless
    the dict sets them or ``cfg`` had them set to non-derived values.
    """
    if override is None or isinstance(override, MultiModalConfig):
        return override or cfg
    data = _merge(cfg.to_dict(), override)
    text = override.get("text", {})
    if text:
        derived = DecoderConfig(**{**data["text"], **dict.fromkeys(DecoderConfig.DERIVED)})
        base = DecoderConfig(**{**cfg.to_dict()["text"], **dict.fromkeys(DecoderConfig.DERIVED)})
        for name in DecoderConfig.DERIVED:
            if name not in text and getattr(cfg.text, name) == getattr(base, name):
                data["text"][name] = getattr(derived, name)
    return MultiModalConfig.from_dict(data)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
