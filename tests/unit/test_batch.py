"""Many units in this process (`sparsetrace.batch`): result files, resume, failures, the batch forms of
`attribute` and `anchors`, and the flags of many units refused before any work."""

import json

import pytest
from test_cli import run

from sparsetrace.batch import InProcess, Unit, UnitsFailedError, run_units, unit_name
from sparsetrace.cli import batch_options
from sparsetrace.config import StreamConfig
from sparsetrace.errors import InputError
from sparsetrace.models import load_model

CONTEXT = "The cat sat on the mat today. A dog ran in the park quickly!\n\nThe lighthouse was built in 1851."
REASONING = ("First we read the problem carefully. Then we compute 3 + 4 = 7 and 7 * 2 = 14. "
             "Wait, is that right? Let me check the sum again. So the total is 14 here.\n\n") * 3 + "The answer is 14."


def square(model, tokenizer, inputs):
    """A task: fails where the inputs ask it to; its calls are counted in inputs["log"]."""
    with open(inputs["log"], "a") as log:
        log.write(f"{inputs['x']}\n")
    if inputs.get("fail"):
        raise ValueError(f"no square for {inputs['x']}")
    return {"x": inputs["x"], "square": inputs["x"] ** 2, "model": model}


def units(tmp_path, fail=()):
    log = str(tmp_path / "calls.log")
    return [Unit(unit_name("x", x), {"x": x, "log": log, "fail": x in fail}) for x in (1, 2, 3)]


def calls(tmp_path) -> list[int]:
    path = tmp_path / "calls.log"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_each_result_is_written_and_a_second_run_resumes(tmp_path):
    seen = []
    batch = run_units(units(tmp_path), square, tmp_path / "out" / "units", InProcess("m", None), progress=False,
                      on_result=lambda unit, result, done: seen.append((unit.name, len(done))))
    assert list(batch.results) == ["x_1", "x_2", "x_3"] and batch.results["x_3"] == {"x": 3, "square": 9, "model": "m"}
    assert seen == [("x_1", 1), ("x_2", 2), ("x_3", 3)] and calls(tmp_path) == [1, 2, 3]
    assert json.loads((tmp_path / "out" / "units" / "x_2.json").read_text())["square"] == 4
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (summary["units"], summary["done"], summary["failed"], summary["remaining"]) == (3, 3, 0, 0)
    assert summary["executor"] == "in-process" and summary["worker_usage"][0]["units"] == 3
    (tmp_path / "out" / "units" / "x_2.json").unlink()
    again = run_units(units(tmp_path), square, tmp_path / "out" / "units", InProcess("m", None), progress=False)
    assert again.results == batch.results and calls(tmp_path) == [1, 2, 3, 2], "only the missing unit runs"
    assert sorted(p.name for p in (tmp_path / "out" / "units").iterdir()) == ["x_1.json", "x_2.json", "x_3.json"]


def test_a_failed_unit_is_reported_skipped_and_retried_on_request(tmp_path):
    results = tmp_path / "units"
    batch = run_units(units(tmp_path, fail=(2,)), square, results, InProcess(None, None), progress=False)
    assert list(batch.results) == ["x_1", "x_3"] and batch.failures == {"x_2": "ValueError: no square for 2"}
    summary = json.loads((tmp_path / "run.json").read_text())
    assert (summary["done"], summary["failed"], summary["remaining"]) == (2, 1, 0)
    assert "raise ValueError" in summary["failures"]["x_2"]["traceback"] and not (results / "x_2.json").exists()
    with pytest.raises(UnitsFailedError, match=r"1 of 3 units failed \(first: x_2: ValueError.*--retry-failed"):
        batch.check()
    skipped = run_units(units(tmp_path), square, results, InProcess(None, None), progress=False)
    assert skipped.failures == batch.failures and calls(tmp_path) == [1, 2, 3], "a failure is not rerun unasked"
    retried = run_units(units(tmp_path), square, results, InProcess(None, None), progress=False, retry_failed=True)
    assert retried.failures == {} and retried.results["x_2"]["square"] == 4 and calls(tmp_path) == [1, 2, 3, 2]
    retried.check()


def test_an_interrupted_run_keeps_complete_files_only(tmp_path):
    def stop(unit, result, done):
        if unit.name == "x_2":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_units(units(tmp_path), square, tmp_path / "units", InProcess(None, None), progress=False, on_result=stop)
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == ["x_1.json", "x_2.json"], "no temporary file"
    assert json.loads((tmp_path / "run.json").read_text())["remaining"] == 1
    unsaveable = run_units([Unit("set", {"x": 1, "log": str(tmp_path / "calls.log")})],
                           lambda model, tokenizer, inputs: {"value": {1, 2}}, tmp_path / "units",
                           InProcess(None, None), progress=False)
    assert unsaveable.failures["set"].startswith("TypeError") and not (tmp_path / "units" / "set.json").exists()


def test_unit_names_are_safe_and_unique(tmp_path):
    assert unit_name(4096, 0.5) == "4096_0.5" and unit_name("../a b/c") == "a_b_c" and unit_name("/") == "unit"
    with pytest.raises(InputError, match="two units are named 'a'"):
        run_units([Unit("a", 1), Unit("a", 2)], square, tmp_path, InProcess(None, None), progress=False)


