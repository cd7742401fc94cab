"""The report's data blob: the trace itself, compactly, plus block texts and run results.

Per layer l the blob carries the trace's kept blocks, not a T x T matrix, so its size is
O(L x H x n_q x K):

    indices  int16 (int32 when n_k > 32767) [L, H, n_q, K], little-endian, base64; -1 = padding
    mass     uint8 [L, H, n_q, K] = round(mass x 255), base64; the error is at most 1/510 per entry
    coverage uint8 [L, H, n_q] = round(estimated coverage x 255), base64, under a coverage budget; else null

An 8k-token trace of the default model (30 layers x 9 heads x 128 query blocks x K = 10) is
1.0 MB of arrays, 1.4 MB as base64.

With the text known, the blob also carries the sentences and paragraphs of `analysis/segments.py`
as token spans [start, end) (and their text, cut as the blocks'), so the page can show the map per
unit; the page aggregates the block masses itself (viewer.units.js), nothing T x T is stored.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

from ..analysis.segments import split_units
from ..analysis.spans import trace_text
from ..errors import InputError
from ..text import decoded_blocks, shorten
from ..trace import Trace

MASS_LEVELS = 255  # uint8 quantisation of the mass: value / 255
TEXT_WIDTH = 240  # characters of each block's text kept for hover and click
UNIT_KINDS = ("sentences", "paragraphs")  # the units the page can switch to besides blocks


def encode_blocks(trace: Trace) -> dict[str, Any]:
    """indices and mass of every layer as base64 strings (see the module docstring for the layout)."""
    wide = trace.num_key_blocks > np.iinfo(np.int16).max
    dtype = np.dtype("<i4" if wide else "<i2")
    indices = np.stack([trace.blocks(layer)[0].numpy() for layer in range(trace.num_layers)]).astype(dtype)
    mass = np.stack([trace.blocks(layer)[1].numpy() for layer in range(trace.num_layers)])
    coverage = None
    if trace.coverage(0) is not None:
        estimated = np.stack([trace.coverage(layer).numpy() for layer in range(trace.num_layers)])
        coverage = base64.b64encode(_quantised(estimated).tobytes()).decode("ascii")
    return {
        "index_type": "int32" if wide else "int16",
        "shape": list(indices.shape),
        "indices": base64.b64encode(indices.tobytes()).decode("ascii"),
        "mass": base64.b64encode(_quantised(mass).tobytes()).decode("ascii"),
        "coverage": coverage,
        "mass_levels": MASS_LEVELS,
    }


def _quantised(share: np.ndarray) -> np.ndarray:
    """A share in [0, 1] as uint8 levels of 1 / MASS_LEVELS."""
    return np.clip(np.rint(share * MASS_LEVELS), 0, MASS_LEVELS).astype(np.uint8)


def decode_blocks(encoded: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `encode_blocks`: (int32 indices, float32 mass), each [L, H, n_q, K]."""
    shape = encoded["shape"]
    dtype = np.dtype("<i4" if encoded["index_type"] == "int32" else "<i2")
    indices = np.frombuffer(base64.b64decode(encoded["indices"]), dtype=dtype).reshape(shape).astype(np.int32)
    mass = np.frombuffer(base64.b64decode(encoded["mass"]), dtype=np.uint8).reshape(shape)
    return indices, mass.astype(np.float32) / encoded["mass_levels"]


def block_texts(trace: Trace, tokenizer, size: int, width: int = TEXT_WIDTH) -> list[str]:
    """Each block of `size` tokens decoded, cut to `width` characters (an ellipsis marks the cut)."""
    return [shorten(text, width, keep_whitespace=True) for text in decoded_blocks(trace.token_ids, tokenizer, size)]


def text_units(trace: Trace, tokenizer, width: int = TEXT_WIDTH) -> tuple[dict[str, Any] | None, str | None]:
    """Sentences and paragraphs of the trace's text as token spans, or None with the reason shown.

    Returns ({"sentences": {"tokens": [[start, end), ...], "texts": [...]}, "paragraphs": ...}, None).
    The units are `split_units(text, tokenizer, kind, region="all")` on the decoded text; that needs
    the text to tokenize back to the trace's own tokens (as `sparsetrace salience --units`).
    """
    text = trace_text(trace, tokenizer)
    mismatch = "no sentences or paragraphs: the decoded text does not tokenize back to the trace's tokens"
    if not text.exact:
        return None, mismatch
    units = {}
    for kind in UNIT_KINDS:
        try:
            split, ids = split_units(text.text, tokenizer, kind, region="all")
        except InputError as error:
            return None, f"no sentences or paragraphs: {error}"
        if ids.tolist() != trace.token_ids.tolist():
            return None, mismatch
        units[kind] = {"tokens": [[unit.token_start, unit.token_end] for unit in split],
                       "texts": [shorten(unit.text, width, keep_whitespace=True) for unit in split]}
    return units, None


def summary(trace: Trace) -> dict[str, Any]:
    """The numbers the page's header shows: model, sizes, config and `Trace.stats()`."""
    stats = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in trace.stats().items()}
    config = trace.config
    return {
        "model": trace.model_info.get("name"),
        "tokens": trace.num_tokens,
        "layers": trace.num_layers,
        "heads": trace.num_heads,
        "query_blocks": trace.num_query_blocks,
        "key_blocks": trace.num_key_blocks,
        "block_q": config.block_q,
        "block_k": config.block_k,
        "sinks": config.sinks,
        "local": config.local,
        "config": config.to_dict(),
        "sliding_windows": trace.model_info.get("sliding_windows"),
        "stats": stats,
    }
