"""Convert between transformers' ``Glm4ForCausalLM`` checkpoints and :class:`GLMDecoder`.

``GLMDecoder`` uses ``Glm4ForCausalLM``'s parameter names minus the ``model.`` prefix, so weights
convert by a key rename (litgpt's ``convert_hf_checkpoint`` in spirit, without the fused-QKV
shuffle). The config maps field by field, RoPE scaling (linear, YaRN, Llama-3) and the bos / eos /
pad ids included; anything our decoder cannot reproduce exactly (dynamic or LongRoPE scaling,
another activation, MoE or memory layers on export) is rejected by name rather than converted
approximately.

    decoder = load_glm4("path/to/glm4-checkpoint")  # config.json + *.safetensors
    save_glm4(decoder, "path/to/out")  # Glm4ForCausalLM.from_pretrained("path/to/out") loads it

An MoE layer converts to transformers' ``MixtralSparseMoeBlock`` (``mixtral_moe_block``), the
reference its parity test and benchmark (bench/moe.py) compare against.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autoglm_phone.config import DecoderConfig, MemoryConfig, RopeScalingConfig, from_dict
from autoglm_phone.models.glm import GLMDecoder
from autoglm_phone.models.moe import MoEFeedForward

# Glm4Config's defaults (transformers 5.x) for keys a config.json may leave out.
GLM4_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1.5625e-07,
    "tie_word_embeddings": False,
    "pad_token_id": 151329,
    "attention_bias": True,
}
REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _rope_parameters(hf: dict[str, Any]) -> tuple[float, float, RopeScalingConfig]:
    """``(rope_theta, partial_rotary_factor, scaling)`` as transformers 5 reads them.

    A ``rope_scaling`` dict *replaces* ``rope_parameters`` when both are present (transformers'
    ``convert_rope_params_to_dict``); ``rope_theta`` / ``partial_rotary_factor`` missing from the
    chosen dict come from the top-level keys, then Glm4Config's defaults (10000, 0.5).
    """
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get(field) or {})
    if not isinstance(hf.get(field) or {}, dict):
        raise ValueError(f"{field} must be a dict, got {hf[field]!r}")
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    rope.pop("type", None)
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    factor = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    if rope_type not in RopeScalingConfig.TYPES:
        raise ValueError(
            f"{field}.rope_type={rope_type!r} is not supported; GLMDecoder implements "
            f"{', '.join(RopeScalingConfig.TYPES)} (dynamic and longrope rescale with the length)"
        )
    try:
        scaling = from_dict(RopeScalingConfig, {"rope_type": rope_type, **rope})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{field}: {err}") from err
    return float(theta), float(factor), scaling


def _eos_ids(value: int | list[int] | None) -> list[int]:
    """transformers' ``eos_token_id`` (one id, several or None) as a list."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def decoder_config_from_glm4(hf_config: dict[str, Any]) -> DecoderConfig:
    """A :class:`DecoderConfig` from a transformers GLM-4 ``config.json`` dict."""
    model_type = hf_config.get("model_type", "glm4")
    if model_type != "glm4":
        raise ValueError(f"model_type={model_type!r} is not a GLM-4 decoder (expected 'glm4')")
    missing = [k for k in REQUIRED if k not in hf_config]
    if missing:
        raise ValueError(f"GLM-4 config is missing {', '.join(missing)}")
    hf = {**GLM4_DEFAULTS, **hf_config}
    if hf["hidden_act"] != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (GLM-4 uses 'silu')")
    rope_theta, partial_rotary_factor, rope_scaling = _rope_parameters(hf)
    return DecoderConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        head_dim=hf["head_dim"],
        intermediate_size=hf["intermediate_size"],
        partial_rotary_factor=partial_rotary_factor,
        rope_theta=rope_theta,
        rms_norm_eps=hf["rms_norm_eps"],
        attention_bias=hf["attention_bias"],
        max_seq_len=hf["max_position_embeddings"],
        tie_word_embeddings=hf["tie_word_embeddings"],
        pad_token_id=0 if hf["pad_token_id"] is None else hf["pad_token_id"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        rope_scaling=rope_scaling,
    )


def glm4_config_from_decoder(cfg: DecoderConfig) -> dict[str, Any]:
    """The ``config.json`` dict of the ``Glm4ForCausalLM`` that computes what ``cfg`` does."""
    if cfg.moe.num_experts > 0:
        raise ValueError(
            f"text.moe.num_experts={cfg.moe.num_experts}: MoE layers have no Glm4ForCausalLM "
            "equivalent"
        )
    if cfg.memory.enabled:
        raise ValueError(
            "text.memory.enabled=True: memory attention has no Glm4ForCausalLM equivalent"
        )
    return {
        "architectures": ["Glm4ForCausalLM"],
        "model_type": "glm4",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor,
            **cfg.rope_scaling.parameters(),
        },
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        # one id as an int, as transformers writes it; none: left out (Glm4Config's default)
        **({"eos_token_id": _eos_json(cfg.eos_token_ids)} if cfg.eos_token_ids else {}),
    }


