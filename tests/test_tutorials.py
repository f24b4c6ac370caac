"""Every tutorial notebook executes top to bottom."""

import re
from pathlib import Path

import nbclient
import nbformat
import pytest
from nbclient.util import run_sync

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
EPOCH_DIVISOR = 4  # the test checks that every cell runs; the numbers shown come from the stored full run


def with_fewer_epochs(source: str) -> str:
    """A cell's ``max_epochs=N`` as N / EPOCH_DIVISOR (at least 10): the same calls, a quarter of the training."""
    return re.sub(r"max_epochs=(\d+)", lambda m: f"max_epochs={max(10, int(m.group(1)) // EPOCH_DIVISOR)}", source)


@pytest.fixture(scope="module")
def kernel():
    """One Python kernel for all notebooks, started in the repository root (so ``../shared/data`` is
    the shared data). Sharing it spares each notebook the imports and numba's compilation of UMAP and
    pynndescent (about 25 s each); every notebook starts from an empty namespace (``%reset -f``)."""
    holder: dict = {}
    yield holder
    if holder.get("km") is not None:
        run_sync(holder["km"].shutdown_kernel)(now=True)


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, kernel):
    """Notebooks write only to temp dirs. Their training runs a quarter of the epochs they show (see
    ``with_fewer_epochs``): every call runs as written, in a quarter of the time."""
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
