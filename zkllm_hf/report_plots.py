"""The report's figures: matplotlib (Agg, no display) drawn from plain series, each returned as PNG bytes.

Every function takes what it plots (``{name: {layer: value}}`` and the limit it is judged against) and knows
nothing of captures, so each figure can be drawn, and tested, from numbers alone. An empty series draws the
axes with a note saying why there is nothing to plot, so a report always holds every figure.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

Series = Mapping[str, Mapping[int, float]]  # line name -> layer -> value
MISSING = (
    "matplotlib is not installed, and the report draws its plots with it: pip install 'zkllm-hf[report]' "
    "(or pip install matplotlib)"
)
_OK, _BAD, _LIMIT = "#2e7d32", "#c62828", "#c62828"


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display); ImportError says what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(MISSING) from exc
    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def _axes(title: str, ylabel: str, *, empty: bool = False) -> tuple[Any, Any]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 1.6 if empty else 3.8))  # a figure with nothing to plot: a short note
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])


def _subtitle(ax: Any, text: str) -> None:
    """The figure's headline number, right-aligned above the axes (where no line or bar can hide it)."""
    ax.set_title(text, fontsize=10, loc="right", color="#333")


def _lines(ax: Any, series: Series, *, log: bool = False) -> None:
    for name, points in series.items():
        layers = sorted(points)
        ax.plot(layers, [points[x] for x in layers], marker="o", markersize=3.5, linewidth=1.2, label=name)
    layers = sorted({x for points in series.values() for x in points})
    if len(layers) <= 40:
        ax.set_xticks(layers)
    if log:
        ax.set_yscale("log")


def _legend(ax: Any) -> None:
    ax.legend(fontsize=8, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)


def headroom(series: Series, limit: float, scale_log2: int) -> bytes:
    """Per layer and point, the largest |x| against the largest value int32 holds at the capture's scale."""
    values = [v for points in series.values() for v in points.values() if v > 0]
    fig, ax = _axes("largest |x| per layer and point", "largest |x| (log)", empty=not values)
    if not values:
        _note(ax, "no values recorded")
        return _png(fig)
    _lines(ax, series, log=True)
    ax.axhline(limit, color=_LIMIT, linestyle="--", linewidth=1.5, label=f"int32 limit 2**{31 - scale_log2}")
    worst = max(values)
    _subtitle(ax, f"largest {worst:.6g}: {100 * worst / limit:.1f}% of int32's {limit:g} at 2**{scale_log2}")
    _legend(ax)
    return _png(fig)


def ratios(series: Series, title: str, note: str) -> bytes:
    """Per layer, each check's worst deviation as a ratio of its bound (1.0: at the bound; above: a failure)."""
    fig, ax = _axes(title, "worst deviation / bound", empty=not any(series.values()))
    if not any(series.values()):
        _note(ax, note)
        return _png(fig)
    _lines(ax, series)
    ax.axhline(1.0, color=_LIMIT, linestyle="--", linewidth=1.5, label="bound (ratio 1)")
    name, layer, top = max(((n, x, v) for n, pts in series.items() for x, v in pts.items()), key=lambda t: t[2])
    ax.set_ylim(0, max(1.15, top * 1.1))
    _subtitle(ax, f"worst: {name} at layer {layer}, {top:.3f} of its bound")
    _legend(ax)
    return _png(fig)


def gate(values: Mapping[int, float], limit: float) -> bytes:
    """Per layer, the largest |gate_proj output| against zkLLM's SwiGLU table range [-limit, limit)."""
    fig, ax = _axes("largest |gate_proj output| per layer", "largest |gate| (log)", empty=not values)
    if not values:
        _note(ax, "the capture records no gate_proj range (an older zkllm-hf, or a model without mlp.gate_proj)")
        return _png(fig)
    layers = sorted(values)
    colours = [_OK if values[x] < limit else _BAD for x in layers]
    ax.bar(layers, [values[x] for x in layers], color=colours, label="largest |gate| over real tokens")
    ax.axhline(limit, color=_LIMIT, linestyle="--", linewidth=1.5, label=f"zkLLM table limit {limit:g}")
    ax.set_yscale("log")
    low = min(v for v in values.values() if v > 0) if any(v > 0 for v in values.values()) else 1e-3
    ax.set_ylim(low / 3, max(limit, max(values.values())) * 2)
    worst = max(layers, key=values.__getitem__)
    share = 100 * values[worst] / limit
    _subtitle(ax, f"largest {values[worst]:.4g} (layer {worst}): {share:.1f}% of zkLLM's ±{limit:g}")
    if len(layers) <= 40:
        ax.set_xticks(layers)
    _legend(ax)
    return _png(fig)


def units(names: Sequence[str], seq_lens: Sequence[int], ok: Sequence[bool]) -> bytes:
    """A dataset's units: each one's seq_len, green if it passed validation, red if it failed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.8))
    ax.set_title("seq_len per unit (green: valid, red: invalid)", fontsize=11, loc="left")
    ax.set_ylabel("seq_len (tokens)")
    ax.grid(True, axis="y", alpha=0.3)
    positions = list(range(len(names)))
    bars = ax.bar(positions, list(seq_lens), color=[_OK if good else _BAD for good in ok])
    ax.yaxis.get_major_locator().set_params(integer=True)
    if len(names) <= 48:
        ax.bar_label(bars, fontsize=8)
    ax.set_ylim(0, max(list(seq_lens) or [1]) * 1.15)
    if len(names) <= 48:
        ax.set_xticks(positions, list(names), rotation=60, ha="right", fontsize=8)
    else:
        ax.set_xlabel(f"{len(names)} units, in folder order")
    return _png(fig)


__all__ = ["MISSING", "gate", "headroom", "pyplot", "ratios", "units"]
