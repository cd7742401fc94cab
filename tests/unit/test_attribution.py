"""Context attribution (`st.attribute`, `sparsetrace attribute`) on tiny models: prompt, sources, mass, CLI."""

import json
import re

import numpy as np
import pytest
import torch
from test_cli import run
from tiny_models import tiny_model

import sparsetrace as st
from sparsetrace.analysis.attribution import (
    SourceMass,
    aggregate,
    context_sources,
    focused_score,
    max_head_score,
    mean_per_token_score,
    mean_score,
    source_of_tokens,
)
from sparsetrace.report import build_report
from sparsetrace.tasks import attribution_runs
from sparsetrace.tracer import run_trace

CONTEXT = ("The cat sat on the mat today. A dog ran in the park quickly! Birds sing every morning here.\n\n"
           "The lighthouse was built in 1851 by the engineer. Its lamp burned oil for decades.")
QUERY = "When was the lighthouse built?"
RESPONSE = "It was built in 1851."


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_prompt_is_contextcites(chat_tokenizer):
    prompt, start = st.attribution_prompt(chat_tokenizer, CONTEXT, QUERY)
    assert prompt == f"<|user|>Context: {CONTEXT}\n\nQuery: {QUERY}\n<|assistant|>"
    assert start == len("<|user|>Context: ") and prompt[start : start + len(CONTEXT)] == CONTEXT


def test_sources_map_back_to_their_text(chat_tokenizer, model):
    for kind, expected in (("sentences", 5), ("paragraphs", 2)):
        result = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, st.StreamConfig(k=2, block_size=16),
                              response=RESPONSE, sources=kind)
        assert len(result.sources) == expected
        for source in result.sources:
            assert CONTEXT[source.start : source.end] == source.text
            a, b = source.tokens
            assert chat_tokenizer.decode(result.prompt_ids[a:b]) == source.text  # one token per byte
    assert result.sources[0].text.startswith("The cat") and result.sources[1].text.endswith("Its lamp burned oil "
                                                                                            "for decades.")
    blocks = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, st.StreamConfig(k=2, block_size=16),
                          response=RESPONSE, sources="blocks").sources
    start = len("<|user|>Context: ")
    assert blocks[0].tokens == (start, 32) and blocks[-1].tokens[1] == start + len(CONTEXT)
    assert all(b.tokens[0] % 16 == 0 and b.tokens[1] - b.tokens[0] == 16 for b in blocks[1:-1])
    assert "".join(b.text for b in blocks) == CONTEXT


def test_tokens_anchor_at_their_first_visible_character():
    prompt = "Q: The cat sat. A dog ran."  # the context is chars 3..
    offsets = [(0, 1), (1, 2), (2, 6), (6, 10), (10, 14), (14, 15), (15, 17), (17, 21), (21, 25), (25, 26)]
    assert [prompt[a:b] for a, b in offsets][2] == " The"  # starts at the space before the context
    sources = context_sources(prompt, offsets, (3, len(prompt)), "sentences")
    assert [(s.text, s.start, s.tokens) for s in sources] == [("The cat sat.", 0, (2, 6)), ("A dog ran.", 13, (6, 10))]
    assert context_sources(prompt, [(0, 26)], (3, len(prompt)), "sentences") == []  # no token anchors inside


def test_mass_is_dense_attention_when_k_covers_every_block(chat_tokenizer, model):
    """Independent reference: transformers' own eager attention probabilities (output_attentions)."""
    result = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, st.StreamConfig(k=64, block_size=16),
                          response=RESPONSE)
    prompt_len, n = len(result.prompt_ids), len(result.response_ids)
    ids = torch.tensor([result.prompt_ids + result.response_ids[:-1]])
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # L x [1, H, T, T]
    rows = torch.stack([a[0, :, prompt_len - 1 :] for a in attentions]).double()  # [L, H, R, T]
    assert rows.shape[2] == n
    expected = np.stack([rows[..., a:b].sum(-1).mean(-1).numpy() for a, b in (s.tokens for s in result.sources)], -1)
    np.testing.assert_allclose(result.mass, expected, atol=1e-5)
    np.testing.assert_allclose(result.scores, expected.max(1).mean(0), atol=1e-5)  # the default, max_head


def test_a_full_coverage_budget_gives_the_dense_mass(chat_tokenizer, model):
    dense = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, st.StreamConfig(k=64, block_size=16),
                         response=RESPONSE)
    covered = st.attribute(model, chat_tokenizer, CONTEXT, QUERY,
                           st.StreamConfig(block_size=16, coverage=1.0, k_max=64), response=RESPONSE)
    np.testing.assert_allclose(covered.mass, dense.mass, atol=1e-5)
    assert covered.trace.coverage(0) is not None


