"""Plain model configuration dataclasses.

These are the single source of truth for model hyper-parameters: the library builds models from
them, the Hydra app uses them as structured-config schemas (so typos fail at start-up), and
checkpoints / exported artifacts store them as plain dicts (``dataclasses.asdict``).
Derived sizes are computed in ``__post_init__`` (litgpt style), never in config interpolations.
"""

# OmegaConf reads these annotations and needs Optional[...], not X | None:
# ruff: noqa: UP045

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import InitVar, asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, NamedTuple, Optional, Union, get_args, get_origin, get_type_hints


class Interval(NamedTuple):
    """A closed range ``[lo, hi]``, or ``(lo, hi]`` with ``lo_open``, for ``LIMITS`` tables."""

    lo: float
    hi: float
    lo_open: bool = False

    def __contains__(self, x: object) -> bool:
        return (self.lo < x if self.lo_open else self.lo <= x) and x <= self.hi

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}]"


# Sanity caps, far above any real model, so a config alone cannot ask for absurd allocations.
MAX_WIDTH = 2**16  # hidden / embedding widths and ranks
MAX_DEPTH = 1024  # layers, blocks, heads, experts
MAX_VOCAB = 2**22
MAX_TOKENS = 2**24  # sequence lengths, context sizes
POSITIVE = Interval(0.0, math.inf, lo_open=True)
NON_NEGATIVE = Interval(0.0, math.inf)
PROBABILITY = Interval(0.0, 1.0)


