"""Per-layer report rows, totals, table and plot from a quantization log."""

from __future__ import annotations

import json
import math

import pytest

from latticequant.checkpoint import CheckpointError
from latticequant.report import format_table, layer_rows, load_report, plot_loss_vs_bound, summary

LOG = {
    "method": "gptq",
    "run": {"quantize_time_s": 12.5},
    "skipped": ["model.layers.0.mlp.down_proj"],
    "layers": [
        {
            "name": "a.q_proj",
            "shape": [8, 16],
            "loss": 2.0,
            "rtn_loss": 4.0,
            "bound": 3.0,
            "clipped": 0,
            "damp": 0.01,
            "time_s": 0.5,
            "bits_per_weight": 4.5,
        },
        {
            "name": "a.o_proj",
            "shape": [16, 16],
            "loss": 1.0,
            "rtn_loss": 1.0,
            "bound": 0.5,
            "clipped": 32,
            "damp": 0.02,
            "time_s": 1.5,
            "bits_per_weight": 3.0,
        },
    ],
}


def test_rows_and_summary_by_hand():
    rows = layer_rows(LOG)
    assert [r["rel_rtn"] for r in rows] == [0.5, 1.0]
    assert rows[1]["clipped_pct"] == pytest.approx(100 * 32 / 256)
    total = summary(LOG, rows)
    assert total["loss"] == 3.0 and total["rel_rtn"] == pytest.approx(3.0 / 5.0)
    assert total["bits_per_weight"] == pytest.approx((4.5 * 128 + 3.0 * 256) / 384)
    assert total["clipped"] == 32 and total["skipped"] == 1 and total["layer_time_s"] == 2.0


def test_missing_rtn_loss_gives_nan():
    log = {"layers": [{"name": "x", "shape": [2, 2], "loss": 1.0, "bound": 1.0}]}
    rows = layer_rows(log)
    assert math.isnan(rows[0]["rel_rtn"])
    assert "nan" in format_table(rows)


def test_table_has_header_and_one_line_per_layer():
    lines = format_table(layer_rows(LOG)).splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:3] == ["layer", "loss", "/rtn"]
    assert lines[1].startswith("a.q_proj") and "0.500" in lines[1]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_plot_and_load(tmp_path):
    (tmp_path / "quant_log.json").write_text(json.dumps(LOG))
    log, rows, total = load_report(tmp_path)
    png = tmp_path / "p.png"
    plot_loss_vs_bound(rows, png)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(ValueError, match="no quantized layers"):
        plot_loss_vs_bound([], tmp_path / "q.png")


def test_missing_or_bad_log(tmp_path):
    with pytest.raises(CheckpointError, match="no quant_log.json"):
        load_report(tmp_path)
    (tmp_path / "quant_log.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_report(tmp_path)
