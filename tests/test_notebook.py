"""notebooks/quickstart.ipynb runs top to bottom on CPU, started in notebooks/ as Jupyter starts it: the scripts
import from there, the toy world is the repository's, the run trains and measures, the plots show, and the
recipe cells print the plan."""

import json

import pytest

from conftest import ROOT


NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def outputs_text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(toy_world, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # papermill's convention: values put after the cell tagged `parameters` override it; the run goes to tmp_path.
    parameters = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    output_dir = tmp_path / "run"
    notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell(f"OUTPUT_DIR = Path({str(output_dir)!r})"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here needs the network
    monkeypatch.delenv("POLARIS_TOY_DIR", raising=False)
    in_notebooks = ROOT / "notebooks"
    leftovers_before = sorted(path.name for path in in_notebooks.iterdir())

    NotebookClient(notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(in_notebooks)}}).execute()

    text = "\n".join(outputs_text(cell) for cell in notebook.cells)
    assert f"repository: {ROOT}" in text
    assert f"Toy world found in {toy_world}" in text and toy_world == ROOT / "outputs" / "toy"
    assert sorted(path.name for path in in_notebooks.iterdir()) == leftovers_before  # nothing built or written beside it
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_problems"] == 32
    assert 0.0 < summary["accuracy_before"] < 1.0 and 0.0 < summary["accuracy_after"] < 1.0
    table = next(cell for cell in notebook.cells if "held-out accuracy (avg@2, 32 problems)" in outputs_text(cell))
    shown = [float(value) for value in outputs_text(table).split()[-2:]]  # the table's before and after, rounded to 3 places
    assert shown == pytest.approx([summary["accuracy_before"], summary["accuracy_after"]], abs=6e-4)
    images = [output for cell in notebook.cells for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(images) == 2  # learning_curve.png and the completion-length plot, shown inline
    assert "HuggingFaceH4/MATH-500 (100 problems, avg@4)" in text  # the consumer recipe's held-out set
    assert "Memory plan" in text and "Fits a 8 GiB GPU" in text
