"""Thought anchors' causal check on the default model: attention suppression vs receiver-head scores.

On the chain of thought of the anchors benchmark (../texts/cot.txt, written by the default model,
SmolLM2-135M-Instruct; sentence units of the assistant turns) cut to the first N tokens:

1. receiver-head scores: `sparsetrace.anchors` at k = 8 (b = 64, the halving search as run.py; its
   defaults, the thought-anchors definitions: `key_average="mean"`, layer 0 included), and the dense
   ones (the same pipeline with k covering every key block, its own receiver heads);
2. attention suppression (`sparsetrace.tasks.suppression.suppression_matrix`), one pass per
   sentence, on the sparse forward (the same k = 8 config) and on the dense forward;
3. Spearman correlations: causal scores vs receiver-head scores (sparse-sparse, dense-dense and
   the crossings), dense vs sparse causal scores (and matrices), and time per sentence of each.

Causal score of sentence i = mean over later sentences j of mean KL at j's tokens (temperature 1);
`log` rows use Bogdan et al.'s aggregate (mean log(KL + 1e-9)); `far` rows average only over
j >= i + 4, the rows the vertical score counts (proximity 4).

    python benchmarks/anchors/causal.py --tokens 1024 2048     # writes causal_results.json, causal_<N>.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
COT = HERE.parent / "texts" / "cot.txt"
SEARCH = "hierarchical"  # as run.py: the committed anchors numbers use the halving search on every row
K = 8
BLOCK = 64
PROXIMITY = 4


def far_scores(effects: np.ndarray, proximity: int = PROXIMITY) -> np.ndarray:
    units = effects.shape[0]
    return np.array([effects[i, i + proximity :].mean() if i + proximity < units else np.nan for i in range(units)])


def measure(tokens: int) -> dict:
    import torch

    import sparsetrace as st
    from sparsetrace.analysis.anchors import receiver_heads, spearman, unit_scores
    from sparsetrace.blocks import num_blocks
    from sparsetrace.plots import suppression_figure
    from sparsetrace.tasks.suppression import suppression_matrix

    torch.set_num_threads(2)
    model, tokenizer = st.load_model()
    text = COT.read_text()
    ids = tokenizer(text)["input_ids"][:tokens]
    sparse_config = st.StreamConfig(k=K, block_size=BLOCK, search=SEARCH)
    full_config = st.StreamConfig(k=num_blocks(len(ids), BLOCK), block_size=BLOCK, search=SEARCH)

    started = time.perf_counter()
    result = st.anchors(model, tokenizer, text, sparse_config, dense_check="always", max_tokens=tokens,
                        progress=False)
    anchors_seconds = time.perf_counter() - started
    t = result.texts[0]
    units = t.units
    receiver_sparse = t.scores
    dense_heads = receiver_heads([t.dense_kurtosis], 20, result.settings["exclude_layer0"])
    receiver_dense = unit_scores(t.dense_vertical, dense_heads)

    runs = {}
    for name, forward, config in (("sparse_k8", "sparse", sparse_config), ("dense", "dense", full_config)):
        runs[name] = suppression_matrix(model, tokenizer, ids, units, forward=forward, config=config, progress=True)
        print(f"{tokens} tokens {name}: {runs[name].seconds:.1f} s, {runs[name].seconds_per_unit:.2f} s per sentence",
              flush=True)
    s, d = runs["sparse_k8"], runs["dense"]
    later = np.triu(np.ones_like(d.effects, dtype=bool), 1)
    rho = {
        "causal_sparse_vs_receiver_sparse": spearman(s.scores, receiver_sparse),
        "causal_dense_vs_receiver_dense": spearman(d.scores, receiver_dense),
        "causal_dense_vs_receiver_sparse": spearman(d.scores, receiver_sparse),
        "causal_sparse_vs_receiver_dense": spearman(s.scores, receiver_dense),
        "log_causal_sparse_vs_receiver_sparse": spearman(s.log_scores, receiver_sparse),
        "log_causal_dense_vs_receiver_dense": spearman(d.log_scores, receiver_dense),
        "far_causal_sparse_vs_receiver_sparse": spearman(far_scores(s.effects), receiver_sparse),
        "far_causal_dense_vs_receiver_dense": spearman(far_scores(d.effects), receiver_dense),
        "causal_sparse_vs_causal_dense": spearman(s.scores, d.scores),
        "log_causal_sparse_vs_log_causal_dense": spearman(s.log_scores, d.log_scores),
        "effects_sparse_vs_effects_dense": spearman(s.effects[later], d.effects[later]),
        "receiver_sparse_vs_receiver_dense": spearman(receiver_sparse, receiver_dense),
    }
    fig = suppression_figure(d.effects, d.scores, receiver_sparse, forward="dense",
                             title=f"cot.txt, first {len(ids):,} tokens: dense attention suppression vs k = 8 "
                                   "receiver-head scores")
    fig.savefig(HERE / f"causal_{tokens}.png", dpi=110)
    order = np.argsort(-np.nan_to_num(d.scores, nan=-np.inf))[:5]
    return {
        "tokens": len(ids), "sentences": len(units), "k": K, "block": BLOCK, "search": SEARCH,
        "key_average": result.settings["key_average"], "exclude_layer0": result.settings["exclude_layer0"],
        "receiver_heads_k8": [list(h) for h in result.receiver_heads], "receiver_heads_dense": dense_heads,
        "receiver_heads_shared": len(set(result.receiver_heads) & set(dense_heads)),
        "anchors_seconds_both_traces": round(anchors_seconds, 1),
        "spearman": {key: None if v is None else round(v, 4) for key, v in rho.items()},
        "seconds_per_sentence": {"sparse_k8": round(s.seconds_per_unit, 3), "dense": round(d.seconds_per_unit, 3)},
        "seconds_total": {"sparse_k8": round(s.seconds, 1), "dense": round(d.seconds, 1)},
        "dense_prefix_reused_mean": round(float(np.mean(d.reused)), 1),
        "base_dtype": d.base_dtype,
        "top_causal_dense": [{"unit": int(i), "score": float(d.scores[i]), "receiver_score": receiver_sparse[i],
                              "category": units[i].category, "text": units[i].text[:80]} for i in order],
        "causal_scores": {"sparse_k8": s.scores.tolist(), "dense": d.scores.tolist()},
        "receiver_scores": {"sparse_k8": receiver_sparse.tolist(), "dense": receiver_dense.tolist()},
        "effects": {"sparse_k8": np.round(s.effects, 8).tolist(), "dense": np.round(d.effects, 8).tolist()},
    }


def _clean(x):
    """JSON-safe: numpy scalars to float, NaN to null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return None if np.isnan(x) else float(x)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024, 2048])
    args = parser.parse_args()
    path = HERE / "causal_results.json"
    rows = json.loads(path.read_text())["runs"] if path.exists() else []
    for tokens in args.tokens:
        row = measure(tokens)
        rows = sorted([r for r in rows if r["tokens"] != row["tokens"]] + [row], key=lambda r: r["tokens"])
        path.write_text(json.dumps(_clean({"runs": rows}), indent=1) + "\n")
        print(json.dumps({k: row[k] for k in ("tokens", "sentences", "spearman", "seconds_per_sentence")}, indent=1),
              flush=True)


if __name__ == "__main__":
    main()
