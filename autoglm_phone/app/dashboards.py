"""Dashboards worth opening: what each validation (and ``eval.py``) sends to wandb and TensorBoard.

:class:`Dashboards` builds, once per validation and on rank 0 only, a logger-free
:class:`Figures` (tables whose cells may be images or audio clips, figures rendered to RGB arrays,
histograms) and sends it to every wandb or TensorBoard logger of the trainer (a CSV logger gets
nothing). What it shows:

- ``retrieval/<m>/examples``: the first ``queries`` validation media (the image, or the audio clip)
  with their caption, the top-``top_k`` captions among the split's unique captions (score, and
  ``✓`` on a right one), the rank of the first right caption and hit or miss at rank 1 (right: a
  caption of the query's item, the rule of ``eval.py``'s protocols);
- ``retrieval/<m>/similarity``: the cosine similarity of the first ``heatmap_size`` media and their
  own captions as a heat map (matched pairs on the diagonal);
- ``generation/<m>/examples``: with a generative head (``objective.lm_weight > 0``), greedy
  answers to each query's prompt beside the truth (``eval_tasks.generate_answers``);
- ``moe/load``: the mean expert load of every MoE layer and modality over the training steps since
  the last validation (layers x experts), and ``moe/load_history``, that load at every validation;
- ``memory/layer<i>/...``: the memory gate (``MemoryBlock.gate_stats``): mean keep-gate of the
  writes since the last validation (only runs long enough to write have them), its prior
  ``sigmoid(b_f)`` (mean, and a histogram) and the mean read and write biases.

Under several processes the examples and the heat map come from rank 0's share of the split (the
logged recall stays the module's, over every rank); generation and the memory statistics are
skipped under FSDP, where rank 0 holds only a shard of the weights.

:class:`RunLink` stores which run logged a checkpoint (``checkpoint["logged_run"]``) so that
:func:`log_eval` can send ``eval.py``'s report to that run's dashboard: a wandb run in the same
group with ``job_type="eval"`` (offline like the training run), or the run's TensorBoard folder.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy

from autoglm_phone.app.eval_tasks import COMPARED, generate_answers
from autoglm_phone.data.instructions import DESCRIBE
from autoglm_phone.models.autoglm import MODALITY_TABLE
from autoglm_phone.objectives import Features, media_kwargs
from autoglm_phone.tokenizer import tokenizer_from_files


@dataclass
class ImageCell:
    pixels: np.ndarray  # (H, W, 3) uint8


@dataclass
class AudioCell:
    samples: np.ndarray  # (T,) float32
    sample_rate: int


Cell = str | float | int | ImageCell | AudioCell


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]


@dataclass
class Figures:
    """What one validation (or evaluation) shows, before any logger sees it."""

    tables: dict[str, Table] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # tag -> (H, W, 3) uint8
    histograms: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any((self.tables, self.images, self.histograms, self.scalars))


# -- plots (matplotlib's object API: no pyplot state, safe beside a training run) -------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _pixels(fig) -> np.ndarray:
    """A figure as ``(H, W, 3)`` uint8."""
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def heatmap(
    values: np.ndarray, title: str, xlabel: str, ylabel: str, yticks: list[str] | None = None
) -> np.ndarray:
    """A ``(R, C)`` matrix as a colour-mapped image with a colour bar."""
    fig = _figure(2.5 + 0.15 * values.shape[1], 2.0 + 0.15 * values.shape[0])
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if yticks is not None:
        ax.set_yticks(range(len(yticks)), yticks)
    return _pixels(fig)


def load_history(steps: list[int], loads: dict[str, list[np.ndarray]]) -> np.ndarray:
    """One panel per MoE layer: each expert's share of the assignments at every validation."""
    fig = _figure(4.0, 1.8 * len(loads) + 0.5)
    for i, (name, rows) in enumerate(loads.items()):
        ax = fig.add_subplot(len(loads), 1, i + 1)
        values = np.stack(rows)  # (V, E)
        for e in range(values.shape[1]):
            ax.plot(steps[-len(rows) :], values[:, e], marker="o", label=f"e{e}")
        ax.axhline(1.0 / values.shape[1], color="k", lw=0.8, ls="--")  # a balanced layer
        ax.set(title=name, ylabel="load")
    ax.set_xlabel("step")
    ax.legend(ncols=min(4, values.shape[1]), fontsize="small")
    return _pixels(fig)


