"""bench/summary.py: the registry's ratios from each benchmark's JSON, one table, and README's
benchmark table generated from docs/bench/summary.json."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "bench" / "summary.py")
summary = importlib.util.module_from_spec(spec)
sys.modules["bench_summary"] = summary
spec.loader.exec_module(summary)

MOE = {
    "throughput": [
        {"tokens": 1024, "experts": 8, "top_k": 2, "variant": "dense_ref",
         "speed_vs_dense_ref": 1.0, "speed_vs_dense_active": 0.2},
        {"tokens": 1024, "experts": 8, "top_k": 2, "variant": "capacity",
         "speed_vs_dense_ref": 3.5, "speed_vs_dense_active": 0.6},
    ]
}  # fmt: skip
MEMORY = {
    "rows": [
        {"model": "memory", "seq_len": 2048, "mode": "forward", "peak_mib": 30.0},
        {"model": "full", "seq_len": 2048, "mode": "forward", "peak_mib": 120.0},
        {"model": "full", "seq_len": 4096, "mode": "forward", "status": "not run"},
        {"model": "memory", "seq_len": 4096, "mode": "forward", "peak_mib": 50.0},
    ]
}
EXPORT = {
    "artifacts": {
        "onnx_fp32": {"format": "onnx", "precision": "fp32", "methods": {"text": {"bytes": 400}}},
        "onnx_int4": {"format": "onnx", "precision": "int4", "methods": {"text": {"bytes": 100}}},
    },
    "latency_ms": {"1": {"text": {"eager": 2.0, "onnx_fp32": 1.0, "onnx_int4": 4.0}}},
    "decode": {
        "rows": {
            "eager": {"ttft_vs_eager": 1.0, "decode_vs_eager": 1.0, "roofline_fraction": 0.1},
            "executorch_int4": {
                "ttft_vs_eager": 1.5,
                "decode_vs_eager": 2.5,
                "roofline_fraction": 0.25,
            },
        }
    },
}
RECALL = {"chance": 0.0625, "results": {"memory": {"final_accuracy": 0.5}, "full": {"loaded": "x"}}}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "outputs" / "bench").mkdir(parents=True)
    for name, body in (
        ("moe", MOE),
        ("export", EXPORT),
        ("memory", MEMORY),
        ("long_recall_quick", RECALL),
    ):
        (tmp_path / "outputs" / "bench" / f"{name}.json").write_text(json.dumps(body))
    (tmp_path / "README.md").write_text(
        f"intro\n{summary.README_BEGIN}\nold table\n{summary.README_END}\nrest\n"
    )
    return tmp_path


def test_ratios_come_from_each_benchmarks_json(root):
    got = summary.main(["--no-run", "--root", str(root)])
    ratios = {name: entry["ratios"] for name, entry in got["benchmarks"].items()}
    assert ratios == {
        "moe": {
            "capacity vs dense_ref, 1024 tokens, E=8, k=2": 3.5,
            "capacity vs dense_active, 1024 tokens, E=8, k=2": 0.6,
        },
        "export": {
            "onnx_fp32 text: speed vs eager, 1 thread": 2.0,
            "onnx_int4 text: size / fp32": 0.25,
            "onnx_int4 text: speed vs eager, 1 thread": 0.5,
            "eager decode: roofline / ms per token": 0.1,
            "executorch_int4 time to first token: speed vs eager": 1.5,
            "executorch_int4 decode tokens/s vs eager": 2.5,
            "executorch_int4 decode: roofline / ms per token": 0.25,
        },
        "memory": {"peak memory/full, forward, 2048 tokens": 0.25},  # 4096: full not run
        "long_recall": {"memory final accuracy / chance": 8.0},
    }
    assert json.loads((root / summary.SUMMARY).read_text()) == got


def test_a_missing_or_broken_json_is_named_not_fatal(root):
    (root / "outputs" / "bench" / "moe.json").unlink()
    (root / "outputs" / "bench" / "memory.json").write_text(json.dumps({"table": []}))
    got = summary.main(["--no-run", "--root", str(root)])["benchmarks"]
    assert got["moe"]["status"] == "no JSON"
    assert got["memory"]["status"].startswith("unreadable JSON (KeyError")
    table = summary.render_table({"machine": got_machine(), "benchmarks": got})
    assert "| moe | no JSON | - |" in table


def got_machine():
    return {"platform": "x86_64", "cpu_count": 2, "torch": "2.0", "device": "CPU"}


def test_unknown_benchmark_is_refused(root):
    with pytest.raises(SystemExit, match="unknown benchmark"):
        summary.main(["--no-run", "--root", str(root), "--only", "moe,nope"])


def test_readme_option_writes_the_table_between_the_markers(root):
    got = summary.main(["--no-run", "--readme", "--root", str(root)])
    readme = (root / "README.md").read_text()
    assert "old table" not in readme and readme.startswith("intro\n") and readme.endswith("rest\n")
    assert summary.render_table(got) in readme
    assert json.loads((root / summary.DOCS_SUMMARY).read_text()) == got


def test_readme_table_matches_docs_summary_json():
    """README's benchmark table is generated from docs/bench/summary.json, never typed."""
    data = json.loads((ROOT / summary.DOCS_SUMMARY).read_text())
    readme = (ROOT / "README.md").read_text()
    assert summary.replace_readme_table(readme, summary.render_table(data)) == readme
