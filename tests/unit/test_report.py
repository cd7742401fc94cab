"""The HTML report: its data blob against the trace, its size, self-containment, text, bad inputs, CLI."""

from __future__ import annotations

import io
import json
import re
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_model

import sparsetrace as st
from sparsetrace.analysis.segments import split_units
from sparsetrace.cli import main
from sparsetrace.report import SCRIPTS, build_report, report
from sparsetrace.report.data import MASS_LEVELS, decode_blocks, encode_blocks

TEXT = "The keeper lit the lamp at dusk. </script><!-- The lamp burned until dawn. " * 6


def synthetic_trace(tokens: int, layers: int = 2, heads: int = 3, block: int = 64, k: int = 8,
                    block_k: int | None = None, seed: int = 0) -> st.Trace:
    """A valid trace of any size without a model: per row the sinks, the local block and k random
    earlier blocks (fewer where the row has fewer), masses random and summing to 0.9."""
    block_k = block_k or block
    config = st.StreamConfig(k=k, block_q=block, block_k=block_k, sinks=1, local=1)
    generator = torch.Generator().manual_seed(seed)
    n_q = -(-tokens // block)
    last = (torch.clamp((torch.arange(n_q) + 1) * block, max=tokens) - 1) // block_k  # [n_q]
    width, big = k + 2, 2**30
    indices, masses = [], []
    for _ in range(layers):
        free = torch.clamp(last - 1, min=0)  # candidates 1 .. last - 1
        pick = 1 + (torch.rand(heads, n_q, k, generator=generator) * free[None, :, None]).long()
        pick = torch.where(free[None, :, None] > 0, pick, big)
        row = torch.cat([torch.zeros(heads, n_q, 1, dtype=torch.long), pick,
                         last[None, :, None].expand(heads, n_q, 1)], dim=-1).sort(-1).values
        duplicate = torch.cat([torch.zeros(heads, n_q, 1, dtype=torch.bool), row[..., 1:] == row[..., :-1]], -1)
        row = torch.where(duplicate, big, row).sort(-1).values
        valid = row < big
        weight = torch.rand(heads, n_q, width, generator=generator) * valid
        indices.append(torch.where(valid, row, -1).to(torch.int32))
        masses.append((0.9 * weight / weight.sum(-1, keepdim=True)).float())
    info = {"name": "synthetic", "architecture": "none", "num_layers": layers, "num_heads": heads,
            "num_kv_heads": heads, "head_dim": 64, "sliding_windows": [None] * layers}
    ids = torch.randint(0, 256, (tokens,), generator=generator)
    return st.Trace(token_ids=ids, config=config, indices=indices, mass=masses, model_info=info)


@pytest.fixture(scope="module")
def tiny_trace(tiny_tokenizer):
    model = tiny_model("llama")
    return st.trace(model, tiny_tokenizer, TEXT, st.StreamConfig(k=2, block_q=16, block_k=12))


def page_data(page: str) -> dict:
    """The JSON blob of a report page, parsed as the browser would."""
    found = re.search(r'<script type="application/json" id="sparsetrace-data">(.*?)</script>', page, re.S)
    return json.loads(found.group(1))


def test_blob_round_trips_the_trace_within_quantisation():
    trace = synthetic_trace(1000, layers=3, heads=2, block=32, k=4)
    indices, mass = decode_blocks(encode_blocks(trace))
    assert indices.shape == (3, 2, trace.num_query_blocks, 6)
    for layer in range(trace.num_layers):
        want_idx, want_mass = trace.blocks(layer)
        assert np.array_equal(indices[layer], want_idx.numpy())
        assert np.abs(mass[layer] - want_mass.numpy()).max() <= 0.5 / MASS_LEVELS + 1e-7


def test_blob_uses_int32_past_int16_key_blocks():
    trace = synthetic_trace(40_000, layers=1, heads=1, block=8192, block_k=1, k=3)
    encoded = encode_blocks(trace)
    assert trace.num_key_blocks > 32767 and encoded["index_type"] == "int32"
    assert np.array_equal(decode_blocks(encoded)[0][0], trace.blocks(0)[0].numpy())
    assert decode_blocks(encode_blocks(synthetic_trace(500)))[0].dtype == np.int32


def test_size_grows_with_the_trace_not_with_t_squared():
    """The default model's 8k-token shape (30 x 9 heads, 128 query blocks, K = 10) stays a few MB, and
    doubling T (4x the T x T matrix) about doubles the page."""
    sizes = {t: len(build_report(synthetic_trace(t, layers=30, heads=9), None).encode()) for t in (8192, 16384)}
    assert sizes[8192] < 3e6
    assert 1.7 < sizes[16384] / sizes[8192] < 2.3


def test_page_is_self_contained_and_carries_the_text(tiny_trace, tiny_tokenizer):
    page = build_report(tiny_trace, tiny_tokenizer)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "nothing is fetched"
    assert "<script src" not in page and "<link" not in page
    assert page.count("</script>") == page.count("<script"), "block text cannot close a script element"
    for name in SCRIPTS:  # every script of the viewer is inline
        assert resources.files("sparsetrace.report").joinpath(name).read_text(encoding="utf-8") in page
    data = page_data(page)
    ids = tiny_trace.token_ids.tolist()
    for size, texts in ((16, data["texts"]["query"]), (12, data["texts"]["key"])):
        assert len(texts) == -(-len(ids) // size)
        assert texts[3] == tiny_tokenizer.decode(ids[3 * size : 4 * size])  # short blocks are not cut
    assert data["summary"]["stats"]["kept_blocks"] == tiny_trace.stats()["kept_blocks"]
    assert data["text_note"] is None


def test_units_are_the_texts_sentences_and_paragraphs(tiny_tokenizer):
    """The units switch's spans are `split_units` on the whole text, token spans the trace's own tokens."""
    text = ("A lamp. The keeper lit the lamp at dusk; it burned until dawn.\n\nShips passed by.  Nobody saw "
            "them go!\n \n" + "The sea was calm that night. " * 12)
    trace = st.trace(tiny_model("llama"), tiny_tokenizer, text, st.StreamConfig(k=2, block_size=16))
    data = page_data(build_report(trace, tiny_tokenizer))
    assert data["units_note"] is None
    for kind, count in (("sentences", 15), ("paragraphs", 3)):  # "A lamp." joins the next sentence
        units, _ = split_units(text, tiny_tokenizer, kind, region="all")
        assert len(units) == count
        assert data["units"][kind]["tokens"] == [[u.token_start, u.token_end] for u in units]
        texts = data["units"][kind]["texts"]
        assert texts[0] == units[0].text and all(len(t) <= 240 for t in texts)
    assert data["units"]["paragraphs"]["texts"][2].endswith("…"), "long units are cut as block text"


def test_units_need_text_that_tokenizes_back(tiny_tokenizer):
    trace = synthetic_trace(300)  # random bytes: not valid UTF-8, the decoded text does not give the same tokens
    data = page_data(build_report(trace, tiny_tokenizer))
    assert data["units"] is None and "does not tokenize back" in data["units_note"]
    assert data["texts"] is not None, "block text is still shown"
    data = page_data(build_report(trace, None))
    assert data["units"] is None and "no tokenizer" in data["units_note"]


def test_without_a_tokenizer_the_page_says_so(tiny_trace):
    data = page_data(build_report(tiny_trace, None))
    assert data["texts"] is None and "token ranges" in data["text_note"]
    data = page_data(build_report(renamed(tiny_trace, "/no/such/model")))  # "auto", and no such model
    assert data["texts"] is None and "not available" in data["text_note"]


def renamed(trace: st.Trace, name: str) -> st.Trace:
    return st.Trace(token_ids=trace.token_ids, config=trace.config,
                    indices=[trace.blocks(i)[0] for i in range(trace.num_layers)],
                    mass=[trace.blocks(i)[1] for i in range(trace.num_layers)],
                    model_info=trace.model_info | {"name": name})


def test_auto_finds_the_tokenizer_of_a_local_model_folder(tmp_path, tiny_tokenizer, tiny_trace):
    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    trace = renamed(tiny_trace, str(tmp_path))
    texts = page_data(build_report(trace))["texts"]
    assert texts["query"][0] == tiny_tokenizer.decode(trace.token_ids[:16])


def test_extras_fidelity_figures_tables_and_needle(tiny_trace, tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), "red").save(buffer, format="PNG")
    png = tmp_path / "route.png"
    png.write_bytes(buffer.getvalue())
    fidelity = {"recall": [0.5, float("nan")], "oracle_recall": [0.6, 0.7], "recall_ratio": [0.8, 0.9],
                "match": True, "kl_next_token": 0.01, "ignored": 1}
    tiny_trace.extra["niah"] = {"k": 2, "route": {"answer_blocks": [3]}}
    tiny_trace.extra["anchors"] = {"top": [1, 2]}
    try:
        data = page_data(build_report(tiny_trace, None, extras={
            "fidelity": fidelity, "figures": {"the route": png}, "tables": {"mine": {"a": 1}}}))
    finally:
        del tiny_trace.extra["niah"], tiny_trace.extra["anchors"]
    assert data["fidelity"]["recall"] == [0.5, None] and "ignored" not in data["fidelity"]
    assert data["figures"][0]["title"] == "the route"
    import base64

    assert base64.b64decode(data["figures"][0]["src"].split(",", 1)[1]) == png.read_bytes()
    assert [t["title"] for t in data["tables"]] == ["run facts", "trace extra: anchors", "mine"]
    assert data["tables"][0]["value"] == {key: v for key, v in tiny_trace.extra.items() if not isinstance(v, dict)}
    assert data["extra"]["niah"]["k"] == 2


def test_bad_inputs_name_the_fix(tmp_path, tiny_trace):
    not_trace = tmp_path / "notes.sptrace"
    not_trace.write_text("hello")
    with pytest.raises(st.TraceFileError):
        report(not_trace, tmp_path / "r.html")
    with pytest.raises(st.InputError, match="does not exist"):
        report(tiny_trace, tmp_path / "missing" / "r.html", None)
    with pytest.raises(st.InputError, match="is a folder"):
        report(tiny_trace, tmp_path, None)
    with pytest.raises(st.InputError, match="not a PNG"):
        build_report(tiny_trace, None, extras={"figures": {"x": b"GIF89a"}})
    with pytest.raises(st.InputError, match="unknown report extras"):
        build_report(tiny_trace, None, extras={"figure": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.sptrace"], "nothing written on bad input"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_report_picks_up_a_needle_runs_files(capsys, tmp_path, tiny_trace):
    path = tiny_trace.save(tmp_path / "trace.sptrace")
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    (tmp_path / "route.png").write_bytes(buffer.getvalue())
    (tmp_path / "fidelity.json").write_text(json.dumps({"recall": [0.9], "oracle_recall": [1.0]}))
    code, out, err = run(capsys, "report", str(path), "-o", str(tmp_path / "r.html"), "--no-text")
    assert code == 0, err
    assert "wrote" in out and "r.html" in out
    data = page_data((tmp_path / "r.html").read_text())
    assert len(data["figures"]) == 1 and data["fidelity"]["recall"] == [0.9]
    code, out, err = run(capsys, "report", str(path), "-o", str(tmp_path / "s.html"), "--no-text", "--only-trace")
    data = page_data((tmp_path / "s.html").read_text())
    assert code == 0 and data["figures"] == [] and data["fidelity"] is None


@pytest.mark.parametrize("argv, message", [
    (["report", "{tmp}/none.sptrace", "-o", "{tmp}/r.html"], "sptrace"),
    (["report", "{trace}", "-o", "{tmp}/no/r.html"], "does not exist"),
    (["report", "{trace}", "-o", "{tmp}/r.html", "--figure", "{tmp}/nope.png"], "no such file"),
    (["report", "{trace}", "-o", "{tmp}/r.html", "--fidelity", "{trace}"], "not JSON"),
    (["demo", "-o", "{trace}"], "is a file"),
    (["demo", "--depth", "2"], "[0, 1]"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, tmp_path, tiny_trace, argv, message):
    trace = tiny_trace.save(tmp_path / "t.sptrace")
    argv = [a.format(tmp=tmp_path, trace=trace) for a in argv]
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.sptrace"]


@pytest.mark.parametrize("command", ["report", "demo"])
def test_help_teaches_with_an_example(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "examples:" in out and f"sparsetrace {command}" in out


def test_load_tokenizer_reads_the_default_models_cached_copy(tmp_path, monkeypatch, tiny_tokenizer):
    """No GGUF read, no weights: the converted copy's tokenizer.json is enough."""
    monkeypatch.setenv("SPARSETRACE_CACHE", str(tmp_path))
    tiny_tokenizer.save_pretrained(tmp_path / "models" / "SmolLM2-135M-Instruct-0123456789ab")
    loaded = st.load_tokenizer(None)
    assert loaded("héllo <b>")["input_ids"] == tiny_tokenizer("héllo <b>")["input_ids"]
    with pytest.raises(st.SparsetraceError, match="neither a model folder nor a hub id"):
        st.load_tokenizer("/no/such/model")
