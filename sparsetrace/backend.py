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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from .block_attention import block_sparse_attention
from .config import StreamConfig
from .errors import InputError, UnsupportedModelError
from .models import check_config_supported
from .stream import Selection, select_blocks

ATTENTION_NAME = "sparsetrace"

LayerCallback = Callable[[int, Selection, Tensor], None]


@dataclass
class _Run:
    config: StreamConfig
    on_layer: LayerCallback


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
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise UnsupportedModelError("sparsetrace traces one plain causal forward pass without a KV cache; "
                                    "call the model with use_cache=False and no attention mask")
    if dropout:
        raise UnsupportedModelError("attention dropout is active; call model.eval() before tracing")
    selection = select_blocks(query, key, run.config, scaling=scaling, sliding_window=sliding_window)
    out, mass = block_sparse_attention(
        query, key, value, selection.indices,
        block_q=run.config.block_q, block_k=run.config.block_k,
        scaling=scaling, sliding_window=sliding_window, softcap=softcap,
    )
    run.on_layer(module.layer_idx, selection, mass)
    return out.transpose(1, 2).contiguous(), None


def plain_causal_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> None:
    """Mask function registered as "sparsetrace": accept plain causal text only, build nothing."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise InputError("padded batches are not supported; trace one text at a time (batch size 1, no padding)")
    if q_offset or kv_offset or q_length != kv_length:
        raise UnsupportedModelError("sparsetrace traces a full forward pass; do not pass a KV cache")
    if not allow_is_causal_skip:
        raise UnsupportedModelError(
            "this model asks for a non-causal attention pattern (packed sequences, image tokens or "
            "bidirectional spans); sparsetrace traces plain causal text"
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
def sparse_attention(model: PreTrainedModel, config: StreamConfig, on_layer: LayerCallback) -> Iterator[None]:
    """Run `model` on Stream sparse attention inside the block; restore its attention after.

    `on_layer(layer_idx, selection, mass)` is called once per attention layer per forward pass.
    """
    check_supported(model)
    previous = model.config._attn_implementation
    token = _ACTIVE.set(_Run(config, on_layer))
    try:
        model.set_attn_implementation(ATTENTION_NAME)
        if model.config._attn_implementation != ATTENTION_NAME:
            raise UnsupportedModelError(f"{type(model).__name__} refused to switch its attention implementation")
        yield
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)
