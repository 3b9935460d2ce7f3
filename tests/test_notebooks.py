"""Every notebook in notebooks/ runs top to bottom in a real Jupyter kernel (the short CI setting).

Each notebook runs in a fresh IPython kernel of this test's own interpreter
(a kernel spec written to a temporary ``JUPYTER_PATH``), from a temporary
working directory, with ``STN_JAX_NOTEBOOK_SMOKE=1`` (the notebooks' short
setting). The notebooks find MNIST as the CLI does, through
``$TFDS_DATA_DIR``; here it points at a small MNIST (:mod:`tests.small_mnist`:
synthetic digits in MNIST's files, prepared by the library's own download
path from a local HTTP server), so the test needs neither the internet nor
the shared copy, and downloading is switched off (``STN_JAX_DOWNLOAD=0``).
"""

from __future__ import annotations

import json
import pathlib
import sys

import nbclient
import nbformat
import pytest

from tests import small_mnist

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "stn-jax-test"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """Environment for the kernels: this interpreter's kernel spec, the short setting, MNIST."""
  jupyter_path = tmp_path_factory.mktemp("jupyter")
  spec_dir = jupyter_path / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "stn-jax tests", "language": "python"}))
  data_dir = small_mnist.prepare(tmp_path_factory.mktemp("mnist"))
  return {"JUPYTER_PATH": str(jupyter_path), "STN_JAX_NOTEBOOK_SMOKE": "1",
          "TFDS_DATA_DIR": str(data_dir), "STN_JAX_DOWNLOAD": "0", "JAX_PLATFORMS": "cpu",
          "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def test_there_are_notebooks():
  assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_"], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_draws(path, kernel_env, tmp_path, monkeypatch):
  for key, value in kernel_env.items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()   # Raises CellExecutionError (with the traceback) on any error.
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  outputs = [o for cell in code for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  # Figures render inline: every cell that shows a figure (pyplot's, or one the library
  # returns) has a PNG among its outputs; a library switching matplotlib to a
  # non-interactive backend would leave them empty.
  drawing = [cell for cell in code if "plt.show()" in cell.source or "_figure(" in cell.source]
  assert drawing, f"{path.name} draws no figure"
  for cell in drawing:
    assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:200]
