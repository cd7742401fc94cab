"""Notebook display: every result's short repr and HTML table, a trace's viewer in a sandboxed iframe
(several on one page, in a real browser), and importing sparsetrace leaving matplotlib's state alone."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from selenium.webdriver.common.by import By
from test_report import synthetic_trace
from test_report_browser import browser, console_errors  # noqa: F401 (browser: the Chromium fixture)

import sparsetrace as st
from sparsetrace.analysis.attribution import Source
from sparsetrace.analysis.segments import Unit
from sparsetrace.notebook import facts_html, facts_repr, trace_html
from sparsetrace.report import build_report
from sparsetrace.tasks.needle_causal import KnockoutRow
from sparsetrace.tasks.niah import DenseAnswer, NiahPrompt

LAYERS, HEADS = 30, 9  # the default model's shape: the generated dataclass reprs printed hundreds of numbers


def srcdocs(page: str) -> list[str]:
    """The pages inside the iframes' srcdoc attributes, unescaped as the browser reads them."""
    return [html.unescape(found) for found in re.findall(r'<iframe srcdoc="([^"]*)"', page)]


def outside_iframes(page: str) -> str:
    return re.sub(r'srcdoc="[^"]*"', 'srcdoc=""', page)


# --- helpers ---

def test_facts_repr_and_html_format_numbers_and_escape_text():
    facts = {"recall": 0.987654321, "match": True, "answer": " 42", "heads": [(7, 7), (17, 3)], "none": None,
             "text": "<script>alert(1)</script>"}
    assert facts_repr("R", facts) == ("R(recall=0.9877, match=True, answer=' 42', heads=[(7, 7), (17, 3)], "
                                      "none=None, text='<script>alert(1)</script>')")
    page = facts_html("R", facts, [{"rank": 1, "text": "a < b"}], rows_title="top")
    assert "<script>" not in page and "&lt;script&gt;" in page and "a &lt; b" in page
    assert "<th" in page and ">0.9877<" in page and ">' 42'<" in page  # a leading space stays visible


# --- the trace and its viewer ---

def test_trace_html_is_the_summary_and_the_report_in_a_sandboxed_iframe():
    trace = synthetic_trace(300, layers=2, heads=3, block=32, k=3)
    page = trace._repr_html_()
    frames = srcdocs(page)
    assert len(frames) == 1 and frames[0] == build_report(trace, None)  # the viewer, escaped losslessly
    assert 'sandbox="allow-scripts allow-downloads"' in page  # an opaque origin: no access to the notebook
    stats = trace.stats()
    assert ">300<" in page and f"{stats['sparsity']:.1%}" in page and ">k = 3<" in page
    outside = outside_iframes(page)
    assert "<script" not in outside and " id=" not in outside  # nothing that could clash with the notebook's


def test_trace_html_without_the_viewer_above_the_entry_limit():
    trace = synthetic_trace(300, layers=2, heads=3, block=32, k=3)
    entries = 2 * 3 * 10 * 5  # L x H x n_q x K
    assert "<iframe" in trace_html(trace, max_entries=entries)
    page = trace_html(trace, max_entries=entries - 1)
    assert "<iframe" not in page and "st.report(trace, 'report.html')" in page and ">300<" in page


def test_several_viewers_on_one_page_work_side_by_side_in_a_browser(browser, tmp_path):  # noqa: F811
    traces = [synthetic_trace(300, layers=2, heads=3, block=32, k=3, seed=1),
              synthetic_trace(700, layers=3, heads=2, block=64, k=4, seed=2)]
    page = tmp_path / "notebook.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                    + "".join(t._repr_html_() for t in traces) + "</body></html>", encoding="utf-8")
    browser.get_log("browser")  # drop earlier entries
    browser.get(page.as_uri())
    frames = browser.find_elements(By.TAG_NAME, "iframe")
    assert len(frames) == 2
    for frame, trace in zip(frames, traces, strict=True):
        browser.switch_to.frame(frame)
        browser.find_element(By.ID, "map")
        assert browser.execute_script("return typeof window.sparsetraceViewer;") == "object", "its script ran"
        assert browser.execute_script("return document.getElementById('map').width;") > 0, "it drew its map"
        pickers = browser.execute_script("return [document.getElementById('layer').options.length, "
                                         "document.getElementById('head').options.length];")
        assert pickers == [trace.num_layers, trace.num_heads]  # its own data (2 x 3 and 3 x 2), not the other's
        browser.switch_to.default_content()
    assert browser.execute_script("return typeof window.sparsetraceViewer;") == "undefined"  # the notebook's own
    assert console_errors(browser) == []


# --- every result object ---

