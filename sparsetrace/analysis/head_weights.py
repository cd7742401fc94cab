"""Learned per-head weights for context attribution: AT2 (Cohen-Wang, Chuang & Madry 2025, "Learning
to Attribute with Attention", MadryLab/AT2) on the sparse pass's attention mass.

A plain average of attention over heads ranks sources by what most heads read (the template, recent
tokens), not by what the response depends on. AT2 learns, once per model, how much each head's
attention counts:

    score[j] = sum over layers l, heads h of weights[l, h] * mass[l, h, j]

with `mass` as in `attribution.SourceMass` (AT2's feature: attention from the response's positions
summed over the source's tokens, mean over those positions). The weights are fit on ablation data
(`AblationSample`): for each training example, M random masks over its sources (keep probability
0.5) and the dense model's response logit-probability with the masked-out sources' text removed.
The fit maximises the mean over examples of the Pearson correlation, across masks, between the
predicted sum of the kept sources' scores and the actual value (AT2's `PearsonCorrelationLoss`,
Adam), keeps the weights non-negative (AT2's `non_negative` option, a clamp after each step) and
L1-normalises the result (AT2's `normalize=True`). Pearson is invariant to the scale and offset of
the prediction, so only the weights' direction matters. Non-negative by default, by measurement
(benchmarks/attribution/heads/fit.json, 6-fold cross-validation on 36 examples, mean held-out LDS
natural / haystack): signed weights of 270 heads fit to 36 examples do worse on held-out text
(0.71 / 0.76) than non-negative ones (0.76 / 0.81), which put all the weight on 7 heads.

Files are JSON: {"format": "sparsetrace-head-weights", "version": 1, "model", "num_layers",
"num_heads", "weights" [L][H], "training"}. The package ships the default model's
(`data/head_weights/`, made by benchmarks/attribution/fit_heads.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

FORMAT = "sparsetrace-head-weights"
VERSION = 1


@dataclass
class AblationSample:
    """One training example: `mass` float [L, H, n]; `masks` bool [M, n] (True = source kept);
    `outcomes` float [M], the response's logit-probability under each mask (dense model, text removed)."""

    mass: np.ndarray
    masks: np.ndarray
    outcomes: np.ndarray

    def features(self) -> np.ndarray:
        """float64 [M, L * H]: per mask, each head's mass summed over the kept sources."""
        layers, heads, n = self.mass.shape
        return self.masks.astype(np.float64) @ self.mass.reshape(layers * heads, n).T.astype(np.float64)


@dataclass
class HeadWeights:
    """Per-head weights `weights` float64 [L, H] for `model`; `training` says what they were fit on."""

    weights: np.ndarray
    model: str
    training: dict[str, Any] = field(default_factory=dict)

    def scores(self, mass: np.ndarray) -> np.ndarray:
        """float64 [n]: each source's score from mass [L, H, n]."""
        mass = np.asarray(mass, dtype=np.float64)
        if mass.shape[:2] != self.weights.shape:
            raise InputError(f"head weights for {self.model!r} are [{self.weights.shape[0]} layers, "
                             f"{self.weights.shape[1]} heads] but the mass is [{mass.shape[0]}, {mass.shape[1]}]; "
                             "fit weights for this model (sparsetrace attribute-fit)")
        return np.einsum("lh,lhn->n", self.weights, mass)

    def describe(self) -> dict[str, Any]:
        """What a result records about the weights it used: the model and the training facts."""
        return {"model": self.model, **{k: self.training[k] for k in ("examples", "masks") if k in self.training}}

    def to_dict(self) -> dict[str, Any]:
        layers, heads = self.weights.shape
        return {"format": FORMAT, "version": VERSION, "model": self.model, "num_layers": layers, "num_heads": heads,
                "weights": self.weights.round(8).tolist(), "training": self.training}

    def save(self, path: str | Path) -> Path:
        from ..files import write_json

        return write_json(path, self.to_dict())