@dataclass
class VisionConfig:
    """A timm vision transformer tower (ViT-tiny by default)."""

    name: str = "vit_tiny_patch16_224"  # timm architecture name
    img_size: int = 64
    patch_size: int = 16
    depth: Optional[int] = None  # None keeps the architecture's own depth (12 for ViT-tiny)
    drop_path_rate: float = 0.0
    pretrained_path: Optional[str] = None  # local timm/.safetensors/.pth file; never downloaded
    # "patch": one linear patchify (ViT); "conv": log2(patch_size) stride-2 3x3 convs (BN + ReLU
    # between them) then a 1x1 projection (Xiao et al. 2021, "Early convolutions help
    # transformers see better")
    stem: str = "patch"

    PREFIX = "vision."
    LIMITS = {
        "img_size": Interval(1, 8192),
        "patch_size": Interval(1, 1024),
        "depth": Interval(1, MAX_DEPTH),
        "drop_path_rate": PROBABILITY,
    }

    def __post_init__(self) -> None:
        validate(self)
        if self.img_size % self.patch_size:
            raise ValueError(
                f"vision.img_size={self.img_size} must be divisible by vision.patch_size={self.patch_size}"
            )
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"vision.stem={self.stem!r}: expected 'patch' or 'conv'")
        if self.stem == "conv":
            if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
                raise ValueError(
                    f"vision.stem='conv' downsamples by stride-2 convolutions, so "
                    f"vision.patch_size must be a power of two >= 2, got {self.patch_size}"
                )
            if self.pretrained_path:
                raise ValueError(
                    "vision.pretrained_path loads a patch-stem ViT; set vision.stem='patch' "
                    "to use pretrained weights"
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

    PREFIX = "audio."
    LIMITS = {
        "sample_rate": Interval(1, 768_000),
        "n_mels": Interval(1, 1024),
        "n_fft": Interval(1, 2**16),
        "hop_length": Interval(1, 2**16),
        "conv_channels": Interval(1, MAX_WIDTH),
        "embed_dim": Interval(1, MAX_WIDTH),
        "depth": Interval(1, MAX_DEPTH),
        "num_heads": Interval(1, MAX_DEPTH),
        "mlp_ratio": Interval(0, 64, lo_open=True),
        "drop_path_rate": PROBABILITY,
    }

    def __post_init__(self) -> None:
        validate(self)
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
    capacity_factor: float = (
        1.25  # tokens per expert = factor * k * tokens / experts; <= 0: dropless
    )
    balance_loss_weight: float = 0.01  # Switch: num_experts * sum(fraction_i * mean_prob_i)
    importance_loss_weight: float = 0.0  # Shazeer et al. 2017: CV^2 of summed gate values
    z_loss_weight: float = 0.0  # ST-MoE router z-loss: mean(logsumexp(logits)^2)
    renormalize_gates: bool = (
        True  # top-k gates sum to 1; top-1 + True leaves the router no task gradient
    )

    PREFIX = "text.moe."
    LIMITS = {
        "num_experts": Interval(0, MAX_DEPTH),
        "top_k": Interval(1, MAX_DEPTH),
        "expert_intermediate_size": Interval(1, 4 * MAX_WIDTH),
        "balance_loss_weight": NON_NEGATIVE,
        "importance_loss_weight": NON_NEGATIVE,
        "z_loss_weight": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        validate(self)
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k={self.top_k} must be in [1, moe.num_experts={self.num_experts}]"
            )


@dataclass
class MemoryConfig:
    """Segment-recurrent memory-augmented attention for long context (``models/memory.py``).

    ``enabled=False``: the plain GLM-4 decoder (full attention up to ``max_seq_len``).
    ``enabled=True``: any length, segment by segment, each layer carrying ``num_slots`` vectors;
    ``carry=False`` keeps the memory weights but never reads or writes them (each segment on its
    own: the no-memory ablation of the same model)."""

    enabled: bool = False
    segment_len: int = 512
    num_slots: int = 32  # memory slots carried from segment to segment
    carry: bool = True  # False: segments independent (ablation)
    bptt_segments: int = 2  # gradients flow back through this many segments
    # recompute each segment in backward: memory bounded by one segment's activations
    checkpoint_segments: bool = False
    # initial biases (None: the defaults in models/memory.py, from segment_len and num_slots)
    gate_bias: Optional[float] = None  # keep-gate logit of the memory write
    read_bias: Optional[float] = None  # logit added to memory keys when a segment reads them
    write_bias: Optional[float] = None  # logit added to a slot's own chunk when it writes
    # chrono init of the keep-gate (Tallec & Ollivier 2018): bias log U(1, N - 1), keep-times up
    # to N segments; 0 uses gate_bias
    chrono_segments: int = 0

    PREFIX = "text.memory."
    LIMITS = {
        "segment_len": Interval(1, MAX_TOKENS),
        "num_slots": Interval(1, MAX_WIDTH),
        "bptt_segments": Interval(1, MAX_TOKENS),
        "chrono_segments": Interval(0, MAX_TOKENS),
    }

    def __post_init__(self) -> None:
        validate(self)
        if self.chrono_segments in (1, 2):
            raise ValueError(
                f"text.memory.chrono_segments={self.chrono_segments}: 0 (off) or >= 3 "
                "(keep-times drawn from U(1, N - 1))"
            )


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling, with the names and meaning of transformers' ``rope_parameters``
    (``modeling_rope_utils.ROPE_INIT_FUNCTIONS``, which computes the frequencies): ``"linear"``
    (position interpolation, Chen et al. 2023), ``"yarn"`` (Peng et al. 2023) and ``"llama3"``;
    ``"default"`` is unscaled RoPE. Fields a type does not read stay ``None``. Types whose
    frequencies change with the sequence length (``dynamic``, ``longrope``) are not supported."""

    TYPES = ("default", "linear", "yarn", "llama3")
    REQUIRED = {"linear": ("factor",), "yarn": ("factor",), "llama3": ("factor", "low_freq_factor",
                "high_freq_factor")}  # fmt: skip

    rope_type: str = "default"
    factor: Optional[float] = None  # context extension factor
    # yarn, llama3: the pre-training context (None: text.max_seq_len, as transformers defaults it)
    original_max_position_embeddings: Optional[int] = None
    attention_factor: Optional[float] = None  # yarn: cos/sin scale (None: from factor)
    beta_fast: Optional[float] = None  # yarn: ramp bounds in rotations (None: 32 and 1)
    beta_slow: Optional[float] = None
    mscale: Optional[float] = None  # yarn, DeepSeek style attention_factor
    mscale_all_dim: Optional[float] = None
    truncate: Optional[bool] = None  # yarn: round the ramp bounds (None: True)
    low_freq_factor: Optional[float] = None  # llama3
    high_freq_factor: Optional[float] = None

    PREFIX = "text.rope_scaling."
    LIMITS = {
        "factor": Interval(0, 2**20, lo_open=True),
        "original_max_position_embeddings": Interval(1, MAX_TOKENS),
        "low_freq_factor": POSITIVE,
        "high_freq_factor": POSITIVE,
    }

    def __post_init__(self) -> None:
        validate(self)
        if self.rope_type not in self.TYPES:
            raise ValueError(
                f"text.rope_scaling.rope_type={self.rope_type!r} is not supported; GLMDecoder "
                f"implements {', '.join(self.TYPES)}"
            )
        missing = [k for k in self.REQUIRED.get(self.rope_type, ()) if getattr(self, k) is None]
        if missing:
            raise ValueError(
                f"text.rope_scaling.rope_type={self.rope_type!r} needs "
                + ", ".join(f"text.rope_scaling.{k}" for k in missing)
            )

    def parameters(self) -> dict[str, Any]:
        """The fields that are set, as transformers' ``rope_parameters`` keys."""
        return {k: v for k, v in asdict(self).items() if v is not None}


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
    bos_token_id: Optional[int] = None  # kept for GLM-4 checkpoints (``models/convert.py``)
    eos_token_ids: list[int] = field(default_factory=list)  # GLM-4 has several
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    PREFIX = "text."
    LIMITS = {
        "vocab_size": Interval(0, MAX_VOCAB),
        "hidden_size": Interval(1, MAX_WIDTH),
        "num_layers": Interval(1, MAX_DEPTH),
        "num_heads": Interval(1, MAX_DEPTH),
        "num_kv_heads": Interval(1, MAX_DEPTH),
        "head_dim": Interval(1, 4096),
        "intermediate_size": Interval(1, 4 * MAX_WIDTH),
        "partial_rotary_factor": Interval(0, 1, lo_open=True),
        "rope_theta": POSITIVE,
        "rms_norm_eps": Interval(0, 1, lo_open=True),
        "max_seq_len": Interval(1, MAX_TOKENS),
        "pad_token_id": Interval(0, MAX_VOCAB),
        "bos_token_id": Interval(0, MAX_VOCAB),
    }

    def __post_init__(self) -> None:
        for name, cls in (("rope_scaling", RopeScalingConfig), ("moe", MoEConfig),
                          ("memory", MemoryConfig)):  # fmt: skip
            if not isinstance(getattr(self, name), cls):
                setattr(self, name, from_dict(cls, getattr(self, name)))
        validate(self)
        if self.vocab_size and self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"text.pad_token_id={self.pad_token_id} must be < text.vocab_size={self.vocab_size}"
            )
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
class AdapterConfig:
    """Tower tokens -> decoder embeddings: token pooling, then a low-rank (LoRA-style) map."""

    POOLS = ("avg", "attn")

    rank: int = 64  # rank of the tower-width -> decoder hidden_size projection
    image_tokens: int = 16  # decoder tokens per image; "avg" needs a square (pooled on the grid)
    audio_tokens: int = 16  # decoder tokens per audio clip, whatever its length
    pool: str = "avg"  # "avg": adaptive average pooling; "attn": learned queries (CoCa pooler)
    position_embed: bool = False  # a learned embedding per media token slot (grid cell / time)
    # the tower's pooled feature (ViT [CLS]; what ITC projects) as one more media token, first
    summary_token: bool = False

    PREFIX = "adapter."
    LIMITS = {
        "rank": Interval(1, MAX_WIDTH),
        "image_tokens": Interval(1, 2**14),
        "audio_tokens": Interval(1, 2**14),
    }

    def __post_init__(self) -> None:
        validate(self)
        if self.pool not in self.POOLS:
            raise ValueError(f"adapter.pool must be one of {self.POOLS}, got {self.pool!r}")
        if self.pool == "avg" and math.isqrt(self.image_tokens) ** 2 != self.image_tokens:
            raise ValueError(
                f"adapter.image_tokens={self.image_tokens} must be a square (k x k grid) "
                "with pool='avg'"
            )


