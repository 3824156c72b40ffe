"""The executed tour notebook runs from top to bottom without an error (nbclient, kernel python3)."""
from __future__ import annotations

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(os.path.dirname(HERE), "examples", "erf_tour.ipynb")


def test_tour_notebook_executes_without_error():
    nbformat = pytest.importorskip("nbformat", reason="nbformat reads the notebook")
    nbclient = pytest.importorskip("nbclient", reason="nbclient executes the notebook")
    pytest.importorskip("ipykernel", reason="ipykernel is the notebook's python3 kernel")
    pytest.importorskip("torchvision", reason="the notebook swaps the pooling of a torchvision ResNet")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any(c.cell_type == "code" for c in nb.cells)
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the ERF heatmaps, the comparison grid and the ResNet swap
