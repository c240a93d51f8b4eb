"""bench/memory.py on the whole tiny model at 128 tokens: its report, and generation with memory
keeping one segment's cache where full attention keeps the whole prompt's."""

from __future__ import annotations

import json

import pytest

from bench import memory as bench

SMALL = ["--segment-len", "64", "--slots", "8", "--new-tokens", "4"]
LENS = ["--seq-lens", "128,192", "--max-full-len", "128"]  # full attention: 128 only


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``main`` with the measurements in this process and each model built once (fast)."""
    out = tmp_path_factory.mktemp("bench") / "memory.json"
    built, build = {}, bench.build

    def build_once(name, args, seq_len):
        if name not in built:
            built[name] = build(name, args, 256)
        return built[name]

    def in_process(name, seq_len, mode, argv, mmap_threshold):  # run_fresh, no subprocess
        return bench.measure(name, seq_len, mode, bench.parse_args(argv))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "build", build_once)
        mp.setattr(bench, "run_fresh", in_process)
        bench.main([*SMALL, *LENS, "--out", str(out)])
    return json.loads(out.read_text())


def test_report_has_every_measure_and_marks_what_did_not_run(report):
    rows = {(r["model"], r["seq_len"], r["mode"]): r for r in report["rows"]}
    assert len(rows) == 2 * 2 * 3  # models x lengths x measures
    for mode in bench.MEASURES:
        for name in bench.MODELS:
            row = rows[(name, 128, mode)]
            assert row["peak_mib"] >= 0 and row["s_per_token"] > 0, row
        assert rows[("full", 192, mode)] == {
            "model": "full",
            "seq_len": 192,
            "mode": mode,
            "status": "not run",
        }
    table = report["table"]
    assert table[0].split("|")[1:-1] == [
        " tokens ",
        " measure ",
        " full MiB ",
        " memory MiB ",
        " ratio memory/full ",
        " full s/token ",
        " memory s/token ",
    ]
    assert len(table) == 2 + 2 * 3
    cells = [line.split(" | ") for line in table[2:]]
    assert [c[1] for c in cells] == list(bench.MEASURES.values()) * 2
    assert all(c[2] == "not run" and c[4] == "-" for c in cells[3:]), table  # full at 192
    assert all(float(c[4]) >= 0 for c in cells[:3]), table
    assert report["seed_claim"] == bench.SEED_CLAIM
    assert "not measured" in report["standing"][1]


def test_generation_with_memory_keeps_one_segment_not_the_prompt(report):
    """The caches generation allocates: full attention's grows with the prompt, memory's is one
    segment (64 positions) plus the slots, whatever the prompt."""
    rows = [r for r in report["rows"] if r["mode"] == "generate" and "status" not in r]
    state = {(r["model"], r["seq_len"]): r["decode_state_mib"] for r in rows}
    layers, kv_heads, head_dim, hidden = 4, 2, 64, 256  # the tiny preset's decoder
    per_position = layers * 2 * kv_heads * head_dim * 4  # k and v, fp32
    segment = (64 * per_position + layers * 8 * hidden * 4) / bench.MIB
    assert state[("memory", 128)] == state[("memory", 192)] == pytest.approx(segment), state
    assert state[("full", 128)] >= 128 * per_position / bench.MIB > state[("memory", 128)], state


def test_generation_with_memory_never_joins_the_prompts_hidden_states(monkeypatch):
    """Prefill keeps only each segment's cache and the last token: the ``(B, T, C)`` hidden
    states of the whole prompt (``unpack`` of all segments) are never built."""
    args = bench.parse_args(SMALL)
    model = bench.build("memory", args, 256)
    batch = bench.make_batch(model, 256, args)

    def refuse(*_):
        raise AssertionError("generation joined the whole prompt's hidden states")

    monkeypatch.setattr(bench.memory, "unpack", refuse)
    assert bench.run_generate(model, batch, args)["new_tokens"] == 4