def fidelity_report() -> st.FidelityReport:
    rng = np.random.default_rng(0)
    per_head = rng.uniform(0.8, 1.0, (LAYERS, HEADS))
    return st.FidelityReport(tokens=1026, config=st.StreamConfig(k=8).to_dict(),
                             recall=per_head.mean(1).tolist(), oracle_recall=(per_head.mean(1) + 0.005).tolist(),
                             recall_per_head=per_head.tolist(), oracle_recall_per_head=(per_head + 0.005).tolist(),
                             continuation=[11, 12], sparse_predictions=[11, 12], kl_next_token=1.5e-4, kl_mean=2e-4,
                             top1_agreement=1.0, stats={"tokens": 1026})


def min_k_result() -> st.MinKResult:
    return st.MinKResult(3, {1: False, 2: False, 3: True, 4: True, 16: True}, True, 16,
                         {"sparsity": 0.75, "compression": 12345.0}, synthetic_trace(200, block=32, k=3))


def anchors_result() -> st.AnchorsResult:
    trace = synthetic_trace(256, layers=LAYERS, heads=HEADS, block=32, k=2)
    units = [Unit(i, f"Sentence {i} <b>.", 10 * i, 10 * i + 9, 25 * i, 25 * i + 25, "plan_generation",
                  None if i == 9 else float(i % 4)) for i in range(10)]
    vertical = np.random.default_rng(0).random((LAYERS, HEADS, 10))
    text = st.AnchorText("text 0", units, np.zeros((LAYERS, HEADS, 10, 10)), vertical, vertical.var(-1), trace,
                         {"sparsity": 0.4, "answer_preserved": True}, "rules")
    return st.AnchorsResult([text], vertical.var(-1), [(3, 1), (7, 7), (2, 0), (5, 5), (9, 1), (1, 1)], {},
                            {"texts": [{"spearman_scores": 0.979}]})


def niah_run() -> st.NiahRun:
    trace = synthetic_trace(640, layers=4, heads=3, block=64, k=3)
    prompt = NiahPrompt("text", trace.token_ids, "tide-step", "1679215", 0.5, (100, 160), (200, 230), 40)
    answer = DenseAnswer(torch.tensor([5, 6]), " 1679215", True)
    return st.NiahRun(prompt, answer, 3, None, trace, True, st.needle_route(trace, (200, 230)), 12.34,
                      DenseAnswer(torch.tensor([5, 7]), " 1679", False))


def attribution() -> st.Attribution:
    sources = [Source(f"Sentence {i} <i>.", 10 * i, 10 * i + 9, (20 + 5 * i, 25 + 5 * i), float(i % 3))
               for i in range(8)]
    return st.Attribution("prompt", "context", 0, " Calder", list(range(60)), [1, 2], sources,
                          np.zeros((LAYERS, HEADS, 8), np.float32), "max_head", {}, 2.5, "Who built it?")


def suppression_result() -> st.SuppressionResult:
    effects = np.triu(np.random.default_rng(0).random((12, 12)), 1)
    effects[4, 5:] += 10  # unit 4 matters most
    return st.SuppressionResult(effects, np.log(effects + 1e-9), [(i, i + 1) for i in range(12)], 12, "sparse", {},
                                1.0, "float32", 3.0)


def reader_knockout() -> st.ReaderKnockout:
    def row(kind, n, seed, accuracy, drop):
        return KnockoutRow(kind, n, seed, [(1, 1)] * n, -1.0 - drop, drop, [-0.5, -0.5], accuracy == 1.0, " 1",
                           accuracy, 1)
    rows = [row("top", 5, None, 0.0, 9.5), row("random", 5, 0, 1.0, 0.5), row("random", 5, 1, 1.0, 0.3),
            row("top", 10, None, 0.0, 12.0), row("random", 10, 0, 1.0, 1.0), row("random", 10, 1, 0.0, 2.0)]
    return st.ReaderKnockout("dense", {}, "zero", " 1679215", "1679215", row("base", 0, None, 1.0, 0.0), rows)


def ablation_result() -> st.AblationResult:
    interventions = [st.Intervention(knockout=[(3, 9)]), st.Intervention(heads_out=[(7, 7)]),
                     st.Intervention(remove=[(0, 5)])]
    base = torch.full((4,), -0.25)
    logprobs = torch.stack([base - 0.1, base - 2.0, base - 0.5])
    return st.AblationResult(torch.arange(300), torch.arange(4), base, logprobs, interventions, "sparse", {}, [0, 0, 0])


def salience_result() -> st.Salience:
    return st.salience(synthetic_trace(640, layers=LAYERS, heads=HEADS, block=64, k=3))


def flow_result() -> st.Flow:
    return st.flow(synthetic_trace(640, layers=4, heads=3, block=64, k=3), "tokens:0-70", "tokens:600-640")


