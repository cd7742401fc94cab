"""Fixed names that the command line lists before it loads anything: option choices and file names.

They live here, with no torch, numpy or transformers import, because argparse needs them to build
`--help` and to check arguments, which must answer at once (benchmarks/cli_latency); the modules
that act on them import them from here.
"""

# models.DTYPES' names: the precisions a model loads in.
DTYPES = ("float32", "bfloat16", "float16")

# analysis.attribution: what a source of a context is, and how per layer/head masses become one score.
SOURCE_KINDS = ("sentences", "paragraphs", "blocks")
# The aggregations that are pure functions of the mass (`analysis.attribution.METHODS`).
MASS_METHODS = ("mean", "mean_per_token", "max_head", "focused")
# "learned": AT2's per-head weights (`analysis.head_weights`), fit once per model on its own ablations.
LEARNED = "learned"
# "auto", the default: "learned" where weights exist for the model (the package ships the default model's, or
# `--head-weights FILE`), else "max_head" (the largest head per layer, mean over layers: a few retrieval heads
# read the support, the other heads' mass on the template dilutes a mean). Measured in benchmarks/attribution:
# learned weights fit on other texts raise the LDS on natural text from max_head's 0.45 towards ContextCite's.
AUTO = "auto"
FALLBACK_METHOD = "max_head"
ATTRIBUTION_METHODS = (AUTO, LEARNED, *MASS_METHODS)
DEFAULT_METHOD = AUTO

# The files of a needle run (`sparsetrace niah`, `demo`) that a report next to them shows.
SIBLING_FIGURES = {"route.png": "route of the needle to the answer through the layers",
                   "needle_heads.png": "mass the answer block puts on the needle block, per head"}
SIBLING_FIDELITY = "fidelity.json"