def _image_cell(media: torch.Tensor) -> ImageCell:
    """A batch image ``(3, H, W)``, uint8 or float in [0, 1], as a cell."""
    x = media.detach().cpu()
    x = x if x.dtype == torch.uint8 else (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageCell(x.permute(1, 2, 0).numpy())


def _media_cell(modality: str, media: torch.Tensor, sample_rate: int) -> Cell:
    if modality == "image":
        return _image_cell(media)
    return AudioCell(media.detach().cpu().float().numpy(), sample_rate)


# -- sinks ---------------------------------------------------------------------------------------
def _offline(run: Any) -> bool:
    return run.settings.mode in ("offline", "dryrun")  # WandbLogger(offline=True): "dryrun"


@contextlib.contextmanager
def _staged_in_run(run: Any) -> Iterator[None]:
    """wandb keeps a table's media in a ``run_table`` artifact, staged under ``WANDB_DATA_DIR``
    (by default in the home folder) until ``wandb sync`` uploads it. An offline run stages them in
    its own folder instead (``offline-run-*/artifacts/staging``), so the folder holds all its
    media and syncs from anywhere it is copied to; a ``WANDB_DATA_DIR`` set by the user wins."""
    if not _offline(run) or "WANDB_DATA_DIR" in os.environ:
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(Path(run.dir).parent)
    try:
        yield
    finally:
        del os.environ["WANDB_DATA_DIR"]


def send_wandb(run: Any, figures: Figures, step: int) -> None:
    """One ``run.log`` of every figure at ``trainer/global_step = step``."""
    import wandb

    def cell(c: Cell) -> Any:
        if isinstance(c, ImageCell):
            return wandb.Image(c.pixels)
        if isinstance(c, AudioCell):
            return wandb.Audio(c.samples, sample_rate=c.sample_rate)
        return c

    data: dict[str, Any] = {
        name: wandb.Table(columns=t.columns, data=[[cell(c) for c in row] for row in t.rows])
        for name, t in figures.tables.items()
    }
    data.update({tag: wandb.Image(px) for tag, px in figures.images.items()})
    data.update({tag: wandb.Histogram(v) for tag, v in figures.histograms.items()})
    data.update(figures.scalars)
    with _staged_in_run(run):
        run.log({**data, "trainer/global_step": step})


def _markdown(table: Table) -> str:
    def text(c: Cell) -> str:
        if isinstance(c, ImageCell | AudioCell):
            return "(media)"
        return f"{c:.3f}" if isinstance(c, float) else str(c).replace("|", "/")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(text(c) for c in row) + " |" for row in table.rows])


def send_tensorboard(writer: Any, figures: Figures, step: int) -> None:
    """The same figures through a ``SummaryWriter``: tables as markdown text beside their media
    (images as one grid per table, audio as one clip per row)."""
    for name, t in figures.tables.items():
        writer.add_text(name, _markdown(t), step)
        for j, column in enumerate(t.columns):
            cells = [row[j] for row in t.rows]
            pics = [c.pixels for c in cells if isinstance(c, ImageCell)]
            if pics:
                writer.add_images(f"{name}/{column}", np.stack(pics), step, dataformats="NHWC")
            for i, c in enumerate(cells):
                if isinstance(c, AudioCell):
                    clip = torch.from_numpy(c.samples)[None]
                    writer.add_audio(f"{name}/{column}/{i}", clip, step, c.sample_rate)
    for tag, px in figures.images.items():
        writer.add_image(tag, px, step, dataformats="HWC")
    for tag, values in figures.histograms.items():
        writer.add_histogram(tag, values, step)
    for tag, value in figures.scalars.items():
        writer.add_scalar(tag, value, step)
    writer.flush()