# Per result: the object, and what its repr must say (its key numbers, computed from the object).
RESULTS = {
    "FidelityReport": (fidelity_report, lambda r: [f"recall={np.mean(r.recall):.4g}", "match=True",
                                                   f"worst_layer=({int(np.argmin(r.recall))}, ", "budget='k = 8'"]),
    "MinKResult": (min_k_result, lambda r: ["min_k=3", "tried={1: False, 2: False, 3: True, 4: True, 16: True}",
                                            "kept_token_pairs='25.0%'", "compression=12345"]),
    "AnchorsResult": (anchors_result, lambda r: ["texts=1", "units=10", "answer_preserved=True",
                                                 "receiver_heads=[(3, 1), (7, 7), (2, 0), (5, 5), (9, 1)]",
                                                 "top_unit=(3, 3.0)", "spearman_vs_dense=0.979"]),
    "AnchorText": (lambda: anchors_result().texts[0], lambda r: ["name='text 0'", "top_unit=(3, 3.0)"]),
    "NiahRun": (niah_run, lambda r: ["needle='tide-step = 1679215'", "dense_answer=' 1679215'", "dense_score=1.0",
                                     "sparse_answer=' 1679'", "sparse_score=0.0", "budget='k = 3'",
                                     f"route_connected={r.route.route.connected}"]),
    "NeedleRoute": (lambda: niah_run().route, lambda r: [f"needle_blocks={r.needle_blocks}",
                                                         f"answer_blocks={r.answer_blocks}",
                                                         f"attention_edges={len(r.route.attention_edges())}"]),
    "Route": (lambda: niah_run().route.route, lambda r: [f"sources={r.sources}", f"connected={r.connected}"]),
    "Salience": (salience_result, lambda r: ["tokens=640", "key_blocks=10",
                                             f"top_block=({r.top[0]['block']}, {r.top[0]['selected_mean']:.4g})"]),
    "Flow": (flow_result, lambda r: ["source='tokens 0-70'", "target='tokens 600-640'",
                                     f"connected={r.route.connected}"]),
    "Attribution": (attribution, lambda r: ["query='Who built it?'", "response=' Calder'", "sources=8",
                                            "top_source=('Sentence 2 <i>.', 2.0)"]),
    "SuppressionResult": (suppression_result, lambda r: ["units=12", f"top_unit=(4, {r.scores[4]:.4g})"]),
    "ReaderKnockout": (reader_knockout, lambda r: ["n=[5, 10]", "top_accuracy=[0.0, 0.0]",
                                                   "random_accuracy=[1.0, 0.5]", "random_drop=[0.4, 1.5]"]),
    "AblationResult": (ablation_result, lambda r: ["interventions=3", "largest_drop=('heads zero 7:7', 8",
                                                   "base_logprob=-1.0"]),
}


@pytest.mark.parametrize("name", list(RESULTS))
def test_each_result_has_a_short_repr_with_its_key_numbers(name):
    build, expected = RESULTS[name]
    result = build()
    text = repr(result)
    assert text.startswith(f"{name}(") and "\n" not in text and len(text) < 400, text
    assert "array(" not in text and "tensor(" not in text and "object at" not in text
    for part in expected(result):
        assert part in text, (part, text)


@pytest.mark.parametrize("name", list(RESULTS))
def test_each_result_shows_an_html_table_of_the_same_numbers(name):
    build, expected = RESULTS[name]
    result = build()
    page = result._repr_html_()
    assert page.startswith('<div class="sparsetrace-result"><table') and f">{name}</caption>" in page
    assert "<script" not in page and "<b>" not in page and "<i>" not in page  # texts are escaped
    shown = dict(re.findall(r"<tr><th[^>]*>([^<]*)</th><td[^>]*>([^<]*)</td></tr>", page))
    for part in expected(result):
        label, value = part.split("=", 1)
        if name == "ReaderKnockout" and value.startswith("["):
            continue  # its per-N lists are the second table's columns
        cell = html.unescape(shown[label.replace("_", " ")])
        assert cell.startswith(value) or cell.startswith(value.strip("'")), (part, cell)
    assert len(page) < 20_000


# --- matplotlib's global state ---

STATE_PROBE = textwrap.dedent("""
    import sys
    import matplotlib
    {before}
    import numpy as np
    import sparsetrace
    from sparsetrace import plots
    from sparsetrace.files import save_figure
    figure = plots.reader_heads_figure(np.random.rand(4, 3), title="t", colorbar="c")
    save_figure(figure, sys.argv[1])
    {after}
    print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
""")


def test_importing_sparsetrace_and_drawing_a_figure_leave_matplotlib_alone(tmp_path):
    """A notebook's backend (here svg, as MPLBACKEND sets it) stays, and pyplot is never imported."""
    code = STATE_PROBE.format(before="", after="")
    env = dict(os.environ, MPLBACKEND="svg", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.png")], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["svg", "False"]
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")


def test_a_pyplot_users_figures_and_backend_are_untouched(tmp_path):
    before = "matplotlib.use('svg'); import matplotlib.pyplot as plt; mine = plt.figure()"
    after = "assert plt.get_fignums() == [mine.number], plt.get_fignums()"
    code = STATE_PROBE.format(before=before, after=after)
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f.png")], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["svg", "True"]