def test_attribute_batch_writes_one_result_per_pair_named_by_its_inputs(capsys, tmp_path, chat_model_folder):
    from sparsetrace.tasks.attribution_runs import attribute

    pairs = [{"context": CONTEXT, "query": "When was it built?", "response": "In 1851."},
             {"id": "dog", "context": CONTEXT, "query": "Who ran?", "response": "A dog."}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    common = ["--model", chat_model_folder, "--k", "2", "--block-size", "16", "--no-progress"]
    code, out, err = run(capsys, "attribute", "--batch", str(tmp_path / "pairs.jsonl"), "-o", str(tmp_path / "a"),
                         *common)
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "a" / "pairs").iterdir())
    assert files[0] == "dog.json" and files[1].startswith("pair_") and len(files) == 2 and "(2 pairs)" in out
    model, tokenizer = load_model(chat_model_folder)
    alone = attribute(model, tokenizer, CONTEXT, "Who ran?", StreamConfig(k=2, block_size=16), response="A dog.")
    saved = json.loads((tmp_path / "a" / "pairs" / "dog.json").read_text())
    assert {**saved, "seconds": 0} == {**alone.to_dict(), "seconds": 0}, "the same result as one pair alone"
    pairs[0]["query"] = "When was the lighthouse built?"  # a changed pair is a new unit; the other is kept
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    code, out, err = run(capsys, "attribute", "--batch", str(tmp_path / "pairs.jsonl"), "-o", str(tmp_path / "a"),
                         *common)
    assert code == 0 and out.count("sources") == 1 and len(list((tmp_path / "a" / "pairs").iterdir())) == 3


def test_anchors_each_gives_every_text_its_own_result(capsys, tmp_path, model_folder):
    from sparsetrace.tasks.anchor_runs import anchors

    texts = [REASONING, REASONING.replace("14", "15")]
    for i, text in enumerate(texts):
        (tmp_path / f"cot{i}.txt").write_text(text)
    code, out, err = run(capsys, "anchors", str(tmp_path / "cot0.txt"), str(tmp_path / "cot1.txt"), "--each",
                         "-o", str(tmp_path / "an"), "--model", model_folder, "--k", "2", "--block-size", "16",
                         "--top-heads", "3", "--dense-check", "never", "--no-progress")
    assert code == 0, err
    files = sorted((tmp_path / "an" / "texts").iterdir())
    assert [p.name[:5] for p in files] == ["cot0_", "cot1_"] and "receiver heads" in out
    model, tokenizer = load_model(model_folder)
    for i, (path, text) in enumerate(zip(files, texts, strict=True)):
        alone = anchors(model, tokenizer, [text], StreamConfig(k=2, block_size=16),
                        names=[str(tmp_path / f"cot{i}.txt")], top_heads=3, dense_check="never").to_dict()
        saved = json.loads(path.read_text())
        assert saved["texts"][0]["name"] == alone["texts"][0]["name"]
        assert saved["receiver_heads"] == alone["receiver_heads"], "its own receiver heads, not the texts' joint ones"
        assert [u["score"] for u in saved["texts"][0]["units"]] == [u["score"] for u in alone["texts"][0]["units"]]


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--workers", "2"], "--workers size Ray workers; add --ray"),
    (["sweep", "--ray", "--workers", "0"], "positive number of Ray workers"),
    (["sweep", "--ray", "--num-cpus", "0"], "positive number of CPUs"),
    (["attribute", "{ctx}", "--query", "Q", "--ray"], "--ray run many inputs as units; add --batch"),
    (["attribute", "{ctx}"], "give CONTEXT and --query Q"),
    (["attribute", "--batch", "{pairs}", "--query", "Q"], "drop --query"),
    (["attribute", "--batch", "{bad}"], "line 2 needs a non-empty \"context\" and \"query\""),
    (["anchors", "{ctx}", "--retry-failed"], "add --each"),
    (["anchors", "--each", "--sample"], "give them as INPUT"),
])
def test_bad_batch_options_exit_2_before_loading(capsys, tmp_path, argv, message):
    (tmp_path / "ctx.txt").write_text(CONTEXT)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"context": "c", "query": "q"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "c", "query": "q"}) + "\n{\"context\": \"c\"}\n")
    paths = {name: str(tmp_path / file) for name, file in (("ctx", "ctx.txt"), ("pairs", "pairs.jsonl"),
                                                           ("bad", "bad.jsonl"))}
    code, _, err = run(capsys, *[a.format(**paths) for a in argv], "--model", str(tmp_path / "no-such-model"),
                       "-o", str(tmp_path / "out"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_ray_missing_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_options.importlib.util, "find_spec", lambda name: None)
    code, _, err = run(capsys, "sweep", "--ray", "--model", str(tmp_path / "m"), "-o", str(tmp_path / "out"))
    assert code == 2 and 'Ray is not installed; pip install "sparsetrace[ray]"' in err


def test_a_failed_sweep_cell_exits_2_after_the_others_and_is_retried_on_request(capsys, tmp_path, model_folder):
    argv = ["sweep", "--model", model_folder, "--lengths", "500", "2000", "--depths", "0.5", "--block-size", "32",
            "--no-progress", "-o", str(tmp_path / "s")]
    code, out, err = run(capsys, *argv)
    assert code == 2 and "1 of 2 units failed (first: 2000_0.5: InputError: the input is" in err
    assert "length    500" in out
    assert [p.name for p in (tmp_path / "s" / "cells").iterdir()] == ["500_0.5.json"]
    assert list(json.loads((tmp_path / "s" / "run.json").read_text())["failures"]) == ["2000_0.5"]
    code, out, err = run(capsys, *argv, "--allow-long", "--retry-failed")  # the fix the error named
    assert code == 0 and "length   2000" in out and "length    500" not in out and "(2 cells)" in out, err
