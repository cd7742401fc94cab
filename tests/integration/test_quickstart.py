"""examples/quickstart.ipynb: executed top to bottom on the default model, so it cannot rot, and kept in
git without outputs (a notebook's outputs are large, machine-specific and change on every run)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"
TIMEOUT_S = 300  # per cell; the whole notebook takes about a minute on a 2-core CPU


def test_the_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has code cells"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), \
        "strip the outputs before committing: jupyter nbconvert --clear-output --inplace examples/quickstart.ipynb"


@pytest.mark.integration
def test_the_quickstart_notebook_runs_without_errors(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    shown = [output["data"] for output in outputs if output.output_type == "execute_result"]
    html = [data.get("text/html", "") for data in shown]
    assert any("<iframe srcdoc=" in page for page in html), "the trace showed its viewer"
    for name in ("FidelityReport", "NeedleRoute", "AnchorsResult"):
        assert any(f">{name}</caption>" in page for page in html), f"{name} showed its table"
        assert any(data["text/plain"].startswith(f"{name}(") for data in shown), f"{name} has its short repr"
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "report.html" in printed
