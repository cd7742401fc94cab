"""The causal check of a needle's reader heads: knock out the top N, or N random heads, and re-ask.

`run_niah` ranks every (layer, head) by the mass the answer block puts on the needle (`readers`).
After the retrieval-head papers (Wu et al. 2024: masking the top retrieval heads breaks needle
retrieval, masking random heads does not), `reader_head_knockout` removes the top N reader heads
(`Intervention(heads_out=...)`, zero mode by default) and, for comparison, N random heads per seed
(drawn uniformly without replacement from every (layer, head) pair except the top N; seeded by
(seed, N), so reproducible), and measures for each:

- **accuracy**: RULER's niah metric `string_match_all` (the fraction of the reference strings, here
  the needle's value, contained in the prediction, case-insensitive) of the greedy answer of the
  knocked-out model. The greedy answer is found in two steps, both under the knockout: one
  teacher-forced pass over prompt + dense answer gives the argmax at every answer position; up to
  the first position where it differs from the dense answer, greedy decoding reproduces the dense
  answer (each earlier token matches, so decoding sees the same input), and at that position it
  emits the argmax; from there on it decodes one token per pass (the whole sequence each time:
  the sparse forward has no key/value cache; the dense forward in zero mode decodes the rest with
  `generate` and a cache, which a zeroed head allows), up to `max_new_tokens` in all, stopping at the end
  of text or once the value is complete (the dense answer's rule). So the prediction is the
  greedy decoding of the knocked-out model (on the sparse forward: with every position before the
  first divergence predicted from the one teacher-forced pass, the criterion `run_niah` uses for
  "answer kept"), and a knockout that keeps the answer costs one pass. This is RULER's metric on a
  real prediction, not the teacher-forced "every argmax equals the dense answer" (`answer_kept`,
  also recorded), which would count a right value after a changed first token as lost.
- **drop**: how much the dense answer's total log-probability (teacher-forced, nats) falls, from
  the same pass; equal to `response_logprobs(..., forward=forward).drop` for the same heads.

The unchanged model is measured the same way (`base`). forward="sparse" runs Stream's sparse
attention with `config` (by default the run's trace config: its k, the smallest that keeps the
answer under k = "auto"); forward="dense" runs the model's own attention.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ablation import ABLATION_FORWARDS, intervened_logits
from ..backend import sparse_attention
from ..config import StreamConfig
from ..errors import InputError
from ..interventions import HEAD_MODES, Intervention
from ..models import describe_model, eos_token_ids, greedy_decode
from ..notebook import facts_html, facts_repr
from ..tracer import prepare_input
from .niah import ANSWER_TOKENS, DenseAnswer, NiahPrompt, dense_answer

DEFAULT_N = (5, 10, 20)
DEFAULT_SEEDS = 5


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's niah metric for one sample: the share of `references` contained in `prediction`
    (case-insensitive)."""
    if not references:
        raise InputError("string_match_all needs at least one reference string")
    return sum(ref.lower() in prediction.lower() for ref in references) / len(references)