def send(loggers: list[Logger], figures: Figures, step: int) -> None:
    """``figures`` to every wandb and TensorBoard logger; the others get nothing."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            send_wandb(logger.experiment, figures, step)
        elif isinstance(logger, TensorBoardLogger):
            send_tensorboard(logger.experiment, figures, step)


def dashboard_loggers(trainer: L.Trainer) -> list[Logger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger | TensorBoardLogger)]


# -- the validation callback ----------------------------------------------------------------------
@dataclass
class _Split:
    """What one modality's validation keeps: every caption's feature, the first queries."""

    text: list[torch.Tensor] = field(default_factory=list)  # (B, E) per batch
    caption_ids: list[int] = field(default_factory=list)
    item_ids: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    media_features: list[torch.Tensor] = field(default_factory=list)  # first max(Q, H) rows
    media: list[torch.Tensor] = field(default_factory=list)  # first Q rows
    prompts: list[str] = field(default_factory=list)  # first Q rows
    truths: list[str] = field(default_factory=list)
    sample_rate: int = 0

    @property
    def kept(self) -> int:
        return sum(len(x) for x in self.media_features)


class Dashboards(Callback):
    """The figures of the module docstring at every validation, to wandb and TensorBoard."""

    def __init__(
        self,
        queries: int = 8,
        top_k: int = 5,
        heatmap_size: int = 32,
        max_new_tokens: int = 32,
    ) -> None:
        self.queries, self.top_k, self.heatmap_size = queries, top_k, heatmap_size
        self.max_new_tokens = max_new_tokens
        self._splits: dict[str, _Split] = {}
        self._load_sum: dict[str, torch.Tensor] = {}  # "image L1" -> summed load (E,)
        self._load_steps: dict[str, int] = {}
        self._history_steps: list[int] = []
        self._history: dict[str, list[np.ndarray]] = {}
        self._tokenizer = None

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and bool(dashboard_loggers(trainer))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """wandb: summaries keep the best recall and the lowest validation loss, on the step axis."""
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                run = logger.experiment
                modalities = pl_module.hparams.data["modalities"] if pl_module.hparams.data else []
                for m in modalities:
                    for k in (1, 5):
                        run.define_metric(
                            f"val/{m}2text_R@{k}", step_metric="trainer/global_step", summary="max"
                        )
                run.define_metric("val/loss", step_metric="trainer/global_step", summary="min")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active(trainer):
            return
        for modality, layers in pl_module.moe_load.items():
            for layer, load in layers.items():
                name = f"{modality} L{layer}"
                self._load_sum[name] = self._load_sum.get(name, 0) + load.float().cpu()
                self._load_steps[name] = self._load_steps.get(name, 0) + 1

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.sanity_checking or not self._active(trainer):
            return
        modality = batch.get("modality")
        if modality not in MODALITY_TABLE or not isinstance(outputs, Features):
            return
        s = self._splits.setdefault(modality, _Split(sample_rate=int(batch["sample_rate"])))
        if outputs.text is not None:
            s.text.append(outputs.text.detach().float().cpu())
            s.caption_ids += batch["caption_id"].tolist()
            s.item_ids += batch["item_id"].tolist()
            s.captions += list(batch["caption"])
        take = max(0, max(self.queries, self.heatmap_size) - s.kept)
        if take:
            s.media_features.append(outputs.media[:take].detach().float().cpu())
        q = max(0, self.queries - len(s.prompts))
        if q:
            s.media.append(batch["media"][:q].detach().cpu())
            n = len(batch["media"][:q])
            s.prompts += list(batch.get("prompt", [DESCRIBE[modality]] * len(batch["caption"])))[:n]
            s.truths += list(batch.get("response", batch["caption"]))[:n]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        splits, self._splits = self._splits, {}
        if trainer.sanity_checking or not self._active(trainer):
            return
        with torch.no_grad():
            figures = self.build(trainer, pl_module, splits)
        if figures:
            send(dashboard_loggers(trainer), figures, trainer.global_step)

    # -- building ----------------------------------------------------------------------------------
    def build(
        self, trainer: L.Trainer, pl_module: L.LightningModule, splits: dict[str, _Split]
    ) -> Figures:
        figures = Figures()
        whole = not isinstance(trainer.strategy, FSDPStrategy)  # FSDP: rank 0 holds a shard
        for modality, s in splits.items():
            if s.text:
                self._retrieval(figures, modality, s)
            if pl_module.objective.active("lm") and whole:
                self._generation(figures, pl_module, modality, s)
        self._moe(figures, trainer.global_step)
        if whole:
            self._memory(figures, pl_module)
        return figures

    def _retrieval(self, figures: Figures, modality: str, s: _Split) -> None:
        text = torch.cat(s.text)  # (N, E)
        first: dict[int, int] = {}
        for row, cid in enumerate(s.caption_ids):
            first.setdefault(cid, row)
        uniq = list(first.values())  # one row per unique caption
        media = torch.cat(s.media_features)  # (K, E)
        queries = media[: self.queries]
        sim = queries @ text[uniq].T  # (Q, U)
        order = sim.argsort(dim=1, descending=True)  # (Q, U)
        k = min(self.top_k, len(uniq))
        columns = [modality, "caption", *(f"top{j + 1}" for j in range(k)), "rank", "R@1"]
        rows, raw = [], torch.cat(s.media)
        for i in range(len(queries)):
            pixels = _media_cell(modality, raw[i], s.sample_rate)
            right = [s.item_ids[uniq[j]] == s.item_ids[i] for j in order[i].tolist()]
            rank = right.index(True) + 1 if any(right) else len(right) + 1
            top = [
                f"{'✓ ' if right[r] else ''}{s.captions[uniq[j]]} ({sim[i, j]:.2f})"
                for r, j in enumerate(order[i, :k].tolist())
            ]
            rows.append([pixels, s.captions[i], *top, rank, "hit" if rank == 1 else "miss"])
        figures.tables[f"retrieval/{modality}/examples"] = Table(columns, rows)
        h = min(self.heatmap_size, len(media), len(text))
        figures.images[f"retrieval/{modality}/similarity"] = heatmap(
            (media[:h] @ text[:h].T).numpy(),
            f"{modality} -> caption cosine similarity",
            "caption (validation order; diagonal: matched pairs)",
            f"{modality} (validation order)",
        )

    def _generation(
        self, figures: Figures, pl_module: L.LightningModule, modality: str, s: _Split
    ) -> None:
        if not s.media:
            return
        if self._tokenizer is None:
            self._tokenizer = tokenizer_from_files(pl_module.hparams.tokenizer_files)
        model = pl_module.model
        media = torch.cat(s.media).to(pl_module.device)
        rate = media_kwargs({"sample_rate": s.sample_rate})
        _, block = model.encode_media_tokens(modality, media, **rate)
        thinking = bool((pl_module.hparams.data or {}).get("thinking"))
        answers: list[tuple[str, str] | None] = [None] * len(s.prompts)
        for prompt in dict.fromkeys(s.prompts):  # one batch per distinct prompt
            rows = [i for i, p in enumerate(s.prompts) if p == prompt]
            out = generate_answers(
                model, self._tokenizer, block[rows], modality, prompt,
                [s.truths[i] for i in rows], self.max_new_tokens, thinking,
            )  # fmt: skip
            for i, answer in zip(rows, out, strict=True):
                answers[i] = answer
        figures.tables[f"generation/{modality}/examples"] = Table(
            [modality, "prompt", "generated", "truth", "exact"],
            [
                [_media_cell(modality, media[i].cpu(), s.sample_rate), s.prompts[i], gen, ref,
                 "yes" if gen == ref else "no"]
                for i, (gen, ref) in enumerate(answers)
            ],
        )  # fmt: skip

    def _moe(self, figures: Figures, step: int) -> None:
        if not self._load_sum:
            return
        mean = {n: (v / self._load_steps[n]).numpy() for n, v in sorted(self._load_sum.items())}
        self._load_sum, self._load_steps = {}, {}
        figures.images["moe/load"] = heatmap(
            np.stack(list(mean.values())),
            "expert load since the last validation",
            "expert",
            "modality, layer",
            yticks=list(mean),
        )
        self._history_steps.append(step)
        for name, load in mean.items():
            self._history.setdefault(name, []).append(load)
        figures.images["moe/load_history"] = load_history(self._history_steps, self._history)

    def _memory(self, figures: Figures, pl_module: L.LightningModule) -> None:
        for layer, stats in pl_module.model.text.memory_stats(reset=True).items():
            prefix = f"memory/layer{layer}"
            if "keep" in stats:
                figures.scalars[f"{prefix}/keep"] = float(stats["keep"])
                figures.scalars[f"{prefix}/writes"] = float(stats["writes"])
            figures.scalars[f"{prefix}/keep_prior"] = float(stats["keep_prior"].mean())
            figures.scalars[f"{prefix}/read_bias"] = float(stats["read_bias"].float().mean())
            figures.scalars[f"{prefix}/write_bias"] = float(stats["write_bias"].float().mean())
            figures.histograms[f"{prefix}/keep_prior"] = stats["keep_prior"].float().cpu().numpy()


# -- which run logged a checkpoint, and eval.py's report into it ----------------------------------
def run_link(loggers: list[Logger]) -> dict[str, dict[str, Any]]:
    """Plain values naming the wandb run and TensorBoard folder of a training run."""
    link: dict[str, dict[str, Any]] = {}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            link["wandb"] = {
                "id": run.id,
                "project": run.project,
                "group": run.group or run.id,
                "name": run.name,
                "dir": str(Path(logger.save_dir).absolute()),
                "offline": _offline(run),
            }
        elif isinstance(logger, TensorBoardLogger):
            link["tensorboard"] = {"log_dir": str(Path(logger.log_dir).absolute())}
    return link


class RunLink(Callback):
    """``checkpoint["logged_run"]``: :func:`run_link` of the trainer's loggers (for ``eval.py``)."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        link = run_link(trainer.loggers)
        if link:
            checkpoint["logged_run"] = link


