"""Sentence categories of the thought-anchors work: a transparent rule-based tagger, or labels from a file.

The eight labels of Bogdan et al. 2025 (plus "unknown"). Their labels come from an LLM judge; ours,
by default, come from the keyword rules below, which are only a rough, reproducible stand-in:
**rule-based tags are never model judgements**, and every output says which source was used
(`RULES_SOURCE` or the labels file). Labels made elsewhere (an LLM, a person) come in with
`load_labels` (JSON).

The rules, tried in this order on the lower-cased unit text; the first that matches wins:

| label | matches |
|---|---|
| final_answer_emission | "final answer", "the answer is", "answer:", "\\boxed" |
| self_checking | check, verify, double-check, confirm, recompute, "let me make sure", "makes sense" |
| uncertainty_management | wait, hmm, "not sure", mistake, wrong, actually, alternatively, reconsider, |
|  | "i think", maybe, perhaps |
| plan_generation | "we need to", "let's", "let me", "to solve", "i will", "i'll", "first," or "next," at |
|  | the start, "step 1", approach, plan, strategy |
| result_consolidation | so, therefore, thus, hence, overall, altogether (at the start or after a comma); |
|  | "in total", "in summary" |
| active_computation | a number, an operator (+ - * / x × ÷ = ^) and a number; or "=" anywhere |
| fact_retrieval | recall, formula, "we know", "is defined", "there are", means, "by definition", rule |
| problem_setup | "the problem", "we are given", "given that", "asks", "we have" |
| unknown | anything else |
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import InputError

CATEGORIES = (
    "problem_setup",
    "plan_generation",
    "fact_retrieval",
    "active_computation",
    "uncertainty_management",
    "result_consolidation",
    "self_checking",
    "final_answer_emission",
)
UNKNOWN = "unknown"
LABELS = (*CATEGORIES, UNKNOWN)
RULES_SOURCE = "rule-based keyword tagger (sparsetrace.analysis.categories); not a model judgement"

_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("final_answer_emission", re.compile(r"final answer|the answer is|answer:|\\boxed")),
    ("self_checking", re.compile(r"\b(check|checking|verify|verif\w*|double-check|confirm\w*|recompute\w*)\b"
                                 r"|let me make sure|makes sense")),
    ("uncertainty_management", re.compile(r"\b(wait|hmm+|mistake|wrong|actually|alternatively|reconsider|maybe|"
                                          r"perhaps)\b|not sure|i think")),
    ("plan_generation", re.compile(r"we need to|\blet's\b|\blet me\b|to solve|\bi will\b|\bi'll\b|^first,|"
                                   r"^next,|\bstep 1\b|\bapproach\b|\bplan\b|\bstrategy\b")),
    ("result_consolidation", re.compile(r"(^|, )(so|therefore|thus|hence|overall|altogether)\b|in total|"
                                        r"in summary")),
    ("active_computation", re.compile(r"\d\s*[-+*/x×÷=^]\s*\(?\d|=")),
    ("fact_retrieval", re.compile(r"\brecall\b|\bformula\b|we know|is defined|there are|\bmeans\b|by definition|"
                                  r"\brule\b")),
    ("problem_setup", re.compile(r"the problem|we are given|given that|\basks\b|we have")),
)


def tag_unit(text: str) -> str:
    """The rule-based label of one unit's text (the module docstring's table)."""
    lowered = " ".join(text.lower().split())
    for label, pattern in _RULES:
        if pattern.search(lowered):
            return label
    return UNKNOWN


def tag_units(texts: list[str]) -> list[str]:
    return [tag_unit(t) for t in texts]


def normalise_label(label: str) -> str:
    """'Active Computation' / 'active-computation' -> 'active_computation'; refuses other labels."""
    name = re.sub(r"[\s\-]+", "_", str(label).strip().lower())
    if name not in LABELS:
        raise InputError(f"unknown category {label!r}; use one of {', '.join(LABELS)}")
    return name


def load_labels(path: str | Path, num_units: int) -> list[str]:
    """Labels from a JSON file: a list with one label per unit, or {"unit index": label}, or a list of
    {"category": label} / {"function_tags": [label, ...]} objects (the first tag is used); units
    without a label are "unknown"."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such labels file; give a JSON file with one category per unit")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON ({error}); give a JSON list of categories, one per unit") from error
    if isinstance(data, dict):
        try:
            pairs = {int(k): v for k, v in data.items()}
        except ValueError as error:
            raise InputError(f"{path}: keys must be unit indices (\"0\", \"1\", ...)") from error
        labels = [pairs.get(i, UNKNOWN) for i in range(num_units)]
        extra = [i for i in pairs if not 0 <= i < num_units]
        if extra:
            raise InputError(f"{path} labels units {extra[:5]} but the text has {num_units} units (0-{num_units - 1});"
                             " split with the same --units as when the labels were made")
    elif isinstance(data, list):
        if len(data) != num_units:
            raise InputError(f"{path} has {len(data)} labels but the text has {num_units} units; split with the same "
                             "--units (and region) as when the labels were made")
        labels = data
    else:
        raise InputError(f"{path}: expected a JSON list or object of categories")
    return [normalise_label(_one_label(x, path)) for x in labels]


def _one_label(item, path: Path) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "category" in item:
            return item["category"]
        tags = item.get("function_tags")
        if isinstance(tags, list) and tags:
            return tags[0]
        return UNKNOWN
    if isinstance(item, list) and item:
        return item[0]
    raise InputError(f"{path}: cannot read a category from {item!r}; use a string or {{\"category\": ...}}")
