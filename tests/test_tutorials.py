"""Every tutorial notebook executes top to bottom."""

import re
from pathlib import Path

import nbclient
import nbformat
import pytest
from nbclient.util import run_sync

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
# The test checks that every cell runs; the numbers shown come from the stored full run.
EPOCH_DIVISOR, MIN_EPOCHS = 10, 5
DEFAULT_EPOCHS_TESTED = 20  # for a training call that leaves max_epochs at its default (hundreds for a small dataset)


def with_fewer_epochs(source: str) -> str:
    """A cell's ``max_epochs=N`` as N / EPOCH_DIVISOR (at least MIN_EPOCHS), and ``DEFAULT_EPOCHS_TESTED`` given to
    ``model.fit``, ``tl.embed`` and ``map_query`` calls without ``max_epochs``: the same calls, a tenth of the training."""
    source = re.sub(r"max_epochs=(\d+)", lambda m: f"max_epochs={max(MIN_EPOCHS, int(m.group(1)) // EPOCH_DIVISOR)}", source)

    def with_epochs(call: re.Match) -> str:
        arguments = call.group(2)
        if "max_epochs" in arguments:
            return call.group(0)
        return f"{call.group(1)}({arguments}{', ' if arguments.strip() else ''}max_epochs={DEFAULT_EPOCHS_TESTED})"

    return re.sub(r"(model\.fit|tl\.embed|\.map_query)\(([^()]*)\)", with_epochs, source)


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
    ``with_fewer_epochs``): every call runs as written, in a fraction of the time."""
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
