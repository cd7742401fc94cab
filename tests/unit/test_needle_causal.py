"""Reader-head knockout on a tiny model: head draws, drops vs response_logprobs, greedy answers, refusals, CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from sparsetrace.ablation import response_logprobs
from sparsetrace.backend import sparse_attention
from sparsetrace.cli import main
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.interventions import Intervention
from sparsetrace.tasks.needle_causal import (
    random_heads,
    reader_head_knockout,
    string_match_all,
    top_reader_heads,
)
from sparsetrace.tasks.niah import dense_answer, niah_prompt

CONFIG = StreamConfig(k=2, block_size=32)
LAYERS, HEADS = 3, 4  # tiny_models' shape


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def needle(model, tiny_tokenizer):
    prompt = niah_prompt(tiny_tokenizer, 400, 0.3, seed=1, form="legacy")  # short: no RULER generation budget
    answer = dense_answer(model, tiny_tokenizer, prompt, max_new_tokens=4)
    # a random model never says the needle's value: make the reference a piece of its own answer, so the
    # unchanged model scores 1 and a knockout can score 0
    reference = answer.text[1:3]
    assert reference and reference in answer.text
    return dataclasses.replace(prompt, answer=reference), answer


READERS = np.random.default_rng(3).random((LAYERS, HEADS))


def test_string_match_all_is_rulers_metric():
    assert string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("ABC and d", ["abc", "xyz"]) == 0.5, "case-insensitive share of the references"
    assert string_match_all("", ["1"]) == 0.0


def test_random_heads_avoid_the_top_heads_are_seeded_and_distinct():
    top = top_reader_heads(READERS, 3)
    assert [READERS[layer, head] for layer, head in top] == sorted(READERS.ravel(), reverse=True)[:3]
    draws = [random_heads(LAYERS, HEADS, 3, top, seed) for seed in range(6)]
    for heads in draws:
        assert len(set(heads)) == 3 and not set(heads) & set(top)
        assert all(0 <= layer < LAYERS and 0 <= head < HEADS for layer, head in heads)
    assert draws == [random_heads(LAYERS, HEADS, 3, top, seed) for seed in range(6)], "reproducible by seed"
    assert len({tuple(h) for h in draws}) > 1, "seeds draw different heads"
    every = {h for seed in range(60) for h in random_heads(LAYERS, HEADS, 3, top, seed)}
    assert every == {(a, b) for a in range(LAYERS) for b in range(HEADS)} - set(top), "any other head can be drawn"


@pytest.mark.parametrize("forward", ["sparse", "dense"])
def test_drops_equal_response_logprobs_and_answers_are_greedy(model, tiny_tokenizer, needle, forward):
    prompt, answer = needle
    result = reader_head_knockout(model, tiny_tokenizer, prompt, READERS, answer=answer, n=(1, 3), seeds=2,
                                  forward=forward, config=CONFIG, max_new_tokens=4, progress=False)
    assert [(r.kind, r.n, r.seed) for r in result.rows] == [("top", 1, None), ("random", 1, 0), ("random", 1, 1),
                                                            ("top", 3, None), ("random", 3, 0), ("random", 3, 1)]
    for row in result.rows:
        top = next(r for r in result.rows if r.kind == "top" and r.n == row.n)
        assert row.kind == "top" or not set(row.heads) & set(top.heads)
    assert sorted(result.rows[3].heads) == sorted(top_reader_heads(READERS, 3))
    reference = response_logprobs(model, tiny_tokenizer, prompt.token_ids, answer.tokens,
                                  [Intervention(heads_out=row.heads) for row in result.rows], forward=forward,
                                  config=CONFIG)
    torch.testing.assert_close(torch.tensor([row.drop for row in result.rows]), reference.drop, atol=1e-4, rtol=1e-4)
    assert result.base.logprob == pytest.approx(float(reference.base.sum()), abs=1e-4)
    assert result.base.drop == 0
    if forward == "sparse":  # at k = 2 the random model's sparse answer differs from its dense one
        return
    assert result.base.accuracy == 1.0
    # dense: the prediction is the greedy decoding under the knockout, checked with the model's own generate
    assert result.base.answer_kept and result.base.prediction == answer.text
    lost = [row for row in result.rows if not row.answer_kept]
    assert lost, "some knockout changes the random model's answer"
    for row in lost[:2]:
        knockouts = Intervention(heads_out=row.heads).layer_knockouts(LAYERS, HEADS, prompt.num_tokens)
        with sparse_attention(model, CONFIG, lambda record: None, forward="exact", knockouts=knockouts):
            out = model.generate(prompt.token_ids[None], attention_mask=torch.ones(1, prompt.num_tokens, dtype=int),
                                 max_new_tokens=4, do_sample=False, pad_token_id=256)
        greedy = tiny_tokenizer.decode(out[0, prompt.num_tokens:])
        assert greedy.startswith(row.prediction) and row.passes > 1
        assert row.accuracy == (prompt.answer in row.prediction)
        assert (prompt.answer in greedy) == (prompt.answer in row.prediction)
    per_n = {row["n"]: row for row in result.per_n()}
    rand = [row.accuracy for row in result.rows if row.kind == "random" and row.n == 3]
    assert per_n[3]["random_accuracy_mean"] == pytest.approx(np.mean(rand))
    assert per_n[3]["random_accuracy_std"] == pytest.approx(np.std(rand, ddof=1))
    assert per_n[3]["top_drop"] == pytest.approx(result.rows[3].drop, abs=1e-5)


@pytest.mark.parametrize("n,message", [
    ((7,), r"need 14 heads, but this model has 3 layers x 4 heads = 12; use n of at most 6 \(--causal-n\)"),
    ((0, 2), "positive numbers of heads"),
])
def test_too_many_heads_is_refused_before_any_forward_pass(model, tiny_tokenizer, needle, monkeypatch, n, message):
    prompt, answer = needle
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(InputError, match=message):
        reader_head_knockout(model, tiny_tokenizer, prompt, READERS, answer=answer, n=n, progress=False)
    with pytest.raises(InputError, match=r"shape \(2, 4\)"):
        reader_head_knockout(model, tiny_tokenizer, prompt, READERS[:2], answer=answer, n=(1,), progress=False)


def test_niah_causal_writes_the_fields_and_figure(capsys, tmp_path, model_folder):
    code = main(["niah", "--model", model_folder, "--length", "400", "--form", "legacy", "--k", "2", "--block-size",
                 "32", "--causal", "--causal-n", "1", "2", "--causal-seeds", "2", "--causal-forward", "dense",
                 "--no-progress", "-o", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "causal       zero knockout, dense forward" in out
    assert "N = 1 " in out and "N = 2 " in out and "2 random draws" in out
    causal = json.loads((tmp_path / "niah.json").read_text())["causal"]
    assert causal["forward"] == "dense" and [row["n"] for row in causal["per_n"]] == [1, 2]
    assert set(causal["per_n"][0]) >= {"top_accuracy", "top_drop", "random_accuracy_mean", "random_accuracy_std",
                                       "random_drop_mean", "random_drop_std"}
    assert len(causal["rows"]) == 6 and causal["base"]["drop"] == 0
    assert (tmp_path / "causal.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (["--causal-n", "5"], "--causal-n set the causal check; add --causal"),
    (["--causal", "--causal-n", "0"], "--causal-n 0: use positive numbers"),
    (["--causal", "--causal-seeds", "0"], "--causal-seeds 0: use a positive number"),
])
def test_bad_causal_options_exit_2_before_loading(capsys, tmp_path, argv, message):
    code = main(["niah", *argv, "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_n_beyond_the_model_is_refused_by_the_cli_before_the_run(capsys, tmp_path, model_folder):
    code = main(["niah", "--model", model_folder, "--length", "400", "--form", "legacy", "--k", "2", "--block-size",
                 "32", "--causal", "--causal-n", "5", "7", "--no-progress", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "use n of at most 6 (--causal-n)" in err