def top_reader_heads(readers: np.ndarray, n: int) -> list[tuple[int, int]]:
    """The n (layer, head) pairs with the most needle mass, largest first (ties: lower layer, head)."""
    flat = np.asarray(readers, dtype=np.float64).ravel()
    order = np.argsort(-flat, kind="stable")[:n]
    heads = np.asarray(readers).shape[1]
    return [(int(i // heads), int(i % heads)) for i in order]


def random_heads(num_layers: int, num_heads: int, n: int, exclude: Sequence[tuple[int, int]],
                 seed: int) -> list[tuple[int, int]]:
    """n distinct (layer, head) pairs drawn uniformly from those not in `exclude`, seeded by (seed, n)."""
    excluded = {(int(a), int(b)) for a, b in exclude}
    pool = [(layer, head) for layer in range(num_layers) for head in range(num_heads) if (layer, head) not in excluded]
    if n > len(pool):
        raise InputError(f"{n} random heads outside the {len(excluded)} excluded ones: only {len(pool)} are left")
    picked = np.random.default_rng([seed, n]).choice(len(pool), size=n, replace=False)
    return sorted(pool[i] for i in picked)


def check_knockout_sizes(n: Sequence[int], num_layers: int, num_heads: int) -> list[int]:
    """The sizes as sorted distinct ints; refuse those the model cannot hold (top N and N others)."""
    sizes = sorted({int(x) for x in n})
    if not sizes or any(x < 1 for x in sizes) or any(isinstance(x, bool) for x in n):
        raise InputError(f"n={list(n)!r}; give positive numbers of heads to knock out, e.g. (5, 10, 20) "
                         "(--causal-n 5 10 20)")
    total = num_layers * num_heads
    if 2 * sizes[-1] > total:
        raise InputError(f"n={sizes[-1]} top reader heads and {sizes[-1]} random others need {2 * sizes[-1]} heads, "
                         f"but this model has {num_layers} layers x {num_heads} heads = {total}; use n of at most "
                         f"{total // 2} (--causal-n)")
    return sizes


@dataclass
class KnockoutRow:
    """One knockout (or the unchanged model: kind "base").

    Attributes:
        kind: "base", "top" or "random"; n: heads knocked out; seed: the random draw's seed.
        heads: the (layer, head) pairs removed.
        logprob: the dense answer's total log-probability (teacher-forced); drop: base - this.
        token_logprobs: per answer token.
        answer_kept: the argmax equals the dense answer at every answer position (teacher-forced).
        prediction: the greedy answer under the knockout; accuracy: its `string_match_all`.
        passes: forward passes it took.
    """

    kind: str
    n: int
    seed: int | None
    heads: list[tuple[int, int]]
    logprob: float
    drop: float
    token_logprobs: list[float]
    answer_kept: bool
    prediction: str
    accuracy: float
    passes: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": self.n, "seed": self.seed, "heads": [list(h) for h in self.heads],
                "logprob": round(self.logprob, 5), "drop": round(self.drop, 5),
                "token_logprobs": [round(x, 5) for x in self.token_logprobs], "answer_kept": self.answer_kept,
                "prediction": self.prediction, "accuracy": self.accuracy, "passes": self.passes}


@dataclass
class ReaderKnockout:
    """Top-N reader heads vs N random heads, knocked out, for one needle prompt (module docstring)."""

    forward: str
    config: dict[str, Any]
    head_mode: str
    answer: str
    expected: str
    base: KnockoutRow
    rows: list[KnockoutRow]
    readers: list[tuple[int, int, float]] = field(default_factory=list)  # (layer, head, mass) of the largest N
    seconds: float = 0.0

    def per_n(self) -> list[dict[str, Any]]:
        """Per N: the top heads' accuracy and drop; the random heads' mean and std (ddof=1) over seeds."""
        out = []
        for n in sorted({row.n for row in self.rows}):
            top = next(row for row in self.rows if row.kind == "top" and row.n == n)
            rand = [row for row in self.rows if row.kind == "random" and row.n == n]
            acc = np.array([row.accuracy for row in rand])
            drop = np.array([row.drop for row in rand])
            ddof = 1 if len(rand) > 1 else 0
            out.append({
                "n": n, "top_accuracy": top.accuracy, "top_drop": round(top.drop, 5),
                "top_answer_kept": top.answer_kept, "top_prediction": top.prediction,
                "random_seeds": len(rand),
                "random_accuracy_mean": float(acc.mean()), "random_accuracy_std": float(acc.std(ddof=ddof)),
                "random_drop_mean": round(float(drop.mean()), 5),
                "random_drop_std": round(float(drop.std(ddof=ddof)), 5),
                "random_answer_kept": int(sum(row.answer_kept for row in rand)),
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward": self.forward, "config": self.config, "head_mode": self.head_mode,
            "answer": self.answer, "expected": self.expected,
            "metric": "RULER string_match_all of the greedy answer under the knockout; drop: teacher-forced "
                      "log-probability of the dense answer, base - knocked out (nats)",
            "base": self.base.to_dict(), "per_n": self.per_n(),
            "top_readers": [[layer, head, round(mass, 5)] for layer, head, mass in self.readers],
            "rows": [row.to_dict() for row in self.rows], "seconds": round(self.seconds, 1),
        }

    def _facts(self) -> dict[str, Any]:
        """The key numbers a notebook shows: the answer, and per N the top heads against random heads."""
        per_n = self.per_n()
        return {"forward": self.forward, "head_mode": self.head_mode, "answer": self.answer,
                "expected": self.expected, "n": [row["n"] for row in per_n],
                "top_accuracy": [row["top_accuracy"] for row in per_n],
                "random_accuracy": [row["random_accuracy_mean"] for row in per_n],
                "top_drop": [row["top_drop"] for row in per_n],
                "random_drop": [row["random_drop_mean"] for row in per_n]}

    def __repr__(self) -> str:
        return facts_repr("ReaderKnockout", self._facts())

    def _repr_html_(self) -> str:
        facts = {key: value for key, value in self._facts().items() if not isinstance(value, list)}
        rows = [{"heads_knocked_out": row["n"], "top_accuracy": row["top_accuracy"], "top_drop": row["top_drop"],
                 "random_accuracy": row["random_accuracy_mean"], "random_drop": row["random_drop_mean"],
                 "seeds": row["random_seeds"]} for row in self.per_n()]
        return facts_html("ReaderKnockout", facts, rows, rows_title="top-N reader heads vs N random heads (mean "
                          "over seeds); accuracy: RULER string match; drop: answer log-prob drop (nats)")


def reader_head_knockout(
    model,
    tokenizer,
    prompt: NiahPrompt,
    readers,
    *,
    answer: DenseAnswer | None = None,
    n: Sequence[int] = DEFAULT_N,
    seeds: int = DEFAULT_SEEDS,
    forward: str = "sparse",
    config: StreamConfig | None = None,
    head_mode: str = "zero",
    max_new_tokens: int = ANSWER_TOKENS,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> ReaderKnockout:
    """Knock out the top-N reader heads and N random heads (per seed) and re-ask the needle.

    Args:
        prompt: the needle prompt.
        readers: a `NiahRun` (its route's readers, dense answer and trace config) or a float [L, H]
            array of needle mass per head (then the dense answer is computed unless given).
        answer: the dense answer (default: the run's, or `dense_answer`).
        n: numbers of heads to knock out; each needs 2n <= layers x heads (top n and n others).
        seeds: random draws per n (seeds 0 .. seeds - 1).
        forward: "sparse" (Stream's sparse attention with `config`) or "dense" (the model's own).
        config: the sparse forward's config (default: the run's trace config, else `StreamConfig()`).
        head_mode: "zero" or "mean" (`Intervention.head_mode`).
        max_new_tokens: the greedy answer's length limit (as `dense_answer`).
    Returns:
        the `ReaderKnockout`; everything is checked before the first forward pass.
    """
    if forward not in ABLATION_FORWARDS:
        raise InputError(f"forward={forward!r}; use 'sparse' (Stream's sparse attention) or 'dense' (the model's own)")
    if head_mode not in HEAD_MODES:
        raise InputError(f"head_mode={head_mode!r}; use one of {', '.join(HEAD_MODES)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise InputError(f"seeds={seeds!r}; use a positive number of random draws per n (--causal-seeds)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}; use a positive number of tokens")
    info = describe_model(model)
    layers, heads = info["num_layers"], info["num_heads"]
    sizes = check_knockout_sizes(n, layers, heads)
    if hasattr(readers, "route"):  # a NiahRun
        answer = answer or readers.answer
        config = config or readers.trace.config
        mass = np.asarray(readers.route.readers, dtype=np.float64)
    else:
        mass = np.asarray(readers, dtype=np.float64)
    if mass.shape != (layers, heads):
        raise InputError(f"readers has shape {mass.shape}, but this model has {layers} layers x {heads} heads; "
                         "give the [layers, heads] needle mass of a run of this model")
    config = config or StreamConfig()
    prepare_input(model, tokenizer, None, prompt.token_ids, config, allow_long=allow_long,
                  continuation=max_new_tokens - 1)
    top = top_reader_heads(mass, sizes[-1])
    plan: list[tuple[str, int, int | None, list[tuple[int, int]]]] = [("base", 0, None, [])]
    for size in sizes:
        plan.append(("top", size, None, sorted(top[:size])))
        plan += [("random", size, seed, random_heads(layers, heads, size, top[:size], seed)) for seed in range(seeds)]

    started = time.perf_counter()
    answer = answer or dense_answer(model, tokenizer, prompt, max_new_tokens)
    eos = tokenizer.eos_token_id
    runner = _Passes(model, config, forward, kernel, layers, heads, mode=head_mode)
    rows: list[KnockoutRow] = []
    show = len(plan) > 4 if progress is None else progress
    for kind, size, seed, removed in tqdm(plan, desc="head knockouts", unit="run", disable=not show):
        rows.append(_measure(runner, tokenizer, prompt, answer, kind, size, seed, removed, max_new_tokens, eos))
    base = rows[0]
    for row in rows:
        row.drop = base.logprob - row.logprob
    return ReaderKnockout(forward, config.to_dict(), head_mode, answer.text, prompt.answer, base, rows[1:],
                          [(layer, head, float(mass[layer, head])) for layer, head in top],
                          time.perf_counter() - started)


@dataclass
class _Passes:
    """Forward passes under a head knockout: logits of the last `keep` positions."""

    model: Any
    config: StreamConfig
    forward: str
    kernel: str
    layers: int
    heads: int
    mode: str = "zero"

    def logits(self, ids: Tensor, removed: list[tuple[int, int]], keep: int) -> Tensor:
        """Args: ids int64 [T]. Returns float32 [keep, vocab] (the logits after positions T-keep .. T-1)."""
        knockouts = None
        if removed:
            knockouts = Intervention(heads_out=removed, head_mode=self.mode).layer_knockouts(self.layers, self.heads,
                                                                                              len(ids))
        return intervened_logits(self.model, ids, config=self.config, forward=self.forward, keep=keep,
                                 knockouts=knockouts, kernel=self.kernel)[0].float().cpu()

    def greedy(self, ids: Tensor, removed: list[tuple[int, int]], steps: int) -> list[int]:
        """Greedy tokens after ids (at most `steps`), with a key/value cache: dense forward, zero mode only
        (a zeroed head is zero at every position, so cached steps see the same knockout; a sparse pass has
        no cache, and "mean" averages over the positions of each call)."""
        knockouts = Intervention(heads_out=removed, head_mode=self.mode).layer_knockouts(self.layers, self.heads,
                                                                                          len(ids))
        with sparse_attention(self.model, self.config, lambda record: None, forward="exact", kernel=self.kernel,
                              knockouts=knockouts):
            tokens, _ = greedy_decode(self.model, ids, steps, stop=eos_token_ids(self.model))
        return tokens.tolist()


def _measure(runner: _Passes, tokenizer, prompt: NiahPrompt, answer: DenseAnswer, kind: str, size: int,
             seed: int | None, removed: list[tuple[int, int]], max_new_tokens: int, eos: int | None) -> KnockoutRow:
    target = answer.tokens
    ids = torch.cat([prompt.token_ids, target[:-1]])
    logits = runner.logits(ids, removed, len(target))
    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, target[:, None])[:, 0]
    argmax = logits.argmax(-1)
    differs = (argmax != target).nonzero()
    kept = len(differs) == 0
    passes = 1
    if kept:
        generated = target.tolist()
    else:  # greedy decoding: the dense answer up to the first divergence, its argmax there, then one pass a token
        first = int(differs[0])
        generated = target[:first].tolist() + [int(argmax[first])]
        if runner.forward == "dense" and runner.mode == "zero" and removed and len(generated) < max_new_tokens \
                and generated[-1] != eos:
            ids = torch.cat([prompt.token_ids, torch.tensor(generated)])
            generated += runner.greedy(ids, removed, max_new_tokens - len(generated))
            passes += 1
            generated = _cut(tokenizer, generated, prompt.answer, eos)
        while (len(generated) < max_new_tokens and generated[-1] != eos
               and prompt.answer.lower() not in tokenizer.decode(generated).lower()):
            step = runner.logits(torch.cat([prompt.token_ids, torch.tensor(generated)]), removed, 1)
            generated.append(int(step[-1].argmax()))
            passes += 1
    prediction = tokenizer.decode(generated)
    return KnockoutRow(kind, size, seed, removed, float(token_logprobs.sum()), 0.0, token_logprobs.tolist(), kept,
                       prediction, string_match_all(prediction, [prompt.answer]), passes)


def _cut(tokenizer, generated: list[int], value: str, eos: int | None) -> list[int]:
    """The tokens up to where `value` is complete or the end of text (as the one-pass-a-token loop stops)."""
    for n in range(1, len(generated) + 1):
        if generated[n - 1] == eos or value.lower() in tokenizer.decode(generated[:n]).lower():
            return generated[:n]
    return generated
