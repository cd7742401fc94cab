"""How results show in Jupyter: a one-line `repr` and a small HTML table of their key numbers, and a
trace's interactive viewer inline.

Why: most results are dataclasses of arrays, and the generated repr printed every number (a
`FidelityReport` about 600 floats). Each result class now names its key numbers once (a dict of
label -> value) and shows them with `facts_repr` (its `__repr__`) and `facts_html` (its
`_repr_html_`), so every result looks the same and no class carries its own HTML.

A trace's viewer is the report page (`report.build_report`, without block text: a trace holds
token ids, not a tokenizer) inside `<iframe srcdoc="...">`. The iframe is a document of its own,
so the page's scripts and element ids cannot clash with the notebook's or with another trace's
viewer on the same page, and `sandbox="allow-scripts allow-downloads"` (no same-origin) keeps its
script away from the notebook while it runs and offers its PNG export. A trace too large to embed
sensibly shows its summary and how to write the report instead.

>>> tr = st.trace(model, tokenizer, text)     # doctest: +SKIP
>>> tr                                        # doctest: +SKIP  (in Jupyter: summary and viewer)
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

# Above this many kept-block entries (L x H x n_q x K) a trace's viewer is not embedded: its page
# carries 4 characters of base64 per entry (int16 index + uint8 mass), so 2 M entries are ~8 MB.
VIEWER_MAX_ENTRIES = 2_000_000
VIEWER_HEIGHT_PX = 860
_TABLE_STYLE = "border-collapse:collapse;font-size:13px;margin:2px 0"
_CELL_STYLE = "padding:2px 10px;text-align:left;border-bottom:1px solid #e4e4e4"


def facts_repr(name: str, facts: Mapping[str, Any]) -> str:
    """`Name(label=value, ...)` on one line; floats to 4 significant digits."""
    return f"{name}({', '.join(f'{label}={_text(value)}' for label, value in facts.items())})"


def facts_html(
    name: str,
    facts: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] = (),
    *,
    rows_title: str = "",
    note: str = "",
) -> str:
    """A titled two-column table of `facts`, then optionally a table of `rows` (dicts sharing their
    keys, e.g. the top sources), then a note. Every text is HTML-escaped."""
    parts = [f'<div class="sparsetrace-result"><table style="{_TABLE_STYLE}">',
             f'<caption style="text-align:left;font-weight:bold">{_escaped(name)}</caption>']
    parts += [_row([label.replace("_", " "), value], header_cells=1) for label, value in facts.items()]
    parts.append("</table>")
    if rows:
        columns = list(rows[0])
        parts.append(f'<table style="{_TABLE_STYLE}">')
        if rows_title:
            parts.append(f'<caption style="text-align:left">{_escaped(rows_title)}</caption>')
        parts.append(_row([c.replace("_", " ") for c in columns], header_cells=len(columns)))
        parts += [_row([row[c] for c in columns]) for row in rows]
        parts.append("</table>")
    if note:
        parts.append(f'<p style="font-size:12px;color:#5b6475;margin:2px 0">{_escaped(note)}</p>')
    return "".join(parts) + "</div>"


def _row(values: Sequence[Any], header_cells: int = 0) -> str:
    """One table row; its first `header_cells` cells are headers."""
    tags = ["th" if i < header_cells else "td" for i in range(len(values))]
    return "<tr>" + "".join(f'<{tag} style="{_CELL_STYLE}">{_escaped(_text(value, quote=False))}</{tag}>'
                            for tag, value in zip(tags, values, strict=True)) + "</tr>"


def _escaped(text: str) -> str:
    return html.escape(text, quote=False)


def _trace_facts(trace) -> dict[str, Any]:
    """A trace's key numbers: model, sizes, budget, sparsity, compression (from `Trace.stats()`)."""
    stats = trace.stats()
    return {
        "model": trace.model_info.get("name"),
        "tokens": trace.num_tokens,
        "layers_x_heads": f"{trace.num_layers} x {trace.num_heads}",
        "blocks": f"{trace.num_query_blocks} query x {trace.num_key_blocks} key, "
                  f"{trace.config.block_q}/{trace.config.block_k} tokens",
        "budget": trace.config.budget_text(),
        "kept_per_row_mean": stats["kept_per_row_mean"],
        "token_pairs_pruned": f"{stats['sparsity']:.1%}",
        "compression": stats["compression"],
        "trace_size": f"{stats['trace_bytes'] / 1e6:.2f} MB",
    }


def trace_html(trace, *, max_entries: int = VIEWER_MAX_ENTRIES) -> str:
    """The trace's summary table and its viewer in a sandboxed iframe (module docstring); above
    `max_entries` kept-block entries, the summary and how to open the viewer instead."""
    from .report import build_report

    entries = trace.num_layers * trace.num_heads * trace.num_query_blocks * trace.blocks(0)[0].shape[-1]
    if entries > max_entries:
        note = (f"viewer not embedded: {entries:,} kept-block entries (over {max_entries:,}) would make this "
                "notebook heavy; write it to a file with st.report(trace, 'report.html') and open that")
        return facts_html("Trace", _trace_facts(trace), note=note)
    page = build_report(trace, None)
    frame = (f'<iframe srcdoc="{html.escape(page, quote=True)}" sandbox="allow-scripts allow-downloads" '
             'title="sparsetrace viewer" '
             f'style="width:100%;height:{VIEWER_HEIGHT_PX}px;border:1px solid #d0d0d0"></iframe>')
    note = "viewer: block numbers only (a trace holds token ids); st.report(trace, path) writes it with text"
    return facts_html("Trace", _trace_facts(trace), note=note) + frame


def _text(value: Any, *, quote: bool = True) -> str:
    """A value as the tables show it: floats to 4 significant digits (whole above 1,000), strings
    quoted (in HTML only those with edge spaces, such as a token's leading space), containers element
    by element."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:.0f}"
        short = f"{value:.4g}"
        return short if any(c in short for c in ".e") else short + ".0"  # 1.0 stays a float
    if isinstance(value, str):
        return repr(value) if quote or value != value.strip() else value
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_text(k)}: {_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _text(value.item(), quote=quote)
    return str(value)
