"""Typed schemas for the Hydra configs in ``conf/``.

Registered in Hydra's ConfigStore and listed first in ``conf/train.yaml`` / ``conf/eval.yaml``
defaults, so an unknown key or a value of the wrong type fails at start-up, before any data or
model loads, with Hydra's message naming the key. The model and objective schemas *are* the
library's :class:`~autoglm_phone.config.MultiModalConfig` and
:class:`~autoglm_phone.objectives.ObjectiveConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from autoglm_phone.config import DecoderConfig, MultiModalConfig
from autoglm_phone.objectives import ObjectiveConfig


@dataclass
class SplitNames:
    """What ``{split}`` becomes in ``data.path``/``image_dir``/``audio_dir`` for each split, e.g.
    Clotho's ``train: development`` (``data.split_names.train=development``)."""

    train: str = "train"
    val: str = "val"
    test: str = "test"


@dataclass
class DataConfig:
    # synthetic | episodes | manifest | coco | audiocaps | webdataset (docs/DATA.md)
    name: str = "synthetic"
    # synthetic generator (autoglm_phone.data.synthetic.SyntheticSpec)
    seed: int = 0  # also seeds the shard order of webdataset
    image_size: int = 64  # render size; batches are resized to model.vision.img_size if different
    # synthetic: render rate. Real sources: audio is decoded to mono at this rate and cropped or
    # zero-padded to audio_seconds; the audio tower resamples to model.audio.sample_rate.
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    num_train: int = 5000
    num_val: int = 500
    num_test: int = 500
    num_av_train: int = 1000
    num_av_val: int = 200
    num_av_test: int = 200
    use_av: bool = True  # AV scenes add (image, image caption) and (audio, audio caption) pairs
    # episodes (autoglm_phone.data.episodes.EpisodeSpec): media items per episode; the question's
    # item is at least min_back items back and (ask_within > 0) among the first ask_within;
    # train_min_items > 0: training episodes have train_min_items..num_items items
    num_items: int = 16
    min_back: int = 4
    ask_within: int = 0
    train_min_items: int = 0
    # "full": each item's whole caption; "short": "<ordinal> <value>." with one asked attribute
    # per modality (image colour, sound count), a key directly followed by its value
    captions: str = "full"
    # real sources (autoglm_phone.data.sources); images decode straight to model.vision.img_size
    path: str | None = None  # manifest / COCO JSON / CSV / shard glob; {split} = a file per split
    # relative media paths start here (relative to the path's folder); {split} as in path
    image_dir: str | None = None
    audio_dir: str | None = None
    split_names: SplitNames = field(default_factory=SplitNames)
    strict: bool = False  # stop at the first bad sample instead of skipping and counting it
    allow_outside_root: bool = False  # media paths may leave the file's folder / image_dir
    max_file_mb: float = 256.0  # larger media files (and non-regular files) are skipped
    # loading
    modalities: list[str] = field(default_factory=lambda: ["image", "audio"])
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    max_text_len: int = 32
    # tokenizer: a local Hugging Face folder, or None to train BPE on the training captions
    tokenizer_path: str | None = None
    vocab_size: int = 1024
    # instruction batches (chat format, autoglm_phone/data/instructions.py) beside the captions
    instructions: bool = False
    max_chat_len: int = 64
    # instruction responses reason first (what the media show), then answer (docs/SERVE.md)
    thinking: bool = False


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_ratio: float = 0.05  # share of total steps spent in linear warm-up
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    # LR multipliers by parameter-name prefix, e.g. {vision: 3.0, vision_adapter: 2.0}: the
    # longest matching prefix wins, the rest train at lr (`python train.py +optim.lr_ratios.vision=3`)
    lr_ratios: dict[str, float] = field(default_factory=dict)


@dataclass
class UnfreezeConfig:
    """Unfreeze the upper ``blocks`` of ``tower`` at ``epoch`` with ``lr * lr_ratio``."""

    tower: str = "vision"
    blocks: int = 0  # 0: never unfreeze
    epoch: int = 1
    lr_ratio: float = 0.1


