"""Learned per-head attribution weights (AT2): the fit, the file, and the ablation data it is fit on."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from test_attribution import CONTEXT, QUERY, RESPONSE
from test_cli import run
from tiny_models import tiny_model

import sparsetrace as st
from sparsetrace.analysis.attribution import aggregate
from sparsetrace.analysis.head_weights import (
    AblationSample,
    HeadWeights,
    bundled_head_weights,
    fit_head_weights,
    load_head_weights,
)
from sparsetrace.errors import InputError
from sparsetrace.tasks.attribution_fit import ablation_sample, logit_probability, removal_spans


def planted_samples(weights: np.ndarray, count: int = 12, sources: int = 15, masks: int = 32, noise: float = 0.0,
                    seed: int = 0) -> list[AblationSample]:
    """Examples whose outcome is exactly linear in the kept sources' weighted mass (plus noise)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        mass = rng.random((*weights.shape, sources)) ** 3
        keep = rng.random((masks, sources)) < 0.5
        truth = np.einsum("lh,lhn->n", weights, mass)
        samples.append(AblationSample(mass, keep, keep @ truth + noise * rng.standard_normal(masks)))
    return samples


def test_the_fit_recovers_planted_head_weights():
    planted = np.zeros((3, 4))
    planted[1, 2], planted[2, 0], planted[0, 3] = 3.0, 1.0, -0.5
    fitted = fit_head_weights(planted_samples(planted, noise=0.01), iterations=1500, learning_rate=3e-3)
    assert fitted.shape == (3, 4) and np.isclose(np.abs(fitted).sum(), 1.0)
    assert pearsonr(fitted.ravel(), planted.ravel()).statistic > 0.95
    # on new examples from the same heads, the fitted scores predict the ablations; the uniform start does not
    held_out = planted_samples(planted, count=4, seed=2)
    fitted_corr = [pearsonr(s.masks @ HeadWeights(fitted, "m").scores(s.mass), s.outcomes).statistic for s in held_out]
    uniform = [pearsonr(s.masks @ s.mass.mean(axis=(0, 1)), s.outcomes).statistic for s in held_out]
    assert min(fitted_corr) > 0.95 and np.mean(uniform) < min(fitted_corr) - 0.1


def test_scores_are_the_weighted_sum_over_heads():
    weights = HeadWeights(np.array([[1.0, 0.0], [0.5, -1.0]]), "m")
    mass = np.arange(12, dtype=float).reshape(2, 2, 3)
    expected = [1 * mass[0, 0, j] + 0.5 * mass[1, 0, j] - 1 * mass[1, 1, j] for j in range(3)]
    np.testing.assert_allclose(weights.scores(mass), expected)
    np.testing.assert_allclose(aggregate(mass, [1, 1, 1], "learned", head_weights=weights), expected)
    with pytest.raises(InputError, match="fit weights for this model"):
        weights.scores(np.zeros((3, 2, 3)))
    with pytest.raises(InputError, match="head weights"):
        aggregate(mass, [1, 1, 1], "learned")


def test_file_round_trip_and_refusals(tmp_path):
    weights = HeadWeights(np.array([[0.25, -0.25], [0.5, 0.0]]), "tiny", {"examples": 3})
    path = weights.save(tmp_path / "w.json")
    loaded = load_head_weights(path)
    np.testing.assert_array_equal(loaded.weights, weights.weights)
    assert loaded.model == "tiny" and loaded.training == {"examples": 3}
    (tmp_path / "trace.json").write_text(json.dumps({"format": "sparsetrace"}))
    (tmp_path / "bad.json").write_text("{not json")
    broken = weights.to_dict() | {"weights": [[1.0]]}
    (tmp_path / "shape.json").write_text(json.dumps(broken))
    for name, message in [("missing.json", "no head-weights file"), ("trace.json", "not a head-weights file"),
                          ("bad.json", "not a head-weights file"), ("shape.json", "not a finite")]:
        with pytest.raises(InputError, match=message):
            load_head_weights(tmp_path / name)


def test_the_default_models_weights_ship_with_the_package():
    shipped = bundled_head_weights("SmolLM2-135M-Instruct", 30, 9)
    assert shipped is not None and shipped.weights.shape == (30, 9) and np.isclose(np.abs(shipped.weights).sum(), 1)
    assert bundled_head_weights("SmolLM2-135M-Instruct", 30, 8) is None  # another shape: not these
    assert bundled_head_weights("some/other-model", 30, 9) is None


def test_fit_refuses_what_it_cannot_learn_from():
    with pytest.raises(InputError, match="no training examples"):
        fit_head_weights([])
    flat = AblationSample(np.ones((1, 1, 3)), np.ones((4, 3), bool), np.zeros(4))
    with pytest.raises(InputError, match="changes under its ablations"):
        fit_head_weights([flat])


def test_removal_keeps_exactly_the_kept_sources_as_contextcite_joins_them(chat_tokenizer, model):
    result = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, response=RESPONSE, progress=False)
    sources, start = result.sources, result.context_start
    rng = np.random.default_rng(0)
    for keep in [np.ones(len(sources), bool), np.zeros(len(sources), bool), *(rng.random((20, len(sources))) < 0.5)]:
        text = result.prompt
        for a, b in reversed(removal_spans(sources, keep, start)):
            text = text[:a] + text[b:]
        kept = [j for j in range(len(sources)) if keep[j]]
        # ContextCite: kept sources in order, each after the first preceded by the whitespace before it
        pieces = [CONTEXT[s.start : s.end] if i == 0 else CONTEXT[sources[j - 1].end : s.end]
                  for i, (j, s) in enumerate((j, sources[j]) for j in kept)]
        context = "".join(pieces) + CONTEXT[sources[-1].end :]
        assert text == result.prompt[:start] + context + result.prompt[start + len(CONTEXT) :]


