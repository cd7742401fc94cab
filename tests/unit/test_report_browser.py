"""The report in a real browser: Debian's headless Chromium, driven by selenium, nothing downloaded.

No console error; layer and head pickers; a click on a query block lists exactly the trace's key
blocks of that row; hover shows the blocks and their token ranges; axis labels; shift/ctrl-click
selects several query blocks and lists what they read together; the units switch re-aggregates the
map to sentences and paragraphs (checked against a token-level computation here); PNG export; run
facts as tables; a screenshot; and at 32k tokens (512 blocks) switching layer or head redraws in
well under a frame budget a user would notice. The tests install nothing: without Chromium they
fail and name the package to install.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select
from test_report import TEXT, page_data, synthetic_trace
from tiny_models import tiny_model

import sparsetrace as st
from sparsetrace.report import report
from sparsetrace.report.data import decode_blocks

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # apt-get install chromium chromium-driver


def ensure_chromium() -> None:
    """Fail, not skip, without Debian's Chromium: installing it is the setup's job (README, .ci/run), not a test's."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        pytest.fail(f"the browser tests need {' and '.join(missing)}; install them first (the README's setup, "
                    "as .ci/run does): sudo apt-get install chromium chromium-driver", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def click_block(driver, row: int, column: int, key: str | None = None, click: bool = True) -> None:
    """Click (or only hover) map cell (row, column) at a whole viewport pixel inside it (the page maps the
    mouse to a cell by arithmetic on the canvas's rect), holding `key` (Keys.SHIFT, Keys.CONTROL) if given."""
    canvas = driver.find_element(By.ID, "map")
    left, top, width, height = driver.execute_script(
        "arguments[0].scrollIntoView({block: 'center'}); const r = arguments[0].getBoundingClientRect(); "
        "return [r.left, r.top, r.width, r.height];", canvas)
    rows, cols = driver.execute_script("const g = window.sparsetraceViewer.grid(); "
                                       "return [g.rows.length, g.cols.length];")

    def pixel(start: float, length: float, n: int, count: int) -> int:
        low, high = start + n * length / count, start + (n + 1) * length / count
        return next(p for p in (round((low + high) / 2), math.floor(high - 1e-6), math.ceil(low)) if low <= p < high)

    actions = ActionChains(driver)
    actions.w3c_actions.pointer_action.move_to_location(pixel(left, width, column, cols), pixel(top, height, row, rows))
    if key:
        actions.key_down(key)
    if click:
        actions.click()
    if key:
        actions.key_up(key)
    actions.perform()


def draw_ms(driver) -> float:
    return float(driver.find_element(By.ID, "map").get_attribute("data-draw-ms"))


def open_report(driver, path) -> None:
    driver.get(path.as_uri())
    assert draw_ms(driver) >= 0, "the map was drawn"


def listed(driver) -> dict[int, tuple[float, int]]:
    """The reads panel: column -> (value, readers)."""
    return {int(li.get_attribute("data-col")): (float(li.get_attribute("data-value")),
                                                int(li.get_attribute("data-readers")))
            for li in driver.find_elements(By.CSS_SELECTOR, "#reads li")}


