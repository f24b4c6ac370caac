"""The bundled example restores exact counts; the simulator makes realistic batches."""

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

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
    adata = cellvae.datasets.simulate(n_cells=600, n_genes=200, n_batches=3, n_cell_types=4, random_state=3)
    assert adata.shape == (600, 200)
    assert set(adata.obs["batch"]) == {"batch0", "batch1", "batch2"}
    assert adata.obs["cell_type"].nunique() == 4
    counts = adata.X.toarray()
    assert np.array_equal(counts, np.round(counts)) and 0.2 < (counts == 0).mean() < 0.95
    per_batch = [np.log1p(counts[adata.obs["batch"] == b].mean(0)) for b in ("batch0", "batch1")]
    assert np.abs(per_batch[0] - per_batch[1]).mean() > 0.2
    again = cellvae.datasets.simulate(n_cells=600, n_genes=200, n_batches=3, n_cell_types=4, random_state=3)
    np.testing.assert_array_equal(again.X.toarray(), counts)
    with pytest.warns(FutureWarning, match=r"simulate\(seed=\.\.\.\) is deprecated: use random_state"):
        by_old_name = cellvae.datasets.simulate(n_cells=600, n_genes=200, n_batches=3, n_cell_types=4, seed=3)
    np.testing.assert_array_equal(by_old_name.X.toarray(), counts)  # the former name of random_state
    with pytest.raises(ValueError, match="got seed=3 and random_state=4; pass random_state alone"):
        cellvae.datasets.simulate(n_cells=600, seed=3, random_state=4)


def test_simulate_with_few_cells_keeps_only_the_categories_its_cells_drew():
    """12 cells of 8 types and 6 batches: empty categories made tl.rank_genes_groups refuse the cell types."""
    adata = cellvae.datasets.simulate(n_cells=12, n_genes=50, n_batches=6, n_cell_types=8, random_state=0)
    for key in ("batch", "cell_type"):
        counts = adata.obs[key].value_counts()
        assert (counts > 0).all() and counts.sum() == 12, key
    assert adata.obs["cell_type"].cat.categories.tolist() == sorted(set(adata.obs["cell_type"]))


def _normalised_log_means(adata, mask):
    counts = adata.X.toarray()[mask]
    proportions = counts / counts.sum(1, keepdims=True)
    return np.log(proportions.mean(0) + 1e-6)


def test_simulate_batch_effect_sets_the_size_of_the_batch_effect():
    """batch_effect=0: batches differ only in depth (same expression profile); a larger sd, larger differences."""
    differences = []
    for effect in (0.0, 1.5):
        adata = cellvae.datasets.simulate(
            n_cells=2000, n_genes=200, n_batches=2, n_cell_types=1, random_state=0, batch_effect=effect
        )
        b0, b1 = (adata.obs["batch"] == "batch0").to_numpy(), (adata.obs["batch"] == "batch1").to_numpy()
        expressed = adata.X.toarray().mean(0) > 1.0  # genes measured well enough to compare
        differences.append(np.median(np.abs(_normalised_log_means(adata, b0) - _normalised_log_means(adata, b1))[expressed]))
    assert differences[0] < 0.1 and differences[1] > 0.5, differences


def test_simulate_markers_per_type_sets_how_many_genes_each_type_raises():
    """Two types with no markers share one profile; with 40 markers each, about 40 genes per type rise >= e^1."""
    raised = []
    for markers in (0, 40):
        adata = cellvae.datasets.simulate(
            n_cells=3000,
            n_genes=300,
            n_batches=1,
            n_cell_types=2,
            random_state=0,
            batch_effect=0.0,
            markers_per_type=markers,
            mean_library_size=20000.0,
        )
        t0, t1 = (adata.obs["cell_type"] == "type0").to_numpy(), (adata.obs["cell_type"] == "type1").to_numpy()
        lfc = _normalised_log_means(adata, t0) - _normalised_log_means(adata, t1)
        expressed = adata.X.toarray().mean(0) > 0.5
        raised.append(int((np.abs(lfc[expressed]) > 0.8).sum()))
    assert raised[0] <= 3 and raised[1] >= 25, raised


def test_simulate_mean_library_size_scales_the_total_counts():
    """Same seed, 4x the mean library size: about 4x the median total counts per cell."""
    totals = [
        np.median(np.asarray(cellvae.datasets.simulate(n_cells=1000, n_genes=200, random_state=0, mean_library_size=m).X.sum(1)))
        for m in (1500.0, 6000.0)
    ]
    assert totals[1] / totals[0] == pytest.approx(4.0, rel=0.1), totals


