"""Fixed names that the command line lists before it loads anything: option choices and file names.

They live here, with no torch, numpy or transformers import, because argparse needs them to build
`--help` and to check arguments, which must answer at once (benchmarks/cli_latency); the modules
that act on them import them from here.
"""

# models.DTYPES' names: the precisions a model loads in.
DTYPES = ("float32", "bfloat16", "float16")

# analysis.attribution: what a source of a context is, and how per layer/head masses become one score.
SOURCE_KINDS = ("sentences", "paragraphs", "blocks")
ATTRIBUTION_METHODS = ("mean", "mean_per_token", "max_head", "focused")
# The default: the largest head per layer, mean over layers. On the first measurements (tests/integration
# test_attribution_default: 4 fact questions x dense and k = 2; benchmarks/attribution's first examples) it
# ranked the supporting sentence first in every case where "mean" ranked it 1st-5th, and had the best LDS of
# the four on the natural text (0.38 vs 0.17): a few retrieval heads read the support, the other heads'
# mass on the template and recent tokens dilutes a mean over heads.
DEFAULT_METHOD = "max_head"

# The files of a needle run (`sparsetrace niah`, `demo`) that a report next to them shows.
SIBLING_FIGURES = {"route.png": "route of the needle to the answer through the layers",
                   "needle_heads.png": "mass the answer block puts on the needle block, per head"}
SIBLING_FIDELITY = "fidelity.json"
