"""`sparsetrace anchors` and `st.anchors` on a tiny model: outputs, fidelity, labels, generation, errors."""

import json

import numpy as np
import pytest
from test_cli import run
from tiny_models import tiny_model

import sparsetrace as st
from sparsetrace.analysis.anchors import receiver_heads
from sparsetrace.config import StreamConfig
from sparsetrace.generation import generate_reasoning

REASONING = ("First we read the problem carefully. Then we compute 3 + 4 = 7 and 7 * 2 = 14. "
             "Wait, is that right? Let me check the sum again. So the total is 14 here.\n\n") * 4 + \
            "The answer is 14."

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def reasoning_file(tmp_path):
    path = tmp_path / "cot.txt"
    path.write_text(REASONING)
    return str(path)


def test_library_result_and_dense_check(tiny_tokenizer):
    model = tiny_model("qwen3")
    result = st.anchors(model, tiny_tokenizer, REASONING, StreamConfig(k=2, block_size=16), top_heads=3,
                        dense_check="always")
    units = result.units
    assert len(units) == 21 and units[-1].text == "The answer is 14."
    assert result.vertical_scores.shape == (3, 4, 21) and result.kurtosis.shape == (3, 4)
    assert result.settings["key_average"] == "mean" and result.settings["exclude_layer0"] is False
    assert result.receiver_heads == receiver_heads(result.kurtosis, 3), "top kurtosis over all layers, layer 0 too"
    assert {u.category for u in units} >= {"active_computation", "final_answer_emission", "self_checking"}
    # the scores are the receiver heads' mean vertical scores
    heads = result.receiver_heads
    expected = np.mean([result.vertical_scores[layer, h] for layer, h in heads], axis=0)
    np.testing.assert_allclose(result.scores[:-4], expected[:-4], rtol=1e-6)
    assert all(u.score is None for u in units[-4:]), "the last `proximity` units have no rows below them"
    fidelity = result.texts[0].fidelity
    assert 0 < fidelity["sparsity"] < 1 and fidelity["answer_tokens"] == len("The answer is 14.")
    assert isinstance(fidelity["answer_preserved"], bool)
    rho = result.dense["texts"][0]["spearman_scores"]
    assert rho is not None and -1 <= rho <= 1
    assert "not a model judgement" in result.texts[0].categories_source


def test_full_k_dense_check_agrees_with_itself(tiny_tokenizer):
    model = tiny_model("llama")
    blocks = -(-len(REASONING) // 16)
    result = st.anchors(model, tiny_tokenizer, REASONING, StreamConfig(k=blocks, block_size=16), top_heads=4,
                        dense_check="always")
    assert result.dense["texts"][0]["spearman_scores"] == pytest.approx(1.0)
    assert result.dense["receiver_overlap"] == 4
    assert result.texts[0].fidelity["answer_preserved"] is True


def test_a_coverage_budget_runs_and_its_dense_check_is_dense(tiny_tokenizer):
    """Under coverage 1.0 with every block allowed the scores are the dense ones; the dense check drops the budget."""
    model = tiny_model("llama")
    blocks = -(-len(REASONING) // 16)
    result = st.anchors(model, tiny_tokenizer, REASONING, StreamConfig(block_size=16, coverage=1.0, k_max=blocks),
                        top_heads=4, dense_check="always")
    assert result.texts[0].trace.coverage(0) is not None
    assert result.dense["texts"][0]["spearman_scores"] == pytest.approx(1.0)
    partial = st.anchors(model, tiny_tokenizer, REASONING, StreamConfig(block_size=16, coverage=0.5, k_max=2),
                         top_heads=4, dense_check="always")
    assert partial.texts[0].trace.stats()["kept_per_row_mean"] < result.texts[0].trace.stats()["kept_per_row_mean"]


def test_cli_writes_json_npz_figures_and_traces(capsys, tmp_path, reasoning_file, model_folder):  # noqa: F811
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["unknown"] * 21))
    out = tmp_path / "anchors"
    code, stdout, err = run(capsys, "anchors", reasoning_file, reasoning_file, "-o", str(out), "--model", model_folder,
                            "--k", "2", "--block-size", "16", "--top-heads", "5", "--no-progress",
                            "--labels", str(labels), str(labels), "--exclude-layer-0", "--key-average", "sum")
    assert code == 0, err
    assert "receivers" in stdout and "pruned" in stdout and "Spearman" in stdout
    data = json.loads((out / "anchors.json").read_text())
    assert len(data["receiver_heads"]) == 5 and len(data["texts"]) == 2
    assert all(layer > 0 for layer, _ in data["receiver_heads"]) and data["settings"]["key_average"] == "sum"
    assert data["texts"][0]["categories_source"].startswith("labels file")
    assert len(data["texts"][0]["vertical_scores"]) == 3
    for name in ("kurtosis.png", "categories.png", "vertical_scores_0.png", "unit_attention_1.png",
                 "trace_0.sptrace", "unit_attention.npz"):
        assert (out / name).stat().st_size > 0, name
    arrays = np.load(out / "unit_attention.npz", allow_pickle=False)
    assert arrays["unit_attention_0"].shape == (3, 4, 21, 21)


def test_cli_errors(capsys, tmp_path, reasoning_file, model_folder):  # noqa: F811
    code, _, err = run(capsys, "anchors", "-o", str(tmp_path / "x"))
    assert code == 2 and "--generate PROBLEM" in err
    code, _, err = run(capsys, "anchors", reasoning_file, "-o", str(tmp_path / "x"), "--model", model_folder,
                       "--labels", "a.json", "b.json")
    assert code == 2 and "one per INPUT" in err
    code, _, err = run(capsys, "anchors", "--generate", "Add 3 and 4.", "-o", str(tmp_path / "x"),
                       "--model", model_folder)
    assert code == 2 and "no chat template" in err
    short = tmp_path / "short.txt"
    short.write_text("One sentence only here.")
    code, _, err = run(capsys, "anchors", str(short), "-o", str(tmp_path / "x"), "--model", model_folder)
    assert code == 2 and "too few for vertical scores" in err


def test_generate_reasoning_spans(tiny_tokenizer):
    model = tiny_model("llama")
    tiny_tokenizer.chat_template = CHATML
    try:
        generation = generate_reasoning(model, tiny_tokenizer, "Add 3 and 4.", max_new_tokens=20, progress=False)
        sampled = generate_reasoning(model, tiny_tokenizer, "Add 3 and 4.", max_new_tokens=20, temperature=0.8,
                                     seed=1, follow_up="Check again.", min_tokens=300, progress=False)
    finally:
        tiny_tokenizer.chat_template = None
    assert generation.text.startswith("<|im_start|>user\nAdd 3 and 4.<|im_end|>\n<|im_start|>assistant\n")
    assert generation.new_tokens == 20 and len(generation.reply_spans) == 1 and generation.settings["greedy"]
    assert len(sampled.reply_spans) > 1 and "Check again." in sampled.text
    for _, b in sampled.reply_spans:
        assert sampled.text[b:].startswith("<|im_end|>")
