"""`Trace`: what a researcher keeps of a sparse forward pass, and its file format.

Per layer l of L, for H heads and n_q = ceil(T / block_q) query blocks, K = sinks + k + local:

    indices[l]  int32   [H, n_q, K]  kept key blocks per row: ascending, distinct, -1 padding at the end,
                                     0 <= j <= last(i) = (min((i+1) * block_q, T) - 1) // block_k
    mass[l]     float32 [H, n_q, K]  mean over the row's queries of the softmax probability summed over
                                     the block's keys; 0 on padding; each row sums to <= 1

    coverage[l] float32 [H, n_q]     under a coverage budget (`StreamConfig.coverage`) only: each row's
                                     estimated share of its attention in its kept blocks, in [0, 1]

A kept block is *forced* (sink or local) iff j < sinks or j > last(i) - local, else *selected*.
Rows keep up to K blocks: fewer where they have fewer candidates, where a k schedule gives them
less, or where a coverage budget needs fewer (the count is the number of indices >= 0).

File format, version "2": one safetensors file. Tensors `token_ids` [T] int32, `layers.{l}.indices`,
`layers.{l}.mass`, `layers.{l}.coverage` under a coverage budget, and `next_token_logits` [vocab]
float32 when present. Version "1" (before coverage budgets) is the same without coverage tensors
and still loads. Metadata (strings): `format` = "sparsetrace", `format_version`, `config` (JSON of
StreamConfig.to_dict()), `model` (JSON of model_info), `extra` (JSON), `created_with`
("sparsetrace <version>"), `created` (UTC ISO time), `sha256`: hex digest over every tensor in
sorted name order of its name's UTF-8 bytes, a zero byte, then its raw little-endian bytes, and
`metadata_sha256`: hex digest over every other metadata entry (`sha256` included) in sorted key
order, of the key's UTF-8 bytes, a zero byte, the value's UTF-8 bytes, a zero byte. Files written
before `metadata_sha256` existed still load, with a note (`SparsetraceWarning`) that their header
is unverified.

Why: safetensors never unpickles, so opening a colleague's trace cannot run code; the version key
lets a later format be refused with a clear message instead of misread; the checksums catch damaged
data that still parses and an edited header (a model, revision or tokenizer name that would load as
genuine and decode the tokens with the wrong vocabulary); and `save` writes a temporary file in the
target folder, fsyncs it and renames it into place, so a crash never leaves a half-written trace
under the real name. Construction and loading share one validator, so whatever loads is a trace the
analyses can trust.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from .blocks import num_blocks, row_key_range
from .config import StreamConfig
from .errors import ConfigError, InputError, SparsetraceWarning, TraceFileError
from .files import atomic_write
from .selection import kept_width

FORMAT = "sparsetrace"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
# Files written before `StreamConfig.search` existed (sparsetrace before commit 54b2904; still format
# version "1") ran the halving search on every row. Their config JSON lacks the key, and filling in
# today's default ("auto") would misdescribe how their blocks were chosen. tests/data holds such a file.
PRE_SEARCH_CONFIG = {"search": "hierarchical"}
try:  # the installed distribution's version, recorded in every file (no upward import of the package)
    VERSION = importlib.metadata.version("sparsetrace")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path that was never pip-installed
    VERSION = "0+unknown"
MODEL_INFO_KEYS = (
    "name", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "sliding_windows"
)
# Row masses are float32 means of softmax sums; allow rounding, not a second distribution.
MASS_TOLERANCE = 1e-3
_FIX = "re-create it with `sparsetrace trace`"
_LAYER_TENSOR = re.compile(r"layers\.(0|[1-9][0-9]{0,8})\.(indices|mass|coverage)")


class InvalidTraceError(ValueError):
    """Arrays or facts given to `Trace` break the trace conventions (a bug in what built them)."""


class Trace:
    """Per layer, head and query block: the kept key blocks and their attention mass.

    Args:
        token_ids: int32 or int64 [T] (kept as int64).
        config: the `StreamConfig` the trace was made with.
        indices: per layer int32 [H, n_q, K], K = `kept_width(T, config)` (sinks + k + local for a fixed k).
        mass: per layer float32 [H, n_q, K].
        model_info: JSON dict with at least the keys in `MODEL_INFO_KEYS`; stored whole.
        next_token_logits: float [vocab], the sparse model's last-position logits (kept as float32).
        extra: small JSON dict of run facts, e.g. {"forward": "sparse", "seconds": 12.3}.
        coverage: per layer float32 [H, n_q], each row's estimated coverage; given exactly when
            `config.coverage` is set.

    Raises `InvalidTraceError` (a ValueError) when the data break the conventions above. Tensors
    are copied to the CPU.
    """

    def __init__(
        self,
        *,
        token_ids: Tensor,
        config: StreamConfig,
        indices: list[Tensor],
        mass: list[Tensor],
        model_info: dict[str, Any],
        next_token_logits: Tensor | None = None,
        extra: dict[str, Any] | None = None,
        coverage: list[Tensor] | None = None,
    ) -> None:
        model_info = _json_copy("model_info", model_info)
        extra = _json_copy("extra", {} if extra is None else extra)
        token_ids, next_token_logits = _cpu(token_ids), _cpu(next_token_logits)
        indices = [_cpu(x) for x in indices] if isinstance(indices, list | tuple) else indices
        mass = [_cpu(x) for x in mass] if isinstance(mass, list | tuple) else mass
        coverage = [_cpu(x) for x in coverage] if isinstance(coverage, list | tuple) else coverage
        _validate(token_ids, config, indices, mass, model_info, next_token_logits)
        _check_coverage(config, coverage, [(x.shape[0], x.shape[1]) for x in indices])
        self._token_ids = token_ids.long()
        self._config = config
        self._indices = list(indices)
        self._mass = list(mass)
        self._coverage = None if coverage is None else list(coverage)
        self._model_info = model_info
        self._logits = None if next_token_logits is None else next_token_logits.float()
        self._extra = extra

    @property
    def num_layers(self) -> int:
        """L: traced attention layers."""
        return len(self._indices)

    @property
    def num_heads(self) -> int:
        """H: query heads per layer."""
        return self._indices[0].shape[0]

    @property
    def num_tokens(self) -> int:
        """T: tokens traced."""
        return self._token_ids.numel()

    @property
    def num_query_blocks(self) -> int:
        """n_q = ceil(T / block_q)."""
        return self._indices[0].shape[1]

    @property
    def num_key_blocks(self) -> int:
        """n_k = ceil(T / block_k)."""
        return num_blocks(self.num_tokens, self._config.block_k)

    @property
    def config(self) -> StreamConfig:
        """The estimator settings the trace was made with."""
        return self._config

    @property
    def token_ids(self) -> Tensor:
        """int64 [T]."""
        return self._token_ids

    @property
    def model_info(self) -> dict[str, Any]:
        """Model facts: name, architecture, layers, heads, sliding windows, ..."""
        return self._model_info

    @property
    def extra(self) -> dict[str, Any]:
        """Run facts, e.g. {"forward": "sparse", "seconds": 12.3}."""
        return self._extra

    @property
    def next_token_logits(self) -> Tensor | None:
        """float32 [vocab]: the sparse model's last-position logits, or None."""
        return self._logits

    def blocks(self, layer: int) -> tuple[Tensor, Tensor]:
        """Kept blocks of one layer: (int32 [H, n_q, K] indices, -1 = empty; float32 [H, n_q, K] mass).

        The tensors are the trace's own (not copies): do not modify them in place.
        """
        if isinstance(layer, bool) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer!r} is out of range; this trace has {self.num_layers} layers "
                             f"(0..{self.num_layers - 1})")
        return self._indices[layer], self._mass[layer]

    def coverage(self, layer: int) -> Tensor | None:
        """float32 [H, n_q]: each row's estimated share of its attention in its kept blocks, under a
        coverage budget; None for a fixed budget (its rows' share is what `check` measures)."""
        self.blocks(layer)  # the range check
        return None if self._coverage is None else self._coverage[layer]

    def kept_counts(self, layer: int) -> Tensor:
        """int64 [H, n_q]: blocks each row keeps, forced ones included."""
        return (self.blocks(layer)[0] >= 0).sum(dim=-1)

    def forced_mask(self, layer: int) -> Tensor:
        """bool [H, n_q, K]: True where the kept block is a forced sink or local block, False for
        blocks the estimator selected and for -1 padding."""
        indices, _ = self.blocks(layer)
        last = self._last_key_block()[None, :, None]
        return (indices >= 0) & ((indices < self._config.sinks) | (indices > last - self._config.local))

    def stats(self) -> dict[str, Any]:
        """Size and sparsity of the trace (L layers, H heads, T tokens, n_q x n_k blocks).

        - `tokens`, `layers`, `heads`, `block_q`, `block_k`, `k`: T, L, H and the config's values.
        - `kept_blocks`: valid (>= 0) block indices over all layers, heads and query blocks;
          `selected_blocks` + `forced_blocks` = `kept_blocks` (forced: sinks and local blocks).
        - `sparsity`: 1 - kept token pairs / (L * H * T(T+1)/2), kept token pairs = the (query t,
          key s) pairs inside kept blocks with s <= t (and t - w < s on a layer with sliding window
          w): the pairs the sparse attention computes, over the causal triangle.
        - `sparsity_selected_only`: the same counting only pairs in selected blocks (what the
          estimator adds on top of sinks and local blocks).
        - `block_sparsity`: 1 - kept_blocks / (L * H * n_q * n_k), over the full block grid (the paper's).
        - `compression`: L * H * T^2 / kept_blocks (the paper's T^2 / (n_q k) per head and layer,
          with the real kept count).
        - `kept_per_row_mean`, `kept_per_row_max`: blocks a (layer, head, query block) row keeps.
        - under a coverage budget, `coverage_mean` (estimated, over rows), `coverage_min` and
          `rows_short_of_coverage`: the share of rows whose candidates ran out before p.
        - `trace_bytes`: bytes of the index, mass (and coverage) tensors (4 + 4 per entry, padding included);
          `dense_pattern_bytes`: L * H * T^2 * 2 (full fp16 attention patterns);
          `dense_to_trace_ratio`: dense_pattern_bytes / trace_bytes.
        """
        layers, heads, tokens = self.num_layers, self.num_heads, self.num_tokens
        kept = forced = pairs = selected_pairs = 0
        for layer in range(layers):
            indices, _ = self.blocks(layer)
            forced_here = self.forced_mask(layer)
            kept += int((indices >= 0).sum())
            forced += int(forced_here.sum())
            layer_pairs = self._kept_pairs(layer)
            pairs += int(layer_pairs.sum())
            selected_pairs += int(layer_pairs[~forced_here].sum())
        triangle = layers * heads * tokens * (tokens + 1) // 2
        dense = layers * heads * tokens * tokens
        trace_bytes = sum(x.numel() * x.element_size() for x in self._indices + self._mass + (self._coverage or []))
        counts = torch.stack([self.kept_counts(layer) for layer in range(layers)]).float()
        budget = {}
        if self._coverage is not None:
            estimated = torch.stack(self._coverage)
            budget = {"coverage": self._config.coverage, "coverage_mean": float(estimated.mean()),
                      "coverage_min": float(estimated.min()),
                      "rows_short_of_coverage": float((estimated < self._config.coverage - 1e-6).float().mean())}
        return {
            "tokens": tokens, "layers": layers, "heads": heads,
            "block_q": self._config.block_q, "block_k": self._config.block_k, "k": self._config.k,
            "kept_blocks": kept, "selected_blocks": kept - forced, "forced_blocks": forced,
            "sparsity": 1 - pairs / triangle,
            "sparsity_selected_only": 1 - selected_pairs / triangle,
            "block_sparsity": 1 - kept / (layers * heads * self.num_query_blocks * self.num_key_blocks),
            "compression": dense / kept if kept else float("inf"),
            "kept_per_row_mean": float(counts.mean()), "kept_per_row_max": int(counts.max()),
            **budget,
            "trace_bytes": trace_bytes,
            "dense_pattern_bytes": dense * 2,
            "dense_to_trace_ratio": dense * 2 / trace_bytes,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the trace to one safetensors file (suffix `.sptrace` recommended), atomically.

        Raises `InputError` when the folder does not exist or the file cannot be written.
        Returns the path written.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise InputError(f"cannot save the trace to {path}: the folder {path.parent} does not exist; "
                             "create it first or choose another path")
        tensors = {"token_ids": self._token_ids.to(torch.int32)}
        for layer in range(self.num_layers):
            tensors[f"layers.{layer}.indices"] = self._indices[layer]
            tensors[f"layers.{layer}.mass"] = self._mass[layer]
            if self._coverage is not None:
                tensors[f"layers.{layer}.coverage"] = self._coverage[layer]
        if self._logits is not None:
            tensors["next_token_logits"] = self._logits
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self._config.to_dict()),
            "model": json.dumps(self._model_info),
            "extra": json.dumps(self._extra),
            "created_with": f"sparsetrace {VERSION}",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "sha256": _checksum(tensors),
        }
        metadata["metadata_sha256"] = _metadata_checksum(metadata)
        return atomic_write(path, safetensors.torch.save(tensors, metadata=metadata), what="the trace")

    def __repr__(self) -> str:
        c = self._config
        return (f"Trace(tokens={self.num_tokens}, layers={self.num_layers}, heads={self.num_heads}, "
                f"k={c.k}, block={c.block_q}/{c.block_k})")

    def _repr_html_(self) -> str:
        """Jupyter: the summary and the interactive viewer (`notebook.trace_html`)."""
        from .notebook import trace_html

        return trace_html(self)

    def _last_key_block(self) -> Tensor:
        """int64 [n_q]: last(i), the last causal key block of each query block."""
        return row_key_range(self.num_tokens, self._config.block_q, self._config.block_k, None)[1]

    def _kept_pairs(self, layer: int) -> Tensor:
        """int64 [H, n_q, K]: causal (and in-window) token pairs of each kept block, 0 on padding.

        Closed form per (row, block): query t in [a, b) sees g(t) = clamp(t - c + 1, 0, n) keys of
        key block [c, c + n) at or before it, and g(t - w) of those fall out of a window w; the sum
        of g over a range of t is a difference of `_clamped_prefix_sum`.
        """
        indices, _ = self.blocks(layer)
        tokens, block_q, block_k = self.num_tokens, self._config.block_q, self._config.block_k
        a = (torch.arange(indices.shape[1]) * block_q)[None, :, None]
        b = torch.clamp(a + block_q, max=tokens)
        c = indices.long() * block_k
        n = torch.clamp(c + block_k, max=tokens) - c
        pairs = _clamped_prefix_sum(b - c, n) - _clamped_prefix_sum(a - c, n)
        window = self._model_info["sliding_windows"][layer]
        if window is not None:
            pairs -= _clamped_prefix_sum(b - window - c, n) - _clamped_prefix_sum(a - window - c, n)
        return torch.where(indices >= 0, pairs, 0)


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace written by `Trace.save`; anything else raises `TraceFileError` with the fix."""
    path = Path(path)
    if not path.exists():
        raise TraceFileError(f"{path}: no such file; check the path or make one with `sparsetrace trace`")
    if path.is_dir():
        raise TraceFileError(f"{path}: is a folder, not a trace file; give the path of a .sptrace file")
    try:
        return _load(path)
    except TraceFileError:
        raise
    except (InvalidTraceError, ConfigError) as exc:
        raise TraceFileError(f"{path}: {_one_line(exc)}; {_FIX}") from exc
    except Exception as exc:  # a damaged file that parses can still upset json or torch
        problem = f"{type(exc).__name__}: {_one_line(exc)}"
        raise TraceFileError(f"{path}: cannot be read ({problem}); {_FIX}") from exc


def _load(path: Path) -> Trace:
    try:
        with safetensors.safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            _check_format(path, metadata)  # before reading tensors: a foreign file may be huge
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except TraceFileError:
        raise
    except Exception as exc:
        raise TraceFileError(f"{path}: not a readable safetensors file ({_one_line(exc)}); it may be "
                             f"truncated or not a trace; {_FIX}") from exc
    if "sha256" not in metadata:
        raise TraceFileError(f"{path}: has no checksum (metadata key 'sha256'); {_FIX}")
    if metadata["sha256"] != _checksum(tensors):
        raise TraceFileError(f"{path}: checksum mismatch, the tensor data is damaged; {_FIX}")
    if "metadata_sha256" not in metadata:
        warnings.warn(f"{path} was written before traces checksummed their header (model, tokenizer, config); it "
                      "loads, but its header is unverified: re-create it with `sparsetrace trace` to have it covered",
                      SparsetraceWarning, stacklevel=3)
    elif metadata["metadata_sha256"] != _metadata_checksum(metadata):
        raise TraceFileError(f"{path}: header checksum mismatch, its metadata (model, tokenizer, config, ...) was "
                             f"edited or damaged; {_FIX}")
    num_layers, has_coverage = _check_tensor_names(path, set(tensors))
    return Trace(
        token_ids=tensors["token_ids"],
        config=StreamConfig.from_dict(PRE_SEARCH_CONFIG | _json_field(metadata, "config")),
        indices=[tensors[f"layers.{layer}.indices"] for layer in range(num_layers)],
        mass=[tensors[f"layers.{layer}.mass"] for layer in range(num_layers)],
        model_info=_json_field(metadata, "model"),
        next_token_logits=tensors.get("next_token_logits"),
        extra=_json_field(metadata, "extra"),
        coverage=[tensors[f"layers.{layer}.coverage"] for layer in range(num_layers)] if has_coverage else None,
    )


def _check_format(path: Path, metadata: dict[str, str]) -> None:
    found = metadata.get("format")
    if found != FORMAT:
        what = "has no 'format' key" if found is None else f"has format {found!r}"
        raise TraceFileError(f"{path}: not a sparsetrace trace (its safetensors metadata {what}, expected "
                             f"{FORMAT!r}); give a file written by `sparsetrace trace` or Trace.save")
    version = metadata.get("format_version")
    if version not in READABLE_VERSIONS:
        raise TraceFileError(f"{path}: trace format version {version!r} is unknown to sparsetrace "
                             f"{VERSION}, which reads version {', '.join(READABLE_VERSIONS)}; a newer "
                             f"sparsetrace may be needed (pip install -U sparsetrace), or {_FIX}")


def _check_tensor_names(path: Path, names: set[str]) -> tuple[int, bool]:
    """The number of layers and whether they have coverage tensors, after checking the file has
    exactly the tensors a trace has."""
    layers = sorted({int(m.group(1)) for name in names if (m := _LAYER_TENSOR.fullmatch(name))})
    if not layers or layers != list(range(len(layers))):
        raise TraceFileError(f"{path}: layer tensors are numbered {layers[:8]}, expected 0, 1, ...; {_FIX}")
    has_coverage = "layers.0.coverage" in names
    kinds = ("indices", "mass", "coverage") if has_coverage else ("indices", "mass")
    expected = {"token_ids"} | {f"layers.{layer}.{kind}" for layer in layers for kind in kinds}
    missing, unexpected = sorted(expected - names), sorted(names - expected - {"next_token_logits"})
    if missing or unexpected:
        raise TraceFileError(f"{path}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}; "
                             f"{_FIX}")
    return len(layers), has_coverage


def _json_field(metadata: dict[str, str], key: str) -> dict[str, Any]:
    if key not in metadata:
        raise InvalidTraceError(f"metadata key {key!r} is missing")
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidTraceError(f"metadata {key!r} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise InvalidTraceError(f"metadata {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def _validate(
    token_ids: Any, config: Any, indices: Any, mass: Any, model_info: dict[str, Any], logits: Any
) -> None:
    """The trace conventions (module docstring), for construction and loading alike."""
    if not isinstance(config, StreamConfig):
        raise InvalidTraceError(f"config must be a StreamConfig, got {type(config).__name__}")
    if not (isinstance(token_ids, Tensor) and token_ids.dim() == 1 and token_ids.numel() > 0
            and token_ids.dtype in (torch.int32, torch.int64)):
        raise InvalidTraceError(f"token_ids must be a non-empty int32/int64 tensor [T], "
                                f"got {_describe(token_ids)}")
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= 2**31:
        raise InvalidTraceError("token_ids must lie in 0 .. 2**31 - 1")
    if not (isinstance(indices, list | tuple) and isinstance(mass, list | tuple) and indices
            and len(indices) == len(mass)):
        raise InvalidTraceError("indices and mass must be non-empty lists with one tensor per layer each")
    tokens = token_ids.numel()
    shape = (num_blocks(tokens, config.block_q), kept_width(tokens, config))
    last = row_key_range(tokens, config.block_q, config.block_k, None)[1]
    heads = indices[0].shape[0] if isinstance(indices[0], Tensor) and indices[0].dim() == 3 else -1
    for layer, (idx, m) in enumerate(zip(indices, mass, strict=True)):
        expect = f"[H={heads}, n_q={shape[0]}, K={shape[1]}] (T={tokens}, block_q={config.block_q})"
        if not (isinstance(idx, Tensor) and idx.dtype == torch.int32 and idx.shape == (heads, *shape)):
            raise InvalidTraceError(f"layer {layer} indices must be int32 {expect}, got {_describe(idx)}")
        if not (isinstance(m, Tensor) and m.dtype == torch.float32 and m.shape == idx.shape):
            raise InvalidTraceError(f"layer {layer} mass must be float32 {expect}, got {_describe(m)}")
        _check_layer(layer, idx, m, last)
    _check_model_info(model_info, len(indices), heads)
    if logits is not None and not (isinstance(logits, Tensor) and logits.is_floating_point()
                                   and logits.dim() == 1 and logits.numel() > 0 and not logits.isnan().any()):
        raise InvalidTraceError(f"next_token_logits must be a float tensor [vocab] without NaN, "
                                f"got {_describe(logits)}")


def _check_coverage(config: StreamConfig, coverage: Any, shapes: list[tuple[int, int]]) -> None:
    """Coverage tensors: present exactly under a coverage budget, float32 [H, n_q] per layer, in [0, 1]."""
    if config.coverage is None:
        if coverage is not None:
            raise InvalidTraceError("coverage tensors belong to a coverage budget, but the config has coverage=None")
        return
    if not (isinstance(coverage, list | tuple) and len(coverage) == len(shapes)):
        raise InvalidTraceError(f"a coverage budget (coverage={config.coverage}) needs one coverage tensor per layer")
    for layer, (c, shape) in enumerate(zip(coverage, shapes, strict=True)):
        if not (isinstance(c, Tensor) and c.dtype == torch.float32 and tuple(c.shape) == shape):
            raise InvalidTraceError(f"layer {layer} coverage must be float32 [H, n_q] = {list(shape)}, "
                                    f"got {_describe(c)}")
        if not bool(((c >= 0) & (c <= 1 + MASS_TOLERANCE)).all()):
            raise InvalidTraceError(f"layer {layer} coverage must lie in [0, 1] (a share of attention)")


def _check_layer(layer: int, indices: Tensor, mass: Tensor, last: Tensor) -> None:
    """indices int32 [H, n_q, K], mass float32 [H, n_q, K], last int64 [n_q]."""
    valid = indices >= 0
    row_checks = (
        (indices < -1, "has an index below -1 (-1 is the only padding value)"),
        (valid & (indices > last[None, :, None]), "keeps a key block after its last causal key block"),
        (valid[..., 1:] & ~valid[..., :-1], "has -1 padding before a kept block (padding goes at the end)"),
        (valid[..., 1:] & (indices[..., 1:] <= indices[..., :-1]), "has kept blocks not strictly ascending "
                                                                   "(unsorted or duplicated)"),
        (~mass.isfinite(), "has a NaN or infinite mass"),
        (mass < 0, "has a negative mass"),
        ((mass != 0) & ~valid, "has mass on -1 padding"),
        (mass.sum(-1, dtype=torch.float64)[..., None] > 1 + MASS_TOLERANCE, "has masses summing past 1"),
    )
    for bad, problem in row_checks:
        if bad.any():
            head, row = (int(v) for v in bad.nonzero()[0][:2])
            raise InvalidTraceError(f"layer {layer}, head {head}, query block {row} {problem}: "
                                    f"indices {indices[head, row].tolist()}, mass {mass[head, row].tolist()}")


def _check_model_info(info: dict[str, Any], layers: int, heads: int) -> None:
    missing = [key for key in MODEL_INFO_KEYS if key not in info]
    if missing:
        raise InvalidTraceError(f"model_info lacks {missing}; it needs {list(MODEL_INFO_KEYS)}")
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
        if not _positive_int(info[key]):
            raise InvalidTraceError(f"model_info[{key!r}] must be a positive integer, got {info[key]!r}")
    if (info["num_layers"], info["num_heads"]) != (layers, heads):
        raise InvalidTraceError(f"model_info says {info['num_layers']} layers x {info['num_heads']} heads, "
                                f"the tensors hold {layers} x {heads}")
    windows = info["sliding_windows"]
    if not (isinstance(windows, list) and len(windows) == layers
            and all(w is None or _positive_int(w) for w in windows)):
        raise InvalidTraceError(f"model_info['sliding_windows'] must list {layers} positive ints or None "
                                f"(one per layer), got {windows!r}")


def _json_copy(name: str, value: Any) -> dict[str, Any]:
    """A copy that survives JSON unchanged, so a saved and reloaded trace compares equal."""
    if not isinstance(value, dict):
        raise InvalidTraceError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidTraceError(f"{name} must be JSON-serialisable: {exc}") from exc


def _checksum(tensors: dict[str, Tensor]) -> str:
    """sha256 over every tensor in sorted name order: name, a zero byte, the raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _metadata_checksum(metadata: dict[str, str]) -> str:
    """sha256 over every metadata entry but `metadata_sha256` in sorted key order: key, a zero byte,
    value, a zero byte."""
    digest = hashlib.sha256()
    for key in sorted(set(metadata) - {"metadata_sha256"}):
        digest.update(key.encode() + b"\0" + metadata[key].encode() + b"\0")
    return digest.hexdigest()


def _clamped_prefix_sum(m: Tensor, n: Tensor) -> Tensor:
    """sum over y <= m of clamp(y, 0, n), elementwise (int64)."""
    inside = torch.minimum(torch.clamp(m, min=0), n)
    return inside * (inside + 1) // 2 + torch.clamp(m - n, min=0) * n


def _cpu(x: Any) -> Any:
    """A CPU copy of a tensor (owned by the trace), anything else unchanged for the validator."""
    return x.detach().to("cpu", copy=True).contiguous() if isinstance(x, Tensor) else x


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _describe(x: Any) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]