def _eos_json(ids: list[int]) -> int | list[int]:
    return ids[0] if len(ids) == 1 else list(ids)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's ``model.safetensors``, or of the shards its index lists."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:  # names from a file: only plain .safetensors names inside folder
            if not (isinstance(shard, str) and shard.endswith(".safetensors")) or (
                Path(shard).name != shard or shard.startswith(".")
            ):
                raise ValueError(f"{index}: shard {shard!r} is not a file name in {folder}")
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(folder / shard))
    return state


def load_glm4(
    source: str | Path | nn.Module,
    *,
    dtype: torch.dtype = torch.float32,
    memory: MemoryConfig | None = None,
) -> GLMDecoder:
    """A :class:`GLMDecoder` with the weights of a GLM-4 checkpoint.

    ``source`` is a local transformers checkpoint folder (``config.json`` plus ``model.safetensors``
    or sharded ``model-*.safetensors`` with their index) or a ``Glm4ForCausalLM`` instance. Nothing
    is downloaded. Tied embeddings are re-tied; the result is in eval mode, in ``dtype``.
    With ``memory`` (enabled) it is a memory decoder: every GLM-4 weight loads, the memory weights
    (slot inits, keep-gate, read/write biases) get their documented initialisation
    (``MemoryBlock.reset_memory_parameters``, docs/MEMORY.md).
    """
    if isinstance(source, nn.Module):
        cfg = decoder_config_from_glm4(source.config.to_dict())
        state = source.state_dict()
    else:
        folder = Path(source)
        path = folder / "config.json"
        try:
            cfg = decoder_config_from_glm4(json.loads(path.read_text(encoding="utf-8")))
        except (TypeError, ValueError) as err:  # JSON errors included: every failure names the file
            raise ValueError(f"{path}: {err}") from err
        state = _read_safetensors(folder)
    ours = {
        k.removeprefix("model."): v
        for k, v in state.items()
        if not k.endswith("rotary_emb.inv_freq")
    }
    if cfg.tie_word_embeddings:
        ours["lm_head.weight"] = ours["embed_tokens.weight"]
    if memory is not None:
        cfg = replace(cfg, memory=memory)
    decoder = GLMDecoder(cfg)
    missing, unexpected = decoder.load_state_dict(ours, strict=False)
    missing = [k for k in missing if ".memory_" not in k]  # new weights, initialised above
    if missing or unexpected:
        raise ValueError(f"not a GLM-4 checkpoint: missing {missing}, unexpected {unexpected}")
    return decoder.to(dtype).eval()


def save_glm4(decoder: GLMDecoder, folder: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` that ``Glm4ForCausalLM.from_pretrained``
    loads into the same model; returns the folder. Raises for MoE or memory decoders."""
    config = glm4_config_from_decoder(decoder.cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in decoder.state_dict().items():
        if name == "lm_head.weight" and decoder.cfg.tie_word_embeddings:
            continue  # tied to model.embed_tokens.weight, as transformers saves it
        key = name if name.startswith("lm_head.") else f"model.{name}"
        state[key] = tensor.detach().contiguous()
    config["dtype"] = str(decoder.embed_tokens.weight.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def mixtral_moe_block(layer: MoEFeedForward, experts_implementation: str = "eager") -> nn.Module:
    """transformers' ``MixtralSparseMoeBlock`` holding ``layer``'s weights: the same softmax
    top-k routing with renormalised gates and the same SwiGLU experts, without a capacity limit,
    so it computes what ``layer`` does in dropless mode. ``experts_implementation``: ``"eager"``
    (the block's own loop over experts, what a standalone block runs) or ``"grouped_mm"`` (what
    transformers picks inside a model)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if not layer.renormalize_gates:
        raise ValueError("moe.renormalize_gates=False: Mixtral always renormalises the top-k gates")
    config = MixtralConfig(
        hidden_size=layer.hidden_size,
        intermediate_size=layer.intermediate_size,
        num_local_experts=layer.num_experts,
        num_experts_per_tok=layer.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    config._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(config).to(layer.gate_up_proj.device, layer.gate_up_proj.dtype)
    with torch.no_grad():  # Mixtral stores (out, in); ours is (in, out), [gate | up] in both
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.gate_up_proj.transpose(1, 2))
        block.experts.down_proj.copy_(layer.down_proj.transpose(1, 2))
    return block
