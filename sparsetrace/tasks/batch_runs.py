"""The batch forms of `attribute` and `anchors`: many independent inputs, a unit of `batch` each.

- `attribute_batch`: context/query pairs (a JSONL file of {"context", "query"[, "response", "id"]});
  each pair's `Attribution.to_dict()` in folder/pairs/NAME.json, NAME its "id" or a hash of its texts.
- `anchors_each`: one anchors result per text (folder/texts/NAME.json, NAME the text's name and a
  hash of its text). Not the joint analysis of `anchors(texts)`, which averages the heads' kurtosis
  over the texts to choose one set of receiver heads: here each text has its own.

A unit is named by its inputs, so a changed input is run again and a reordered file is not.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

from ..batch import BatchResult, InProcess, Unit, run_units, unit_name
from ..config import StreamConfig
from ..errors import InputError


def read_pairs(text: str, source: str) -> list[dict[str, Any]]:
    """The pairs of a JSONL text, checked: one {"context", "query"[, "response", "id"]} per line."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where} is not JSON ({error.msg}); give one {{\"context\", \"query\"}} object a "
                             "line") from None
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) and pair[k].strip()
                                                 for k in ("context", "query")):
            raise InputError(f"{where} needs a non-empty \"context\" and \"query\" (strings)")
        if "response" in pair and not (isinstance(pair["response"], str) and pair["response"].strip()):
            raise InputError(f"{where} has an empty \"response\"; give its text or leave it out")
        if "id" in pair and not (isinstance(pair["id"], str | int) and str(pair["id"]).strip()):
            raise InputError(f"{where} has an \"id\" that is not a non-empty string or number")
        pairs.append(pair)
    if not pairs:
        raise InputError(f"{source} holds no pairs; give one {{\"context\", \"query\"}} object a line")
    return pairs


def pair_units(pairs: list[dict[str, Any]]) -> list[Unit]:
    """A unit per pair, named by its "id", else "pair_" and a hash of its context, query and response."""
    return [Unit(unit_name(pair["id"]) if "id" in pair else "pair_" + _digest(
        [pair["context"], pair["query"], pair.get("response")]), pair) for pair in pairs]


def attribution_unit(model, tokenizer, pair: dict[str, Any], **options) -> dict[str, Any]:
    """One pair's attribution, a `batch` task: `attribute(...).to_dict()` with `options` of `attribute`."""
    from .attribution_runs import attribute

    return attribute(model, tokenizer, pair["context"], pair["query"], response=pair.get("response"),
                     **options).to_dict()


def attribute_batch(model, tokenizer, pairs: list[dict[str, Any]], folder: str | Path,
                    config: StreamConfig | None = None, *, executor=None, retry_failed: bool = False,
                    progress: bool | None = None, on_pair=None, **options) -> BatchResult:
    """Attribute every pair (module docstring); `options` go to `attribute` (sources, method, head_weights,
    max_new_tokens, allow_long, kernel). `executor`, `retry_failed`, `progress`: as `batch.run_units`;
    `on_pair(name, result)` after each new result. Failures are in the result (`.check()` raises them)."""
    task = partial(attribution_unit, config=config or StreamConfig(), progress=False, **options)
    return run_units(pair_units(pairs), task, Path(folder) / "pairs", executor or InProcess(model, tokenizer),
                     retry_failed=retry_failed, progress=progress,
                     on_result=None if on_pair is None else lambda unit, result, _: on_pair(unit.name, result))


def text_units(texts: list[str], names: list[str], labels: list | None = None) -> list[Unit]:
    """A unit per text, named by its name (a file's stem) and a hash of its text and labels."""
    labels = labels or [None] * len(texts)
    return [Unit(f"{unit_name(Path(name).stem)}_{_digest([text, given])}", {"text": text, "name": name,
                                                                             "labels": given})
            for text, name, given in zip(texts, names, labels, strict=True)]


def anchors_unit(model, tokenizer, item: dict[str, Any], *, region: str = "auto", **options) -> dict[str, Any]:
    """One text's thought anchors, a `batch` task: `anchors(...).to_dict()` of that text alone."""
    from .anchor_runs import anchors

    labels = None if item["labels"] is None else [item["labels"]]
    return anchors(model, tokenizer, [item["text"]], names=[item["name"]], regions=[region], labels=labels,
                   **options).to_dict()


def anchors_each(model, tokenizer, texts: list[str], names: list[str], folder: str | Path,
                 config: StreamConfig | None = None, *, labels: list | None = None, executor=None,
                 retry_failed: bool = False, progress: bool | None = None, on_text=None, **options) -> BatchResult:
    """Thought anchors of each text on its own (module docstring); `options` go to `anchors` (units, region,
    proximity, top_heads, ...); the rest as `attribute_batch`."""
    task = partial(anchors_unit, config=config or StreamConfig(), progress=False, **options)
    return run_units(text_units(texts, names, labels), task, Path(folder) / "texts",
                     executor or InProcess(model, tokenizer), retry_failed=retry_failed, progress=progress,
                     on_result=None if on_text is None else lambda unit, result, _: on_text(unit.name, result))


def _digest(parts: list) -> str:
    """12 hex digits of the SHA-256 of the parts as JSON: the same inputs, the same name."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
