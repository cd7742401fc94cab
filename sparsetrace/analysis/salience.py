"""Salience: how much later text reads each key block (and unit), per layer and head.

For layer l, head h and key block j, the trace's kept entries (query block i, mass m) that point
at j fall into three kinds, as `Trace.forced_mask` splits them:

- sink: j < sinks (always kept);
- local: j > last(i) - local, the diagonal blocks always kept (last(i): query block i's last
  causal key block);
- selected: every other kept entry, the blocks the estimator chose among the candidates.

    total[kind][l, h, j] = sum over query blocks i of m(l, h, i -> j)   (only entries of that kind)
    readers[kind][j]     = the query blocks i where j is causal and of that kind
    mean[kind][l, h, j]  = total / readers                                (NaN when readers = 0)

The headline salience is the **selected** kind: sinks and local blocks are kept for every row by
construction and carry most of the mass, so they would drown everything else; they are reported
on their own. `total` favours early blocks (more later rows can read them); `mean` (the average
selected mass a block gets per query block that could have selected it) does not, and ranks the
top spans. Blocks read by fewer than `min_readers` query blocks are left out of the ranking (a
mean over one or two rows is noise). The aggregate is the mean over layers and heads (`AGGREGATION`).

Units (sentences, paragraphs, any token spans) get their blocks' values weighted by overlap: a
unit's total is sum over j of (its tokens in j / tokens of j) x total[j] (the block's mass spread
evenly over its tokens: the trace has no finer resolution), its mean is the token-weighted mean
of its blocks' means.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks import row_key_range
from ..errors import InputError, SparsetraceWarning
from ..notebook import facts_html, facts_repr
from ..text import shorten
from ..trace import Trace
from .spans import TraceText

KINDS = ("selected", "sink", "local")
AGGREGATION = ("mean over layers and heads of each head's selected mass on the block: `total` sums it over the "
               "query blocks that read it, `mean` divides that by the query blocks that could select it")
DEFAULT_TOP = 10
DEFAULT_MIN_READERS = 4


@dataclass
class Salience:
    """Salience of every key block of a trace (module docstring).

    Attributes:
        total, mean: kind -> float [L, H, n_k].
        readers: kind -> int [n_k].
        block_k, num_tokens: block size and T, for token positions (block j: tokens [j * block_k, ...)).
        min_readers: the fewest candidate query blocks a block needs to be ranked.
        block_text: block -> text (empty without a tokenizer).
        units: optional list of dicts (tokens [a, b), text, total, mean) per unit, in text order.
        top: the `top` blocks by aggregate selected mean, as dicts.
    """

    total: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]
    readers: dict[str, np.ndarray]
    block_k: int
    num_tokens: int
    min_readers: int
    block_text: dict[int, str] = field(default_factory=dict)
    units: list[dict[str, Any]] | None = None
    top: list[dict[str, Any]] = field(default_factory=list)
    top_units: list[dict[str, Any]] = field(default_factory=list)

    def aggregate(self, kind: str = "selected", measure: str = "mean") -> np.ndarray:
        """float [n_k]: mean over layers and heads (NaN where a block has no reader of that kind)."""
        values = (self.mean if measure == "mean" else self.total)[kind]
        return values.mean(axis=(0, 1))

    def per_layer(self, kind: str = "selected", measure: str = "mean") -> np.ndarray:
        """float [L, n_k]: mean over heads."""
        return (self.mean if measure == "mean" else self.total)[kind].mean(axis=1)

    def block_tokens(self, block: int) -> tuple[int, int]:
        return block * self.block_k, min((block + 1) * self.block_k, self.num_tokens)

    def to_dict(self) -> dict[str, Any]:
        layers, heads, blocks = self.total["selected"].shape
        out: dict[str, Any] = {
            "aggregation": AGGREGATION,
            "ranking": f"aggregate selected mean; blocks with fewer than {self.min_readers} candidate query blocks "
                       "are not ranked",
            "layers": layers, "heads": heads, "key_blocks": blocks, "block_k": self.block_k,
            "tokens": self.num_tokens, "min_readers": self.min_readers,
            "top": self.top,
        }
        if self.units is not None:
            out["top_units"] = self.top_units
            out["units"] = self.units
        out["blocks"] = [
            {"block": j, "tokens": list(self.block_tokens(j)), "text": self.block_text.get(j),
             **{f"{kind}_{measure}": _number(self.aggregate(kind, measure)[j])
                for kind in KINDS for measure in ("total", "mean")},
             **{f"{kind}_readers": int(self.readers[kind][j]) for kind in KINDS}}
            for j in range(blocks)
        ]
        out["per_layer_selected_mean"] = _numbers(self.per_layer("selected", "mean"))
        out["per_head_total"] = {kind: _numbers(self.total[kind]) for kind in KINDS}  # [L][H][n_k]
        out["per_head_note"] = "per_head_total[kind][layer][head][block]; the mean is it divided by the block's readers"
        return out

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: sizes and the most-read block."""
        layers, heads, blocks = self.total["selected"].shape
        best = self.top[0] if self.top else None
        return {"tokens": self.num_tokens, "layers_x_heads": f"{layers} x {heads}", "key_blocks": blocks,
                "block_k": self.block_k, "units": None if self.units is None else len(self.units),
                "top_block": None if best is None else (best["block"], best["selected_mean"])}

    def __repr__(self) -> str:
        return facts_repr("Salience", self._facts())

    def _repr_html_(self) -> str:
        rows = [{"rank": row["rank"], "tokens": tuple(row["tokens"]), "selected_mean": row["selected_mean"],
                 "text": shorten(row["text"] or "", 90)} for row in self.top[:5]]
        return facts_html("Salience", self._facts(), rows, rows_title="most-read key blocks (selected mass per "
                          "possible reader, mean over layers and heads)")


