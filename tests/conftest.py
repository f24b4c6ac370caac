"""Shared fixtures: the bundled PBMC example, simulated batches, the shared real-data folder."""

from pathlib import Path

import pytest
import torch

import cellvae

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


def shared_dataset(name: str):
    """Read ``../shared/data/<name>`` or skip the test with the reason."""
    import anndata as ad

    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real dataset {path} not found (the ../shared/data folder beside the repository is absent)")
    return ad.read_h5ad(path)


@pytest.fixture(scope="session")
def pbmc():
    return cellvae.datasets.pbmc68k()


@pytest.fixture(scope="session")
def two_batches():
    return cellvae.datasets.simulate(n_cells=1200, n_genes=300, n_batches=2, n_cell_types=4, seed=1, batch_effect=0.6)
