"""Needle runs end to end on a tiny model: answer, min k, trace, route, files, sweep, CLI."""

import json
import shutil

import pytest
from tiny_models import tiny_model

from sparsetrace.cli import main
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.tasks.needle_runs import run_niah, save_niah, sweep
from sparsetrace.tasks.niah import niah_prompt
from sparsetrace.trace import load_trace

CONFIG = StreamConfig(k=2, block_size=32)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_auto_k_keeps_the_dense_answer_and_files_are_written(model, tiny_tokenizer, tmp_path):
    prompt = niah_prompt(tiny_tokenizer, 700, 0.3, seed=1)
    run = run_niah(model, tiny_tokenizer, prompt, CONFIG, k="auto", progress=False)
    assert run.min_k is not None and run.k == run.min_k.min_k and run.answer_kept, "full k always keeps it"
    assert run.min_k.min_k == 1 or not run.min_k.passed[run.min_k.min_k - 1], "k - 1 loses the answer"
    assert run.trace.num_tokens == prompt.num_tokens + len(run.answer.tokens) - 1, "the answer is teacher-forced"
    first, end = prompt.needle_tokens
    assert run.route.needle_blocks == list(range(first // 32, (end - 1) // 32 + 1))
    assert run.route.answer_blocks[-1] == run.trace.num_query_blocks - 1
    paths = save_niah(run, tiny_tokenizer, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["needle_heads.png", "niah.json", "route.png", "trace.sptrace"]
    assert (tmp_path / "route.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "niah.json").read_text())
    assert summary["min_k"] == run.k and summary["prompt"]["answer"] == prompt.answer
    assert load_trace(paths["trace"]).extra["niah"]["route"]["needle_blocks"] == run.route.needle_blocks


def test_sweep_is_resumable(model, tiny_tokenizer, tmp_path):
    cells = sweep(model, tiny_tokenizer, [500, 650], [0.2, 0.8], tmp_path, CONFIG, progress=False)
    assert [(c["length"], c["depth"]) for c in cells] == [(500, 0.2), (500, 0.8), (650, 0.2), (650, 0.8)]
    assert all(c["min_k"] is not None and c["answer_kept"] for c in cells)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    seen = []
    again = sweep(model, tiny_tokenizer, [500, 650], [0.2, 0.8], tmp_path, CONFIG, progress=False, on_cell=seen.append)
    assert again == cells and seen == [], "finished cells are read back, not recomputed"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == stamps
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    shutil.rmtree(tmp_path / "cells")
    assert sweep(model, tiny_tokenizer, [500, 650], [0.2, 0.8], tmp_path, CONFIG, progress=False,
                 on_cell=seen.append) == cells and seen == [], "sweep.json alone resumes a sweep"


def test_an_interrupted_sweep_leaves_its_finished_cells_summarised(model, tiny_tokenizer, tmp_path):
    def stop_after_first(cell: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(model, tiny_tokenizer, [500, 650], [0.2], tmp_path, CONFIG, progress=False, on_cell=stop_after_first)
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert [(c["length"], c["depth"]) for c in summary["cells"]] == [(500, 0.2)]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_tokenizer, model):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


def test_niah_and_sweep_commands(capsys, tmp_path, model_folder):
    code = main(["niah", "--model", model_folder, "--length", "600", "--k", "3", "--block-size", "32",
                 "--no-progress", "-o", str(tmp_path / "one")])
    out = capsys.readouterr().out
    assert code == 0 and "route        needle -> answer" in out and "k = 3" in out
    assert (tmp_path / "one" / "route.png").exists()
    code = main(["sweep", "--model", model_folder, "--lengths", "500", "--depths", "0.5", "--block-size", "32",
                 "--no-progress", "--json", "-o", str(tmp_path / "many")])
    cells = json.loads(capsys.readouterr().out)
    assert code == 0 and len(cells) == 1 and cells[0]["min_k"] is not None


@pytest.mark.parametrize("argv,message", [
    (["niah", "--k", "0"], "positive number of key blocks or auto"),
    (["niah", "--threshold", "2"], "value in [0, 1]"),
    (["sweep", "--depths", "0.5", "1.5"], "must lie in [0, 1]"),
])
def test_bad_needle_options_exit_2_before_loading(capsys, tmp_path, argv, message):
    code = main([*argv, "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists(), "nothing is written on bad input"


def test_a_prompt_whose_answer_would_pass_the_context_is_refused_before_the_dense_answer(
        model, tiny_tokenizer, monkeypatch):
    prompt = niah_prompt(tiny_tokenizer, 700, 0.5, seed=1)
    context = prompt.num_tokens + 5  # the prompt fits, its answer (up to 11 more positions) does not
    monkeypatch.setattr(model.config, "max_position_embeddings", context)
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("the dense answer ran"))
    with pytest.raises(InputError, match=rf"up to 11 more positions.*{context - 11:,} tokens or fewer"):
        run_niah(model, tiny_tokenizer, prompt, CONFIG, k=2, progress=False)
