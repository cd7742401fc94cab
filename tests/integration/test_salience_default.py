"""Salience and flow on a real default-model trace, read back from disk without the model."""

from importlib import resources

import pytest

from sparsetrace import StreamConfig, flow, load_trace, salience, trace
from sparsetrace.analysis.spans import resolve_tokenizer, trace_text

pytestmark = pytest.mark.integration

SAMPLE = resources.files("sparsetrace").joinpath("data/sample.txt").read_text()


def test_saved_trace_decodes_and_analyses_without_the_model(default_model, tmp_path):
    model, tokenizer = default_model
    text = SAMPLE[:2500]
    trace(model, tokenizer, text, StreamConfig(k=4, block_size=32)).save(tmp_path / "run.sptrace")
    saved = load_trace(tmp_path / "run.sptrace")
    decoded = trace_text(saved, resolve_tokenizer(saved))  # the tokenizer the trace records, no weights
    assert decoded.exact and decoded.text == text
    result = salience(saved, text=decoded)
    assert result.top and all(row["text"] in text for row in result.top)
    name = text[text.index("Hallin Skerry"):][:13]
    found = flow(saved, name, text=decoded, min_flow=0.0)  # to the last token
    assert found.source.text.strip() == name and found.route.connected
