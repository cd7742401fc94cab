"""The report in a real browser: Debian's headless Chromium, driven by selenium, nothing downloaded.

No console error; layer and head pickers; a click on a query block lists exactly the trace's key
blocks of that row; hover shows the block; a screenshot; and at 32k tokens (512 blocks) switching
layer or head redraws in well under a frame budget a user would notice. The tests install
nothing: without Chromium they fail and name the package to install.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from test_report import TEXT, synthetic_trace
from tiny_models import tiny_model

import sparsetrace as st
from sparsetrace.report import report

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


def click_block(driver, row: int, column: int) -> None:
    """Click the centre of map cell (row, column), in the canvas's on-screen coordinates."""
    canvas = driver.find_element(By.ID, "map")
    # Whole canvas in view: webdriver offsets are from the centre of the element's visible part.
    rect = driver.execute_script("arguments[0].scrollIntoView({block: 'start'}); "
                                 "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", canvas)
    shape = driver.execute_script("return [window.sparsetraceViewer.nq, window.sparsetraceViewer.nk];")
    x = (column + 0.5) * rect[0] / shape[1] - rect[0] / 2  # selenium offsets are from the element's centre
    y = (row + 0.5) * rect[1] / shape[0] - rect[1] / 2
    ActionChains(driver).move_to_element_with_offset(canvas, round(x), round(y)).click().perform()


def open_report(driver, path) -> None:
    driver.get(path.as_uri())
    driver.find_element(By.ID, "draw-ms")
    assert driver.find_element(By.ID, "draw-ms").get_attribute("data-ms"), "the map was drawn"


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
        listed = browser.find_elements(By.CSS_SELECTOR, "#reads li")
        indices, mass = trace.blocks(layer)
        want = {int(j): float(m) for j, m in zip(indices[head, row], mass[head, row], strict=True) if j >= 0}
        got = {int(li.get_attribute("data-block")): float(li.get_attribute("data-mass")) for li in listed}
        assert browser.find_element(By.ID, "reads").get_attribute("data-row") == str(row)
        assert got.keys() == want.keys()
        assert all(abs(got[j] - want[j]) <= 0.5 / 255 + 1e-4 for j in want)
        panel = browser.find_element(By.ID, "reads")
        assert (panel.get_attribute("data-layer"), panel.get_attribute("data-head"), panel.get_attribute("data-row")) \
            == (str(layer), str(head), str(row))
        j = min(want)  # the text of each listed block is the block decoded
        text = tiny_tokenizer.decode(trace.token_ids[j * 12 : (j + 1) * 12])
        assert " ".join(text.split()) in " ".join(listed[[int(li.get_attribute("data-block")) for li in listed]
                                                         .index(j)].text.split())
        for h in range(trace.num_heads):  # every head's row of the same query block
            chips = browser.find_elements(By.CSS_SELECTOR, f'#all-heads tr[data-head="{h}"] span.chip')
            assert {int(c.get_attribute("data-block")) for c in chips} == {int(j) for j in indices[h, row] if j >= 0}
    click_block(browser, 20, 3)
    tooltip = browser.find_element(By.ID, "tooltip")
    assert tooltip.is_displayed() and "query block 20" in tooltip.text and "key block 3" in tooltip.text
    browser.find_element(By.ID, "goto-answer").click()
    assert browser.find_element(By.ID, "reads").get_attribute("data-row") == "20"
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
        timings.append(float(browser.find_element(By.ID, "draw-ms").get_attribute("data-ms")))
    click_block(browser, 400, 10)
    listed = {int(li.get_attribute("data-block")) for li in browser.find_elements(By.CSS_SELECTOR, "#reads li")}
    indices, _ = trace.blocks(12)
    assert listed == {int(j) for j in indices[6, 400] if j >= 0}
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
