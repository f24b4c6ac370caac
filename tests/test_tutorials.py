"""Every tutorial notebook executes top to bottom."""

from pathlib import Path

import nbclient
import nbformat
import pytest
from conftest import with_fewer_epochs
from nbclient.util import run_sync

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel():
    """One Python kernel for all notebooks, started in the repository root (so ``../shared/data`` is
    the shared data). Sharing it spares each notebook the imports and numba's compilation of UMAP and
    pynndescent (about 25 s each); every notebook starts from an empty namespace (``%reset -f``)."""
    holder: dict = {}
    yield holder
    if holder.get("km") is not None:
        run_sync(holder["km"].shutdown_kernel)(now=True)


def as_parameter(path: Path):
    """A notebook on the real datasets of ``../shared/data`` is a long evaluation (marked slow); the quick start's
    bundled example is not."""
    cells = nbformat.read(path, as_version=4).cells
    on_shared_data = any('"shared"' in cell.source for cell in cells if cell.cell_type == "code")
    return pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if on_shared_data else [])


@pytest.mark.parametrize("path", [as_parameter(path) for path in TUTORIALS])
def test_tutorial_runs(path, kernel):
    """Notebooks write only to temp dirs. Their training runs a tenth of the epochs they show (see
    ``with_fewer_epochs``): every call runs as written, in a fraction of the time; the numbers shown come from the
    stored full run."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.source = with_fewer_epochs(cell.source)
    notebook.cells.insert(0, nbformat.v4.new_code_cell("%reset -f\nimport matplotlib.pyplot\nmatplotlib.pyplot.close('all')"))
    client = nbclient.NotebookClient(
        notebook, km=kernel.get("km"), timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    try:
        client.execute(cleanup_kc=False)
    except BaseException:
        kernel.pop("km", None)  # a failed notebook may leave the kernel in any state: the next one gets a new kernel
        run_sync(client.km.shutdown_kernel)(now=True)
        raise
    kernel["km"] = client.km
    client.kc.stop_channels()


def test_committed_tutorials_carry_no_widget_state():
    """The stored runs hold no Jupyter widget state (progress bars are text): none is left behind in the files."""
    for path in TUTORIALS:
        assert "widgets" not in nbformat.read(path, as_version=4).metadata, path.name