def read_run_link(ckpt_path: str | Path) -> tuple[dict[str, Any], int]:
    """A checkpoint's :class:`RunLink` entry (empty if none) and its global step."""
    path = Path(ckpt_path)
    if not path.is_file():
        return {}, 0
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return state.get("logged_run") or {}, int(state.get("global_step", 0))


def eval_figures(result: dict[str, Any], plots: list[Path]) -> Figures:
    """``eval.py``'s report: the retrieval table, the fused tasks' numbers and generated examples,
    the eager-vs-exported comparison (export's parity report) and the plots it wrote."""
    import matplotlib.image

    figures = Figures()
    report = result.get("retrieval", {})
    if report:
        cols = [c for c in next(iter(report.values())) if isinstance(c, str)]
        figures.tables["eval/retrieval"] = Table(
            ["direction", *cols],
            [[name, *(float(m[c]) for c in cols)] for name, m in report.items()],
        )
        for name, m in report.items():
            for c in ("R@1", "R@5", "R@10"):
                if c in m:
                    figures.scalars[f"eval/{name}/{c}"] = float(m[c])
    fused = result.get("fused", {})
    numbers = [
        [task, key, float(v)] for task, m in fused.items() for key, v in m.items()
        if isinstance(v, int | float)
    ]  # fmt: skip
    if numbers:
        figures.tables["eval/fused"] = Table(["task", "metric", "value"], numbers)
    examples = [
        [task, e["generated"], e["reference"]] for task, m in fused.items()
        for e in m.get("examples", [])[:8]
    ]  # fmt: skip
    if examples:
        figures.tables["eval/generated"] = Table(["task", "generated", "truth"], examples)
    exported = result.get("exported")
    if exported and result.get("ckpt_path"):
        eager = {**result["retrieval"], **result.get("fused", {})}
        folder = {**exported["retrieval"], **exported["fused"]}
        figures.tables["eval/exported_parity"] = Table(
            ["metric", "eager", "exported", "diff"],
            [
                [f"{name} {key}", float(eager[name][key]), float(v), float(v - eager[name][key])]
                for name, m in folder.items() for key, v in m.items()
                if key in COMPARED and name in eager
            ],
        )  # fmt: skip
    for path in plots:
        if path.exists():
            rgba = matplotlib.image.imread(path)  # (H, W, 4) float in [0, 1]
            figures.images[f"eval/{path.stem}"] = (rgba[..., :3] * 255).astype(np.uint8)
    return figures


