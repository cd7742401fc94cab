"""Needle in a haystack on the real default model: it finds the needle, and the trace shows how."""

import pytest

from sparsetrace import StreamConfig
from sparsetrace.tasks.needle_runs import run_niah
from sparsetrace.tasks.niah import NOISE, RULER_TOKENS_TO_GENERATE, niah_prompt

pytestmark = pytest.mark.integration


def test_the_answer_block_reads_the_needle(default_model):
    model, tokenizer = default_model
    prompt = niah_prompt(tokenizer, 1024, 0.5, seed=0)
    assert prompt.num_tokens <= 1024 and tokenizer.decode(prompt.token_ids[slice(*prompt.needle_tokens)]).strip() \
        == f"One of the special magic numbers for {prompt.key} is: {prompt.answer}."
    run = run_niah(model, tokenizer, prompt, StreamConfig(), k=16, progress=False)
    assert run.answer.correct, f"the default model retrieves the needle at 1k tokens (said {run.answer.text!r})"
    assert run.answer_kept, "k = 16 of 16 candidate blocks keeps the whole answer"
    assert run.sparse_answer.text == run.answer.text and run.sparse_score == 1.0, "and answers as the dense model"
    assert run.route.route.connected
    assert run.route.readers.max() > 0.1, "some head of the answer block puts >10% of its attention on the needle"


def test_min_k_keeps_the_whole_answer_and_one_less_does_not(default_model):
    model, tokenizer = default_model
    prompt = niah_prompt(tokenizer, 1024, 0.9, seed=0)
    run = run_niah(model, tokenizer, prompt, StreamConfig(), k="auto", k_max=8, progress=False)
    assert run.answer.correct and run.answer_kept and run.k == run.min_k.min_k
    assert run.min_k.passed[run.k] and (run.k == 1 or not run.min_k.passed[run.k - 1])
    assert any(u[0] == 0 and u[1] in run.route.needle_blocks for u, _ in run.route.route.graph.edges), \
        "the route starts at the needle's blocks"


def test_rulers_length_includes_its_generation_budget(default_model):
    _, tokenizer = default_model
    prompt = niah_prompt(tokenizer, 2048, 0.5, seed=0, chat_template=False)
    counted = len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"]) + RULER_TOKENS_TO_GENERATE
    unit = len(tokenizer("\n" + NOISE, add_special_tokens=False)["input_ids"])
    assert 2048 - unit < counted <= 2048, "RULER's '2048' prompt: about 1,920 tokens, not 2,048"
    assert niah_prompt(tokenizer, 2048, 0.5, seed=0, chat_template=False, form="legacy").num_tokens > 2048 - unit
