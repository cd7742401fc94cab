"""Figures a researcher puts in a paper: one function per figure, each returns a matplotlib Figure.

Figures are built with matplotlib's object-oriented API (`Figure()`, `fig.subplots`), never pyplot:
importing sparsetrace or drawing a figure leaves the user's backend and pyplot's figure list alone
(a notebook keeps its inline backend), and a figure needs no display and no `close`. Such a figure
renders with `fig.savefig` (`files.save_figure`) or shows itself in Jupyter.
"""

from __future__ import annotations

import matplotlib.cm
import matplotlib.colors
import matplotlib.patches
import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from .analysis.routes import Route
from .text import shorten

ROUTE_RED = "#d62728"


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs) -> tuple[Figure, object]:
    """`pyplot.subplots` without pyplot: a Figure of its own that no backend or figure list holds."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


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
    fig, ax = _subplots(figsize=(width, 7.5))
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
    fig, ax = _subplots(figsize=(max(4.0, 0.45 * heads + 2.5), max(4.0, 0.22 * layers + 1.5)))
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
    fig, axes = _subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
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


def vertical_scores_figure(vertical: np.ndarray, layer: int, highlight: int, *, title: str = "") -> Figure:
    """The paper's thought-anchors panel: vertical score along the trace for every head of one layer,
    the highest-kurtosis head highlighted.

    Args:
        vertical: float [H, U] (NaN for the last `proximity` units).
    """
    heads, units = vertical.shape
    fig, ax = _subplots(figsize=(min(max(7.0, units * 0.03), 16.0), 3.8))
    x = np.arange(units)
    for h in range(heads):
        if h != highlight:
            ax.plot(x, vertical[h], color="#9e9e9e", lw=0.7, alpha=0.7)
    ax.plot(x, vertical[highlight], color=ROUTE_RED, lw=1.6, label=f"head {highlight} (highest kurtosis)")
    ax.plot([], [], color="#9e9e9e", lw=0.7, label=f"other heads of layer {layer}")
    ax.set_xlabel("unit (position in the trace)")
    ax.set_ylabel("vertical score")
    ax.set_xlim(0, max(units - 1, 1))
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or f"Vertical score per unit, layer {layer}", fontsize=10)
    fig.tight_layout()
    return fig


def kurtosis_figure(kurtosis: np.ndarray, receivers: list[tuple[int, int]]) -> Figure:
    """Layer x head heatmap of the kurtosis of vertical scores, receiver heads marked.

    Args:
        kurtosis: float [L, H] (NaN = excluded, e.g. layer 0).
    """
    layers, heads = kurtosis.shape
    fig, ax = _subplots(figsize=(max(4.5, 0.45 * heads + 3.0), max(4.0, 0.22 * layers + 1.5)))
    image = ax.imshow(np.ma.masked_invalid(kurtosis), aspect="auto", origin="lower", cmap="viridis")
    if receivers:
        ax.scatter([h for _, h in receivers], [layer for layer, _ in receivers], marker="o", s=40,
                   facecolors="none", edgecolors=ROUTE_RED, linewidths=1.4,
                   label=f"receiver heads (top {len(receivers)})")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8)
    ax.set_xticks(range(heads))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("Kurtosis of each head's vertical scores", fontsize=10)
    fig.colorbar(image, ax=ax, label="Fisher kurtosis")
    fig.tight_layout()
    return fig


def unit_attention_figure(matrix: np.ndarray, categories: list[str] | None = None, *, title: str = "") -> Figure:
    """Unit x unit attention map of one head (log colour scale), rows = query units.

    Args:
        matrix: float [U, U], lower triangular.
    """
    units = matrix.shape[0]
    fig, ax = _subplots(figsize=(6.5, 5.8))
    positive = matrix[matrix > 0]
    low = float(np.percentile(positive, 5)) if positive.size else 1e-6
    shown = np.ma.masked_less_equal(matrix, 0.0)
    image = ax.imshow(shown, cmap="magma", norm=matplotlib.colors.LogNorm(vmin=max(low, 1e-6),
                      vmax=max(float(matrix.max()), low * 10)), interpolation="nearest")
    if categories is not None:
        answer = [i for i, c in enumerate(categories) if c == "final_answer_emission"]
        for i in answer:
            ax.axhline(i, color="#2ca02c", lw=0.4, alpha=0.6)
    ax.set_xlabel("key unit")
    ax.set_ylabel("query unit")
    ax.set_xlim(-0.5, units - 0.5)
    ax.set_ylim(units - 0.5, -0.5)
    ax.set_title(title or "Unit attention", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean attention of the query unit's tokens")
    fig.tight_layout()
    return fig


def anchor_categories_figure(categories: list[str], positions: list[float], scores: list[float | None], *,
                             source: str = "") -> Figure:
    """Mean receiver-head score per category against its mean relative position in the trace
    (marker size = number of units), as the paper's category panel."""
    fig, ax = _subplots(figsize=(7.0, 4.6))
    names = sorted(set(categories))
    for name in names:
        pairs = [(p, s) for c, p, s in zip(categories, positions, scores, strict=True) if c == name and s is not None]
        if not pairs:
            continue
        x, y = np.mean([p for p, _ in pairs]), np.mean([s for _, s in pairs])
        ax.scatter([x], [y], s=30 + 8 * len(pairs), alpha=0.7)
        ax.annotate(f"{name.replace('_', ' ')} ({len(pairs)})", (x, y), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    ax.set_xlabel("mean relative position of the category's units (0 = first, 1 = last)")
    ax.set_ylabel("mean score (receiver heads)")
    ax.set_xlim(-0.05, 1.15)
    ax.set_title("Receiver-head score by category" + (f"\ncategories: {source}" if source else ""), fontsize=9)
    fig.tight_layout()
    return fig


def salience_figure(result, *, title: str = "", top: int = 10) -> Figure:
    """Salience along the text: the selected-block salience of every key block (top spans numbered
    and listed with their text), and below it, on its own scale, the forced sink and local blocks.

    Args:
        result: an `analysis.salience.Salience`.
    """
    selected = result.aggregate("selected", "mean")
    local, sink = result.aggregate("local", "mean"), result.aggregate("sink", "mean")
    starts = np.arange(len(selected)) * result.block_k
    fig = Figure(figsize=(13.0, 6.2))
    grid = fig.add_gridspec(2, 2, width_ratios=[3.2, 1.25], height_ratios=[3, 1.2], wspace=0.04, hspace=0.08)
    ax, forced, listing = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[:, 1])
    ranked = result.readers["selected"] >= result.min_readers
    colors = np.where(ranked, "#1f77b4", "#b0c4de")
    ax.bar(starts, np.nan_to_num(selected), width=result.block_k, align="edge", color=colors, linewidth=0)
    ax.legend(handles=[matplotlib.patches.Patch(color="#1f77b4", label="selected blocks (numbers: top spans)"),
                       matplotlib.patches.Patch(color="#b0c4de", label=f"fewer than {result.min_readers} possible "
                                                "readers (not ranked)")], loc="upper left", fontsize=8, framealpha=0.9)
    lines = []
    for row in result.top[:top]:
        j = row["block"]
        ax.annotate(str(row["rank"]), (starts[j] + result.block_k / 2, selected[j]), textcoords="offset points",
                    xytext=(0, 2), ha="center", va="bottom", fontsize=8, color=ROUTE_RED, fontweight="bold")
        text = shorten(row["text"] or "", 46)
        lines.append(f"{row['rank']:>2}. tokens {row['tokens'][0]}-{row['tokens'][1]}  ({row['selected_mean']:.3f})\n"
                     f"    {text!r}" if row["text"] is not None else
                     f"{row['rank']:>2}. tokens {row['tokens'][0]}-{row['tokens'][1]}  ({row['selected_mean']:.3f})")
    ax.set_ylabel("selected mass per possible reader\n(mean over layers and heads)", fontsize=9)
    ax.set_title(title or f"Salience along the text ({result.num_tokens:,} tokens, key blocks of {result.block_k})",
                 fontsize=10)
    ax.tick_params(labelbottom=False)
    ax.set_ylim(0, max(float(np.nanmax(selected)) if np.isfinite(selected).any() else 0.0, 1e-9) * 1.12)
    forced.bar(starts, np.nan_to_num(local), width=result.block_k, align="edge", color="#ff7f0e", linewidth=0,
               label="local (diagonal) blocks")
    forced.bar(starts, np.nan_to_num(sink), width=result.block_k, align="edge", color="#7f7f7f", linewidth=0,
               label="sink blocks")
    forced.set_ylabel("forced blocks:\nmass per reader", fontsize=9)
    forced.set_xlabel("token position (start of key block)")
    forced.legend(loc="upper right", fontsize=8, ncol=2, framealpha=0.9)
    for axis in (ax, forced):
        axis.set_xlim(0, result.num_tokens)
    listing.axis("off")
    listing.text(0.02, 0.99, "most-read spans (selected blocks)\n\n" + "\n".join(lines), va="top", ha="left",
                 fontsize=7.5, family="monospace", transform=listing.transAxes)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.93, bottom=0.09)
    return fig


