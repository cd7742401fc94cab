"""sparsetrace: per-head sparse attention traces of long-context language models.

>>> import sparsetrace as st                                        # doctest: +SKIP
>>> model, tokenizer = st.load_model()                              # doctest: +SKIP
>>> tr = st.trace(model, tokenizer, text, st.StreamConfig(k=8))     # doctest: +SKIP
>>> tr.save("run.sptrace"); st.load_trace("run.sptrace").stats()    # doctest: +SKIP
"""

from .ablation import AblationResult, response_logprobs
from .analysis.flow import Flow, flow
from .analysis.routes import NeedleRoute, Route, flow_graph, needle_route, route
from .analysis.salience import Salience, salience
from .block_attention import block_sparse_attention
from .config import StreamConfig
from .errors import (
    ConfigError,
    InputError,
    MemoryRequestError,
    SparsetraceError,
    TraceFileError,
    UnsupportedModelError,
)
from .fidelity import FidelityReport, MinCoverageResult, MinKResult, check, min_coverage, min_k
from .interventions import Intervention
from .models import describe_model, load_model, load_tokenizer
from .report import build_report, report
from .selection import Selection
from .stream import select_blocks
from .tasks.anchor_runs import AnchorsResult, AnchorText, anchors
from .tasks.attribution_runs import Attribution, attribute, attribution_prompt
from .tasks.needle_causal import ReaderKnockout, reader_head_knockout
from .tasks.needle_runs import NiahRun, run_niah, sparse_answer, sweep
from .tasks.niah import NiahPrompt, niah_prompt, ruler_prompts
from .tasks.suppression import SuppressionResult, suppression_matrix
from .trace import VERSION as __version__  # the package metadata's (pyproject.toml), as trace files record it
from .trace import Trace, load_trace
from .tracer import trace

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