def test_sparse_mass_is_a_share_of_each_row(chat_tokenizer, model):
    prompt, start = st.attribution_prompt(chat_tokenizer, CONTEXT, QUERY)
    ids = torch.tensor(chat_tokenizer(prompt + RESPONSE, add_special_tokens=False)["input_ids"][:-1])
    prompt_len = len(chat_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    sources = [st.attribute(model, chat_tokenizer, CONTEXT, QUERY, st.StreamConfig(k=1, block_size=16),
                            response=RESPONSE).sources][0]
    reducer = SourceMass(source_of_tokens(sources, len(ids)), len(sources), prompt_len - 1, 3, 4, 16, 16)
    run_trace(model, chat_tokenizer, ids, st.StreamConfig(k=1, block_size=16), on_probabilities=reducer)
    mass, other = reducer.mass, reducer.other
    assert mass.shape == (3, 4, len(sources)) and (mass >= 0).all() and (mass <= 1).all()
    np.testing.assert_allclose(mass.sum(-1) + other, 1.0, atol=1e-5)  # each row sums to 1 over all keys
    dense = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, st.StreamConfig(k=64, block_size=16),
                         response=RESPONSE).mass
    assert np.abs(mass - dense).max() > 1e-3, "k = 1 prunes blocks, so the mass differs from dense"


def test_aggregations_by_hand():
    mass = np.zeros((2, 2, 3))
    mass[0, 0] = [0.6, 0.0, 0.0]  # focused on source 0
    mass[0, 1] = [0.2, 0.2, 0.2]  # spread evenly: weight 0 in "focused"
    mass[1, 0] = [0.0, 0.4, 0.0]
    mass[1, 1] = [0.1, 0.1, 0.1]
    tokens = np.array([2, 4, 1])
    np.testing.assert_allclose(mean_score(mass, tokens), [0.225, 0.175, 0.075])
    np.testing.assert_allclose(mean_per_token_score(mass, tokens), [0.1125, 0.04375, 0.075])
    np.testing.assert_allclose(max_head_score(mass, tokens), [(0.6 + 0.1) / 2, (0.2 + 0.4) / 2, (0.2 + 0.1) / 2])
    np.testing.assert_allclose(focused_score(mass, tokens), [0.3, 0.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(aggregate(mass, tokens, "max_head"), max_head_score(mass, tokens))
    with pytest.raises(st.InputError, match="method='median'"):
        aggregate(mass, tokens, "median")


def test_result_top_to_dict_and_other_methods(chat_tokenizer, model):
    result = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, st.StreamConfig(k=2, block_size=16),
                          response=RESPONSE, method="mean_per_token")
    assert result.response == RESPONSE and chat_tokenizer.decode(result.response_ids) == RESPONSE
    top = result.top(2)
    assert top[0].score >= top[1].score >= max(s.score for s in result.sources if s not in top)
    np.testing.assert_allclose(result.scores, result.scores_by("mean") / result.num_tokens)
    data = json.loads(json.dumps(result.to_dict()))
    assert [set(s) for s in data["sources"]] == [{"text", "span", "tokens", "score"}] * len(result.sources)
    assert data["prompt"][data["context_start"]:].startswith(CONTEXT) and data["method"] == "mean_per_token"
    # the prompt-and-span form on the same prompt gives the same mass
    same = st.attribute(model, chat_tokenizer, None, None, st.StreamConfig(k=2, block_size=16), response=RESPONSE,
                        prompt=result.prompt, context_span=(result.context_start, result.context_start + len(CONTEXT)))
    np.testing.assert_allclose(same.mass, result.mass)
    assert same.query is None and [s.text for s in same.sources] == [s.text for s in result.sources]
    page = build_report(result.trace, None, extras={"attribution": result})
    blob = json.loads(re.search(r'id="sparsetrace-data">(.*?)</script>', page, re.S).group(1))
    assert blob["attribution"]["sources"][0]["text"] == top[0].text and blob["attribution"]["num_sources"] == 5


def test_greedy_response_when_none_is_given(chat_tokenizer, model):
    result = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, st.StreamConfig(k=2, block_size=16),
                          max_new_tokens=4)
    ids = torch.tensor([result.prompt_ids])
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         eos_token_id=model.generation_config.eos_token_id)[0, ids.shape[1] :]
    assert result.response == chat_tokenizer.decode(new) and result.config["generated"]
    assert result.response_ids == chat_tokenizer(result.prompt + result.response,
                                                 add_special_tokens=False)["input_ids"][len(result.prompt_ids):]


