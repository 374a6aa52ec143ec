"""Per-layer tables and plots from a checkpoint's ``quant_log.json``."""

from __future__ import annotations

import math
import os
from pathlib import Path

from latticequant.pipeline.checkpoint import read_quant_log
from latticequant.pipeline.files import atomic_write

__all__ = ["layer_rows", "summary", "format_table", "plot_loss_vs_bound", "load_report"]

COLUMNS = (
    ("name", "layer", "{}"),
    ("loss", "loss", "{:.4g}"),
    ("rel_rtn", "/rtn", "{:.3f}"),
    ("rel_gptq", "/gptq", "{:.3f}"),
    ("bound", "bound", "{:.4g}"),
    ("rel_bound", "/bound", "{:.3f}"),
    ("clipped", "clipped", "{:d}"),
    ("clipped_pct", "clip%", "{:.2f}"),
    ("damp", "damp", "{:.3g}"),
    ("time_s", "time s", "{:.2f}"),
    ("bits_per_weight", "bits", "{:.3f}"),
)
REFINE_COLUMNS = (
    ("refine_cd_pct", "cd-%", "{:.2f}"),
    ("refine_scales_pct", "scales-%", "{:.2f}"),
)
"""Shown when a run refined its layers: the share of the loss each step removed."""
EXPERT_COLUMNS = (
    ("expert_tokens", "tokens", "{:d}"),
    ("expert_fallback", "fallback", "{}"),
)
"""Shown for mixture-of-experts models: the tokens routed to each expert layer, and the
fallback (``--expert-fallback``) an expert with too few of them was quantized on."""


def _ratio(a, b) -> float:
    if a is None or b is None or b == 0:
        return float("nan")
    return a / b


def layer_rows(log: dict) -> list[dict]:
    """One row per quantized layer: loss, loss relative to RTN, bound, clipping, damping, time."""
    rows = []
    for entry in log.get("layers", []):
        clipped = int(entry.get("clipped", 0))
        shape = entry.get("shape") or [0, 0]
        n_weights = shape[0] * shape[1]
        rows.append(
            {
                "name": entry["name"],
                "loss": float(entry.get("loss", float("nan"))),
                "rel_rtn": _ratio(entry.get("loss"), entry.get("rtn_loss")),
                "rel_gptq": _ratio(entry.get("loss"), entry.get("gptq_loss")),
                "bound": float(entry.get("bound", float("nan"))),
                "rel_bound": _ratio(entry.get("loss"), entry.get("bound")),
                "refine_cd_pct": 100
                * _ratio(entry.get("refine_cd_removed"), entry.get("loss_before_refine")),
                "refine_scales_pct": 100
                * _ratio(entry.get("refine_scales_removed"), entry.get("loss_before_refine")),
                "clipped": clipped,
                "clipped_pct": 100.0 * clipped / n_weights if n_weights else float("nan"),
                "damp": float(entry.get("damp", float("nan"))),
                "time_s": float(entry.get("time_s", float("nan"))),
                "bits_per_weight": float(entry.get("bits_per_weight", float("nan"))),
                "expert_tokens": entry.get("expert_tokens"),
                "expert_fallback": entry.get("expert_fallback")
                or ("-" if "expert_tokens" in entry else None),
            }
        )
    return rows


def summary(log: dict, rows: list[dict]) -> dict:
    """Totals over the layers: summed losses, the ratio to RTN, weighted bits, time."""
    layers = log.get("layers", [])
    total_loss = sum(e.get("loss", 0.0) for e in layers)
    total_rtn = sum(e.get("rtn_loss", 0.0) for e in layers) if layers else 0.0
    total_gptq = sum(e.get("gptq_loss", float("nan")) for e in layers) if layers else 0.0
    weights = [(e.get("shape") or [0, 0]) for e in layers]
    n = sum(a * b for a, b in weights)
    bits = sum(e.get("bits_per_weight", 0.0) * a * b for e, (a, b) in zip(layers, weights))
    fallbacks: dict[str, int] = {}
    for e in layers:
        if e.get("expert_fallback"):
            fallbacks[e["expert_fallback"]] = fallbacks.get(e["expert_fallback"], 0) + 1
    skipped = log.get("skipped") or {}
    reasons = skipped.values() if isinstance(skipped, dict) else []
    kept = [r for r in reasons if str(r).startswith("expert fallback")]
    if kept:
        fallbacks["float"] = len(kept)
    return {
        "method": log.get("method"),
        "n_layers": len(rows),
        "skipped": len(log.get("skipped", [])),
        "loss": total_loss,
        "rel_rtn": _ratio(total_loss, total_rtn) if total_rtn else float("nan"),
        "rel_gptq": _ratio(total_loss, total_gptq) if total_gptq else float("nan"),
        "clipped": sum(r["clipped"] for r in rows),
        "bits_per_weight": bits / n if n else float("nan"),
        "layer_time_s": sum(r["time_s"] for r in rows if not math.isnan(r["time_s"])),
        "quantize_time_s": (log.get("run") or {}).get("quantize_time_s"),
        "expert_layers": sum(1 for e in layers if "expert_tokens" in e) + len(kept),
        "expert_fallbacks": fallbacks,
    }


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one line per layer, columns aligned."""
    columns = COLUMNS
    if any(not math.isnan(r.get("refine_cd_pct", math.nan)) for r in rows) or any(
        not math.isnan(r.get("refine_scales_pct", math.nan)) for r in rows
    ):
        columns = COLUMNS + REFINE_COLUMNS
    if any(r.get("expert_tokens") is not None for r in rows):
        columns = columns + EXPERT_COLUMNS
    header = [title for _, title, _ in columns]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row[key]
            if value is None:
                cells.append("-")
                continue
            cells.append(
                "nan" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
            )
        body.append(cells)
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))
        )
    ]
    for cells in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
        )
    return "\n".join(lines)


def plot_loss_vs_bound(rows: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """PNG of each layer's proxy loss next to its Babai bound (log scale), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no quantized layers to plot")
    path = Path(path)
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.12 * len(rows))), 4.5))
    ax.semilogy(x, [r["bound"] for r in rows], "o-", ms=3, label="bound (no clipping)")
    ax.semilogy(x, [r["loss"] for r in rows], "s-", ms=3, label="proxy loss")
    clipped = [i for i, r in enumerate(rows) if r["clipped"] > 0]
    if clipped:
        ax.semilogy(
            clipped,
            [rows[i]["loss"] for i in clipped],
            "x",
            color="red",
            label="layer with clipped codes",
        )
    ax.set_xlabel("layer (in quantization order)")
    ax.set_ylabel("tr((W-Q) H (W-Q)^T)")
    ax.set_title(title or "proxy loss and Babai bound per layer")
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def load_report(folder: str | os.PathLike) -> tuple[dict, list[dict], dict]:
    """``(log, rows, summary)`` of a checkpoint folder."""
    log = read_quant_log(folder)
    rows = layer_rows(log)
    return log, rows, summary(log, rows)
