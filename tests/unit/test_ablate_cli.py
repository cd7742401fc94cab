"""`sparsetrace ablate` on a tiny local model: JSON that matches the library, one-line errors before any work."""

import json

import pytest
from test_cli import run

from sparsetrace import Intervention, StreamConfig, load_model, response_logprobs

TEXT = "The keeper lit the lamp at dusk. The lamp burned until dawn. The gate key is blue. " * 2


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(TEXT)
    return str(path)


def test_ablate_json_equals_the_library(capsys, text_file, model_folder):
    common = ["--model", model_folder, "--k", "2", "--block-size", "16", "--no-progress"]
    code, out, err = run(capsys, "ablate", text_file, "--response", " blue", "--knockout", "The gate key is blue.",
                         "--head", "1:2", "--json", *common)
    assert code == 0, err
    result = json.loads(out)
    model, tokenizer = load_model(model_folder)
    start = TEXT.index("The gate key is blue.")
    ids = tokenizer(TEXT)["input_ids"]
    span = (start, start + len("The gate key is blue."))  # byte-level tokens: one per character
    assert result["spans"]["knockout"][0]["tokens"] == list(span) and len(ids) == len(TEXT)
    expected = response_logprobs(model, tokenizer, TEXT, " blue", [Intervention(knockout=[span], heads_out=[(1, 2)])],
                                 config=StreamConfig(k=2, block_size=16))
    assert result["base_logprob"] == pytest.approx(float(expected.base.sum()), abs=1e-5)
    assert result["interventions"][0]["drop"] == pytest.approx(float(expected.drop[0]), abs=1e-5)
    assert result["response"] == " blue"


def test_ablate_separately_with_the_models_own_answer(capsys, text_file, model_folder):
    code, out, err = run(capsys, "ablate", text_file, "--remove", "chars:0-32", "--remove", "lamp", "--separately",
                         "--forward", "dense", "--response-tokens", "3", "--model", model_folder, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["response_ids"]) == 3
    assert [row["intervention"] for row in result["interventions"]] == ["remove chars:0-32", "remove lamp"]
    assert result["interventions"][1]["reused_positions"] == TEXT.index("lamp")


@pytest.mark.parametrize(("argv", "message"), [
    ([], "nothing to ablate"),
    (["--head", "3"], "LAYER:HEAD"),
    (["--head", "9:0"], "layer 9 does not exist"),
    (["--knockout", "tokens:0-5000"], "ends past"),
    (["--knockout", "zebra"], "does not occur"),
    (["--knockout", "lamp", "--response", " "], "--response is empty"),
])
def test_bad_input_exits_2_with_one_line(capsys, text_file, model_folder, argv, message):
    code, out, err = run(capsys, "ablate", text_file, "--model", model_folder, *argv)
    assert code == 2 and out == "" and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "Loading weights" not in line]  # transformers' bar
    assert len(lines) == 1 and message in lines[0]