@dataclass
class FinetuneConfig:
    freeze: list[str] = field(default_factory=list)  # top-level modules: vision, audio, text, ...
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    lora: bool = False  # peft LoRA on ``lora_targets``; only the adapters (and keep) train
    lora_targets: list[str] = field(default_factory=lambda: ["text"])
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    use_dora: bool = False
    lora_keep_trainable: list[str] = field(default_factory=list)  # e.g. itm_head, text_proj


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` (passed through as keywords)."""

    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"  # "32-true", "bf16-mixed", "16-mixed"
    max_epochs: int = 5
    max_steps: int = -1  # > 0: train exactly this many steps; max_epochs no longer applies
    max_time: str | None = None
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    val_check_interval: Any = None
    num_sanity_val_steps: int = 0
    fast_dev_run: Any = False
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    deterministic: bool = False
    enable_progress_bar: bool = True
    sync_batchnorm: bool = False  # batch statistics over all ranks (the ViT's conv stem)


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | csv | tensorboard | none
    project: str = "autoglm-phone"
    offline: bool = True  # wandb: no account needed; set false after `wandb login`
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class DashboardsConfig:
    """What every validation sends to wandb / TensorBoard (autoglm_phone/app/dashboards.py)."""

    enabled: bool = True
    queries: int = 8  # retrieval and generation examples per modality
    top_k: int = 5  # captions shown per query
    heatmap_size: int = 32  # media x caption similarity slice
    max_new_tokens: int = 32  # generated answers (objectives with a generative head)


@dataclass
class CallbacksConfig:
    monitor: str = "val/loss"
    mode: str = "min"
    save_top_k: int = 1
    save_last: bool = True
    every_n_epochs: int = 1
    every_n_train_steps: int = 0  # > 0: also write last.ckpt every n steps (mid-epoch resume)
    lr_monitor: bool = True
    dashboards: DashboardsConfig = field(default_factory=DashboardsConfig)


@dataclass
class PathsConfig:
    root_dir: str = "."
    cache_dir: str = ".cache"
    output_dir: str = "outputs"


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: MultiModalConfig = field(default_factory=MultiModalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    task_name: str = "train"
    seed: int = 42
    ckpt_path: str | None = None  # resume from this checkpoint ("last": the run's last.ckpt)
    init_from: str | None = None  # start from these weights (a training checkpoint); no resume


@dataclass
class EvalConfig:
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: str | None = None
    # an export.py folder, evaluated beside its checkpoint (ckpt_path, else its manifest's source)
    exported: str | None = None
    split: str = "test"
    task_name: str = "eval"
    seed: int = 42
    output_json: str | None = None  # default: <output_dir>/metrics.json
    # fused evaluations (itm, rerank, mlm, perplexity, captioning); None: those the
    # checkpoint's objective trained for (autoglm_phone/app/eval_tasks.py)
    tasks: list[str] | None = None
    rerank_k: int = 16  # ITM re-ranks each query's ITC top-k
    # re-ranked score = ITC logit + w * ITM log-odds; None: w fitted on the validation split
    rerank_weight: float | None = None
    # the hard suites on the embedded data (autoglm_phone/app/eval_headroom.py), beside the split
    headroom: bool = False
    headroom_size: int = 200  # samples per suite
    # the report also goes to the run that logged the checkpoint (wandb: a run in its group with
    # job_type=eval; TensorBoard: a folder in its log_dir), autoglm_phone/app/dashboards.py
    log_to_run: bool = True


@dataclass
class ExportConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: str | None = None  # a training checkpoint or a save_pretrained folder
    format: str = "executorch"  # executorch (XNNPACK .pte) | onnx
    precision: str = "fp32"  # fp32 | fp16 | int4
    out_dir: str | None = None  # default: <run folder>/<format>_<precision>
    methods: list[str] = field(default_factory=lambda: ["image", "audio", "text", "generate"])
    group_size: int = 32  # int4: input channels per weight scale
    max_text_len: int | None = None  # None: the checkpoint's data.max_text_len, else 32
    audio_seconds: float | None = None  # None: the checkpoint's data.audio_seconds, else 1.0
    quant: str = "rtn"  # int4 grid: rtn (round to nearest) | awq (calibrated on training data)
    calibration_samples: int = 32  # awq: items per modality from the checkpoint's training split
    dry_run: bool = False  # print the INT4 size plan of ckpt_path or preset; build nothing
    preset: str | None = None  # dry_run: a preset name instead of ckpt_path
    vocab_size: int | None = None  # dry_run: for a preset whose vocabulary comes from a tokenizer
    context_len: int = 8192  # dry_run: tokens of FP16 KV cache in the plan
    # generation: prompt positions per prefill and KV cache slots (memory: one segment each)
    prompt_len: int = 128
    cache_len: int | None = None  # None: prompt_len + 128, within text.max_seq_len
    task_name: str = "export"


@dataclass
class ServeConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: str | None = None  # a training checkpoint, save_pretrained or export.py folder
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "autoglm-phone"  # the id clients ask for (GET /v1/models)
    api_key: str | None = None  # None: no key asked for (conf/serve.yaml reads AUTOGLM_API_KEY)
    device: str = "auto"  # auto: cuda if present, else cpu (an exported folder: cpu)
    max_batch_size: int = 8  # requests decoded together; 1 turns batching off
    batch_wait_ms: float = 5.0  # how long a batch waits for more requests
    max_queue: int = 64  # waiting requests; more are answered 503
    request_timeout_s: float = 300.0
    max_body_mb: float = 32.0
    max_image_pixels: int = 4096 * 4096
    max_audio_seconds: float = 30.0
    max_media: int = 8  # images + audio clips per request
    default_max_tokens: int = 64  # when a request sets no max_tokens
    default_temperature: float = 0.0  # when a request sets none (0: greedy)
    context_window: int | None = None  # None: the decoder's max_seq_len
    max_text_len: int | None = None  # embeddings; None: the checkpoint's data.max_text_len, else 32
    audio_seconds: float | None = None  # None: the checkpoint's data.audio_seconds, else 1.0
    task_name: str = "serve"


def _schema(cls: type) -> Any:
    """Structured node for ``cls`` with the decoder's derived sizes left unset (None)."""
    node = OmegaConf.structured(cls)
    if "model" in node:
        for name in DecoderConfig.DERIVED:
            node.model.text[name] = None
    return node


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=_schema(TrainConfig))
    cs.store(name="eval_schema", node=_schema(EvalConfig))
    cs.store(name="export_schema", node=_schema(ExportConfig))
    cs.store(name="serve_schema", node=_schema(ServeConfig))
