"""A self-contained HTML report of a trace: summary, fidelity, a per layer/head block map, results.

One file with everything inline (no network, no CDN): `viewer.html` is the page, `viewer.css` and
the scripts (`SCRIPTS`, pasted in order into one function scope) go into it, and the data go in a
JSON script element (`data.py` describes the blob). Its size grows with the trace, L x H x n_q x K,
not with T^2, so an 8k-token trace of the default model gives a report of about 1.5 MB and a
32k-token one stays responsive: the page draws one image of (key x query units) per layer, head or
units change and finds the cell under the mouse by arithmetic. The units are the trace's blocks,
or sentences and paragraphs (`segments.py`'s, computed here), whose reads the page sums from the
blocks' masses (viewer.units.js says how).

>>> import sparsetrace as st                                            # doctest: +SKIP
>>> st.report("run.sptrace", "report.html")                             # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import InputError, SparsetraceError, SparsetraceWarning
from ..files import atomic_write
from ..text import recorded_tokenizer
from ..trace import Trace, load_trace
from .data import block_texts, encode_blocks, summary, text_units

FIDELITY_KEYS = ("tokens", "config", "recall", "oracle_recall", "recall_ratio", "recall_per_head",
                 "oracle_recall_per_head", "match", "kl_next_token", "kl_mean", "top1_agreement")
AUTO = "auto"
ATTRIBUTION_ROWS = 20  # top sources an attribution table shows
# the page's scripts: the map and its selection, units (blocks, sentences, paragraphs), tables, PNG export
SCRIPTS = ("viewer.js", "viewer.units.js", "viewer.tables.js", "viewer.export.js")  # package data: viewer.*


def build_report(
    trace: Trace,
    tokenizer: Any = AUTO,
    *,
    extras: dict[str, Any] | None = None,
    title: str | None = None,
) -> str:
    """The report page as one HTML string.

    Args:
        trace: the trace to show.
        tokenizer: decodes each block's text for hover and click; "auto" (default) loads the trace's
            model's tokenizer (`models.load_tokenizer`), None shows token ranges only.
        extras: results to add: "fidelity" (a `FidelityReport` or its `to_dict()`), "figures"
            ({caption: PNG bytes or path}), "tables" ({title: JSON value}), "attribution" (an
            `Attribution` or its `to_dict()`: its top sources as a table). Results the trace carries
            in `extra` (e.g. a needle run's) are shown too.
        title: the page's title (default: the model and token count).
    """
    extras = dict(extras or {})
    unknown = set(extras) - {"fidelity", "figures", "tables", "attribution"}
    if unknown:
        raise InputError(f"unknown report extras {sorted(unknown)}; use fidelity, figures, tables or attribution")
    tokenizer, note = _tokenizer(trace, tokenizer)
    units, units_note = text_units(trace, tokenizer) if tokenizer is not None else (None, note)
    facts = summary(trace)
    facts_of_run = {key: value for key, value in trace.extra.items() if not isinstance(value, dict | list)}
    results = {key: value for key, value in trace.extra.items() if key != "niah" and key not in facts_of_run}
    blob = {
        "summary": facts,
        "blocks": encode_blocks(trace),
        "texts": _texts(trace, tokenizer),
        "text_note": note,
        "units": units,
        "units_note": units_note,
        "fidelity": _fidelity(extras.get("fidelity")),
        "figures": [{"title": caption, "src": _png_uri(png)} for caption, png in extras.get("figures", {}).items()],
        "tables": ([{"title": "run facts", "value": facts_of_run}] if facts_of_run else [])
        + [{"title": f"trace extra: {key}", "value": value} for key, value in results.items()]
        + [{"title": name, "value": value} for name, value in extras.get("tables", {}).items()],
        "extra": {"niah": trace.extra["niah"]} if "niah" in trace.extra else {},
        "attribution": _attribution(extras.get("attribution")),
    }
    title = title or f"{facts['model'] or 'trace'}: {trace.num_tokens:,} tokens"
    package = resources.files(__name__)
    page = package.joinpath("viewer.html").read_text(encoding="utf-8")
    replacements = {
        "__TITLE__": html.escape(title),
        "/*__STYLE__*/": package.joinpath("viewer.css").read_text(encoding="utf-8"),
        "/*__SCRIPT__*/": "\n".join(package.joinpath(name).read_text(encoding="utf-8") for name in SCRIPTS),
        "__DATA__": _script_json(blob),
    }
    for marker, value in replacements.items():  # the data last: nothing in it is read as a marker
        page = page.replace(marker, value)
    return page


def report(
    trace: Trace | str | os.PathLike[str],
    output: str | os.PathLike[str],
    tokenizer: Any = AUTO,
    *,
    extras: dict[str, Any] | None = None,
    title: str | None = None,
) -> Path:
    """Write `build_report(...)` to `output` atomically; `trace` may be a path to a saved trace.

    Raises `InputError` when the output folder does not exist (before any work), `TraceFileError`
    when the path is not a trace. Returns the path written.
    """
    output = Path(output)
    if output.is_dir():
        raise InputError(f"{output} is a folder; give a file name such as {output / 'report.html'}")
    if not output.parent.is_dir():
        raise InputError(f"the output folder {output.parent} does not exist; create it first or choose another path")
    if not isinstance(trace, Trace):
        trace = load_trace(trace)
    page = build_report(trace, tokenizer, extras=extras, title=title)
    return atomic_write(output, page.encode("utf-8"), what="the report")


def _tokenizer(trace: Trace, tokenizer: Any) -> tuple[Any, str | None]:
    """The tokenizer to decode the text with ("auto": the trace's), or None with the reason shown on the page."""
    if tokenizer == AUTO:
        from ..models import load_tokenizer

        name = recorded_tokenizer(trace)
        try:
            return load_tokenizer(name), None
        except SparsetraceError as error:
            note = f"no block text: the tokenizer of {name!r} is not available ({error}); token ranges shown instead"
            warnings.warn(note, SparsetraceWarning, stacklevel=3)  # the page says it too; the CLI, on stderr
            return None, note
    if tokenizer is None:
        return None, "no block text (no tokenizer given); token ranges shown instead"
    return tokenizer, None


def _texts(trace: Trace, tokenizer: Any) -> dict[str, list[str]] | None:
    """Block texts for queries and keys (None without a tokenizer)."""
    if tokenizer is None:
        return None
    config = trace.config
    query = block_texts(trace, tokenizer, config.block_q)
    key = query if config.block_k == config.block_q else block_texts(trace, tokenizer, config.block_k)
    return {"query": query, "key": key}


def _fidelity(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
    return {key: value[key] for key in FIDELITY_KEYS if key in value}


def _attribution(value: Any, top: int = ATTRIBUTION_ROWS) -> dict[str, Any] | None:
    """The top sources of an attribution, highest score first, with the facts the table heads."""
    if value is None:
        return None
    value = value.to_dict() if hasattr(value, "to_dict") else dict(value)
    ranked = sorted((s for s in value["sources"] if s.get("score") is not None), key=lambda s: -s["score"])[:top]
    return {"query": value.get("query"), "response": value.get("response"), "method": value.get("method"),
            "num_sources": len(value["sources"]),
            "sources": [{"rank": i + 1, **{key: s[key] for key in ("score", "tokens", "span", "text")}}
                        for i, s in enumerate(ranked)]}


def _png_uri(png: bytes | str | os.PathLike[str]) -> str:
    if not isinstance(png, bytes):
        path = Path(png)
        if not path.is_file():
            raise InputError(f"figure {path}: no such file; give PNG files that exist")
        png = path.read_bytes()
    if not png.startswith(b"\x89PNG"):
        raise InputError("a report figure is not a PNG image; save figures as PNG (files.save_figure)")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _script_json(value: Any) -> str:
    """JSON safe inside <script>: no '<' at all (so no '</script>' or '<!--' from block text); NaN/inf
    become null (JSON has no such numbers)."""
    return json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