class _NoForward:
    """Counts forward passes of a model, to check that bad input is refused before any."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.mark.parametrize("kwargs, message", [
    ({"context": " \n"}, "the context is empty"),
    ({"query": ""}, "the query is empty"),
    ({"method": "median"}, "method='median'"),
    ({"sources": "words"}, "sources='words'"),
    ({"response": "x" * 1100}, "more than the model's 1,024-token context; shorten the context, shorten the response"),
    ({"response": None, "max_new_tokens": 1000}, "lower max_new_tokens (--max-new-tokens)"),
    ({"response": "  "}, "the response is empty"),
    ({"prompt": "abc", "context_span": (2, 9)}, "not a char range"),
])
def test_bad_input_is_refused_before_any_forward(chat_tokenizer, model, kwargs, message):
    args = {"context": CONTEXT, "query": QUERY, "response": RESPONSE} | kwargs
    if "prompt" in kwargs:
        args |= {"context": None, "query": None}
    counter = _NoForward(model)
    try:
        with pytest.raises(st.InputError, match=re.escape(message)):
            st.attribute(model, chat_tokenizer, args.pop("context"), args.pop("query"), **args)
    finally:
        counter.handle.remove()
    assert counter.calls == 0


def test_context_without_sources_and_tokenizer_without_template(chat_tokenizer, tiny_tokenizer, model, monkeypatch):
    with pytest.raises(st.InputError, match="no chat template"):
        st.attribute(model, tiny_tokenizer, CONTEXT, QUERY, response=RESPONSE)
    monkeypatch.setattr(attribution_runs, "context_sources", lambda *a, **k: [])
    with pytest.raises(st.InputError, match="the context has no sentences"):
        st.attribute(model, chat_tokenizer, CONTEXT, QUERY, response=RESPONSE)


def test_cli_writes_json_figure_and_report(capsys, tmp_path, chat_model_folder):
    context_file = tmp_path / "context.txt"
    context_file.write_text(CONTEXT)
    out = tmp_path / "attr"
    code, stdout, err = run(capsys, "attribute", str(context_file), "--query", QUERY, "--response", RESPONSE,
                            "-o", str(out), "--model", chat_model_folder, "--k", "2", "--block-size", "16",
                            "--no-progress", "--json", "--top", "3")
    assert code == 0, err
    printed = json.loads(stdout)
    assert printed == json.loads((out / "attribution.json").read_text())
    assert len(printed["sources"]) == 5 and printed["response"] == RESPONSE
    assert (out / "attribution.png").read_bytes().startswith(b"\x89PNG")
    assert "Context attribution" in (out / "report.html").read_text() and (out / "trace.sptrace").is_file()
    code, stdout, err = run(capsys, "attribute", str(context_file), "--query", QUERY, "-o", str(out), "--model",
                            chat_model_folder, "--block-size", "16", "--max-new-tokens", "3", "--no-progress")
    assert code == 0, err
    assert "greedy answer" in stdout and "top sources" in stdout and " 1. " in stdout


def test_cli_refuses_bad_input_and_writes_nothing(capsys, tmp_path, chat_model_folder):
    context_file, empty = tmp_path / "context.txt", tmp_path / "empty.txt"
    context_file.write_text(CONTEXT)
    empty.write_text("  \n")
    out = tmp_path / "never"
    model = ["--model", chat_model_folder, "--no-progress"]
    for argv, message in (
        ([str(empty), "--query", QUERY], "is empty"),
        ([str(context_file), "--query", " "], "--query is empty"),
        ([str(context_file), "--query", QUERY, "--response", "x" * 1100], "1,024-token context"),
        ([str(context_file), "--query", QUERY, "--top", "0"], "positive numbers"),
    ):
        code, _, err = run(capsys, "attribute", *argv, "-o", str(out), *model)
        lines = [line for line in err.splitlines() if line.startswith("sparsetrace: error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err
        assert not out.exists()
    with pytest.raises(SystemExit) as exited:
        run(capsys, "attribute", str(context_file), "--query", QUERY, "--method", "median", "-o", str(out), *model)
    assert exited.value.code == 2 and not out.exists()
    with pytest.raises(SystemExit) as exited:
        run(capsys, "attribute", "--help")
    assert exited.value.code == 0 and "sparsetrace attribute paper.txt --query" in capsys.readouterr().out