@dataclass
class SpecialTokens:
    """Ids of the GLM markers around media blocks; ``None`` until a tokenizer fills them in."""

    NAMES = {
        "begin_of_image": "<|begin_of_image|>",
        "end_of_image": "<|end_of_image|>",
        "begin_of_audio": "<|begin_of_audio|>",
        "end_of_audio": "<|end_of_audio|>",
    }

    begin_of_image: Optional[int] = None
    end_of_image: Optional[int] = None
    begin_of_audio: Optional[int] = None
    end_of_audio: Optional[int] = None
    eos: Optional[int] = None  # the tokenizer's eos: ``AutoGLMModel.generate``'s default stop
    mask: Optional[int] = None  # ``[MASK]``, what MLM puts on 80% of its targets
    specials: list[int] = field(default_factory=list)  # every special id: never an MLM target

    PREFIX = "special_tokens."

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> SpecialTokens:
        """Look the markers up in a Hugging Face tokenizer; a missing one raises naming it."""
        ids = {}
        for name, token in cls.NAMES.items():
            idx = tokenizer.convert_tokens_to_ids(token)
            if idx is None or idx == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {token!r} token (needed for {name})")
            ids[name] = idx
        return cls(
            **ids,
            eos=tokenizer.eos_token_id,
            mask=tokenizer.mask_token_id,
            specials=sorted(tokenizer.all_special_ids),
        )