def load_head_weights(path: str | Path) -> HeadWeights:
    """Read a head-weights file; anything else is refused with a one-line error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no head-weights file at {path}; make one with `sparsetrace attribute-fit`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not a head-weights file ({error.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"{path} is not a head-weights file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise InputError(f"{path} is head-weights version {data.get('version')!r}; this sparsetrace reads "
                         f"version {VERSION}")
    weights = np.asarray(data.get("weights"), dtype=np.float64)
    if weights.shape != (data.get("num_layers"), data.get("num_heads")) or not np.isfinite(weights).all():
        raise InputError(f"{path}: the weights are not a finite [num_layers, num_heads] table")
    return HeadWeights(weights, str(data.get("model")), dict(data.get("training") or {}))


def bundled_head_weights(model_name: str | None, num_layers: int, num_heads: int) -> HeadWeights | None:
    """The package's weights for a model of this name and shape, or None."""
    if not model_name:
        return None
    entry = resources.files("sparsetrace") / "data" / "head_weights" / f"{Path(model_name).name}.json"
    if not entry.is_file():
        return None
    weights = load_head_weights(Path(str(entry)))
    return weights if weights.model == model_name and weights.weights.shape == (num_layers, num_heads) else None


def pearson_loss(predictions, targets):
    """AT2's loss: minus the Pearson correlation of each row, mean over rows. predictions, targets [B, M]."""
    p = predictions - predictions.mean(dim=1, keepdim=True)
    t = targets - targets.mean(dim=1, keepdim=True)
    covariance = (p * t).mean(dim=1)
    correlation = covariance / (p.pow(2).mean(dim=1).sqrt() * t.pow(2).mean(dim=1).sqrt() + 1e-8)
    return -correlation.mean()


def mean_pearson(samples: list[AblationSample], weights: np.ndarray) -> float:
    """The fit's objective: the mean over examples of the Pearson correlation, across masks, between the
    predicted sum of the kept sources' scores and the actual value. weights [L, H]."""
    import torch

    values = [-float(pearson_loss(torch.tensor(s.features() @ np.ravel(weights))[None],
                                  torch.tensor(np.asarray(s.outcomes, dtype=np.float64))[None])) for s in samples]
    return float(np.mean(values)) if values else float("nan")


def fit_head_weights(samples: list[AblationSample], *, iterations: int = 1000, learning_rate: float = 1e-3,
                     non_negative: bool = True, seed: int = 0) -> np.ndarray:
    """float64 [L, H]: AT2's linear weights fit on `samples` (module docstring), L1-normalised.

    Starts from uniform weights (the mean over heads), as AT2; full batch (every example each step);
    `non_negative` clamps the weights at 0 after every step.
    """
    import torch

    if not samples:
        raise InputError("no training examples; give at least one (context, query) pair")
    layers, heads, _ = samples[0].mass.shape
    if any(s.mass.shape[:2] != (layers, heads) for s in samples):
        raise InputError("the training examples come from models of different shapes; fit one model at a time")
    usable = [s for s in samples if np.ptp(s.outcomes) > 0 and len(s.outcomes) > 2]
    if not usable:
        raise InputError("no training example's response changes under its ablations; give more or longer "
                         "examples, or more masks")
    torch.manual_seed(seed)
    features = [torch.tensor(s.features()) for s in usable]  # each [M, L * H]
    targets = [torch.tensor(np.asarray(s.outcomes, dtype=np.float64))[None] for s in usable]  # each [1, M]
    weights = torch.full((layers * heads,), 1.0 / (layers * heads), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=learning_rate)
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = sum(pearson_loss((x @ weights)[None], y) for x, y in zip(features, targets, strict=True)) / len(usable)
        loss.backward()
        optimizer.step()
        if non_negative:
            with torch.no_grad():
                weights.clamp_(min=0.0)
    result = weights.detach().numpy()
    return (result / max(np.abs(result).sum(), 1e-12)).reshape(layers, heads)
