"""sparsetrace: per-head sparse attention traces of long-context language models.

>>> import sparsetrace as st                                        # doctest: +SKIP
>>> model, tokenizer = st.load_model()                              # doctest: +SKIP
>>> tr = st.trace(model, tokenizer, text, st.StreamConfig(k=8))     # doctest: +SKIP
>>> tr.save("run.sptrace"); st.load_trace("run.sptrace").stats()    # doctest: +SKIP

The public names load on first use (PEP 562): `import sparsetrace` and the `sparsetrace` command's
`--help` must not pay torch's and transformers' import (seconds; benchmarks/cli_latency).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types

try:  # the installed distribution's version (pyproject.toml), as trace files record it
    __version__ = importlib.metadata.version("sparsetrace")
except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path that was never pip-installed
    __version__ = "0+unknown"

# Public name -> the module that defines it.
_EXPORTS = {
    "AblationResult": ".ablation",
    "response_logprobs": ".ablation",
    "Flow": ".analysis.flow",
    "flow": ".analysis.flow",
    "NeedleRoute": ".analysis.routes",
    "Route": ".analysis.routes",
    "flow_graph": ".analysis.routes",
    "needle_route": ".analysis.routes",
    "route": ".analysis.routes",
    "Salience": ".analysis.salience",
    "salience": ".analysis.salience",
    "block_sparse_attention": ".block_attention",
    "StreamConfig": ".config",
    "ConfigError": ".errors",
    "InputError": ".errors",
    "MemoryRequestError": ".errors",
    "SparsetraceError": ".errors",
    "TraceFileError": ".errors",
    "UnsupportedModelError": ".errors",
    "FidelityReport": ".fidelity",
    "MinCoverageResult": ".fidelity",
    "MinKResult": ".fidelity",
    "check": ".fidelity",
    "min_coverage": ".fidelity",
    "min_k": ".fidelity",
    "Intervention": ".interventions",
    "describe_model": ".models",
    "load_model": ".models",
    "load_tokenizer": ".models",
    "build_report": ".report",
    "report": ".report",
    "Selection": ".selection",
    "select_blocks": ".stream",
    "AnchorsResult": ".tasks.anchor_runs",
    "AnchorText": ".tasks.anchor_runs",
    "anchors": ".tasks.anchor_runs",
    "Attribution": ".tasks.attribution_runs",
    "attribute": ".tasks.attribution_runs",
    "attribution_prompt": ".tasks.attribution_runs",
    "ReaderKnockout": ".tasks.needle_causal",
    "reader_head_knockout": ".tasks.needle_causal",
    "NiahRun": ".tasks.needle_runs",
    "run_niah": ".tasks.needle_runs",
    "sparse_answer": ".tasks.needle_runs",
    "sweep": ".tasks.needle_runs",
    "NiahPrompt": ".tasks.niah",
    "niah_prompt": ".tasks.niah",
    "ruler_prompts": ".tasks.niah",
    "SuppressionResult": ".tasks.suppression",
    "suppression_matrix": ".tasks.suppression",
    "Trace": ".trace",
    "load_trace": ".trace",
    "trace": ".tracer",
}


def __getattr__(name: str):
    """Import the module behind a public name on first use and keep the name."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """`st.trace` and `st.report` are functions, yet `sparsetrace.trace` and `sparsetrace.report` are also
    modules, which the import system binds on the package when they load: keep the functions' names free."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("trace", "report") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "AblationResult",
    "Intervention",
    "response_logprobs",
    "AnchorText",
    "AnchorsResult",
    "anchors",
    "Attribution",
    "attribute",
    "attribution_prompt",
    "ConfigError",
    "FidelityReport",
    "Flow",
    "MinCoverageResult",
    "MinKResult",
    "InputError",
    "NeedleRoute",
    "NiahPrompt",
    "NiahRun",
    "ReaderKnockout",
    "Route",
    "MemoryRequestError",
    "Salience",
    "Selection",
    "SuppressionResult",
    "SparsetraceError",
    "StreamConfig",
    "Trace",
    "TraceFileError",
    "UnsupportedModelError",
    "__version__",
    "block_sparse_attention",
    "build_report",
    "check",
    "describe_model",
    "flow",
    "flow_graph",
    "load_model",
    "load_tokenizer",
    "load_trace",
    "min_coverage",
    "min_k",
    "needle_route",
    "niah_prompt",
    "reader_head_knockout",
    "report",
    "route",
    "ruler_prompts",
    "run_niah",
    "salience",
    "select_blocks",
    "sparse_answer",
    "suppression_matrix",
    "sweep",
    "trace",
]