def salience_layers_figure(result, *, title: str = "") -> Figure:
    """Layer x position heatmap of the selected-block salience (mean over heads); blocks no query
    block could select (sinks, the last blocks) are blank.

    Args:
        result: an `analysis.salience.Salience`.
    """
    matrix = result.per_layer("selected", "mean")  # [L, n_k]
    layers = matrix.shape[0]
    fig, ax = _subplots(figsize=(11.0, max(3.5, 0.16 * layers + 1.8)))
    finite = matrix[np.isfinite(matrix)]
    top = float(np.quantile(finite, 0.995)) if finite.size else 1.0
    cmap = colormaps["magma"].with_extremes(bad="#e8e8e8")
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", origin="lower", cmap=cmap, vmin=0.0,
                      vmax=max(top, 1e-9), interpolation="nearest",
                      extent=(0, matrix.shape[1] * result.block_k, -0.5, layers - 0.5))
    ax.set_xlim(0, result.num_tokens)
    ax.set_xlabel("token position (key block)")
    ax.set_ylabel("layer")
    ax.set_title(title or "Selected-block salience per layer (mean over heads); grey: no possible reader", fontsize=10)
    fig.colorbar(image, ax=ax, label="selected mass per possible reader", extend="max", fraction=0.04, pad=0.01)
    fig.tight_layout()
    return fig



