"""Run a Hugging Face model on Stream's sparse attention, layer by layer.

transformers (5.x) lets a model's attention layers call any function registered in its
`AttentionInterface`. We register `stream_attention_forward` under the name "sparsetrace": each
layer hands it q and k after RoPE (and any q/k norm) as [B, H, T, d] / [B, H_kv, T, d], it
selects the blocks, computes the block-sparse attention and reports (layer, selection, mass)
to the active run. The next layer therefore sees the sparse output: the whole model runs sparse.

The same name is registered in `AttentionMaskInterface`, otherwise transformers would hand us
`attention_mask=None` even for padded batches. Our mask function builds no T x T mask: it checks
that the request is plain causal text (no padding, no cache offset, no packed sequences or
bidirectional spans) and refuses anything else; causality and sliding windows are applied
inside the block computation from the `sliding_window` keyword each layer passes.

`sparse_attention(model, ...)` switches a model to this backend and always switches it back.

Causal checks (`interventions`) ride on the same function: a per-layer `LayerKnockout` hides keys
inside the kept blocks and removes heads' outputs. forward="exact" runs them on dense attention
(the model's own where a layer knocks out no span, `dense.dense_attention` where it does), with
no selection and, unlike the sparse pass, on a KV cache too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from .block_attention import block_sparse_attention, flex_block_attention
from .config import StreamConfig
from .dense import dense_attention, dense_block_mass
from .errors import InputError, UnsupportedModelError
from .interventions import LayerKnockout
from .kernels import check_kernel, choose_kernel
from .models import check_config_supported
from .selection import Selection, fit_to_input
from .stream import select_blocks

ATTENTION_NAME = "sparsetrace"

FORWARDS = ("sparse", "dense", "exact")


@dataclass(frozen=True)
class LayerRecord:
    """What one attention layer reports during a traced forward pass.

    Attributes:
        layer: the layer index.
        selection: the kept blocks Stream chose from this layer's q and k.
        mass: float32 [B, H, n_q, K] attention mass of each kept block: renormalised over the kept
            blocks (forward="sparse", rows sum to 1) or under the model's full attention
            (forward="dense", rows sum to the recall).
        block_mass: float32 [B, H, n_q, n_k], the dense mass of every block (forward="dense" only).
        query, key: the layer's q [B, H, T, d] and k [B, H_kv, T, d] as the attention saw them
            (references, no copy: keep them only if you need them, e.g. to try other estimators).
        scaling, sliding_window: the layer's softmax scale and window.
    """

    layer: int
    selection: Selection
    mass: Tensor
    block_mass: Tensor | None = None
    query: Tensor | None = None
    key: Tensor | None = None
    scaling: float | None = None
    sliding_window: int | None = None


LayerCallback = Callable[[LayerRecord], None]
# (layer, first query block of the chunk, probs [B, H, c, block_q, K * block_k], indices [B, H, c, K]):
# see `block_attention`'s module docstring.
ProbabilityCallback = Callable[[int, int, Tensor, Tensor], None]


@dataclass
class _Run:
    config: StreamConfig
    on_layer: LayerCallback
    forward: str
    original: str  # the model's own attention implementation
    on_probabilities: ProbabilityCallback | None = None
    kernel: str = "auto"  # `kernels.KERNELS`
    knockouts: list[LayerKnockout | None] | None = None  # per layer (`interventions`)
    prefix_cache: bool = False  # forward="sparse" may run a suffix on a cached prefix (`ablation`)
    layers_seen: set[int] = field(default_factory=set)


_ACTIVE: ContextVar[_Run | None] = ContextVar("sparsetrace_run", default=None)


def stream_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The attention function transformers calls in every layer (registered as "sparsetrace").

    Args:
        query: [B, H, T, d]; key, value: [B, H_kv, T, d] (not repeated over head groups).
    Returns:
        ([B, T, H, d] attention output, None): transformers' convention.
    """
    run = _ACTIVE.get()
    if run is None:
        raise RuntimeError("the sparsetrace attention runs only inside `sparse_attention(model, ...)`")
    if s_aux is not None:
        raise UnsupportedModelError("this model uses learned attention sinks (s_aux, e.g. gpt-oss), "
                                    "which sparsetrace does not support yet; use a model without them")
    run.layers_seen.add(module.layer_idx)
    knock = run.knockouts[module.layer_idx] if run.knockouts else None
    if run.forward == "exact":
        if knock is not None and knock.hidden_from is not None:
            out = dense_attention(query, key, value, scaling=scaling, sliding_window=sliding_window, softcap=softcap,
                                  hidden_from=knock.hidden_from.to(query.device))
        else:
            out = _model_attention(module, run.original)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                sliding_window=sliding_window, softcap=softcap, **kwargs,
            )[0]
        return (out if knock is None else knock.remove_heads(out)), None
    cached = key.shape[2] - query.shape[2]  # positions of a cached prefix
    if (cached and not run.prefix_cache) or (attention_mask is not None and run.forward == "sparse"):
        raise UnsupportedModelError("sparsetrace traces one plain causal forward pass without a KV cache; "
                                    "call the model with use_cache=False and no attention mask")
    if dropout:
        raise UnsupportedModelError("attention dropout is active; call model.eval() before tracing")
    config = fit_to_input(key.shape[2], run.config)  # a k past the blocks that exist would only pad
    if cached % config.block_q:
        raise UnsupportedModelError(f"a cached prefix of {cached} positions does not end on a query block boundary "
                                    f"(block_q={config.block_q}); cache a multiple of block_q positions")
    first_row = cached // config.block_q
    kernel = choose_kernel(run.kernel, query.device, probabilities=run.on_probabilities is not None)
    hidden_from = None if knock is None or knock.hidden_from is None else knock.hidden_from.to(query.device)
    if hidden_from is not None or (first_row and kernel == "flex"):
        kernel = "eager"  # the knockout mask and the row offset live in the eager block attention
    selection = select_blocks(query, key, config, scaling=scaling, sliding_window=sliding_window,
                              compiled=kernel == "compile", first_row=first_row)
    if run.forward == "sparse":
        blocks = dict(block_q=config.block_q, block_k=config.block_k, scaling=scaling, sliding_window=sliding_window,
                      softcap=softcap)
        if kernel == "flex":
            out, mass = flex_block_attention(query, key, value, selection.indices, **blocks)
        else:
            hook = None if run.on_probabilities is None else partial(run.on_probabilities, module.layer_idx)
            out, mass = block_sparse_attention(query, key, value, selection.indices, **blocks, on_probabilities=hook,
                                               compiled=kernel == "compile", hidden_from=hidden_from,
                                               first_row=first_row)
        run.on_layer(LayerRecord(module.layer_idx, selection, mass, None, query, key, scaling, sliding_window))
        out = out.transpose(1, 2).contiguous()
        return (out if knock is None else knock.remove_heads(out)), None
    # forward="dense": the model's own attention computes the output; we only measure.
    block_mass = dense_block_mass(query, key, block_q=config.block_q, block_k=config.block_k, scaling=scaling,
                                  sliding_window=sliding_window, softcap=softcap)
    kept = selection.indices.long()
    mass = block_mass.gather(-1, kept.clamp(min=0)) * (kept >= 0)
    run.on_layer(LayerRecord(module.layer_idx, selection, mass, block_mass, query, key, scaling, sliding_window))
    return _model_attention(module, run.original)(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
        sliding_window=sliding_window, softcap=softcap, **kwargs,
    )


