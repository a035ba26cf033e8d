"""The quickstart notebook: in step with its generator, committed executed, runs on tiny.

`notebooks/make_quickstart.py` holds the cells; `notebooks/quickstart.ipynb` is its
output executed on the real model. The last test runs a fresh copy of the notebook in a
python3 kernel on the tiny random model (MECH_UNLEARN_NOTEBOOK_MODEL=tiny-gemma3).
"""

import importlib.util
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
GENERATOR = ROOT / "notebooks" / "make_quickstart.py"
MAX_BYTES = 2_500_000  # committed with outputs; keep it reviewable and cheap to clone
CELL_TIMEOUT_S = 180


def _generator():
  spec = importlib.util.spec_from_file_location("make_quickstart", GENERATOR)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cells(nb):
  return [(c.cell_type, c.get("id"), c.source) for c in nb.cells]


def _errors(nb) -> list[str]:
  """Error outputs and tracebacks on stderr, as 'cell id: text'."""
  found = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      if out.output_type == "error":
        found.append(f"{cell.id}: {out.ename}: {out.evalue}")
      elif out.output_type == "stream" and out.name == "stderr" and "Traceback" in out.text:
        found.append(f"{cell.id}: {out.text[-500:]}")
  return found


def _plot_cells_without_image(nb) -> list[str]:
  """Code cells that draw (plt.show / Image) but produced no PNG."""
  missing = []
  for cell in nb.cells:
    if cell.cell_type == "code" and ("plt.show()" in cell.source or "Image(" in cell.source):
      if not any("image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
        missing.append(cell.id)
  return missing


def test_committed_notebook_is_the_generators_output():
  committed = nbformat.read(NOTEBOOK, as_version=4)
  built = _generator().build_notebook()
  assert _cells(committed) == _cells(built), (
      "notebooks/quickstart.ipynb differs from notebooks/make_quickstart.py: regenerate it"
      " (python notebooks/make_quickstart.py --execute)"
  )
  nbformat.validate(committed)


def test_committed_notebook_was_executed_on_the_real_model():
  assert NOTEBOOK.stat().st_size < MAX_BYTES
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  # Every cell ran, in order, in one kernel session.
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not _errors(nb)
  assert not _plot_cells_without_image(nb)
  first = "".join(o.get("text", "") for o in code[0].outputs)
  assert "model: 'default'" in first, "the committed outputs must come from the real model"
  # treescope renders the model as HTML.
  (shown,) = [c for c in code if "treescope.show(model" in c.source]
  assert any("text/html" in o.get("data", {}) for o in shown.outputs)


def _kernel_or_skip() -> None:
  """Skips (with the reason) when no python3 Jupyter kernel can start here."""
  from jupyter_client.manager import start_new_kernel  # pylint: disable=g-import-not-at-top

  try:
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=90)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no python3 Jupyter kernel could start ({type(e).__name__}: {e})")
  kc.stop_channels()
  km.shutdown_kernel(now=True)


def test_notebook_runs_on_the_tiny_model(tmp_path, monkeypatch):
  _kernel_or_skip()
  monkeypatch.setenv("MECH_UNLEARN_NOTEBOOK_MODEL", "tiny-gemma3")
  # Hermetic: the kernel inherits these, so caches and the notebook's workdir land here.
  monkeypatch.setenv("MECH_UNLEARN_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:  # a fresh copy: none of the committed outputs
    if cell.cell_type == "code":
      cell.outputs, cell.execution_count = [], None
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOK.parent)}},
  )
  try:
    client.execute()
  finally:
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # to read when it fails
  assert not _errors(nb)
  assert not _plot_cells_without_image(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  first = "".join(o.get("text", "") for o in code[0].outputs)
  assert "model: 'tiny-gemma3'" in first
  # The notebook's outputs went to the temp folder, not the repository.
  assert any(p.name.startswith("mech_unlearn_quickstart_") for p in tmp_path.iterdir())