def attribution_figure(context: str, spans: list[tuple[int, int]], scores: np.ndarray, *, top: int = 5,
                       title: str = "", width: int = 100, max_lines: int = 200) -> Figure:
    """The context as text, each source shaded by its attribution score, the top sources numbered in
    the margin (rank and score).

    Each line is drawn as pieces (one per source it crosses), each piece placed after the previous
    one's rendered extent and shaded by its own text box, so shading and text agree at any dpi.

    Args:
        spans: each source's char range [start, end) in `context`.
        scores: float [n], one per span (NaN: unshaded).
        width: characters per line (wrapped at spaces); lines past `max_lines` are cut.
    """
    lines, position = [], 0
    for paragraph in context.split("\n"):
        end = position + len(paragraph)
        while end - position > width:
            cut = context.rfind(" ", position, position + width)
            cut = cut + 1 if cut > position else position + width
            lines.append((position, cut))
            position = cut
        lines.append((position, end))
        position = end + 1
    cut_lines = max(len(lines) - max_lines, 0)
    lines = lines[:max_lines]
    values = np.asarray(scores, dtype=np.float64)
    finite = values[np.isfinite(values)]
    norm = matplotlib.colors.Normalize(vmin=min(float(finite.min()) if finite.size else 0.0, 0.0),
                                       vmax=max(float(finite.max()) if finite.size else 0.0, 1e-12))
    cmap = colormaps["YlOrRd"]
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[:top]
    rank = {int(j): r + 1 for r, j in enumerate(order) if np.isfinite(values[j])}
    owner = np.full(len(context) + 1, -1)
    for j, (start, end) in enumerate(spans):
        owner[start:end] = j
    size, line_height = 8.0, 1.5 * 8.0 / 72  # points, inches
    text_w = width * 0.64 * size / 72 + 0.1  # DejaVu Sans Mono advance 0.602 em, rounded up by hinting
    margin, label_w, bar_w = 0.25, 1.1, 0.15
    text_h = max(len(lines), 1) * line_height
    fig_w, fig_h = margin + text_w + label_w + bar_w + 0.95, max(text_h + 0.75 + (0.2 if cut_lines else 0), 1.6)
    fig = Figure(figsize=(fig_w, fig_h))
    bottom = (fig_h - 0.55 - text_h) / fig_h
    ax = fig.add_axes([margin / fig_w, bottom, text_w / fig_w, text_h / fig_h])
    ax.set_xlim(0, 1)
    ax.set_ylim(len(lines) - 0.5, -0.5)
    ax.axis("off")
    labelled = set()
    for y, (a, b) in enumerate(lines):
        piece = None
        cuts = [a] + [c for c in range(a + 1, b) if owner[c] != owner[c - 1]] + [b]
        for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True):
            j = int(owner[c0])
            shaded = j >= 0 and np.isfinite(values[j])
            box = {"boxstyle": "square,pad=0.12", "linewidth": 0, "alpha": 0.8,
                   "facecolor": cmap(norm(values[j])) if shaded else "none"}
            style = {"fontsize": size, "family": "DejaVu Sans Mono", "ha": "left", "bbox": box}
            text = context[c0:c1].replace("\t", " ")
            if piece is None:
                piece = ax.text(0, y, text, va="center", **style)
            else:  # right after the previous piece, as rendered
                piece = ax.annotate(text, xy=(1, 0), xycoords=piece, va="bottom", **style)
            if j in rank and j not in labelled:
                labelled.add(j)
                ax.text(1.01, y, f"#{rank[j]}  {values[j]:.3g}", va="center", ha="left", fontsize=size,
                        color=ROUTE_RED, fontweight="bold", transform=ax.get_yaxis_transform())
    if cut_lines:
        ax.text(0, len(lines) + 0.3, f"... {cut_lines} more lines not shown", va="top", fontsize=size, color="#5b6475")
    bar = fig.add_axes([(margin + text_w + label_w) / fig_w, bottom + max(text_h - 2.5, 0) / fig_h, bar_w / fig_w,
                        min(text_h, 2.5) / fig_h])
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=bar, label="score")
    fig.suptitle(title or "Context attribution: sources shaded by score, top sources numbered", fontsize=10,
                 x=margin / fig_w, ha="left", y=1 - 0.15 / fig_h, va="top")
    return fig


