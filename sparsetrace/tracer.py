"""`trace()`: one forward pass of the model on sparse attention, recorded as a `Trace`.

Every attention layer selects its blocks with Stream, attends only to them and reports its
selection and block masses; the tracer keeps them (on the CPU, int32/float32) and the sparse
model's last-position logits. Before any work it checks the input: not empty, within the
model's context (or explicitly allowed past it), in blocks no longer than itself, and within the
machine's free memory. A k above the blocks the input has is clamped to them (the same selection,
without padding every row to k) with a note, a `SparsetraceWarning`, which the CLI prints as one
line; the trace records the k it used.

>>> tr = trace(model, tokenizer, "Some long text ...", StreamConfig(k=8))   # doctest: +SKIP
>>> tr.stats()["sparsity"]                                                     # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
import warnings

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .backend import LayerCallback, LayerRecord, ProbabilityCallback, sparse_attention
from .blocks import num_blocks
from .config import StreamConfig
from .errors import InputError, MemoryRequestError, SparsetraceWarning, UnsupportedModelError
from .models import describe_model, execution_devices, forward_logits, forward_sizes
from .selection import fit_to_input, kept_width, selectable_blocks
from .trace import Trace

# Inputs at least this long get a progress bar over layers by default.
PROGRESS_MIN_TOKENS = 2048
# Blocks up to the default size are fine on shorter inputs (one partial block); longer ones must fit the input.
LONGEST_SHORT_BLOCK = StreamConfig().block_size


def trace(
    model,
    tokenizer,
    text: str | None = None,
    config: StreamConfig | None = None,
    *,
    input_ids: Tensor | list[int] | None = None,
    forward: str = "sparse",
    max_tokens: int | None = None,
    allow_long: bool = False,
    progress: bool | None = None,
    kernel: str = "auto",
) -> Trace:
    """Trace one text (or token ids) through `model` running on Stream sparse attention.

    Args:
        model, tokenizer: from `load_model()` (any Hugging Face causal LM).
        text: the input text; or give `input_ids` instead (int [T] or [1, T]).
        config: the estimator's settings (default `StreamConfig()`).
        forward: "sparse" (default): every layer attends only to its kept blocks, later layers
            see the sparse outputs. "dense": the model keeps its own dense attention and the
            trace records the selection, with the dense attention mass of each kept block
            (each row then sums to its recall).
        max_tokens: keep only the first `max_tokens` tokens.
        allow_long: trace past the model's trained context instead of refusing.
        progress: show a progress bar over layers (default: for inputs >= 2048 tokens).
        kernel: the code that runs the estimator and block attention (`kernels`): "auto" (default,
            the fastest for the device), "eager" (the reference), "compile" or "flex"; the same trace.
    Returns:
        the `Trace`: per layer the kept blocks and their masses, the token ids, the model's
        next-token logits; its `config` is `config` with k clamped to the input's blocks
        (`selection.fit_to_input`), the budget actually used.
    """
    config = config or StreamConfig()
    ids = prepare_input(model, tokenizer, text, input_ids, config, max_tokens=max_tokens, allow_long=allow_long,
                        forward=forward)
    return run_trace(model, tokenizer, ids, config, forward=forward, progress=progress, kernel=kernel)[0]


def prepare_input(
    model,
    tokenizer,
    text: str | None,
    input_ids: Tensor | list[int] | None,
    config: StreamConfig,
    *,
    max_tokens: int | None = None,
    allow_long: bool = False,
    forward: str = "sparse",
    continuation: int = 0,
) -> Tensor:
    """The input as int64 [T], refused early when empty, too long, cut into blocks longer than itself
    or too big for free memory.

    `continuation`: positions a later pass appends (a teacher-forced answer); the prompt and they
    must fit the context together, checked now rather than after the dense work. Notes (a
    `SparsetraceWarning` each): an input cut by `max_tokens`, a k clamped to the blocks that exist
    (`selection.fit_to_input`; the trace records the k it used).
    """
    ids = _token_ids(tokenizer, text, input_ids)
    if max_tokens is not None:
        if max_tokens < 1:
            raise InputError(f"max_tokens={max_tokens}; use a positive number of tokens")
        if len(ids) > max_tokens:
            warnings.warn(f"the input is {len(ids):,} tokens; kept the first {max_tokens:,} (max_tokens / "
                          "--max-tokens)", SparsetraceWarning, stacklevel=2)
        ids = ids[:max_tokens]
    _check_length(len(ids), describe_model(model).get("max_positions"), allow_long, continuation)
    _check_blocks(len(ids), config)
    _note_clamped_budget(len(ids) + continuation, config)
    check_memory(model, len(ids) + continuation, config, forward=forward)
    return ids


def run_trace(
    model,
    tokenizer,
    ids: Tensor,
    config: StreamConfig,
    *,
    forward: str = "sparse",
    logits_to_keep: int = 1,
    progress: bool | None = None,
    on_layer: LayerCallback | None = None,
    on_probabilities: ProbabilityCallback | None = None,
    kernel: str = "auto",
    cache: dict | None = None,
) -> tuple[Trace, Tensor]:
    """One traced forward pass over checked token ids (see `prepare_input`).

    Args:
        ids: int64 [T].
        logits_to_keep: how many final positions' logits to return.
        on_layer: also called with every layer's `LayerRecord` (e.g. to keep dense block masses).
        on_probabilities: a reducer of every query chunk's kept-key probabilities, as
            `backend.sparse_attention` (e.g. `analysis.anchors.UnitAttention`); forward="sparse" only.
        kernel: as `trace`.
        cache: a `models.kv_cache` for the forward to fill (forward="dense": decoding can go on from it).
    Returns:
        the `Trace`, and float32 [logits_to_keep, vocab] logits of the last positions.
    """
    info = describe_model(model)
    config = fit_to_input(len(ids), config)  # what the layers select with, so what the trace records
    num_layers = info["num_layers"]
    indices: list[Tensor | None] = [None] * num_layers
    masses: list[Tensor | None] = [None] * num_layers
    coverage: list[Tensor | None] = [None] * num_layers
    show = len(ids) >= PROGRESS_MIN_TOKENS if progress is None else progress
    bar = tqdm(total=num_layers, desc=f"tracing {len(ids):,} tokens ({forward})", unit="layer", disable=not show)

    def record(layer: LayerRecord) -> None:
        indices[layer.layer] = layer.selection.indices[0].to("cpu", torch.int32)
        masses[layer.layer] = layer.mass[0].to("cpu", torch.float32)
        if layer.selection.coverage is not None:
            coverage[layer.layer] = layer.selection.coverage[0].to("cpu", torch.float32)
        if on_layer is not None:
            on_layer(layer)
        bar.update(1)

    started = time.perf_counter()
    switched = sparse_attention(model, config, record, forward=forward, on_probabilities=on_probabilities,
                                kernel=kernel)
    with bar, switched:
        logits = forward_logits(model, ids, keep=logits_to_keep, cache=cache).float().cpu()
    seconds = time.perf_counter() - started
    missing = [layer for layer, x in enumerate(indices) if x is None]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__}: attention layers {missing} never called the sparse attention, "
            "so the model is not fully traced; this architecture is not supported"
        )
    result = Trace(
        token_ids=ids,
        config=config,
        indices=indices,
        mass=masses,
        model_info=info | {"tokenizer": getattr(tokenizer, "name_or_path", None)},
        next_token_logits=logits[-1],
        extra={"forward": forward, "seconds": round(seconds, 3)},
        coverage=coverage if config.coverage is not None else None,
    )
    return result, logits


def _token_ids(tokenizer, text: str | None, input_ids: Tensor | list[int] | None) -> Tensor:
    """The input as int64 [T], with clear errors for empty or ambiguous input."""
    if (text is None) == (input_ids is None):
        raise InputError("give either text or input_ids (exactly one of them)")
    if input_ids is None:
        if not text or not text.strip():
            raise InputError("the text is empty; give a non-empty text (a file path or '-' for standard input)")
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    else:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise InputError(f"input_ids has shape {tuple(ids.shape)}; give one sequence, shape [T] or [1, T]")
    if ids.numel() == 0:
        raise InputError("the input has no tokens; give a non-empty text")
    return ids.long()


def _check_length(tokens: int, context: int | None, allow_long: bool, continuation: int = 0) -> None:
    if context is None or tokens + continuation <= context or allow_long:
        return
    if continuation == 0:
        raise InputError(
            f"the input is {tokens:,} tokens, longer than the model's {context:,}-token context; shorten it, "
            f"keep the first {context:,} tokens (max_tokens / --max-tokens), or trace past the trained "
            "context anyway (allow_long=True / --allow-long)"
        )
    raise InputError(
        f"the input is {tokens:,} tokens and its continuation takes up to {continuation} more positions: "
        f"{tokens + continuation:,}, longer than the model's {context:,}-token context; shorten the input to "
        f"{context - continuation:,} tokens or fewer (max_tokens / --max-tokens, or --length), or run past the "
        "trained context anyway (allow_long=True / --allow-long)"
    )


def _check_blocks(tokens: int, config: StreamConfig) -> None:
    """Refuse blocks longer than the input (and than the default block): they would only pad it, to
    as many tokens as a block holds in every layer's buffers."""
    longest = max(tokens, LONGEST_SHORT_BLOCK)
    for name in ("block_q", "block_k"):
        size = getattr(config, name)
        if size > longest:
            raise InputError(
                f"{name}={size:,} tokens is longer than the {tokens:,}-token input, which it would pad to {size:,} "
                f"tokens; use blocks of at most {longest:,} tokens (--block-size, e.g. 64)"
            )