@pytest.mark.parametrize("size", ["n_cells", "n_genes", "n_batches", "n_cell_types"])
def test_simulate_refuses_a_size_of_zero(size):
    with pytest.raises(ValueError, match="must all be at least 1"):
        cellvae.datasets.simulate(**{"n_cells": 10, "n_genes": 5, "n_batches": 1, "n_cell_types": 1, size: 0})


@pytest.mark.parametrize("size", ["n_cells", "n_genes", "n_batches", "n_cell_types", "markers_per_type"])
def test_simulate_refuses_a_size_that_is_not_a_whole_number_naming_it(size):
    """simulate(n_cells=1e4) raised numpy's bare "expected a sequence of integers or a single integer"."""
    with pytest.raises(TypeError, match=rf"{size} must be a whole number, got 4.0; write {size}=4"):
        cellvae.datasets.simulate(**{"n_cells": 10, "n_genes": 5, size: 4.0})
    with pytest.raises(TypeError, match=rf"{size} must be a whole number, got '4'"):
        cellvae.datasets.simulate(**{"n_cells": 10, "n_genes": 5, size: "4"})
    cellvae.datasets.simulate(**{"n_cells": 10, "n_genes": 5, size: np.int64(4)})  # numpy's integers are whole numbers


@pytest.mark.parametrize(
    ("arguments", "error", "told"),
    [
        ({"random_state": None}, TypeError, "random_state must be an integer seed, e.g. 0, got None; equal seeds give equal"),
        ({"random_state": True}, TypeError, "random_state must be an integer seed, e.g. 0, got True"),
        ({"random_state": 1.5}, TypeError, "random_state must be an integer seed, e.g. 0, got 1.5"),
        ({"random_state": -1}, ValueError, r"random_state must be a non-negative integer below 2\*\*32, got -1"),
        ({"mean_library_size": "1e3"}, TypeError, "mean_library_size must be a number, got '1e3'"),
        ({"mean_library_size": 1e300}, ValueError, "mean_library_size must be a positive number of counts up to 1e7"),
        ({"batch_effect": None}, TypeError, "batch_effect must be a number, got None"),
        ({"sparse": "no"}, TypeError, "sparse must be True .* or False .*, got 'no'"),
    ],
)
def test_simulate_refuses_a_seed_or_setting_it_cannot_replay_or_use_naming_it(arguments, error, told):
    """A seed of None drew new data each call (and recorded a source that could not replay it); others met numpy's
    errors, which name no argument, or (sparse="no") were taken as True."""
    with pytest.raises(error, match=told):
        cellvae.datasets.simulate(n_cells=10, n_genes=5, **arguments)
    with pytest.warns(FutureWarning), pytest.raises(TypeError, match="^seed must be an integer seed"):  # (the name used)
        cellvae.datasets.simulate(n_cells=10, n_genes=5, seed=1.5)
    np.testing.assert_array_equal(  # numpy's integers are seeds
        cellvae.datasets.simulate(n_cells=10, n_genes=5, random_state=np.int64(3)).X.toarray(),
        cellvae.datasets.simulate(n_cells=10, n_genes=5, random_state=3).X.toarray(),
    )


def test_simulate_refuses_a_negative_number_of_markers_naming_it():
    with pytest.raises(ValueError, match="markers_per_type a count >= 0, got 0.5 and -1"):
        cellvae.datasets.simulate(n_cells=10, n_genes=5, markers_per_type=-1)


def test_simulate_sparse_false_stores_a_dense_array_of_the_same_counts():
    dense = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=2, sparse=False)
    stored = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=2)
    assert isinstance(dense.X, np.ndarray) and dense.X.dtype == np.float32
    assert sp.isspmatrix_csr(stored.X) or isinstance(stored.X, sp.csr_array)
    np.testing.assert_array_equal(dense.X, stored.X.toarray())
    assert dense.uns["source"] == "cellvae.datasets.simulate(random_state=2)"


def test_pbmc68k_keeps_scanpys_cell_annotations():
    pbmc = cellvae.datasets.pbmc68k()
    source = sc.datasets.pbmc68k_reduced()
    assert list(pbmc.obs.columns) == ["cell_type", "n_counts", "percent_mito", "phase"]
    assert isinstance(pbmc.obs["phase"].dtype, pd.CategoricalDtype)
    assert isinstance(pbmc.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert pbmc.obs["cell_type"].astype(str).tolist() == source.obs["bulk_labels"].astype(str).tolist()
    np.testing.assert_array_equal(pbmc.obs["percent_mito"], source.obs["percent_mito"])
    assert list(pbmc.var_names) == list(source.raw.var_names) and list(pbmc.obs_names) == list(source.obs_names)
