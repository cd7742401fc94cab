"""`suppression_matrix`: the causal check of thought anchors, by attention suppression.

After Bogdan et al. 2025 (Thought Anchors, their `attn_supp_funcs.get_suppression_KL_matrix`). For
each unit i (a sentence), one forward pass runs with unit i *suppressed*: in every layer and head
no later token may attend to unit i's tokens (`Intervention(knockout=[unit i's token span])`).
Its effect on a later unit j is how much the next-token distributions at j's tokens move:

    effect[i, j] = (1 / |j|) * sum over positions t in unit j of KL(p(. | t) || q_i(. | t))

with p the unchanged pass's next-token distribution at position t (the one predicting token
t + 1), q_i the suppressed pass's, both softmax(logits / temperature). effect[i, j] = 0 for j <= i:
nothing before the end of unit i can read the knockout (positions before it are not computed).
A unit's **causal score** is the mean of its row over the later units j > i (NaN for the last).

Differences from their code, on purpose: they take the KL at temperature 0.6 over the top-p
(0.9999) nucleus of each distribution and average log(KL + 1e-9) over j's tokens; here the KL is
over the whole vocabulary at `temperature` (default 1.0, the model's own distribution), and the
mean of log(KL + 1e-9) is kept too (`log_effects`, NaN for j <= i) for comparison. Their mask
also hides unit i from its own tokens; ours hides it only from later tokens, which changes
nothing for j > i (a later token cannot read unit i's tokens in either case).

Forwards: "dense" (the model's own attention; `dense.dense_attention` in the knockout layers)
keeps the unchanged pass's key/value cache and runs each suppressed pass only from the end of
unit i on (the prefix cannot change). "sparse" runs on Stream's sparse attention with `config`
(the selection sees the knockout's changed q and k) and reuses the cache from the last query block
boundary at or before the end of unit i (`ablation.reusable_prefix`), all of it on the eager block
attention, where the knockout mask lives (the unchanged pass too, so both share their numerics).
With k covering every key block the sparse matrix equals the dense one. (On the sparse forward a
query block's selection is shared by its queries, so in the block that holds the end of unit i the
positions before the end may see other blocks once the later ones change; they are not measured.)

Memory: the unchanged pass's log-probabilities over the vocabulary are kept for the positions
from the second unit on (float32, T x V x 4 bytes: 400 MB at 2,048 tokens and a 49,152-token
vocabulary; float16 when that is more than a quarter of the available memory, noted in
`base_dtype`); one suppressed pass's logits live at a time and the KL is taken in chunks of
positions. One pass per unit.

>>> result = suppression_matrix(model, tokenizer, text, "sentences", forward="dense")  # doctest: +SKIP
>>> result.effects.shape, result.scores                                               # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ablation import caches, intervened_logits, reusable_prefix
from ..analysis.segments import Unit, split_units
from ..config import StreamConfig
from ..errors import InputError
from ..interventions import Intervention
from ..models import describe_model, forward_sizes
from ..notebook import facts_html, facts_repr
from ..tracer import available_memory, prepare_input

SUPPRESSION_FORWARDS = ("sparse", "dense")
LOG_EPSILON = 1e-9  # their log(KL + 1e-9)
_CHUNK = 256  # positions per KL chunk


@dataclass
class SuppressionResult:
    """The attention-suppression matrix of one text (module docstring).

    Attributes:
        effects: float64 [U, U], row i suppressed, column j affected: mean KL over j's tokens (0 for j <= i).
        log_effects: float64 [U, U], mean log(KL + 1e-9) over j's tokens (their aggregate; NaN for j <= i).
        spans: the U token spans [a, b).
        forward: "sparse" or "dense"; config: the StreamConfig (sparse passes).
        seconds: all passes; seconds_per_unit: the suppressed passes' mean.
        reused: per unit, the positions taken from the unchanged pass's cache (dense).
    """

    effects: np.ndarray
    log_effects: np.ndarray
    spans: list[tuple[int, int]]
    tokens: int
    forward: str
    config: dict[str, Any]
    temperature: float
    base_dtype: str
    seconds: float = 0.0
    seconds_per_unit: float = 0.0
    reused: list[int] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        """float64 [U]: each unit's causal score, the mean effect on the later units (NaN for the last)."""
        return _row_means(self.effects)

    @property
    def log_scores(self) -> np.ndarray:
        """float64 [U]: the mean over later units of `log_effects`."""
        return _row_means(self.log_effects)

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward": self.forward, "config": self.config, "temperature": self.temperature,
            "tokens": self.tokens, "base_dtype": self.base_dtype, "spans": [list(s) for s in self.spans],
            "effects": _json(self.effects), "log_effects": _json(self.log_effects),
            "scores": _json(self.scores), "log_scores": _json(self.log_scores),
            "seconds": round(self.seconds, 2), "seconds_per_unit": round(self.seconds_per_unit, 3),
            "definition": "effects[i][j] = mean over the tokens t of unit j of KL(p(.|t) || q_i(.|t)), q_i with no "
                          "later token attending to unit i (all layers and heads); 0 for j <= i; score[i] = mean "
                          "of row i over j > i; log_effects: mean of log(KL + 1e-9) (Bogdan et al.'s aggregate)",
        }

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: sizes, the forward, the unit of largest causal score."""
        scores = self.scores
        top = int(np.nanargmax(scores)) if np.isfinite(scores).any() else None
        return {"units": len(self.spans), "tokens": self.tokens, "forward": self.forward,
                "top_unit": None if top is None else (top, float(scores[top])),
                "seconds": round(self.seconds, 2)}

    def __repr__(self) -> str:
        return facts_repr("SuppressionResult", self._facts())

    def _repr_html_(self) -> str:
        return facts_html("SuppressionResult", self._facts(), note="top unit: (unit, mean KL its suppression "
                          "causes in later units)")


def suppression_matrix(
    model,
    tokenizer,
    text: str | Sequence[int] | Tensor,
    units: str | Sequence[Unit | tuple[int, int]] = "sentences",
    *,
    forward: str = "sparse",
    config: StreamConfig | None = None,
    region: str | tuple[int, int] = "auto",
    temperature: float = 1.0,
    max_tokens: int | None = None,
    allow_long: bool = False,
    progress: bool | None = None,
) -> SuppressionResult:
    """The attention-suppression matrix of `text` over `units` (module docstring). One pass per unit.

    Args:
        text: the text, or its token ids (then `units` must be token spans or `Unit`s).
        units: "sentences", "paragraphs" or "blocks" (split as `anchors`, inside `region`), or the
            units themselves: `segments.Unit`s or (start, end) token spans, in order, not overlapping.
        forward: "sparse" (Stream's sparse attention with `config`) or "dense" (the model's own).
        temperature: of both softmaxes (1.0: the model's distributions; their code: 0.6).
        progress: a bar over the units (default: more than 4).
    Returns:
        the `SuppressionResult`.
    """
    if forward not in SUPPRESSION_FORWARDS:
        raise InputError(f"forward={forward!r}; use 'sparse' (Stream's sparse attention) or 'dense' (the model's own)")
    if not temperature > 0:
        raise InputError(f"temperature={temperature!r}; use a positive temperature (1.0: the model's own)")
    config = config or StreamConfig()
    if isinstance(units, str):
        if not isinstance(text, str):
            raise InputError(f"units={units!r} splits a text; give the text, or the units as token spans")
        split, ids = split_units(text, tokenizer, units, region=region, block_size=config.block_k)
        spans = [(u.token_start, u.token_end) for u in split]
    else:
        spans = [(u.token_start, u.token_end) if isinstance(u, Unit) else (int(u[0]), int(u[1])) for u in units]
        ids = text if not isinstance(text, str) else tokenizer(text)["input_ids"]
    ids = prepare_input(model, tokenizer, None, torch.as_tensor(ids, dtype=torch.int64).reshape(-1), config,
                        max_tokens=max_tokens, allow_long=allow_long)
    tokens = len(ids)
    spans = _check_spans(spans, tokens)
    info = describe_model(model)
    layers, heads = info["num_layers"], info["num_heads"]
    owner = torch.full((tokens,), -1, dtype=torch.long)
    for u, (a, b) in enumerate(spans):
        owner[a:b] = u
    counts = torch.bincount(owner[owner >= 0], minlength=len(spans)).double()
    first = spans[1][0]  # the first position any effect is measured at
    vocab = forward_sizes(model)["vocab"]
    base_dtype = torch.float32 if (tokens - first) * max(vocab, 1) * 4 <= available_memory() / 4 else torch.float16

    started = time.perf_counter()
    # the eager block attention everywhere in the sparse forward: the kernel the knockout passes use
    run = partial(intervened_logits, model, config=config, forward=forward, kernel="eager")
    logits, cache = run(ids, keep=tokens - first, keep_cache=caches(forward, config))
    base = _log_softmax(logits, temperature, base_dtype)  # [T - first, V], rows = positions first..T-1
    del logits
    effects = np.zeros((len(spans), len(spans)))
    log_effects = np.full((len(spans), len(spans)), np.nan)
    reused = []
    show = len(spans) > 4 if progress is None else progress
    passes_started = time.perf_counter()
    for i in tqdm(range(len(spans) - 1), desc="suppression", unit="unit", disable=not show):
        a, b = spans[i]
        knockouts = Intervention(knockout=[(a, b)]).layer_knockouts(layers, heads, tokens)
        start = spans[i + 1][0]  # the first position measured for this row
        reused.append(0 if cache is None else reusable_prefix(b, forward, config))
        prefix = None if not reused[-1] else [(k[:, :, : reused[-1]], v[:, :, : reused[-1]]) for k, v in cache]
        logits, _ = run(ids, keep=tokens - start, knockouts=knockouts, prefix=prefix)
        kl = _kl(base[start - first :], logits, temperature)  # [T - start]
        del logits
        where = owner[start:]
        inside = where >= 0
        per_unit = torch.zeros(len(spans), dtype=torch.float64).index_add_(0, where[inside], kl[inside])
        logs = torch.zeros(len(spans), dtype=torch.float64).index_add_(0, where[inside],
                                                                     torch.log(kl[inside] + LOG_EPSILON))
        later = slice(i + 1, len(spans))
        effects[i, later] = (per_unit / counts.clamp(min=1))[later].numpy()
        log_effects[i, later] = (logs / counts.clamp(min=1))[later].numpy()
    done = time.perf_counter()
    return SuppressionResult(effects, log_effects, spans, tokens, forward, config.to_dict(), float(temperature),
                             str(base_dtype).removeprefix("torch."), done - started,
                             (done - passes_started) / max(len(spans) - 1, 1), reused)


def _check_spans(spans: list[tuple[int, int]], tokens: int) -> list[tuple[int, int]]:
    """Units inside the input, in order and disjoint; at least two of them (refused before any pass)."""
    kept = [(a, b) for a, b in spans if b <= tokens]  # units cut by max_tokens are dropped, as anchors does
    previous = 0
    for a, b in kept:
        if not previous <= a < b:
            raise InputError(f"unit tokens {a}-{b} is empty, overlaps the unit before or is out of order; give "
                             "(start, end) token spans in text order, not overlapping")
        previous = b
    if len(kept) < 2:
        raise InputError(f"only {len(kept)} unit(s) in the input; the suppression check needs at least 2 (a unit "
                         "to suppress and a later one it may affect): give a longer text or finer units "
                         "(sentences, or blocks)")
    return kept


def _log_softmax(logits: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    out = torch.empty(logits.shape, dtype=dtype, device=logits.device)
    for c in range(0, len(logits), _CHUNK):
        out[c : c + _CHUNK] = torch.log_softmax(logits[c : c + _CHUNK].float() / temperature, dim=-1)
    return out


def _kl(base: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """float64 [n] on the CPU: KL(p || q) per position, p from the stored log-probs, q from `logits`."""
    rows = []
    for c in range(0, len(logits), _CHUNK):
        log_p = base[c : c + _CHUNK].float()
        log_q = torch.log_softmax(logits[c : c + _CHUNK].float() / temperature, dim=-1)
        p = log_p.exp()
        terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), device=p.device))
        rows.append(terms.sum(-1).clamp(min=0).double().cpu())
    return torch.cat(rows)


def _row_means(matrix: np.ndarray) -> np.ndarray:
    units = matrix.shape[0]
    out = np.full(units, np.nan)
    for i in range(units - 1):
        out[i] = float(np.mean(matrix[i, i + 1 :]))
    return out


def _json(x: np.ndarray) -> list:
    """Nested lists with NaN as null, 6 significant digits."""
    return np.vectorize(lambda v: None if np.isnan(v) else float(f"{v:.6g}"), otypes=[object])(x).tolist()