def salience(
    trace: Trace,
    *,
    text: TraceText | None = None,
    units: list | None = None,
    top: int = DEFAULT_TOP,
    min_readers: int = DEFAULT_MIN_READERS,
) -> Salience:
    """Salience of every key block (module docstring), the `top` blocks by selected mean, and per unit.

    Args:
        text: the trace's text (`spans.trace_text`), for the spans' text; None: token ranges only.
        units: token spans (a, b), objects with `token_start`/`token_end` (`segments.Unit`) or dicts
            with "tokens": [a, b]; default: `trace.extra["units"]` when the trace carries them.
        top: how many blocks (and units) to rank.
        min_readers: blocks with fewer candidate query blocks are not ranked; when that leaves none,
            a `SparsetraceWarning` says so (an empty list is otherwise indistinguishable from no data).
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"top={top!r}; give a positive number of spans to list")
    if isinstance(min_readers, bool) or not isinstance(min_readers, int) or min_readers < 1:
        raise InputError(f"min_readers={min_readers!r}; give a positive number of query blocks")
    config = trace.config
    layers, heads, blocks = trace.num_layers, trace.num_heads, trace.num_key_blocks
    total = {kind: np.zeros((layers, heads, blocks)) for kind in KINDS}
    for layer in range(trace.num_layers):
        indices, mass = (x.numpy() for x in trace.blocks(layer))
        forced = trace.forced_mask(layer).numpy()
        sink = forced & (indices < config.sinks)
        kinds = {"selected": (indices >= 0) & ~forced, "sink": sink, "local": forced & ~sink}
        head = np.broadcast_to(np.arange(heads)[:, None, None], indices.shape)
        for kind, where in kinds.items():
            np.add.at(total[kind][layer], (head[where], indices[where]), mass[where])
    readers = _readers(trace)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = {kind: np.where(readers[kind] > 0, total[kind] / readers[kind], np.nan) for kind in KINDS}
    block_text = {}
    if text is not None:
        block_text = {j: text.of_tokens(j * config.block_k, (j + 1) * config.block_k) for j in range(blocks)}
    result = Salience(total, mean, readers, config.block_k, trace.num_tokens, min_readers, block_text)
    result.top = _rank(result, top)
    most = int(readers["selected"].max(initial=0))
    if not result.top and most < min_readers:
        warnings.warn(f"no key block ranks: min_readers={min_readers:,} (--min-readers), but the most query blocks "
                      f"that can select any one block is {most:,}; give a lower number to rank blocks",
                      SparsetraceWarning, stacklevel=2)
    spans = _unit_spans(trace, units)
    if spans is not None:
        result.units = _unit_salience(result, spans, text)
        ranked = [u for u in result.units if u["selected_mean"] is not None and u["ranked"]]
        result.top_units = sorted(ranked, key=lambda u: -u["selected_mean"])[:top]
    return result


def _readers(trace: Trace) -> dict[str, np.ndarray]:
    """kind -> int [n_k]: the query blocks for which key block j is causal and of that kind."""
    config, blocks = trace.config, trace.num_key_blocks
    last = row_key_range(trace.num_tokens, config.block_q, config.block_k, None)[1].numpy()  # [n_q]
    j = np.arange(blocks)[None, :]
    causal = j <= last[:, None]  # [n_q, n_k]
    sink = causal & (j < config.sinks)
    local = causal & ~sink & (j > last[:, None] - config.local)
    return {"selected": (causal & ~sink & ~local).sum(0), "sink": sink.sum(0), "local": local.sum(0)}


def _rank(result: Salience, top: int) -> list[dict[str, Any]]:
    score = result.aggregate("selected", "mean")
    totals = result.aggregate("selected", "total")
    ok = np.flatnonzero((result.readers["selected"] >= result.min_readers) & ~np.isnan(score))
    order = ok[np.argsort(-score[ok], kind="stable")][:top]
    return [{"rank": r + 1, "block": int(j), "tokens": list(result.block_tokens(int(j))),
             "text": result.block_text.get(int(j)), "selected_mean": _number(score[j]),
             "selected_total": _number(totals[j]), "readers": int(result.readers["selected"][j])}
            for r, j in enumerate(order)]


def _unit_spans(trace: Trace, units: list | None) -> list[tuple[int, int]] | None:
    if units is None:
        units = trace.extra.get("units")
        if units is None:
            return None
    spans = []
    for unit in units:
        if hasattr(unit, "token_start"):
            span = (unit.token_start, unit.token_end)
        elif isinstance(unit, dict) and "tokens" in unit:
            span = tuple(unit["tokens"])
        else:
            span = tuple(unit)
        whole = len(span) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        if not whole or not 0 <= span[0] < span[1] <= trace.num_tokens:
            raise InputError(f"unit {unit!r} is not a token span [a, b) with 0 <= a < b <= {trace.num_tokens}; "
                             "give (start, end) token pairs")
        spans.append(span)
    return spans


def _unit_salience(result: Salience, spans: list[tuple[int, int]], text: TraceText | None) -> list[dict[str, Any]]:
    """Per unit: overlap-weighted block values (module docstring)."""
    blocks = len(result.readers["selected"])
    overlap = np.zeros((len(spans), blocks))  # tokens of unit u in block j
    for u, (a, b) in enumerate(spans):
        for j in range(a // result.block_k, (b - 1) // result.block_k + 1):
            lo, hi = result.block_tokens(j)
            overlap[u, j] = min(b, hi) - max(a, lo)
    sizes = np.array([np.subtract(*result.block_tokens(j)[::-1]) for j in range(blocks)])
    out = []
    for u, (a, b) in enumerate(spans):
        row = {"unit": u, "tokens": [a, b], "text": text.of_tokens(a, b) if text else None}
        for kind in KINDS:
            total, mean = result.aggregate(kind, "total"), result.aggregate(kind, "mean")
            row[f"{kind}_total"] = _number(float((overlap[u] / sizes * total).sum()))
            weight = overlap[u] * ~np.isnan(mean)
            row[f"{kind}_mean"] = _number(float((weight * np.nan_to_num(mean)).sum() / weight.sum())
                                          if weight.sum() else float("nan"))
        row["ranked"] = bool((result.readers["selected"][overlap[u] > 0] >= result.min_readers).any())
        out.append(row)
    return out


def save_salience(result: Salience, folder: str | Path, *, title: str = "") -> dict[str, str]:
    """Write salience.json, salience.png (along the text) and salience_layers.png (layer x position)."""
    from ..files import save_figure, write_json
    from ..plots import salience_figure, salience_layers_figure

    folder = Path(folder)
    paths = {
        "json": write_json(folder / "salience.json", result.to_dict()),
        "along_text": save_figure(salience_figure(result, title=title), folder / "salience.png"),
        "layers": save_figure(salience_layers_figure(result, title=title), folder / "salience_layers.png"),
    }
    return {name: str(path) for name, path in paths.items()}


def _number(value: float) -> float | None:
    """JSON-safe: NaN (no reader) becomes null."""
    value = float(value)
    return None if np.isnan(value) else round(value, 6)


def _numbers(array: np.ndarray) -> list:
    rounded = np.round(array.astype(float), 6)
    return np.where(np.isnan(rounded), None, rounded).tolist()