def log_eval(ckpt_path: str | Path, result: dict[str, Any], plots: list[Path], name: str) -> list:
    """Send ``eval.py``'s report to the checkpoint's run; returns where it went (empty when the
    checkpoint names no run). wandb: a new run in the training run's group, ``job_type="eval"``,
    in the same folder and mode (offline stays offline); TensorBoard: ``<log_dir>/<name>``."""
    link, step = read_run_link(ckpt_path)
    if not link:
        return []
    figures = eval_figures(result, plots)
    sent = []
    if "wandb" in link:
        import wandb

        w = link["wandb"]
        offline = w["offline"] or os.environ.get("WANDB_MODE") == "offline"
        run = wandb.init(
            project=w["project"],
            group=w["group"],
            job_type="eval",
            name=f"{w['name']}-{name}",
            dir=w["dir"],
            mode="offline" if offline else "online",
            config={"ckpt_path": str(ckpt_path), "train_run_id": w["id"], "eval": name},
        )
        try:
            send_wandb(run, figures, step)
        finally:
            run.finish()
        sent.append(f"wandb run {run.id} (group {w['group']}, job_type eval)")
    if "tensorboard" in link:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(link["tensorboard"]["log_dir"]) / name
        writer = SummaryWriter(log_dir=str(folder))
        try:
            send_tensorboard(writer, figures, step)
        finally:
            writer.close()
        sent.append(f"TensorBoard {folder}")
    return sent
