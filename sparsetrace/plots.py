"""Figures a researcher puts in a paper: one function per figure, each returns a matplotlib Figure.

Uses the non-interactive Agg backend, so figures render on machines without a display.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .analysis.routes import Route  # noqa: E402

ROUTE_RED = "#d62728"


def route_figure(
    route: Route,
    layers: int,
    blocks: int,
    labels: dict[int, str],
    *,
    title: str = "",
    source_name: str = "needle",
    target_name: str = "answer",
) -> Figure:
    """The paper's route picture: node (layer, block) on a grid, route edges in red (width and
    opacity by mass), residual steps of the route in grey, source and target columns marked.

    Args:
        labels: block index -> short text, written under the x axis (the labelled blocks only).
    """
    width = min(max(8.0, blocks * 0.11), 28.0)
    fig, ax = plt.subplots(figsize=(width, 7.5))
    grid_x, grid_y = np.meshgrid(np.arange(blocks), np.arange(layers + 1))
    ax.scatter(grid_x.ravel(), grid_y.ravel(), s=2, color="#cccccc", zorder=1)
    attention, residual, strength = [], [], []
    for (l0, j), (l1, i), data in route.graph.edges(data=True):
        if data["residual"]:
            residual.append([(j, l0), (i, l1)])
        else:
            attention.append([(j, l0), (i, l1)])
            strength.append(data["flow"])
    ax.add_collection(LineCollection(residual, colors="#888888", linewidths=0.8, zorder=2))
    if attention:
        w = np.clip(np.asarray(strength), 0.0, 1.0)
        colors = [matplotlib.colors.to_rgba(ROUTE_RED, 0.25 + 0.75 * x) for x in w]
        ax.add_collection(LineCollection(attention, colors=colors, linewidths=0.6 + 2.4 * w, zorder=3))
    for blocks_, color, name in ((route.sources, "#1f77b4", source_name), (route.targets, "#2ca02c", target_name)):
        for b in blocks_:
            ax.axvspan(b - 0.45, b + 0.45, color=color, alpha=0.15, zorder=0)
        ax.plot([], [], color=color, alpha=0.4, lw=6, label=f"{name} block{'s' if len(blocks_) > 1 else ''}")
    ax.plot([], [], color=ROUTE_RED, lw=2, label="route: attention edge (width = flow)")
    ax.plot([], [], color="#888888", lw=1, label="route: residual stream")
    ax.set_xlim(-1, blocks)
    ax.set_ylim(-0.5, layers + 0.5)
    ax.set_ylabel("layer (0 = embeddings)")
    ticks = sorted(labels)
    ax.set_xticks(ticks, [f"{b}: {labels[b]}" for b in ticks], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("block")
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    status = "connected" if route.connected else "not connected"
    ax.set_title(title or f"Route from the {source_name} to the {target_name} ({status})", fontsize=9)
    fig.tight_layout()
    return fig


def reader_heads_figure(matrix: np.ndarray, *, title: str, colorbar: str) -> Figure:
    """Layer x head heatmap, e.g. the mass the answer block puts on the needle block.

    Args:
        matrix: float [L, H].
    """
    layers, heads = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * heads + 2.5), max(4.0, 0.22 * layers + 1.5)))
    top = max(float(matrix.max()), 1e-9)
    image = ax.imshow(matrix, aspect="auto", origin="lower", cmap="magma", vmin=0.0, vmax=top)
    ax.set_xticks(range(heads))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar)
    fig.tight_layout()
    return fig


def sweep_figure(cells: list[dict], lengths: list[int], depths: list[float], panels: dict[str, str]) -> Figure:
    """Length x depth heatmaps, one panel per quantity.

    Args:
        cells: dicts with "length", "depth" and the keys of `panels`.
        panels: key -> panel title.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (key, name) in zip(axes[0], panels.items(), strict=True):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for cell in cells:
            value = cell.get(key)
            if value is not None and cell["length"] in lengths and cell["depth"] in depths:
                grid[lengths.index(cell["length"]), depths.index(cell["depth"])] = float(value)
        yes_no = set(np.unique(grid[~np.isnan(grid)])) <= {0.0, 1.0}
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis",
                          **({"vmin": 0.0, "vmax": 1.0} if yes_no else {}))
        for (r, c), value in np.ndenumerate(grid):
            text = "-" if np.isnan(value) else (f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}")
            ax.text(c, r, text, ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(range(len(depths)), [str(d) for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("length (tokens)")
        ax.set_title(name, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
