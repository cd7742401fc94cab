"""The `sparsetrace` command on a tiny local model: output, --json, exit status, one-line errors."""

import io
import json

import pytest

from sparsetrace.cli import main
from sparsetrace.trace import load_trace

TEXT = "The keeper lit the lamp at dusk. The lamp burned until dawn. " * 5


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_trace_then_info(capsys, tmp_path, text_file, model_folder):
    out_path = tmp_path / "run.sptrace"
    code, out, err = run(capsys, "trace", text_file, "-o", str(out_path), "--model", model_folder,
                         "--k", "2", "--block-size", "16", "--no-progress")
    assert code == 0, err
    for word in ("tokens", "kept blocks", "sparsity", "compression", "trace", "dense fp16", "time"):
        assert word in out
    tr = load_trace(out_path)
    assert tr.config.k == 2 and tr.config.block_q == 16 and tr.num_tokens == len(TEXT)

    code, out, _ = run(capsys, "info", str(out_path), "--json")
    info = json.loads(out)
    assert code == 0 and info["tokens"] == len(TEXT) and info["kept_blocks"] == tr.stats()["kept_blocks"]
    assert info["config"]["k"] == 2


def test_trace_from_standard_input_as_json(capsys, tmp_path, model_folder, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT))
    code, out, _ = run(capsys, "trace", "-", "-o", str(tmp_path / "x.sptrace"), "--model", model_folder,
                       "--k", "3", "--block-q", "32", "--block-k", "16", "--score", "logsumexp", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["block_q"] == 32 and summary["block_k"] == 16 and summary["k"] == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["trace", "missing.txt", "-o", "{tmp}/a.sptrace"], "no such file"),
        (["trace", "{text}", "-o", "{tmp}/no/such/folder/a.sptrace"], "does not exist"),
        (["trace", "{text}", "-o", "{tmp}"], "is a folder"),
        (["trace", "{text}", "-o", "{tmp}/a.sptrace", "--k", "0"], "k=0"),
        (["trace", "{text}", "-o", "{tmp}/a.sptrace", "--block-size", "-4"], "block_size"),
        (["trace", "{empty}", "-o", "{tmp}/a.sptrace"], "is empty"),
        (["trace", "{text}", "--sample", "-o", "{tmp}/a.sptrace"], "exactly one input"),
        (["trace", "{text}", "-o", "{tmp}/a.sptrace", "--model", "{tmp}/not-a-model"], "not-a-model"),
        (["info", "{text}"], "not a trace"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, text_file, model_folder, argv, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    argv = [a.format(tmp=tmp_path, text=text_file, empty=empty) for a in argv]
    if argv[0] == "trace" and "--model" not in argv:
        argv += ["--model", model_folder]
    before = set(tmp_path.rglob("*"))
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before, "nothing is written on bad input"


@pytest.mark.parametrize("command", ["trace", "info"])
def test_help_teaches_with_an_example(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "examples:" in out and f"sparsetrace {command}" in out


def test_check_and_min_k(capsys, text_file, model_folder):
    common = ["--model", model_folder, "--block-size", "16", "--no-progress"]
    code, out, err = run(capsys, "check", text_file, *common, "--k", "2", "--json")
    report = json.loads(out)
    assert code == 0, err
    assert len(report["recall"]) == 3 and all(r <= o + 1e-6 for r, o in zip(report["recall"],
                                                                            report["oracle_recall"], strict=True))
    assert isinstance(report["match"], bool) and len(report["continuation"]) == 2
    code, out, _ = run(capsys, "check", text_file, *common, "--k", "2")
    assert code == 0 and "behaviour" in out and "recall / oracle" in out

    code, out, _ = run(capsys, "min-k", text_file, *common, "--n-match", "1", "--json")
    result = json.loads(out)
    assert code == 0 and result["passed"][str(result["min_k"])] is True
    code, out, _ = run(capsys, "min-k", text_file, *common, "--n-match", "1")
    assert code == 0 and out.startswith("min k")
    code, out, _ = run(capsys, "min-k", text_file, *common, "--n-match", "1", "--budget", "coverage", "--json")
    result = json.loads(out)
    assert code == 0 and result["passed"][str(result["min_coverage"])] is True
    code, out, err = run(capsys, "min-k", text_file, *common, "--n-match", "1", "--budget", "coverage", "--k-max", "3")
    assert code == 0, err
    assert out.startswith(("min p", "no p")) and "blocks a row" in out
    code, _, err = run(capsys, "min-k", text_file, *common, "--k-max", "3")
    assert code == 2 and "--budget coverage" in err


def test_dense_forward_trace(capsys, tmp_path, text_file, model_folder):
    out_path = tmp_path / "dense.sptrace"
    code, _, err = run(capsys, "trace", text_file, "-o", str(out_path), "--model", model_folder, "--forward", "dense",
                       "--k", "2", "--block-size", "16")
    assert code == 0, err
    tr = load_trace(out_path)
    _, mass = tr.blocks(0)
    assert tr.extra["forward"] == "dense" and float(mass.sum(-1).max()) <= 1 + 1e-5
    assert float(mass.sum(-1).min()) < 0.999, "k = 2 keeps only part of the dense attention"