def test_viewer_switches_layer_and_head_and_lists_the_rows_blocks(browser, tmp_path, tiny_tokenizer):
    trace = st.trace(tiny_model("llama"), tiny_tokenizer, TEXT, st.StreamConfig(k=2, block_q=16, block_k=12))
    trace.extra["niah"] = {"k": 2, "dense_answer": "x", "correct": True, "answer_kept": True, "min_k": 2,
                           "prompt": {"key": "a", "answer": "x", "depth": 0.5},
                           "route": {"needle_blocks": [5], "answer_blocks": [20], "connected": True, "threshold": 0.05}}
    path = report(trace, tmp_path / "report.html", tiny_tokenizer)
    browser.get_log("browser")  # drop earlier entries
    open_report(browser, path)
    assert console_errors(browser) == []
    for layer, head, row in ((2, 3, 20), (0, 1, 7), (1, 0, trace.num_query_blocks - 1)):
        Select(browser.find_element(By.ID, "layer")).select_by_value(str(layer))
        Select(browser.find_element(By.ID, "head")).select_by_value(str(head))
        click_block(browser, row, 0)
        items = browser.find_elements(By.CSS_SELECTOR, "#reads li")
        indices, mass = trace.blocks(layer)
        want = {int(j): float(m) for j, m in zip(indices[head, row], mass[head, row], strict=True) if j >= 0}
        got = {j: value for j, (value, _) in listed(browser).items()}
        assert got.keys() == want.keys()
        assert all(abs(got[j] - want[j]) <= 0.5 / 255 + 1e-4 for j in want)
        panel = browser.find_element(By.ID, "reads")
        assert (panel.get_attribute("data-layer"), panel.get_attribute("data-head"), panel.get_attribute("data-rows")) \
            == (str(layer), str(head), str(row))
        j = min(want)  # the text of each listed block is the block decoded
        text = tiny_tokenizer.decode(trace.token_ids[j * 12 : (j + 1) * 12])
        assert " ".join(text.split()) in " ".join(items[[int(li.get_attribute("data-col")) for li in items]
                                                        .index(j)].text.split())
        for h in range(trace.num_heads):  # every head's row of the same query block
            chips = browser.find_elements(By.CSS_SELECTOR, f'#all-heads tr[data-head="{h}"] span.chip')
            assert {int(c.get_attribute("data-col")) for c in chips} == {int(j) for j in indices[h, row] if j >= 0}
    click_block(browser, 20, 3)
    tooltip = browser.find_element(By.ID, "tooltip")
    assert tooltip.is_displayed() and "query block 20" in tooltip.text and "key block 3" in tooltip.text
    browser.find_element(By.ID, "goto-answer").click()
    assert browser.find_element(By.ID, "reads").get_attribute("data-rows") == "20"
    assert "Needle in a haystack" in browser.find_element(By.ID, "results").text
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert console_errors(browser) == []


def test_32k_tokens_stay_responsive(browser, tmp_path):
    """512 query x 512 key blocks, 30 layers x 9 heads (the default model's shape): the page opens and
    every layer/head switch redraws quickly."""
    trace = synthetic_trace(32768, layers=30, heads=9, k=8)
    path = report(trace, tmp_path / "big.html", None)
    size = path.stat().st_size
    browser.get_log("browser")
    started = time.perf_counter()
    open_report(browser, path)
    opened = time.perf_counter() - started
    timings = []
    for layer, head in ((5, 2), (29, 8), (0, 0), (17, 4), (12, 6)):
        Select(browser.find_element(By.ID, "layer")).select_by_value(str(layer))
        Select(browser.find_element(By.ID, "head")).select_by_value(str(head))
        timings.append(draw_ms(browser))
    click_block(browser, 400, 10)
    indices, _ = trace.blocks(12)
    assert set(listed(browser)) == {int(j) for j in indices[6, 400] if j >= 0}
    print(json.dumps({"report_mb": round(size / 1e6, 2), "open_s": round(opened, 2), "redraw_ms": timings}))
    assert console_errors(browser) == []
    assert size < 12e6 and opened < 10 and max(timings) < 150


def test_viewer_shows_each_rows_kept_count_and_coverage(browser, tmp_path, tiny_tokenizer):
    config = st.StreamConfig(block_size=12, coverage=0.8, k_max=4)
    trace = st.trace(tiny_model("llama"), tiny_tokenizer, TEXT, config)
    path = report(trace, tmp_path / "report.html", tiny_tokenizer)
    browser.get_log("browser")
    open_report(browser, path)
    for layer, head, row in ((1, 2, 15), (0, 0, trace.num_query_blocks - 1)):
        Select(browser.find_element(By.ID, "layer")).select_by_value(str(layer))
        Select(browser.find_element(By.ID, "head")).select_by_value(str(head))
        click_block(browser, row, 0)
        title = browser.find_element(By.ID, "reads-title").text
        kept = int(trace.kept_counts(layer)[head, row])
        assert f"keeps {kept} block" in title
        shown = float(title.split("estimated coverage ")[1].split(" ")[0])
        assert abs(shown - float(trace.coverage(layer)[head, row])) <= 0.5 / 255 + 1e-3
    assert console_errors(browser) == []


UNITS_TEXT = ("The keeper lit the lamp at dusk. The lamp burned until dawn.\n\n"
              "Ships passed by at night. Nobody saw them go, and the sea was calm!\n\n") * 3


