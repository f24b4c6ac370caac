"""The bundled example restores exact counts; the simulator makes realistic batches."""

import numpy as np
import scanpy as sc

import cellvae


def test_pbmc68k_counts_are_exact_integers(pbmc):
    counts = pbmc.X.toarray()
    assert pbmc.shape == (700, 765)
    assert np.array_equal(counts, np.round(counts)) and counts.min() == 0
    # Re-normalising the restored counts with each cell's n_counts gives back scanpy's raw.X
    # (stored to 3 decimals), so the integers are the original ones.
    source = sc.datasets.pbmc68k_reduced()
    renormalised = np.log1p(counts / pbmc.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(renormalised, source.raw.X.toarray(), atol=6e-4)
    # Only 765 of the original genes were kept, so row sums stay below each cell's total.
    assert (counts.sum(1) <= pbmc.obs["n_counts"].to_numpy()).all()
    assert pbmc.obs["cell_type"].nunique() == 10


def test_simulate_shapes_and_batch_effects():
    adata = cellvae.datasets.simulate(n_cells=600, n_genes=200, n_batches=3, n_cell_types=4, seed=3)
    assert adata.shape == (600, 200)
    assert set(adata.obs["batch"]) == {"batch0", "batch1", "batch2"}
    assert adata.obs["cell_type"].nunique() == 4
    counts = adata.X.toarray()
    assert np.array_equal(counts, np.round(counts)) and 0.2 < (counts == 0).mean() < 0.95
    per_batch = [np.log1p(counts[adata.obs["batch"] == b].mean(0)) for b in ("batch0", "batch1")]
    assert np.abs(per_batch[0] - per_batch[1]).mean() > 0.2
    again = cellvae.datasets.simulate(n_cells=600, n_genes=200, n_batches=3, n_cell_types=4, seed=3)
    np.testing.assert_array_equal(again.X.toarray(), counts)