def test_logit_probability():
    lp = np.log(np.array([[0.5, 0.5], [0.9, 1.0]]))
    p = np.exp(lp.sum(-1))
    np.testing.assert_allclose(logit_probability(lp), np.log(p) - np.log1p(-p))


def test_ablation_sample_scores_the_ablated_prompt_with_the_dense_model(chat_tokenizer, model):
    sample, result = ablation_sample(model, chat_tokenizer, CONTEXT, QUERY, response=RESPONSE, masks=4, seed=3)
    assert sample.masks.shape == (4, len(result.sources)) and sample.mass.shape == result.mass.shape
    for keep, outcome in zip(sample.masks, sample.outcomes, strict=True):  # independently: plain HF forward
        kept = [j for j in range(len(result.sources)) if keep[j]]
        context = "".join(("" if i == 0 else CONTEXT[result.sources[j - 1].end : result.sources[j].start])
                          + result.sources[j].text for i, j in enumerate(kept)) + CONTEXT[result.sources[-1].end :]
        prompt, _ = st.attribution_prompt(chat_tokenizer, context, QUERY)
        ids = chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full = torch.tensor([ids + result.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=full).logits[0, len(ids) - 1 : -1].double(), -1)
        token_lp = logp.gather(-1, torch.tensor(result.response_ids)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(outcome, logit_probability(token_lp[None])[0], rtol=1e-4, atol=1e-4)


def test_attribute_uses_given_weights_and_refuses_a_wrong_shape(chat_tokenizer, model, tmp_path):
    rng = np.random.default_rng(0)
    weights = HeadWeights(rng.standard_normal((3, 4)), "tiny")  # the tiny llama: 3 layers, 4 heads
    result = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, response=RESPONSE, head_weights=weights,
                          progress=False)
    assert result.method == "learned" and result.config["head_weights"]["model"] == "tiny"
    np.testing.assert_allclose(result.scores, weights.scores(result.mass))
    plain = st.attribute(model, chat_tokenizer, CONTEXT, QUERY, response=RESPONSE, progress=False)
    assert plain.method == "max_head"  # auto, and the package has no weights for a tiny model
    np.testing.assert_allclose(plain.scores, aggregate(plain.mass, plain.num_tokens, "max_head"))
    with pytest.raises(InputError, match="fit weights for this model"):
        st.attribute(model, chat_tokenizer, CONTEXT, QUERY, response=RESPONSE,
                     head_weights=HeadWeights(np.ones((2, 4)), "other"))
    with pytest.raises(InputError, match="no learned head weights"):
        st.attribute(model, chat_tokenizer, CONTEXT, QUERY, response=RESPONSE, method="learned")


def test_cli_fits_weights_that_attribute_then_uses(capsys, tmp_path, chat_model_folder):
    examples = tmp_path / "train.jsonl"
    examples.write_text("\n".join(json.dumps({"context": CONTEXT, "query": q}) for q in
                                   (QUERY, "What did the dog do?", "What do birds do?")) + "\n")
    weights_file = tmp_path / "heads.json"
    options = ["--model", chat_model_folder, "--block-size", "16", "--no-progress"]
    code, stdout, err = run(capsys, "attribute-fit", str(examples), "-o", str(weights_file), "--masks", "6",
                            "--iterations", "50", *options, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["examples"] == 3 and summary["masks"] == 6
    fitted = load_head_weights(weights_file)
    assert fitted.weights.shape == (3, 4) and np.isclose(np.abs(fitted.weights).sum(), 1.0)
    context = tmp_path / "context.txt"
    context.write_text(CONTEXT)
    out = tmp_path / "attr"
    code, stdout, err = run(capsys, "attribute", str(context), "--query", QUERY, "--response", RESPONSE, "-o",
                            str(out), "--head-weights", str(weights_file), *options, "--json")
    assert code == 0, err
    printed = json.loads(stdout)
    assert printed["method"] == "learned"
    mass_scores = [s["score"] for s in printed["sources"]]
    result = st.attribute(*st.load_model(chat_model_folder), CONTEXT, QUERY, st.StreamConfig(block_size=16),
                          response=RESPONSE, head_weights=fitted, progress=False)
    np.testing.assert_allclose(mass_scores, result.scores, rtol=1e-5, atol=1e-8)


def test_cli_fit_refuses_bad_examples_before_loading(capsys, tmp_path, monkeypatch):
    import sparsetrace.cli.attribution as command

    monkeypatch.setattr(command, "load", lambda args: pytest.fail("the model loaded before the input was checked"))
    out = tmp_path / "heads.json"
    for content, message in [("{not json\n", "line 1 is not JSON"), ("", "is empty"), ("[1, 2]\n", "needs a non-empty"),
                             (json.dumps({"context": "text"}) + "\n", "needs a non-empty"),
                             (json.dumps({"context": "a", "query": "b", "response": " "}) + "\n", "empty")]:
        examples = tmp_path / "bad.jsonl"
        examples.write_text(content)
        code, _, err = run(capsys, "attribute-fit", str(examples), "-o", str(out))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out.exists()
    code, _, err = run(capsys, "attribute", str(examples), "--query", "q", "-o", str(tmp_path / "a"),
                       "--head-weights", str(tmp_path / "missing.json"))
    assert code == 2 and "no head-weights file" in err


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")
