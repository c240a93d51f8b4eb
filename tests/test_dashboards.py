"""Dashboards (autoglm_phone/app/dashboards.py): a tiny offline run's wandb folder and TensorBoard
events hold the validation's tables and heat maps, and eval.py's report lands beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL_DATA, compose_config

from autoglm_phone.app import evaluate
from autoglm_phone.app.train import run

# depth 1 towers, a dense and an MoE decoder layer; two validations of one batch each
FAST = [
    "model.vision.depth=1",
    "model.audio.depth=1",
    "model.text.num_layers=2",
    "model.text.moe.layers=[1]",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.dashboards.queries=4",
    "callbacks.dashboards.heatmap_size=8",
    "callbacks.dashboards.max_new_tokens=4",
]


def _train(tmp_path: Path, cache_dir: Path, logger: str, experiment: str, *extra: str) -> dict:
    cfg = compose_config(
        "train",
        [
            f"experiment={experiment}",
            f"logger={logger}",
            f"paths.output_dir={tmp_path}",
            f"paths.cache_dir={cache_dir}",
            *SMALL_DATA,
            *FAST,
            *extra,
        ],
    )
    return run(cfg)


def _media(run_dir: Path, kind: str) -> list[Path]:
    return sorted((run_dir / "files" / "media" / kind).rglob("*"))


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, cache_dir) -> dict:
    """The quickstart's experiment, tiny, logged offline; with the metric definitions the run
    received (an offline run keeps them only in its binary record)."""
    from wandb.sdk.wandb_run import Run

    out, defined = tmp_path_factory.mktemp("dash_wandb"), {}
    real = Run.define_metric

    def spy(self, name, *args, **kwargs):
        defined[name] = kwargs
        return real(self, name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Run, "define_metric", spy)
        result = _train(out, cache_dir, "wandb", "itc_pretrain")
    return {**result, "defined": defined}


def test_wandb_offline_run_holds_tables_and_heatmaps(wandb_run):
    (run_dir,) = (Path(wandb_run["output_dir"]) / "wandb").glob("offline-run-*")
    tables = _media(run_dir, "table")
    for m in ("image", "audio"):
        examples = [p for p in tables if f"retrieval/{m}/examples" in str(p)]
        assert len(examples) == 2, tables  # one per validation
        table = json.loads(examples[-1].read_text())
        assert table["columns"][:2] == [m, "caption"] and len(table["data"]) == 4
        assert {row[-1] for row in table["data"]} <= {"hit", "miss"}
        assert all(1 <= row[-2] for row in table["data"])  # the rank of the right caption
    # the table's cells (the queries' images and clips) are staged in the run folder for sync
    staged = [p.read_bytes()[:4] for p in (run_dir / "artifacts" / "staging").iterdir()]
    assert staged.count(b"\x89PNG") >= 2 * 4 and staged.count(b"RIFF") >= 2 * 4
    images = [str(p) for p in _media(run_dir, "images")]
    for m in ("image", "audio"):
        assert sum(f"retrieval/{m}/similarity" in p for p in images) == 2, images
    # the checkpoint names its run, for eval.py
    import torch

    state = torch.load(wandb_run["ckpt_path"], map_location="cpu", weights_only=True)
    assert state["logged_run"]["wandb"]["id"] in run_dir.name


def test_wandb_summaries_keep_the_best_recall(wandb_run):
    defined = wandb_run["defined"]
    for m in ("image", "audio"):
        assert defined[f"val/{m}2text_R@1"]["summary"] == "max"
        assert defined[f"val/{m}2text_R@1"]["step_metric"] == "trainer/global_step"
    assert defined["val/loss"]["summary"] == "min"


def test_eval_logs_into_a_linked_run(wandb_run, cache_dir, tmp_path):
    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={wandb_run['ckpt_path']}",
            f"output_json={tmp_path / 'metrics.json'}",
            "tasks=[]",
            f"paths.cache_dir={cache_dir}",
            f"paths.output_dir={tmp_path}",
        ],
    )
    result = evaluate.run(cfg)
    import torch

    train_id = torch.load(wandb_run["ckpt_path"], weights_only=True)["logged_run"]["wandb"]["id"]
    runs = sorted((Path(wandb_run["output_dir"]) / "wandb").glob("offline-run-*"))
    (eval_dir,) = [r for r in runs if not r.name.endswith(train_id)]  # beside the training run
    (table,) = [p for p in _media(eval_dir, "table") if "eval/retrieval" in str(p)]
    rows = {row[0]: row for row in json.loads(table.read_text())["data"]}
    assert rows["image->text"][1] == pytest.approx(result["retrieval"]["image->text"]["R@1"])
    assert any("eval/metrics" in str(p) for p in _media(eval_dir, "images"))  # eval.py's plot
    (record,) = eval_dir.glob("run-*.wandb")  # what `wandb sync` uploads: config, group, job
    group = torch.load(wandb_run["ckpt_path"], weights_only=True)["logged_run"]["wandb"]["group"]
    data = record.read_bytes()
    assert train_id.encode() in data and group.encode() in data  # train_run_id, the same group


def test_tensorboard_gets_the_same_figures(tmp_path, cache_dir):
    """caption_sft: the decoder runs, so generated answers and the MoE load figures appear too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, cache_dir, "tensorboard", "caption_sft", "data.modalities=[image]")
    (events,) = (tmp_path / "tensorboard").rglob("events.out.tfevents*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = acc.Tags()["images"]
    assert "moe/load" in images and "moe/load_history" in images, images
    assert any(t.startswith("generation/image/examples") for t in images), images
    text = {t for t in acc.Tags()["tensors"] if t.endswith("text_summary")}
    assert "generation/image/examples/text_summary" in text, text
    (last,) = acc.Tensors("generation/image/examples/text_summary")[-1:]
    markdown = last.tensor_proto.string_val[0].decode()
    assert len(markdown.splitlines()) == 2 + 4  # header, rule, one row per query
    assert "memory/layer0/keep_prior" in acc.Tags()["scalars"]


def test_eval_figures_hold_the_exported_parity_table():
    from autoglm_phone.app.dashboards import eval_figures

    retrieval = {"image->text": {"R@1": 50.0, "R@5": 90.0}}
    result = {
        "ckpt_path": "last.ckpt",
        "retrieval": retrieval,
        "fused": {"image perplexity": {"perplexity": 3.0, "nll": 1.1}},
        "exported": {
            "retrieval": {"image->text": {"R@1": 48.0, "R@5": 90.0}},
            "fused": {"image perplexity": {"perplexity": 3.5}},
        },
    }
    figures = eval_figures(result, plots=[])
    rows = {row[0]: row[1:] for row in figures.tables["eval/exported_parity"].rows}
    assert rows == {
        "image->text R@1": [50.0, 48.0, -2.0],
        "image->text R@5": [90.0, 90.0, 0.0],
        "image perplexity perplexity": [3.0, 3.5, 0.5],
    }
    assert figures.scalars == {"eval/image->text/R@1": 50.0, "eval/image->text/R@5": 90.0}