def _model_attention(module: torch.nn.Module, name: str) -> Callable:
    """The attention function the model itself would call (transformers' dispatch rule)."""
    if name == "eager":
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise UnsupportedModelError(f"{type(module).__name__} has no eager attention function; "
                                        "load the model with attn_implementation='sdpa'")
        return eager
    return AttentionInterface._global_mapping[name]


def plain_causal_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> Tensor | None:
    """Mask function registered as "sparsetrace": accept plain causal text only; build nothing
    (forward="sparse") or the model's own mask (forward="dense")."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise InputError("padded batches are not supported; trace one text at a time (batch size 1, no padding)")
    run = _ACTIVE.get()
    cached = run is not None and (run.forward == "exact" or run.prefix_cache)  # may run on a cache
    if not cached and (q_offset or kv_offset or q_length != kv_length):
        raise UnsupportedModelError("sparsetrace traces a full forward pass; do not pass a KV cache")
    if not allow_is_causal_skip:
        raise UnsupportedModelError(
            "this model asks for a non-causal attention pattern (packed sequences, image tokens or "
            "bidirectional spans); sparsetrace traces plain causal text"
        )
    if run is not None and run.forward in ("dense", "exact"):  # the model's own attention needs its own mask
        return AttentionMaskInterface._global_mapping[run.original](
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            attention_mask=attention_mask, allow_is_causal_skip=allow_is_causal_skip, **kwargs,
        )
    return None


AttentionInterface.register(ATTENTION_NAME, stream_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, plain_causal_mask)


def check_supported(model: PreTrainedModel) -> None:
    """Refuse, before any work, models whose attention we cannot run sparsely."""
    check_config_supported(model.config, type(model).__name__)
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not route its attention through transformers' AttentionInterface, so its "
            "attention cannot be replaced; use a model whose modeling code does (Llama, Qwen, Mistral, Gemma, Phi-3...)"
        )
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            raise UnsupportedModelError(f"{name} uses learned attention sinks (s_aux), which sparsetrace "
                                        "does not support yet; use a model without them")
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx") and not module.is_causal:
            raise UnsupportedModelError(f"{name} has non-causal attention layers; sparsetrace traces causal LMs")


@contextmanager
def sparse_attention(
    model: PreTrainedModel,
    config: StreamConfig,
    on_layer: LayerCallback,
    forward: str = "sparse",
    on_probabilities: ProbabilityCallback | None = None,
    kernel: str = "auto",
    knockouts: list[LayerKnockout | None] | None = None,
    prefix_cache: bool = False,
) -> Iterator[_Run]:
    """Run `model` on Stream sparse attention inside the block; restore its attention after.

    `on_layer(record)` receives a `LayerRecord` once per attention layer per forward pass. With
    forward="dense" the blocks are still selected and measured, but the model keeps its own
    dense attention output (so the selection is measured on the unmodified model's q and k).
    `on_probabilities(layer, rows, probs, indices)`, if given, sees every query chunk's
    probabilities over its kept keys (forward="sparse" only: a dense forward has no sparse
    probabilities; for dense values trace with k covering every block, which equals dense attention).
    `kernel` chooses the code that runs them (`kernels`: auto, eager, compile or flex); the same result.
    forward="exact" runs the model's dense attention with `knockouts` applied and measures nothing.
    `knockouts` (per layer, `interventions.LayerKnockout` or None) apply to the "sparse" and "exact"
    forwards; the layers that ran are in the yielded run's `layers_seen`. `prefix_cache` lets a sparse
    forward run a suffix on a KV cache of a prefix that ends on a query block boundary (the rows from
    there on are selected and attended; the layer records then hold those rows only).
    """
    if forward not in FORWARDS:
        raise InputError(f"forward={forward!r}; use 'sparse' (the model runs on the kept blocks) or 'dense'")
    if on_probabilities is not None and forward != "sparse":
        raise InputError("probability reducers (e.g. sentence attention) run on the sparse forward only; use "
                         "forward='sparse' (for dense values: a k that covers every key block)")
    check_kernel(kernel)
    check_supported(model)
    previous = model.config._attn_implementation
    if knockouts is not None and forward == "dense":
        raise InputError("knockouts apply to forward='sparse' or 'exact', not to a dense measuring trace")
    if forward != "sparse" and previous not in AttentionMaskInterface._global_mapping:
        raise UnsupportedModelError(f"forward={forward!r} needs one of transformers' own attention implementations, "
                                    f"not {previous!r}; load the model with attn_implementation='sdpa'")
    if prefix_cache and forward != "sparse":
        raise InputError("prefix_cache applies to forward='sparse' (forward='exact' always accepts a cache)")
    run = _Run(config, on_layer, forward, previous, on_probabilities, kernel, knockouts, prefix_cache)
    token = _ACTIVE.set(run)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        if model.config._attn_implementation != ATTENTION_NAME:
            raise UnsupportedModelError(f"{type(model).__name__} refused to switch its attention implementation")
        yield run
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)
