"""Needle runs end to end on a tiny model: answers, min k, trace, route, files, sweep, RULER prompts, CLI."""

import json
import shutil

import pytest
import torch
from tiny_models import tiny_model

from sparsetrace.ablation import intervened_logits
from sparsetrace.cli import main
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.fidelity import greedy_continuation
from sparsetrace.models import eos_token_ids
from sparsetrace.tasks import needle_runs
from sparsetrace.tasks.needle_runs import run_niah, save_niah, sparse_answer, sweep
from sparsetrace.tasks.niah import ANSWER_TOKENS, answer_end, dense_answer, niah_prompt
from sparsetrace.trace import load_trace

CONFIG = StreamConfig(k=2, block_size=32)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_auto_k_keeps_the_dense_answer_and_files_are_written(model, tiny_tokenizer, tmp_path, monkeypatch):
    prompt = niah_prompt(tiny_tokenizer, 700, 0.3, seed=1)
    monkeypatch.setattr(needle_runs, "run_trace", lambda *a, **k: pytest.fail("traced again after the search"))
    run = run_niah(model, tiny_tokenizer, prompt, CONFIG, k="auto", progress=False)
    assert run.min_k is not None and run.k == run.min_k.min_k and run.answer_kept, "full k always keeps it"
    assert run.trace is run.min_k.trace and run.trace.config.k == run.k, "the search's trace at min k"
    assert run.sparse_answer.tokens.numel() <= ANSWER_TOKENS and run.sparse_score in (0.0, 1.0)
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
    assert (summary["sparse_answer"], summary["sparse_score"], summary["dense_score"]) == \
        (run.sparse_answer.text, run.sparse_score, float(prompt.answer in run.answer.text))
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


def test_a_coverage_budget_traces_once_without_a_k_search(model, tiny_tokenizer, tmp_path, capsys, model_folder):
    prompt = niah_prompt(tiny_tokenizer, 700, 0.3, seed=1)
    config = StreamConfig(block_size=32, coverage=0.9, k_max=6)
    run = run_niah(model, tiny_tokenizer, prompt, config, progress=False)
    assert run.k is None and run.min_k is None and run.trace.config == config
    assert run.budget == "coverage 0.9 (1-6 blocks a row)" and run.trace.coverage(0) is not None
    summary = run.summary()
    assert summary["kept_per_row_mean"] == run.trace.stats()["kept_per_row_mean"] and summary["coverage"] == 0.9
    expected = sparse_answer(model, tiny_tokenizer, prompt, config)
    assert torch.equal(run.sparse_answer.tokens, expected.tokens), "the own answer under the same budget"
    code = main(["sweep", "--model", model_folder, "--lengths", "500", "--depths", "0.5", "--block-size", "32",
                 "--coverage", "0.9", "--no-progress", "--json", "-o", str(tmp_path / "cov")])
    cells = json.loads(capsys.readouterr().out)
    assert code == 0 and cells[0]["min_k"] is None and cells[0]["kept_per_row_mean"] <= 1 + 4 * 8 + 1
    assert json.loads((tmp_path / "cov" / "sweep.json").read_text())["config"]["coverage"] == 0.9
    code = main(["niah", "--model", model_folder, "--length", "600", "--coverage", "0.9", "--block-size", "32",
                 "--no-progress", "-o", str(tmp_path / "one")])
    out, err = capsys.readouterr()
    # k_max (4k = 32) is clamped to the 13 blocks a row of this 462-token prompt can select (15 blocks of 32 tokens)
    assert code == 0 and "trace        coverage 0.9 (1-13 blocks a row)" in out and "k_max=32 is more than" in err