@pytest.fixture(scope="module")
def units_report(tmp_path_factory, tiny_tokenizer):
    """A tiny model's trace of a text with sentences and paragraphs (query blocks 16, key blocks 12), its report."""
    trace = st.trace(tiny_model("llama"), tiny_tokenizer, UNITS_TEXT, st.StreamConfig(k=2, block_q=16, block_k=12))
    trace.extra.update(seed=3, form="ruler")
    path = report(trace, tmp_path_factory.mktemp("units") / "report.html", tiny_tokenizer,
                  extras={"tables": {"mine": {"sizes": [1, 2], "rows": [{"x": 1, "y": 0.5}], "nested": {"d": "e"}}}})
    return trace, path


def unit_shares(indices: np.ndarray, mass: np.ndarray, spans: list, block_q: int, block_k: int,
                tokens: int) -> dict[tuple[int, int], float]:
    """share[(U, V)] of query unit U on key unit V, through a dense token x token matrix (a few hundred tokens):
    a kept block's mass spread evenly over the keys of that block each query token can see.

    indices, mass: one head's [n_q, K]; spans: [start, end) token spans. Only pairs with a visible kept key."""
    attention = np.zeros((tokens, tokens))
    visible = np.zeros((tokens, tokens), dtype=bool)
    for t in range(tokens):
        for j, m in zip(indices[t // block_q], mass[t // block_q], strict=True):
            low, high = j * block_k, min((j + 1) * block_k, tokens, t + 1)
            if j >= 0 and high > low:
                attention[t, low:high] += m / (high - low)
                visible[t, low:high] = True
    return {(u, v): attention[a:b, c:d].sum() / (b - a)
            for u, (a, b) in enumerate(spans) for v, (c, d) in enumerate(spans) if visible[a:b, c:d].any()}


def test_axes_label_block_numbers_and_hover_shows_token_ranges(browser, units_report):
    trace, path = units_report
    browser.get_log("browser")
    open_report(browser, path)
    assert browser.find_element(By.ID, "x-title").text.startswith("key block")
    assert browser.find_element(By.ID, "y-title").text.startswith("query block")
    map_rect = browser.find_element(By.ID, "map").rect
    tokens = trace.num_tokens
    axes = (("x-axis", 12, trace.num_key_blocks, "x"), ("y-axis", 16, trace.num_query_blocks, "y"))
    for axis, size, count, along in axes:
        ticks = browser.find_elements(By.CSS_SELECTOR, f"#{axis} .tick")
        numbers = [int(t.get_attribute("data-index")) for t in ticks]
        assert len(ticks) >= 5 and numbers[0] == 0 and numbers == sorted(numbers) and numbers[-1] >= count // 2
        for tick, n in zip(ticks, numbers, strict=True):
            assert tick.text == str(n)
            assert f"tokens {n * size}-{min((n + 1) * size, tokens) - 1}" in tick.get_attribute("title")
            rect, extent = tick.rect, ("width" if along == "x" else "height")
            centre = rect[along] + rect[extent] / 2
            block_centre = map_rect[along] + (n + 0.5) * map_rect[extent] / count
            assert abs(centre - block_centre) < 3, "the label sits on its block"
    click_block(browser, 9, 4, click=False)  # hover only
    tooltip = browser.find_element(By.ID, "tooltip")
    assert tooltip.is_displayed()
    assert "query block 9 (tokens 144-159)" in tooltip.text and "key block 4 (tokens 48-59)" in tooltip.text
    assert browser.find_element(By.ID, "reads").get_attribute("data-rows") == "", "hover selects nothing"
    assert console_errors(browser) == []


def test_no_heading_before_a_click_and_no_timing_text(browser, units_report):
    _, path = units_report
    open_report(browser, path)
    panel = browser.find_element(By.ID, "reads-panel")
    assert [h.text for h in panel.find_elements(By.TAG_NAME, "h3") if h.is_displayed()] == []
    assert browser.find_element(By.ID, "reads-hint").is_displayed()
    for heading in browser.find_elements(By.CSS_SELECTOR, "h1, h2, h3, h4"):
        assert not heading.is_displayed() or heading.text.strip(), "no empty heading"
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "drawn in" not in body and not re.search(r"\d\s*ms\b", body)
    click_block(browser, 5, 0)
    shown = [h.text for h in panel.find_elements(By.TAG_NAME, "h3") if h.is_displayed()]
    assert len(shown) == 2 and shown[0].startswith("Query block 5")
    assert not browser.find_element(By.ID, "reads-hint").is_displayed()


def test_run_facts_and_tables_are_html_tables(browser, units_report):
    trace, path = units_report
    open_report(browser, path)
    results = browser.find_element(By.ID, "results")
    assert results.find_elements(By.TAG_NAME, "pre") == [] and "{" not in results.text
    facts = results.find_element(By.CSS_SELECTOR, '.value-box[data-title="run facts"] > table')
    rows = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")[1].text
            for tr in facts.find_elements(By.TAG_NAME, "tr")}
    assert rows["seed"] == "3" and rows["form"] == "ruler"
    assert rows.keys() == {k for k, v in trace.extra.items() if not isinstance(v, dict | list)}
    mine = results.find_element(By.CSS_SELECTOR, '.value-box[data-title="mine"] > table')
    assert "1, 2" in mine.text
    grid = mine.find_element(By.CSS_SELECTOR, "table.grid")
    assert [th.text for th in grid.find_elements(By.TAG_NAME, "th")] == ["x", "y"]
    assert [td.text for td in grid.find_elements(By.TAG_NAME, "td")] == ["1", "0.5"]
    assert mine.find_element(By.CSS_SELECTOR, ":scope table.facts td").text == "d"  # the nested object


def summary_rows(driver) -> dict[str, str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#summary-table tr")
    return {r.find_elements(By.TAG_NAME, "td")[0].text: r.find_elements(By.TAG_NAME, "td")[1].text for r in rows}


def test_compression_is_explained_and_kept_blocks_per_row_shown(browser, units_report, tmp_path, tiny_tokenizer):
    trace, path = units_report
    open_report(browser, path)
    stats = trace.stats()
    rows = summary_rows(browser)
    assert rows["compression"].startswith(f"{stats['compression']:,.0f}x")
    assert f"{stats['dense_to_trace_ratio']:,.0f}x smaller" in rows["compression"]
    assert "bytes of the dense T x T patterns / bytes of the trace" in rows["compression"]
    assert "not pruning" in rows["compression"]
    assert float(rows["kept per row"].split()[0]) == pytest.approx(stats["kept_per_row_mean"], abs=0.05)
    assert f"at most {stats['kept_per_row_max']}" in rows["kept per row"]
    assert rows["pruned"].startswith(f"{100 * stats['sparsity']:.1f}".rstrip("0").rstrip(".") + "%")
    for layer, head in ((0, 0), (2, 3)):
        Select(browser.find_element(By.ID, "layer")).select_by_value(str(layer))
        Select(browser.find_element(By.ID, "head")).select_by_value(str(head))
        counts = browser.find_element(By.ID, "kept-strip").get_attribute("data-counts")
        assert [int(c) for c in counts.split(",")] == trace.kept_counts(layer)[head].tolist()
        mean = trace.kept_counts(layer)[head].float().mean().item()
        assert f"keep {mean:.1f}".rstrip("0").rstrip(".") in browser.find_element(By.ID, "head-facts").text
    dense = st.trace(tiny_model("llama"), tiny_tokenizer, UNITS_TEXT[:150], st.StreamConfig(k=8, block_size=16))
    assert dense.stats()["sparsity"] == 0
    open_report(browser, report(dense, tmp_path / "dense.html", None))
    assert "every row keeps every key block it can read" in summary_rows(browser)["pruned"]


def test_shift_and_ctrl_click_select_several_query_blocks(browser, units_report):
    """Plain click one row, ctrl-click adds and drops rows, shift-click selects the range from the last click;
    the list is the union of the rows' kept blocks with the mean mass (0 where a row does not keep one)."""
    trace, path = units_report
    open_report(browser, path)
    Select(browser.find_element(By.ID, "layer")).select_by_value("1")
    Select(browser.find_element(By.ID, "head")).select_by_value("2")
    indices, mass = (x[2].numpy() for x in trace.blocks(1))

    def check(rows: list[int]) -> None:
        assert browser.find_element(By.ID, "reads").get_attribute("data-rows") == ",".join(map(str, rows))
        want: dict[int, list[float]] = {}
        for r in rows:
            for j, m in zip(indices[r], mass[r], strict=True):
                if j >= 0:
                    want.setdefault(int(j), []).append(float(m))
        got = listed(browser)
        assert got.keys() == want.keys()  # the union
        for j, masses in want.items():
            assert abs(got[j][0] - sum(masses) / len(rows)) <= 0.5 / 255 + 1e-4 and got[j][1] == len(masses)
        for h in range(trace.num_heads):
            chips = browser.find_elements(By.CSS_SELECTOR, f'#all-heads tr[data-head="{h}"] span.chip')
            union = {int(j) for r in rows for j in trace.blocks(1)[0][h, r] if j >= 0}
            assert {int(c.get_attribute("data-col")) for c in chips} == union

    click_block(browser, 7, 0)
    click_block(browser, 12, 0, Keys.CONTROL)
    check([7, 12])
    assert "Query blocks 7, 12 (2)" in browser.find_element(By.ID, "reads-title").text
    click_block(browser, 15, 0, Keys.SHIFT)
    check([12, 13, 14, 15])
    click_block(browser, 13, 0, Keys.CONTROL)
    check([12, 14, 15])
    click_block(browser, 3, 0)
    check([3])
    assert console_errors(browser) == []


@pytest.mark.parametrize("kind", ["sentences", "paragraphs"])
def test_units_switch_aggregates_to_sentences_and_paragraphs(browser, units_report, kind):
    trace, path = units_report
    data = page_data(path.read_text())
    spans = data["units"][kind]["tokens"]
    assert len(spans) == {"sentences": 12, "paragraphs": 6}[kind]
    open_report(browser, path)
    browser.find_element(By.CSS_SELECTOR, f'input[name="units"][value="{kind}"]').click()
    assert browser.find_element(By.ID, "y-title").text.startswith(f"query {kind[:-1]}")
    assert not browser.find_element(By.ID, "kept-strip").is_displayed()
    ticks = browser.find_elements(By.CSS_SELECTOR, "#x-axis .tick")
    a, b = spans[int(ticks[1].get_attribute("data-index"))]
    assert f"tokens {a}-{b - 1}" in ticks[1].get_attribute("title")
    indices, mass = decode_blocks(data["blocks"])  # the page's own (quantised) masses
    for layer, head, rows in ((0, 1, [len(spans) - 1]), (2, 3, [1, len(spans) - 2])):
        Select(browser.find_element(By.ID, "layer")).select_by_value(str(layer))
        Select(browser.find_element(By.ID, "head")).select_by_value(str(head))
        shares = unit_shares(indices[layer, head], mass[layer, head], spans, 16, 12, trace.num_tokens)
        click_block(browser, rows[0], 0)
        for r in rows[1:]:
            click_block(browser, r, 0, Keys.CONTROL)
        got = listed(browser)
        want = {v for (u, v) in shares if u in rows}
        assert got.keys() == want and len(want) > 1
        for v in want:
            mean = sum(shares.get((u, v), 0.0) for u in rows) / len(rows)
            assert got[v][0] == pytest.approx(mean, abs=1e-4)
            assert got[v][1] == sum((u, v) in shares for u in rows)
        assert sum(shares[(rows[0], v)] for v in want if (rows[0], v) in shares) <= 1 + 1e-6
        click_block(browser, rows[0], 0, click=False)
        text = browser.find_element(By.ID, "tooltip").text
        c, d = spans[rows[0]]
        assert f"query {kind[:-1]} {rows[0]} (tokens {c}-{d - 1})" in text
    assert console_errors(browser) == []


def test_png_export_of_the_current_map(browser, units_report):
    _, path = units_report
    open_report(browser, path)
    browser.execute_script(  # record the download instead of saving a file
        "window.exported = []; HTMLAnchorElement.prototype.click = function () "
        "{ window.exported.push([this.href, this.download]); };")
    Select(browser.find_element(By.ID, "layer")).select_by_value("2")
    browser.find_element(By.CSS_SELECTOR, 'input[name="units"][value="sentences"]').click()
    browser.find_element(By.ID, "export-png").click()
    (href, name), = browser.execute_script("return window.exported;")
    assert href.startswith("data:image/png;base64,") and name == "sparsetrace-layer2-head0-sentences.png"
    image = Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1])))
    canvas = browser.find_element(By.ID, "map")
    width, height = (float(canvas.value_of_css_property(side)[:-2]) for side in ("width", "height"))
    assert image.format == "PNG" and image.size == (round(56 + width + 12), round(52 + height + 12))
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels[52:, 56:] != 255).any(axis=-1).mean() > 0.2, "the map is in the picture"
    assert (pixels[:52] != 255).any(), "title and axis labels are drawn"
    assert console_errors(browser) == []
