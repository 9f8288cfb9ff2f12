"""PNG plots of a comparison (matplotlib, Agg backend; ``pip install moequant[eval]``).

- ``plot_ppl``: PPL per run with its CI as error bars, the baseline as a dashed line;
- ``plot_frontier``: bits/weight against PPL (log y) with CI bars, the baseline as a horizontal line;
- ``plot_proxy_heatmap``: layer x expert map of the solver's proxy loss tr(ΔHΔᵀ)/tr(WHWᵀ) per fused
  expert tensor, from a run's ``report.json`` (``quantized_tensors[*].proxy_per_expert``).

Each function writes one file (to a temporary name, then renamed) and returns nothing.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from moequant.errors import MoequantError
from moequant.eval.runs_io import write_bytes_atomic

MAX_FRONTIER_BITS = 8.5  # runs above this (fp16/bf16 copies) are listed under the frontier, not drawn

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MoequantError("plots need matplotlib: pip install 'moequant[eval]' (or pass --no-plots)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def _fmt(v: float) -> str:
    """4 significant digits below 1000, whole numbers with thousands separators above."""
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"


def _log_y(values: list[float]) -> bool:
    lo, hi = min(values), max(values)
    return lo > 0 and hi / lo > 20


def _plain_log_ticks(ax: Any, lo: float, hi: float) -> None:
    """Log y axis labelled with plain numbers (``25``, ``1e+04``), minor ticks labelled within a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fmt = FuncFormatter(lambda v, _: _fmt(v))
    ax.yaxis.set_major_formatter(fmt)
    ax.grid(axis="y", alpha=0.3, which="both" if hi / lo < 100 else "major")
    if hi / lo < 10:
        ax.yaxis.set_minor_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)))
        ax.yaxis.set_minor_formatter(fmt)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot_ppl(rows: list[dict[str, Any]], baseline: str, title: str, path: Path) -> None:
    """``rows``: ``{"run", "ppl", "ci": [lo, hi]}`` per run, the baseline among them."""
    plt = _pyplot()
    names = [r["run"] for r in rows]
    ppl = [r["ppl"] for r in rows]
    err = [[r["ppl"] - r["ci"][0] for r in rows], [r["ci"][1] - r["ppl"] for r in rows]]  # [2, n_runs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2.5), 4.2))
    colors = ["tab:gray" if n == baseline else "tab:blue" for n in names]
    lows, highs = [r["ci"][0] for r in rows], [r["ci"][1] for r in rows]
    log_y = _log_y(lows + highs)
    if not log_y:  # bars from 0 only make sense on a linear axis
        ax.bar(range(len(rows)), ppl, color=colors, alpha=0.35, width=0.6)
    ax.errorbar(range(len(rows)), ppl, yerr=err, fmt="o", color="black", capsize=5, label="PPL, 95% CI")
    base_ppl = next(r["ppl"] for r in rows if r["run"] == baseline)
    ax.axhline(base_ppl, color="tab:gray", ls="--", lw=1, label=f"baseline {baseline}: {base_ppl:.4g}")
    for i, v in enumerate(ppl):
        ax.annotate(_fmt(v), (i, v), textcoords="offset points", xytext=(8, 0), va="center", fontsize=8)
    tilt = len(rows) > 4
    ax.set_xticks(range(len(rows)), names, rotation=20 if tilt else 0, ha="right" if tilt else "center")
    ax.set_xlim(-0.5, len(rows) - 0.5 + 0.3)  # room for the last value label
    if log_y:
        ax.set_yscale("log")
        _plain_log_ticks(ax, min(lows), max(highs))
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    if not log_y:
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_frontier(points: list[dict[str, Any]], baseline: dict[str, Any], title: str, path: Path) -> None:
    """``points``: ``{"run", "bits_per_weight", "ppl", "ci"}`` for runs with a known bits/weight;
    ``baseline``: ``{"run", "ppl", "ci"}``, drawn as a horizontal line with its CI as a band."""
    plt = _pyplot()
    hidden = [p for p in points if p["bits_per_weight"] > MAX_FRONTIER_BITS]  # fp16 copies etc. squash the axis
    points = [p for p in points if p["bits_per_weight"] <= MAX_FRONTIER_BITS]
    fig, ax = plt.subplots(figsize=(6.4, 4.4) if len(points) <= 8 else (7.6, 5.4))
    ax.axhline(baseline["ppl"], color="tab:gray", ls="--", lw=1,
               label=f"baseline {baseline['run']}: PPL {baseline['ppl']:.4g}")
    ax.axhspan(baseline["ci"][0], baseline["ci"][1], color="tab:gray", alpha=0.15, label="baseline 95% CI")
    pts = sorted(points, key=lambda p: p["bits_per_weight"])
    dodged = False
    if pts:
        bits = [p["bits_per_weight"] for p in pts]
        span = max(bits) - min(bits)
        x = _dodge(pts, 0.05 * max(span, 1.0))
        dodged = any(abs(a - b) > 1e-12 for a, b in zip(x, bits))
        y = [p["ppl"] for p in pts]
        err = [[p["ppl"] - p["ci"][0] for p in pts], [p["ci"][1] - p["ppl"] for p in pts]]  # [2, n]
        ax.errorbar(x, y, yerr=err, fmt="o", color="tab:blue", capsize=4, label="run, PPL with 95% CI")
        ax.set_xlim(min(x) - 0.15 * span - 0.3, max(x) + 0.35 * span + 0.5)
    ax.set_yscale("log")
    lows = [baseline["ci"][0]] + [p["ci"][0] for p in pts]
    highs = [baseline["ci"][1]] + [p["ci"][1] for p in pts]
    _plain_log_ticks(ax, min(lows), max(highs))
    if pts:
        ax.set_ylim(*ax.get_ylim())  # freeze the limits so that data -> display is final for label placement
        names = [p["run"] for p in pts]
        for name, xi, yi, dy in zip(names, x, y, _label_offsets(ax, fig.dpi, x, y, names)):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(7, dy), va="center", fontsize=8,
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="gray") if abs(dy) > 6 else None)
    ax.set_xlabel("bits per weight (quantized tensors, every stored bit)"
                  + ("\nruns with equal bits/weight are drawn side by side" if dodged else ""))
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="x", alpha=0.3)
    if hidden:
        ax.text(0.01, 0.01, f"not shown (> {MAX_FRONTIER_BITS:g} bits/weight): "
                + ", ".join(f"{p['run']} ({p['bits_per_weight']:.3g} b/w, PPL {_fmt(p['ppl'])})" for p in hidden),
                transform=ax.transAxes, fontsize=7, color="dimgray", va="bottom")
    _save(fig, path)


