"""Shared fixtures for the integration tests: the real default model, loaded once per session."""

import pytest

from sparsetrace.models import load_model


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) of the default SmolLM2-135M-Instruct, from the user's cache (converted once)."""
    return load_model()