def _note_clamped_budget(tokens: int, config: StreamConfig) -> None:
    """Say once that a budget beyond the input's blocks is clamped (`selection.fit_to_input`)."""
    fitted = fit_to_input(tokens, config)
    if fitted == config:
        return
    asked, used = (config.k, fitted.k) if fitted.k != config.k else (config.k_max, fitted.k_max)
    name = "k" if fitted.k != config.k else "k_max"
    warnings.warn(
        f"{name}={asked:,} is more than the {selectable_blocks(tokens, config):,} key blocks a row of this "
        f"{tokens:,}-token input can select ({num_blocks(tokens, config.block_k):,} blocks of {config.block_k} "
        f"tokens); every row keeps all it can, and the trace records {name}={used:,}",
        SparsetraceWarning, stacklevel=3,
    )


def estimate_memory(model, tokens: int, config: StreamConfig, forward: str = "sparse") -> int:
    """Bytes a trace of `tokens` tokens needs beyond the loaded weights (a deliberate over-estimate).

    Peak activations of one layer (hidden states, q/k/v, MLP intermediate), the estimator's and
    block attention's chunks, and the trace itself; nothing grows as T^2 in a sparse trace. The
    block buffers count padding: q/k/v cut into blocks are padded to whole blocks, and one chunk
    holds at least one query block's scores over its K kept key blocks, [H, block_q, K * block_k]
    float32, with its probabilities and masks. A dense-forward trace adds the model's own attention
    mask (T^2 bytes on sliding-window layers) and one layer's dense block masses.
    """
    info = describe_model(model)
    heads = info["num_heads"]
    sizes = forward_sizes(model)
    qkv = 4 * (heads + 2 * info["num_kv_heads"]) * info["head_dim"]
    per_token = 8 * sizes["hidden"] + 4 * sizes["intermediate"] + qkv
    n_q, width = num_blocks(tokens, config.block_q), kept_width(tokens, fit_to_input(tokens, config))
    padded = max(n_q * config.block_q, num_blocks(tokens, config.block_k) * config.block_k)
    activations = (tokens * per_token + (padded - tokens) * qkv) * sizes["element_bytes"]
    chunk = 4 * 4 * max(1 << 20, heads * config.block_q * width * config.block_k)  # scores, probs, masks
    stored = info["num_layers"] * heads * n_q * width * 8
    if forward == "dense":
        stored += tokens * tokens + 2 * heads * n_q * num_blocks(tokens, config.block_k) * 4
    return activations + chunk + stored + (512 << 20)


def available_memory() -> int:
    """Bytes the OS reports as available (MemAvailable), or total memory if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(model, tokens: int, config: StreamConfig, forward: str = "sparse") -> None:
    """Refuse, before starting, a request the machine's free memory cannot hold.

    Checked when any layer computes on the CPU (also a model split by accelerate across CPU, disk and
    GPUs, whose offloaded weights sit on "meta"); GPU memory is left to the GPU's own error.
    """
    if torch.device("cpu") not in execution_devices(model):
        return
    need, have = estimate_memory(model, tokens, config, forward), available_memory()
    if need > have:
        raise MemoryRequestError(
            f"tracing {tokens:,} tokens needs about {need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB is "
            "available; shorten the input (max_tokens / --max-tokens), use smaller blocks (--block-size) or free "
            "memory"
        )