def _groups(pts: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of runs with the same bits/weight (to 0.1), each group by decreasing PPL."""
    groups: dict[float, list[int]] = {}
    for i, p in enumerate(pts):
        groups.setdefault(round(p["bits_per_weight"] * 10) / 10, []).append(i)
    return [sorted(idx, key=lambda i: -pts[i]["ppl"]) for idx in groups.values()]


def _dodge(pts: list[dict[str, Any]], step: float) -> list[float]:
    """x positions: runs sharing a bits/weight are spread ``step`` apart around it, highest PPL leftmost."""
    x = [p["bits_per_weight"] for p in pts]
    for idx in _groups(pts):
        for k, i in enumerate(idx):
            x[i] += step * (k - (len(idx) - 1) / 2)
    return x


def _label_offsets(ax: Any, dpi: float, x: list[float], y: list[float], names: list[str]) -> list[float]:
    """Vertical offsets (points) of the labels right of each point so that no label overlaps another label
    or a marker: from the top point down, each label takes the free slot nearest its point (0, +h, -h,
    +2h, ...)."""
    import numpy as np

    xy = ax.transData.transform(np.column_stack([x, y])) * 72.0 / dpi  # [n, 2] in points
    frame = ax.get_window_extent()
    bottom, top = frame.y0 * 72.0 / dpi, frame.y1 * 72.0 / dpi
    height, char, marker = 10.5, 4.6, 5.0  # 8-point text: line height, mean character width; marker radius
    boxes = [(px - marker, px + marker, py - marker, py + marker) for px, py in xy]  # (x0, x1, y0, y1)
    out = [0.0] * len(x)
    for i in sorted(range(len(x)), key=lambda i: -xy[i, 1]):
        x0, x1 = xy[i, 0] + 7, xy[i, 0] + 7 + char * len(names[i])
        for k in range(0, 4 * len(x) + 2):
            dy = height * ((k + 1) // 2) * (1 if k % 2 else -1)
            y0, y1 = xy[i, 1] + dy - height / 2, xy[i, 1] + dy + height / 2
            inside = bottom + 2 <= y0 and y1 <= top - 2
            if inside and not any(x0 < bx1 and bx0 < x1 and y0 < by1 and by0 < y1 for bx0, bx1, by0, by1 in boxes):
                break
        boxes.append((x0, x1, y0, y1))
        out[i] = dy
    return out


def expert_proxy_matrices(report: dict[str, Any]) -> dict[str, tuple[list[int], list[list[float]]]]:
    """Per fused expert parameter (e.g. ``gate_up_proj``): (layer indices, [n_layers][n_experts] proxy losses)
    from ``report.json``'s ``quantized_tensors``; empty when the report records no per-expert proxies."""
    by_param: dict[str, dict[int, list[float]]] = {}
    for t in report.get("quantized_tensors") or []:
        proxies = t.get("proxy_per_expert")
        m = _LAYER.search(t.get("name", ""))
        if not proxies or m is None:
            continue
        param = t["name"].rsplit(".", 1)[-1]
        by_param.setdefault(param, {})[int(m.group(1))] = [float(p) for p in proxies]
    out = {}
    for param, layers in by_param.items():
        idx = sorted(layers)
        width = max(len(v) for v in layers.values())
        rows = [layers[i] + [float("nan")] * (width - len(layers[i])) for i in idx]  # [n_layers, n_experts]
        out[param] = (idx, rows)
    return out


def starved_cells(report: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(parameter, layer, expert) of every starved expert the report lists."""
    out = []
    for st in report.get("starved_experts") or []:
        m = _LAYER.search(st.get("tensor", ""))
        if m is not None:
            out.append((st["tensor"].rsplit(".", 1)[-1], int(m.group(1)), int(st["expert"])))
    return out


def plot_proxy_heatmap(report: dict[str, Any], title: str, path: Path) -> bool:
    """Layer x expert heat map of the proxy loss (log colour scale), one panel per fused expert tensor.
    Returns False (and writes nothing) when the report has no per-expert proxy losses (RTN without
    calibration, dense models)."""
    mats = expert_proxy_matrices(report)
    if not mats:
        return False
    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm

    arrays = {k: np.asarray(v[1], dtype=np.float64) for k, v in mats.items()}  # [n_layers, n_experts]
    pos = np.concatenate([a[np.isfinite(a) & (a > 0)] for a in arrays.values()])
    norm = LogNorm(vmin=float(pos.min()), vmax=float(pos.max())) if pos.size and pos.max() > pos.min() else None
    n_layers = max(a.shape[0] for a in arrays.values())
    n_experts = max(a.shape[1] for a in arrays.values())
    fig, axes = plt.subplots(1, len(arrays), figsize=(1.2 + 0.42 * n_experts * len(arrays) + 1.5 * len(arrays),
                                                      1.6 + 0.38 * n_layers), squeeze=False)
    starved = starved_cells(report)
    im = None
    for ax, (param, a) in zip(axes[0], arrays.items()):
        layers = mats[param][0]
        im = ax.imshow(a, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        cells = [(layers.index(li), e) for (p, li, e) in starved if p == param and li in layers]
        if cells:
            ax.scatter([e for _, e in cells], [r for r, _ in cells], marker="x", s=40, color="red", linewidths=1.5,
                       label="starved expert")
            ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 1.16), frameon=False)
        ax.set_title(param, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_xticks(range(a.shape[1]))
        ax.set_yticks(range(a.shape[0]), [str(i) for i in layers])
        ax.tick_params(labelsize=7)
    cbar = fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9)
    cbar.ax.tick_params(labelsize=7)
    cbar.set_label(r"proxy loss $\mathrm{tr}(\Delta H \Delta^\top) / \mathrm{tr}(W H W^\top)$ (log scale)",
                   fontsize=8)
    fig.suptitle(title, fontsize=10, y=1.0 + 0.25 / (1.6 + 0.38 * n_layers))
    _save(fig, path)
    return True
