"""examples/tour.ipynb runs from top to bottom (nbclient, a real Jupyter kernel) on a tiny run,
and is committed without outputs."""
import os

import nbclient
import nbformat

from tests.test_loop import ROOT

NOTEBOOK = os.path.join(ROOT, "examples", "tour.ipynb")


def test_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
  assert "colab.research.google.com" in nb.cells[0].source


def test_runs_on_a_tiny_run(monkeypatch):
  # The smoke config for 4 steps: the cells' code paths, not the digits' quality.
  monkeypatch.setenv("DDPM_JAX_NOTEBOOK_CONFIG", "smoke")
  monkeypatch.setenv("DDPM_JAX_NOTEBOOK_STEPS", "4")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("DDPM_JAX_RUN", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(ROOT, "examples")}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)
  assert images == 4, text  # one grid per sampler
  assert "heun, 5 steps, NFE 9" in text
  assert "variational bound:" in text and "probability-flow ODE:" in text, text