# String shorthands for the towers and the decoder (``MultiModalConfig(vision_encoder=...)``).
VISION_ENCODERS: dict[str, Callable[[], VisionConfig]] = {
    "vit-tiny": VisionConfig,  # timm ViT-Ti/16 at 64 px: 16 tokens, 5.5M parameters
    # the same with a convolutional stem (loads no ViT weights); trains far better from scratch
    "vit-tiny-conv": lambda: VisionConfig(stem="conv"),  # 16 tokens, 5.6M
    "vit-base": lambda: VisionConfig(name="vit_base_patch16_224", img_size=224),  # 196 tokens, 86M
}
AUDIO_ENCODERS: dict[str, Callable[[], AudioConfig]] = {
    "audio-tiny": AudioConfig,  # 192 wide, 4 blocks: 2.0M parameters
    "audio-base": lambda: AudioConfig(embed_dim=512, depth=6, num_heads=8),  # Whisper-base, 19M
}
TEXT_DECODERS: dict[str, Callable[[], DecoderConfig]] = {
    # 256 wide, 4 layers, top-2-of-4 MoE FFNs in layers 1 and 3, memory over segments of 512
    # tokens (32 slots per layer); vocabulary from the tokenizer
    "glm-tiny": lambda: DecoderConfig(
        moe=MoEConfig(num_experts=4, top_k=2, layers=[1, 3]), memory=MemoryConfig(enabled=True)
    ),
    # GLM-4-9B-0414's shape (untied embeddings, 9.4B parameters), at an 8192-token context
    "glm-4-9b": lambda: DecoderConfig(
        vocab_size=151552,
        hidden_size=4096,
        num_layers=40,
        num_heads=32,
        num_kv_heads=2,
        head_dim=128,
        intermediate_size=13696,
        partial_rotary_factor=0.5,
        max_seq_len=8192,
        tie_word_embeddings=False,
        pad_token_id=151329,
    ),
}
QUANTIZE = (None, "int4")
SHORTHANDS = ("vision_encoder", "audio_encoder", "text_decoder")


def _lookup(table: dict[str, Callable[[], Any]], kind: str, name: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]()


