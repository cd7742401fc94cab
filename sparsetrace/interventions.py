"""What a causal check changes in a forward pass: span knockout, head knockout, text removal.

An `Intervention` names one change (or several at once) to the model's computation on one input:

- **span knockout** (`knockout`): the queries of the chosen layers and heads (default: all) may
  not attend to the tokens of the given spans; the tokens stay in the input. A query inside a
  span still reads the span (its own tokens are not cut from themselves): what is cut is every
  path out of the span, since later positions can only read it through attention. With all
  layers and heads, nothing after the span can depend on it.
- **head knockout** (`heads_out`): the output of the given (layer, head) pairs is replaced,
  before the output projection, by zero ("zero") or by its own mean over the input's positions
  ("mean": mean ablation on this input).
- **text removal** (`remove`): the characters of the given spans are deleted from the prompt text,
  which is tokenized again (ContextCite's ablation); the response's tokens stay the same.

In the sparse pass the estimator selects blocks as usual and the knocked-out keys are hidden
inside the kept blocks (a kept block that is all knockout receives no mass; the budget it used
is not re-spent), so with k covering every key block the sparse pass equals the dense one.

`LayerKnockout` is what one attention layer applies (`backend` reads it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import InputError

HEAD_MODES = ("zero", "mean")
_NEVER = torch.iinfo(torch.int64).max  # a `hidden_from` limit no query reaches


def _pairs(values, what: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in values)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what} must be pairs of whole numbers, e.g. [(0, 10)]; got {values!r}") from error


@dataclass(frozen=True)
class Intervention:
    """One causal change to a forward pass (module docstring). An empty one changes nothing.

    Attributes:
        knockout: token spans [a, b) of the prompt that later queries may not read.
        layers, heads: where the knockout applies (None: every layer / every head).
        heads_out: (layer, head) pairs whose output is removed; head_mode "zero" or "mean".
        remove: character spans [a, b) of the prompt text to delete (text removal).
        label: a name for reports.
    """

    knockout: Sequence[tuple[int, int]] = ()
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    heads_out: Sequence[tuple[int, int]] = ()
    head_mode: str = "zero"
    remove: Sequence[tuple[int, int]] = ()
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("knockout", "heads_out", "remove"):
            object.__setattr__(self, name, _pairs(getattr(self, name), name))
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(x) for x in value))
        if self.head_mode not in HEAD_MODES:
            raise InputError(f"head_mode={self.head_mode!r}; use one of {', '.join(HEAD_MODES)}")
        for name in ("knockout", "remove"):
            for a, b in getattr(self, name):
                if not 0 <= a < b:
                    raise InputError(f"{name} span ({a}, {b}) is empty or negative; give [a, b) with 0 <= a < b")
        if self.remove and (self.knockout or self.heads_out):
            raise InputError("text removal shifts every later token, so it cannot be combined with knockouts in "
                             "one intervention; give them as separate interventions")
        if (self.layers is not None or self.heads is not None) and not self.knockout:
            raise InputError("layers / heads choose where a span knockout applies; give knockout spans too (for "
                             "whole heads use heads_out)")

    @property
    def is_empty(self) -> bool:
        return not (self.knockout or self.heads_out or self.remove)

    def describe(self) -> str:
        """A short name for tables and plots."""
        if self.label:
            return self.label
        parts = []
        if self.knockout:
            where = "" if self.layers is None and self.heads is None else (
                f" in layers {_list(self.layers)} heads {_list(self.heads)}")
            parts.append("knockout tokens " + ", ".join(f"{a}-{b}" for a, b in self.knockout) + where)
        if self.heads_out:
            parts.append(f"heads {self.head_mode} " + ", ".join(f"{layer}:{head}" for layer, head in self.heads_out))
        if self.remove:
            parts.append("remove chars " + ", ".join(f"{a}-{b}" for a, b in self.remove))
        return "; ".join(parts) or "none"

    def check(self, num_layers: int, num_heads: int, prompt_tokens: int, prompt_chars: int | None) -> None:
        """Refuse, before any forward pass, spans, layers or heads that do not exist."""
        for a, b in self.knockout:
            if b > prompt_tokens:
                raise InputError(f"knockout span tokens {a}-{b} ends past the {prompt_tokens}-token prompt; "
                                 f"use spans within tokens 0-{prompt_tokens}")
        for a, b in self.remove:
            if prompt_chars is None:
                raise InputError("text removal needs the prompt as text, not token ids")
            if b > prompt_chars:
                raise InputError(f"removed span chars {a}-{b} ends past the {prompt_chars}-character prompt; "
                                 f"use spans within chars 0-{prompt_chars}")
        layers = list(self.layers or []) + [layer for layer, _ in self.heads_out]
        heads = list(self.heads or []) + [head for _, head in self.heads_out]
        if any(not 0 <= layer < num_layers for layer in layers):
            raise InputError(f"layer {max(layers)} does not exist: this model has layers 0-{num_layers - 1}")
        if any(not 0 <= head < num_heads for head in heads):
            raise InputError(f"head {max(heads)} does not exist: this model has heads 0-{num_heads - 1}")

    def first_affected(self, prompt_tokens: int) -> int:
        """The first position whose computation may change (knockouts; text removal is compared by ids)."""
        if self.heads_out:
            return 0
        if self.knockout:
            return min(b for _, b in self.knockout)
        return prompt_tokens

    def layer_knockouts(self, num_layers: int, num_heads: int, tokens: int) -> list[LayerKnockout | None]:
        """Per layer, what its attention applies (None: nothing) on an input of `tokens` positions."""
        hidden = None
        if self.knockout:
            hidden = torch.full((num_heads, tokens), _NEVER, dtype=torch.int64)
            heads = list(range(num_heads)) if self.heads is None else list(self.heads)
            for a, b in self.knockout:
                # a key in several spans is hidden from the end of the first one that ends
                hidden[heads, a:b] = torch.minimum(hidden[heads, a:b], torch.tensor(b))
        layers = range(num_layers) if self.layers is None else self.layers
        out: list[LayerKnockout | None] = [None] * num_layers
        for layer in range(num_layers):
            removed = sorted(head for l_, head in self.heads_out if l_ == layer)
            span = hidden if layer in layers else None
            if span is not None or removed:
                out[layer] = LayerKnockout(span, tuple(removed), self.head_mode)
        return out


def _list(values: Sequence[int] | None) -> str:
    return "all" if values is None else ",".join(map(str, values))


@dataclass(frozen=True)
class LayerKnockout:
    """One layer's part of an intervention.

    Attributes:
        hidden_from: int64 [H, T] or None: key s is hidden from the queries t >= hidden_from[h, s].
        heads_out: heads whose output this layer removes; head_mode: "zero" or "mean".
    """

    hidden_from: Tensor | None
    heads_out: tuple[int, ...] = ()
    head_mode: str = "zero"

    def remove_heads(self, out: Tensor) -> Tensor:
        """Apply the head knockout to an attention output [B, T, H, d] (in place when possible)."""
        if not self.heads_out:
            return out
        heads = list(self.heads_out)
        replacement = 0.0 if self.head_mode == "zero" else out[:, :, heads].mean(dim=1, keepdim=True)
        out[:, :, heads] = replacement
        return out