@pytest.mark.parametrize("argv,message", [
    (["niah", "--k", "3", "--coverage", "0.9"], "two budgets"),
    (["niah", "--k-max", "3", "--coverage", "0.9"], "drop one of them"),
    (["sweep", "--coverage", "1.5"], "0 < coverage <= 1"),
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


def test_the_sparse_models_own_answer_at_full_k_is_the_dense_greedy_answer(model, tiny_tokenizer):
    prompt = niah_prompt(tiny_tokenizer, 700, 0.3, seed=1)
    dense = dense_answer(model, tiny_tokenizer, prompt)
    own = sparse_answer(model, tiny_tokenizer, prompt, CONFIG.with_k(prompt.num_tokens // 32 + 1))
    assert torch.equal(own.tokens, dense.tokens) and own.text == dense.text


@pytest.mark.parametrize("k", [1, 2])
def test_the_sparse_answer_is_decoded_free_running(model, tiny_tokenizer, k):
    """Each token from a whole sparse pass over the prompt and the tokens chosen before (no cache): the
    cached passes of `sparse_answer` must give the same tokens."""
    prompt = niah_prompt(tiny_tokenizer, 700, 0.6, seed=2)
    config = CONFIG.with_k(k)
    own = sparse_answer(model, tiny_tokenizer, prompt, config, max_new_tokens=6)
    generated: list[int] = []
    while len(generated) < 6:
        ids = torch.cat([prompt.token_ids, torch.tensor(generated, dtype=torch.int64)])
        generated.append(int(intervened_logits(model, ids, config=config, forward="sparse", keep=1)[0][-1].argmax()))
        if generated[-1] in eos_token_ids(model):
            break
    assert own.tokens.tolist() == generated


def test_run_niah_on_plain_text_names_the_fix(model, tiny_tokenizer):
    with pytest.raises(InputError, match="not a NiahPrompt; build one with niah_prompt"):
        run_niah(model, tiny_tokenizer, "One of the special magic numbers for a-b is: 1234567.", CONFIG)


def _ruler_jsonl(tiny_tokenizer, path, settings):
    """RULER's jsonl of niah_prompt prompts: the text split where the answer prefix starts, as its niah.py does."""
    rows = []
    for seed, depth in settings:
        prompt = niah_prompt(tiny_tokenizer, 650, depth, seed=seed)
        cut = prompt.text.rfind(" The special magic")
        rows.append(json.dumps({"input": prompt.text[:cut], "answer_prefix": prompt.text[cut:],
                                "outputs": [prompt.answer]}))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_sweep_over_rulers_prompts_is_resumable(model, tiny_tokenizer, tmp_path):
    from sparsetrace.tasks.niah import ruler_prompts

    prompts = ruler_prompts(tiny_tokenizer, _ruler_jsonl(tiny_tokenizer, tmp_path / "v.jsonl", [(1, 0.2), (2, 0.7)]))
    cells = sweep(model, tiny_tokenizer, None, None, tmp_path / "out", CONFIG, prompts=prompts, progress=False)
    assert [c["row"] for c in cells] == [0, 1] and [c["tokens"] for c in cells] == [p.num_tokens for p in prompts]
    assert all(c["min_k"] is not None and {"sparse_answer", "sparse_score", "dense_score"} <= set(c) for c in cells)
    assert sorted(p.name for p in (tmp_path / "out" / "cells").iterdir()) == ["row_0.json", "row_1.json"]
    seen = []
    assert sweep(model, tiny_tokenizer, None, None, tmp_path / "out", CONFIG, prompts=prompts, progress=False,
                 on_cell=seen.append) == cells and seen == []
    with pytest.raises(InputError, match="or prompts alone"):
        sweep(model, tiny_tokenizer, [500], None, tmp_path / "out", CONFIG, prompts=prompts)


def test_niah_and_sweep_run_rulers_jsonl(capsys, tmp_path, model_folder, tiny_tokenizer):
    path = _ruler_jsonl(tiny_tokenizer, tmp_path / "v.jsonl", [(1, 0.2), (3, 0.5)])
    code = main(["niah", "--model", model_folder, "--prompts", str(path), "--row", "1", "--k", "2", "--block-size",
                 "32", "--no-progress", "--json", "-o", str(tmp_path / "one")])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["prompt"]["form"] == "text" and summary["k"] == 2
    assert summary["prompt"]["answer"] == niah_prompt(tiny_tokenizer, 650, 0.5, seed=3).answer, "row 1"
    assert "sparse_answer" in summary and "sparse_score" in summary
    code = main(["sweep", "--model", model_folder, "--prompts", str(path), "--block-size", "32", "--no-progress",
                 "-o", str(tmp_path / "many")])
    out = capsys.readouterr().out
    assert code == 0 and out.count("sparse model's own answer") == 2 and "(2 cells)" in out


@pytest.mark.parametrize("argv,message", [
    (["niah", "--prompts", "{jsonl}", "--length", "900"], "drop --length"),
    (["sweep", "--prompts", "{jsonl}", "--depths", "0.5", "--form", "legacy"], "drop --form, --depths"),
    (["niah", "--prompts", "{missing}"], "no such file"),
    (["niah", "--row", "2"], "--row 2: give a prompt's position in --prompts"),
    (["min-k", "{jsonl}", "--answer", "1", "--n-match", "2"], "give one of them"),
])
def test_bad_prompt_options_exit_2_before_loading(capsys, tmp_path, argv, message):
    (tmp_path / "p.jsonl").write_text("{}\n")
    paths = {"jsonl": str(tmp_path / "p.jsonl"), "missing": str(tmp_path / "missing.jsonl")}
    argv = [arg.format(**paths) for arg in argv]
    code = main([*argv, "--model", str(tmp_path / "no-such-model")] + ([] if argv[0] == "min-k" else
                                                                       ["-o", str(tmp_path / "out")]))
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_min_k_compares_the_whole_answer_where_one_is_known(capsys, tmp_path, model_folder, model, tiny_tokenizer):
    prompt = niah_prompt(tiny_tokenizer, 650, 0.5, seed=1)
    path = tmp_path / "needle.txt"
    path.write_text(prompt.text)
    common = ["--model", model_folder, "--block-size", "32", "--no-progress", "--json"]
    code = main(["min-k", str(path), *common])
    result = json.loads(capsys.readouterr().out)
    budget = ANSWER_TOKENS + len(prompt.answer)  # byte tokens; a random model never says the value: all of them
    assert code == 0 and result["answer"] == prompt.answer and result["n_match"] == budget
    _, continuation, _ = greedy_continuation(model, prompt.token_ids, budget)
    piece = tiny_tokenizer.decode(continuation[3:5])
    code = main(["min-k", str(path), *common, "--answer", piece])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n_match"] == answer_end(tiny_tokenizer, continuation, piece) <= 5
    code = main(["min-k", str(path), *common, "--n-match", "3"])
    assert json.loads(capsys.readouterr().out)["n_match"] == 3
