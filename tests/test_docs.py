"""Numbers in the docs come from the code: the size tables and figures of docs/MODEL.md are
regenerated here and must match the text."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm_phone.models.autoglm import AutoGLMModel

MODEL_MD = Path(__file__).resolve().parents[1] / "docs" / "MODEL.md"


@pytest.fixture(scope="module")
def model_md() -> str:
    return MODEL_MD.read_text(encoding="utf-8")


def test_tiny_summary_table_matches_model_md(model_md: str) -> None:
    # the experiments' tokenizer has 409 tokens; the table shows the 8192-token KV cache
    model = AutoGLMModel.from_pretrained("autoglm-phone-tiny", config={"text": {"vocab_size": 409}})
    table = str(model.summary(context_len=8192, show=False))
    assert table in model_md, f"docs/MODEL.md's tiny table is stale; it should read:\n{table}"


def test_9b_summary_and_figures_match_model_md(model_md: str) -> None:
    model = AutoGLMModel.from_pretrained("autoglm-phone-9b")  # meta device: shapes only
    summary = model.summary(show=False)
    assert str(summary) in model_md, f"docs/MODEL.md's 9B table is stale:\n{summary}"
    assert f"**{summary.params:,}** parameters" in model_md
    totals = {g: model.summary(int4_group_size=g, show=False).total_bytes() for g in (32, 64, 128)}
    for g, total in totals.items():
        assert f"{total / 1e9:.2f}e9 bytes" in model_md, f"group {g}: {total / 1e9:.2f}e9 bytes"
