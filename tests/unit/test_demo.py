"""`tasks.demo.demo` and `sparsetrace demo` on a tiny model: every file, the fidelity at the run's k, the summary."""

import json

from test_cli import run
from test_report import page_data

from sparsetrace.tasks.demo import SIBLING_FIDELITY, SIBLING_FIGURES


def test_demo_writes_the_run_its_fidelity_and_the_report(capsys, tmp_path, model_folder):
    code, out, err = run(capsys, "demo", "--model", model_folder, "--length", "700", "--depth", "0.3", "--no-progress",
                         "-o", str(tmp_path / "demo"))
    assert code == 0, err
    folder = tmp_path / "demo"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["niah.json", "trace.sptrace", "report.html",
                                                               SIBLING_FIDELITY, *SIBLING_FIGURES])
    niah = json.loads((folder / "niah.json").read_text())
    fidelity = json.loads((folder / SIBLING_FIDELITY).read_text())
    assert fidelity["config"]["k"] == niah["k"] == niah["min_k"], "the fidelity check runs at the run's k"
    assert [line for line in out.splitlines() if line[:3] in ("1/3", "2/3", "3/3")] == [
        "1/3  dense answer, smallest k that keeps it, trace and route",
        f"2/3  fidelity check at k = {niah['k']} (a dense pass with exact block masses, then a sparse one)",
        "3/3  report"]
    assert f"sparse model at k = {niah['k']} keeps it" in out and f"open {folder / 'report.html'}" in out
    page = (folder / "report.html").read_text()
    data = page_data(page)
    assert "sparsetrace demo: needle in" in page and data["fidelity"]["recall"] == fidelity["recall"]
    assert sorted(figure["title"] for figure in data["figures"]) == sorted(SIBLING_FIGURES.values())
