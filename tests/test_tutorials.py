"""Every tutorial notebook executes top to bottom."""

from pathlib import Path

import nbclient
import nbformat
import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path):
    """Runs from the repository root (so ``../shared/data`` is the shared data); notebooks write only to temp dirs."""
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parents[1])}}
    )
    client.execute()