@dataclass
class MultiModalConfig:
    """The whole model: towers, adapters into the decoder, decoder, and the contrastive space.

    ``vision_encoder`` / ``audio_encoder`` / ``text_decoder`` are init-only shorthands: a name from
    :data:`VISION_ENCODERS` / :data:`AUDIO_ENCODERS` / :data:`TEXT_DECODERS` fills in ``vision`` /
    ``audio`` / ``text`` (give a name or the nested config, not both). Only the nested configs are
    stored, so ``to_dict`` / ``from_dict`` round-trip exactly.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: DecoderConfig = field(default_factory=DecoderConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)
    embed_dim: int = 256  # shared contrastive space
    proj_rank: int = 64  # rank of the low-rank tower -> shared-space projections
    text_pool: str = "mean"  # "mean" over valid tokens, or "last" valid token
    # 0: ITC encodes text with the decoder (bidirectional). k > 0: with its own k-layer
    # bidirectional stack of the decoder's width (own embeddings, dense FFNs), so the fused
    # objectives (ITM, MLM, LM) and ITC stop sharing the text weights: ALBEF's split of text
    # encoder and fusion layers (docs/RECIPES.md)
    text_encoder_layers: int = 0
    init_temperature: float = 0.07
    quantize: Optional[str] = None  # None or "int4": the deployment precision (summary default)
    vision_encoder: InitVar[Optional[str]] = None
    audio_encoder: InitVar[Optional[str]] = None
    text_decoder: InitVar[Optional[str]] = None

    PREFIX = ""
    LIMITS = {
        "embed_dim": Interval(1, MAX_WIDTH),
        "proj_rank": Interval(1, MAX_WIDTH),
        "text_encoder_layers": Interval(0, MAX_DEPTH),
    }

    def __post_init__(
        self,
        vision_encoder: Optional[str] = None,
        audio_encoder: Optional[str] = None,
        text_decoder: Optional[str] = None,
    ) -> None:
        # Hydra/OmegaConf hand us dict-like nodes; accept plain dicts too.
        sections = (
            ("vision", VisionConfig, vision_encoder, VISION_ENCODERS, "vision_encoder"),
            ("audio", AudioConfig, audio_encoder, AUDIO_ENCODERS, "audio_encoder"),
            ("text", DecoderConfig, text_decoder, TEXT_DECODERS, "text_decoder"),
            ("adapter", AdapterConfig, None, None, None),
            ("special_tokens", SpecialTokens, None, None, None),
        )
        for name, cls, shorthand, table, kind in sections:
            value = getattr(self, name)
            if not isinstance(value, cls):
                value = from_dict(cls, value)
                setattr(self, name, value)
            if shorthand is not None:
                if value != cls():
                    raise ValueError(f"give {kind}={shorthand!r} or {name}=..., not both")
                setattr(self, name, _lookup(table, kind.replace("_", " "), shorthand))
        validate(self)
        if self.text_pool not in ("mean", "last"):
            raise ValueError(f"text_pool must be 'mean' or 'last', got {self.text_pool!r}")
        if not 0 < self.init_temperature < 1:
            raise ValueError(f"init_temperature must be in (0, 1), got {self.init_temperature}")
        if self.text_encoder_layers < 0:
            raise ValueError(f"text_encoder_layers must be >= 0, got {self.text_encoder_layers}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text_encoder_config(self) -> DecoderConfig | None:
        """The ITC text stack's config (``None`` when the decoder encodes text for ITC)."""
        if not self.text_encoder_layers:
            return None
        return replace(
            self.text,
            num_layers=self.text_encoder_layers,
            moe=MoEConfig(num_experts=0, layers=[]),
            memory=MemoryConfig(),
            tie_word_embeddings=True,  # its LM head is never used: no extra weights for one
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiModalConfig:
        """From a plain (nested) dict; unknown keys, wrong types and out-of-range values fail
        naming the key (``text.hidden_size``); shorthand names are accepted."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a model config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} | set(SHORTHANDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
        return cls(**data)  # __post_init__ builds the nested configs, checking their keys

    def with_tokenizer(self, tokenizer: Any) -> MultiModalConfig:
        """A copy sized for ``tokenizer``: vocabulary (if still 0), pad id and media markers.

        The same steps as the training app, so a model built here matches a trained one.
        """
        vocab = self.text.vocab_size or len(tokenizer)
        if vocab < len(tokenizer):
            raise ValueError(f"text.vocab_size={vocab} < tokenizer size {len(tokenizer)}")
        text = replace(self.text, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
        return replace(self, text=text, special_tokens=SpecialTokens.from_tokenizer(tokenizer))


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a (nested) config dataclass from a plain dict, rejecting unknown keys by name."""
    prefix = getattr(cls, "PREFIX", "")
    if not isinstance(data, Mapping):
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        names = ", ".join(prefix + str(k) for k in unknown)
        raise ValueError(f"unknown {cls.__name__} key(s): {names}")
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory if callable(known[name].default_factory) else None
        if isinstance(value, Mapping) and default is not None and is_dataclass(default):
            value = from_dict(default, value)
        kwargs[name] = value
    return cls(**kwargs)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_error(path: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` does not match the annotation ``hint`` (None when it does).

    Written by hand for the few annotations the configs use (bool is not an int here, an int is
    a float); OmegaConf checks the Hydra path, this checks plain dicts and Python callers.
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _type_error(path, value, inner)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return f"{path}={value!r} must be a list"
        errors = (_type_error(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        return next((e for e in errors if e), None)
    if is_dataclass(hint):
        ok = isinstance(value, (hint, Mapping))
        return None if ok else f"{path}={value!r} must be a mapping of {hint.__name__} keys"
    if hint is bool:
        return None if isinstance(value, bool) else f"{path}={value!r} must be true or false"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{path}={value!r} must be an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{path}={value!r} must be a number"
        return None if math.isfinite(value) else f"{path}={value!r} must be finite"
    if hint is str:
        return None if isinstance(value, str) else f"{path}={value!r} must be a string"
    return None  # Any


def validate(cfg: Any) -> None:
    """Check every field of the config dataclass ``cfg`` against its type annotation, then its
    class's ``LIMITS`` ranges; a ``ValueError`` names the key path (``cls.PREFIX`` + field)."""
    prefix, hints = type(cfg).PREFIX, _type_hints(type(cfg))
    for f in fields(cfg):
        error = _type_error(prefix + f.name, getattr(cfg, f.name), hints[f.name])
        if error:
            raise ValueError(error)
    for name, interval in getattr(cfg, "LIMITS", {}).items():
        value = getattr(cfg, name)
        if value is not None and value not in interval:
            raise ValueError(f"{prefix}{name}={value!r} is outside {interval}")


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
