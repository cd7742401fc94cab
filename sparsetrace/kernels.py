"""Execution paths ("kernels"): the same estimator and block attention, run by different code.

- "eager": the readable code of `stream.py` and `block_attention.py`; the reference every other
  path is tested against.
- "compile": the same code with its hot per-chunk functions (`stream._search_round`,
  `stream._rank_span`, `block_attention._attend_chunk`) under `torch.compile(dynamic=True)`: the
  sizes are symbolic, so a new sequence length reuses the compiled code. Each function still
  compiles a few variants, a bounded set met at the first lengths, not one per length: a chunk or
  span of one block, masked chunks or not, a sliding window or softcap or not (benchmarks/fast_paths
  counts the graphs compiled after each length).
- "flex": the block attention by torch's `flex_attention`, compiled, over a
  `BlockMask.from_kv_blocks` of the kept blocks (`block_attention.flex_block_attention`); the
  estimator runs eager.
- "auto" (default): the fastest for the device. On CPU "eager": in benchmarks/fast_paths no other
  path was faster than eager for estimator plus attention at 4k-32k tokens, and compiling makes a
  process's first calls take seconds. On CUDA "flex", not measured here (no GPU): flex_attention's
  fused kernels are what it is built for.

Fallbacks: a request a path cannot serve runs eager. The `on_probabilities` hook (e.g. sentence
attention, `analysis.anchors`) needs the probabilities over the kept keys, which flex_attention
never materialises, so "flex" (and "auto" on CUDA) run eager with a hook. forward="dense" keeps
the model's own attention whatever the kernel; only its estimator follows "compile".
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # torch loads where a kernel runs, not where the command line lists KERNELS
    import torch

KERNELS = ("auto", "eager", "compile", "flex")


def check_kernel(kernel: str) -> str:
    """`kernel`, or an `InputError` naming the choices."""
    if kernel not in KERNELS:
        raise InputError(f"kernel={kernel!r}; use one of {', '.join(KERNELS)} (auto picks the fastest for the "
                         "device; eager is the reference)")
    return kernel


def choose_kernel(kernel: str, device: torch.device, *, probabilities: bool = False) -> str:
    """The path that runs: "eager", "compile" or "flex".

    Args:
        kernel: one of `KERNELS`.
        device: where the layer's q and k are.
        probabilities: an `on_probabilities` hook wants the kept-key probabilities.
    """
    check_kernel(kernel)
    if kernel == "auto":
        kernel = "flex" if device.type == "cuda" else "eager"
    if kernel == "flex" and probabilities:
        return "eager"
    return kernel


@cache
def compiled_version(function: Callable) -> Callable:
    """`function` under `torch.compile(dynamic=True)`, built once per process and shared.

    Built on first use, not at import: importing torch's compiler costs seconds. Duck sizing is off
    while it compiles: it would tie sizes that happen to be equal on the first call (at 4k tokens,
    64 key blocks and 64 tokens a block) and compile again once a new length parts them.
    """
    import torch
    from torch.fx.experimental import _config as shapes

    return shapes.patch(use_duck_shape=False)(torch.compile(function, dynamic=True))