def suppression_figure(effects: np.ndarray, causal_scores: np.ndarray, receiver_scores: np.ndarray, *,
                       forward: str = "", title: str = "") -> Figure:
    """The attention-suppression matrix (row i suppressed, column j affected; log colour scale) and a
    scatter of each unit's causal score against its receiver-head score, with their Spearman correlation."""
    from scipy import stats

    effects = np.asarray(effects, dtype=np.float64)
    causal = np.asarray(causal_scores, dtype=np.float64)
    receiver = np.asarray(receiver_scores, dtype=np.float64)
    fig, (left, right) = _subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    positive = effects[effects > 0]
    shown = np.where(effects > 0, effects, np.nan)
    if positive.size:
        norm = matplotlib.colors.LogNorm(vmin=max(float(np.quantile(positive, 0.02)), 1e-12),
                                         vmax=max(float(positive.max()), 1e-12))
        image = left.imshow(shown, cmap="Reds", norm=norm, interpolation="nearest")
        fig.colorbar(image, ax=left, label="mean KL at unit j's tokens (nats)")
    left.set_xlabel("affected unit j")
    left.set_ylabel("suppressed unit i")
    left.set_title("effect of suppressing unit i on unit j", fontsize=9)
    ok = np.isfinite(causal) & np.isfinite(receiver)
    right.scatter(receiver[ok], causal[ok], s=18, color="#1f77b4", alpha=0.8)
    for u in np.flatnonzero(ok):
        right.annotate(str(u), (receiver[u], causal[u]), fontsize=6, color="#5b6475", xytext=(2, 2),
                       textcoords="offset points")
    rho = float(stats.spearmanr(receiver[ok], causal[ok]).statistic) if ok.sum() >= 3 else float("nan")
    if ok.any() and np.all(causal[ok] > 0):
        right.set_yscale("log")
    right.set_xlabel("receiver-head score (mean vertical score)")
    right.set_ylabel("causal score (mean effect on later units)")
    right.set_title(f"Spearman {rho:.3f} over {int(ok.sum())} units", fontsize=9)
    fig.suptitle(title or f"Attention suppression{f' ({forward} forward)' if forward else ''}", fontsize=10)
    fig.tight_layout()
    return fig


# --- needle reader-head knockout (tasks/needle_causal.py) ---
def knockout_figure(per_n: list[dict], *, title: str = "",
                    random_label: str = "N random heads (mean ± std over seeds)") -> Figure:
    """Accuracy and answer log-prob drop when the top-N reader heads vs N random heads are knocked out.

    `per_n`: `ReaderKnockout.per_n()` (or the same keys averaged over prompts by the caller): n,
    top_accuracy, top_drop, random_accuracy_mean/std, random_drop_mean/std; optional
    top_accuracy_std / top_drop_std (over prompts) draw error bars on the top heads too.
    """
    import textwrap

    ns = [row["n"] for row in per_n]
    fig, axes = _subplots(1, 2, figsize=(9, 3.4))
    panels = (("accuracy", "RULER accuracy (string match)", 1.0), ("drop", "answer log-prob drop (nats)", None))
    for ax, (key, label, top_limit) in zip(axes, panels, strict=True):
        ax.errorbar(ns, [row[f"top_{key}"] for row in per_n], yerr=[row.get(f"top_{key}_std", 0) for row in per_n],
                    fmt="o-", color=ROUTE_RED, capsize=3, label="top-N reader heads")
        ax.errorbar(ns, [row[f"random_{key}_mean"] for row in per_n], yerr=[row[f"random_{key}_std"] for row in per_n],
                    fmt="s--", color="#5b6475", capsize=3, label=random_label)
        ax.set_xlabel("heads knocked out (N)")
        ax.set_ylabel(label)
        ax.set_xticks(ns)
        if top_limit is not None:
            ax.set_ylim(-0.05, top_limit + 0.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(textwrap.fill(title or "Knocking out the needle's reader heads vs random heads", 110), fontsize=10)
    fig.tight_layout()
    return fig
