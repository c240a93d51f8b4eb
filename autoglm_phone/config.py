"""Plain model configuration dataclasses.

These are the single source of truth for model hyper-parameters: the library builds models from
them, the Hydra app uses them as structured-config schemas (so typos fail at start-up), and
checkpoints / exported artifacts store them as plain dicts (``dataclasses.asdict``).
Derived sizes are computed in ``__post_init__`` (litgpt style), never in config interpolations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Optional


@dataclass
class VisionConfig:
    """A timm vision transformer tower (ViT-tiny by default)."""

    name: str = "vit_tiny_patch16_224"  # timm architecture name
    img_size: int = 64
    patch_size: int = 16
    depth: Optional[int] = None  # None keeps the architecture's own depth (12 for ViT-tiny)
    drop_path_rate: float = 0.0
    pretrained_path: Optional[str] = None  # local timm/.safetensors/.pth file; never downloaded

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(
                f"vision.img_size={self.img_size} must be divisible by vision.patch_size={self.patch_size}"
            )


@dataclass
class AudioConfig:
    """Log-mel front end + conv subsampling + transformer (timm block names)."""

    sample_rate: int = 16000  # model rate; inputs at other rates are resampled to it
    n_mels: int = 64
    n_fft: int = 400  # 25 ms at 16 kHz
    hop_length: int = 160  # 10 ms at 16 kHz
    conv_channels: int = 64
    embed_dim: int = 192
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"audio.embed_dim={self.embed_dim} must be divisible by audio.num_heads={self.num_heads}"
            )


@dataclass
class MoEConfig:
    """Top-k mixture-of-experts FFN (Switch / GShard style); ``num_experts=0`` keeps dense FFNs."""

    num_experts: int = 0
    top_k: int = 2
    layers: list[int] = field(default_factory=list)  # decoder layers with MoE; empty = all layers
    expert_intermediate_size: Optional[int] = None  # None: the dense intermediate_size
    capacity_factor: float = 1.25  # tokens per expert = factor * k * tokens / experts; <= 0: dropless
    balance_loss_weight: float = 0.01  # Switch: num_experts * sum(fraction_i * mean_prob_i)
    importance_loss_weight: float = 0.0  # Shazeer et al. 2017: CV^2 of summed gate values
    z_loss_weight: float = 0.0  # ST-MoE router z-loss: mean(logsumexp(logits)^2)

    def __post_init__(self) -> None:
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k={self.top_k} must be in [1, moe.num_experts={self.num_experts}]")


@dataclass
class MemoryConfig:
    """Segment-recurrent memory-augmented attention for long context; ``enabled=False`` is off."""

    enabled: bool = False
    segment_len: int = 512
    num_slots: int = 32  # memory slots carried from segment to segment
    bptt_segments: int = 2  # gradients flow back through this many segments


@dataclass
class DecoderConfig:
    """GLM-4-shaped decoder (RoPE, GQA, RMSNorm with post-norms, fused SwiGLU)."""

    DERIVED = ("head_dim", "intermediate_size")  # filled in __post_init__ when left as None

    vocab_size: int = 0  # 0: take it from the tokenizer at build time
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    intermediate_size: Optional[int] = None  # None: GLM-4's ratio (13696 / 4096) rounded to 64
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    moe: MoEConfig = field(default_factory=MoEConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = from_dict(MoEConfig, self.moe)
        if isinstance(self.memory, dict):
            self.memory = from_dict(MemoryConfig, self.memory)
        bad = [i for i in self.moe.layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"text.moe.layers {bad} outside [0, num_layers={self.num_layers})")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"text.hidden_size={self.hidden_size} must be divisible by "
                    f"text.num_heads={self.num_heads} (or set text.head_dim)"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"text.num_heads={self.num_heads} must be a multiple of "
                f"text.num_kv_heads={self.num_kv_heads}"
            )
        if self.intermediate_size is None:
            self.intermediate_size = _round_up(self.hidden_size * 13696 // 4096, 64)
        rotary = int(self.head_dim * self.partial_rotary_factor)
        if rotary % 2:
            raise ValueError(f"rotary dim {rotary} (head_dim × partial_rotary_factor) must be even")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


@dataclass
class MultiModalConfig:
    """The whole model: towers, decoder, and the shared contrastive space."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 256  # shared contrastive space
    proj_rank: int = 64  # rank of the low-rank tower -> shared-space projections
    text_pool: str = "mean"  # "mean" over valid tokens, or "last" valid token
    init_temperature: float = 0.07

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand us dict-like nodes; accept plain dicts too.
        for name, cls in (("vision", VisionConfig), ("audio", AudioConfig), ("text", DecoderConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                setattr(self, name, from_dict(cls, dict(value)))
        if self.text_pool not in ("mean", "last"):
            raise ValueError(f"text_pool must be 'mean' or 'last', got {self.text_pool!r}")
        if not 0 < self.init_temperature < 1:
            raise ValueError(f"init_temperature must be in (0, 1), got {self.init_temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiModalConfig:
        return from_dict(cls, data)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a (nested) config dataclass from a plain dict, rejecting unknown keys by name."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory if callable(known[name].default_factory) else None
        if isinstance(value, dict) and default is not None and is_dataclass(default):
            value = from_dict(default, value)
        kwargs[name] = value
    return cls(**kwargs)


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
