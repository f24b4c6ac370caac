"""The minibatch loader: every cell once per epoch, fresh shuffles, in-memory and backed (CSR, CSC, dense)."""

import re
import threading
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import knn_accuracy, no_warnings
from scipy.special import gammaln

import cellvae
import cellvae.data
from cellvae.config import Config
from cellvae.data import BACKED_BLOCK_ROWS, CellLoader, DeviceBuffer, cell_positions, library_sizes
from cellvae.module import VAE
from cellvae.train import TrainSettings, train


def loader_for(adata, device="cpu") -> CellLoader:
    n = adata.n_obs
    return CellLoader(
        adata.X, np.zeros((n, 0), dtype=np.float32), library_sizes(adata.X), np.zeros(n, dtype=np.int64), device=device
    )


@pytest.fixture(scope="module")
def counts():
    return cellvae.datasets.simulate(n_cells=2 * BACKED_BLOCK_ROWS * 5 + 37, n_genes=60, random_state=4)


def stored(counts, tmp_path_factory, kind: str):
    """The simulated counts written as .h5ad with X as CSR, CSC or dense, opened backed."""
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": lambda m: m.toarray()}[kind](counts.X)
    path = tmp_path_factory.mktemp(kind) / "cells.h5ad"
    ad.AnnData(matrix, obs=counts.obs, var=counts.var).write_h5ad(path)
    return ad.read_h5ad(path, backed="r")


@pytest.mark.parametrize("indptr_dtype", [np.int32, np.int64])
def test_in_memory_minibatches_from_csr_with_either_index_type(counts, indptr_dtype):
    """h5py often reads int64 row pointers with int32 column indices, where scipy's row indexing would copy
    every column index per minibatch: the loader narrows a copy of the pointers (sharing the counts), and
    rows of a matrix whose pointers cannot be narrowed are gathered by cellvae. Both give the same rows."""
    from cellvae import data

    matrix = sp.csr_matrix(counts.X, copy=True)
    matrix.indices, matrix.indptr = matrix.indices.astype(np.int32), matrix.indptr.astype(indptr_dtype)
    adata = ad.AnnData(matrix, obs=counts.obs, var=counts.var)
    loader = loader_for(adata)
    assert loader.matrix.indptr.dtype == np.int32 and np.shares_memory(loader.matrix.data, matrix.data)
    assert adata.X.indptr.dtype == indptr_dtype  # the AnnData is left as it was
    expected = counts.X.toarray()
    cells = np.arange(counts.n_obs)[1::3]
    for mb in loader.batches(cells, 50, shuffle=True, rng=np.random.default_rng(0), with_sparse=True):
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        rebuilt = np.zeros_like(expected[mb.cell_index])  # the likelihood's non-zero counts, from the same rows
        rebuilt[mb.sparse.rows.numpy(), mb.sparse.columns.numpy()] = mb.sparse.values.numpy()
        np.testing.assert_array_equal(rebuilt, expected[mb.cell_index])
    rows = np.array([7, 3, 3, 900, 0])
    np.testing.assert_array_equal(data._gather_csr_rows(matrix, rows).toarray(), expected[rows])


def scrambled_csr(matrix: sp.csr_matrix, seed: int) -> sp.csr_matrix:
    """The same counts with each row's column indices in random order and, in every third row, each count
    of 2 or more stored as two entries of the same gene (as some converters and concatenations write)."""
    coo = matrix.tocoo()
    rows, columns, values = coo.row, coo.col, coo.data
    split = (rows % 3 == 0) & (values >= 2)
    halves = np.floor(values[split] / 2)
    rows = np.concatenate([rows, rows[split]])
    columns = np.concatenate([columns, columns[split]])
    values = np.concatenate([np.where(split, values - np.floor(values / 2), values), halves]).astype(np.float32)
    order = np.lexsort((np.random.default_rng(seed).random(len(rows)), rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=matrix.shape[0]))])
    return sp.csr_matrix((values[order], columns[order].astype(np.int32), indptr), shape=matrix.shape)


def test_csr_with_unsorted_columns_and_repeated_entries_reads_and_trains_like_its_canonical_form(counts):
    """Minibatches hold each cell's summed counts and the likelihood sees each non-zero count once
    (without sorting every minibatch's columns), training matches the canonical matrix, and the
    AnnData keeps its own layout."""
    scrambled = scrambled_csr(sp.csr_matrix(counts.X), seed=0)
    assert not scrambled.has_sorted_indices and scrambled.nnz > counts.X.nnz
    stored_indices, stored_values = scrambled.indices.copy(), scrambled.data.copy()
    adata = ad.AnnData(scrambled, obs=counts.obs, var=counts.var)
    expected = counts.X.toarray()
    cells = np.arange(counts.n_obs)
    for mb in loader_for(adata).batches(cells, 128, shuffle=True, rng=np.random.default_rng(0), with_sparse=True):
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        entries = mb.sparse.rows.numpy() * counts.n_vars + mb.sparse.columns.numpy()
        assert len(np.unique(entries)) == len(entries)  # no cell and gene twice
        rebuilt = np.zeros_like(expected[mb.cell_index])
        rebuilt[mb.sparse.rows.numpy(), mb.sparse.columns.numpy()] = mb.sparse.values.numpy()
        np.testing.assert_array_equal(rebuilt, expected[mb.cell_index])
        log_factorial = gammaln(expected[mb.cell_index] + 1).sum(1)
        np.testing.assert_allclose(mb.sparse.sum_per_cell(mb.sparse.log_factorial).numpy(), log_factorial, rtol=1e-5)

    fits = [
        cellvae.CellVAE(data, batch_key="batch").fit(max_epochs=3, random_state=0, progress=False) for data in (counts, adata)
    ]
    columns = ["train_loss", "validation_elbo"]
    np.testing.assert_allclose(fits[1].history[columns], fits[0].history[columns], rtol=1e-5)
    np.testing.assert_allclose(fits[1].get_latent(), fits[0].get_latent(), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(adata.X.indices, stored_indices)  # the user's matrix as it was
    np.testing.assert_array_equal(adata.X.data, stored_values)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.float32])
def test_repeated_entries_whose_sum_a_narrow_stored_type_cannot_hold_are_summed_without_overflow(dtype):
    """Two stored entries of 20,000 for one cell and gene are a count of 40,000 (scipy's meaning), in the
    dense minibatch, in its non-zero counts and log x!, and in the copy a GPU would hold (int16 cannot)."""
    expected = np.random.default_rng(0).poisson(3.0, size=(20, 5)).astype(np.float32)
    expected[0, 0] = 40_000
    dense = sp.csr_matrix(expected[1:])
    rest = sp.csr_matrix(np.delete(expected[0], 0)[None, :])
    indices = np.concatenate([[0, 0], rest.indices + 1, dense.indices]).astype(np.int32)
    data = np.concatenate([[20_000, 20_000], rest.data, dense.data]).astype(dtype)
    indptr = np.concatenate([[0], 2 + rest.nnz + np.concatenate([[0], dense.indptr[1:]])])
    matrix = sp.csr_matrix((data, indices, indptr), shape=expected.shape)
    assert matrix.dtype == dtype and not matrix.has_canonical_format
    loader = loader_for(ad.AnnData(matrix))
    assert loader.library[0] == expected[0].sum()
    mb = next(loader.batches(np.arange(20), 20, with_sparse=True))
    np.testing.assert_array_equal(mb.counts.numpy(), expected)
    rebuilt = np.zeros_like(expected)
    np.add.at(rebuilt, (mb.sparse.rows.numpy(), mb.sparse.columns.numpy()), mb.sparse.values.numpy())
    np.testing.assert_array_equal(rebuilt, expected)
    np.testing.assert_allclose(mb.sparse.sum_per_cell(mb.sparse.log_factorial).numpy(), gammaln(expected + 1).sum(1), rtol=1e-6)
    resident = loader._resident_tensors()[0]
    assert resident.dtype == torch.float32
    np.testing.assert_array_equal(resident.numpy(), expected)
    # also where the genes are picked, with a model gene the data lacks (read as zeros), as for new data
    n = expected.shape[0]
    columns = np.array([0, -1, 2])
    picked = CellLoader(matrix, np.zeros((n, 0), np.float32), np.ones(n), np.zeros(n, np.int64), gene_columns=columns)
    first = next(picked.batches(np.arange(n), n))
    np.testing.assert_array_equal(first.counts.numpy(), np.c_[expected[:, 0], np.zeros(n), expected[:, 2]])


@pytest.mark.parametrize("kind", ["memory", "csr", "csc", "dense"])
def test_each_cell_exactly_once_per_epoch_with_its_own_counts(counts, tmp_path_factory, kind):
    adata = counts if kind == "memory" else stored(counts, tmp_path_factory, kind)
    loader = loader_for(adata)
    assert loader.backed == (kind != "memory")
    expected = counts.X.toarray()
    cells = np.arange(counts.n_obs)[::2]  # a subset, like a training split
    rng = np.random.default_rng(0)
    for _ in range(2):
        seen = []
        for mb in loader.batches(cells, 100, shuffle=True, rng=rng, with_sparse=True):
            np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
            np.testing.assert_allclose(mb.library.numpy().ravel(), expected[mb.cell_index].sum(1), rtol=1e-6)
            rows, columns = mb.sparse.rows.numpy(), mb.sparse.columns.numpy()
            dense = np.zeros_like(mb.counts.numpy())
            dense[rows, columns] = mb.sparse.values.numpy()
            np.testing.assert_array_equal(dense, mb.counts.numpy())  # the non-zero list is the counts, exactly
            np.testing.assert_array_equal(mb.sparse.row_lengths.numpy(), (dense > 0).sum(1))
            log_factorials = mb.sparse.sum_per_cell(mb.sparse.log_factorial).numpy()
            np.testing.assert_allclose(log_factorials, gammaln(dense + 1).sum(1), rtol=1e-5)
            seen.append(mb.cell_index)
        seen = np.concatenate(seen)
        assert len(seen) == len(cells) and set(seen) == set(cells)


@pytest.mark.parametrize("kind", ["memory", "csr", "csc", "dense"])
def test_every_minibatch_but_the_last_has_batch_size_cells(counts, tmp_path_factory, kind, monkeypatch):
    # Read buffers of 3 blocks (768 rows) that 100 does not divide: the cells left at the end of one
    # buffer open the next, so every data-parallel rank takes ceil(cells / batch_size) steps.
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * counts.n_vars * 1000)
    adata = counts if kind == "memory" else stored(counts, tmp_path_factory, kind)
    loader = loader_for(adata)
    expected = counts.X.toarray()
    for n_cells, batch_size in ((counts.n_obs, 100), (1450, 100), (counts.n_obs, 1000)):  # 1000: more than a buffer
        cells = np.arange(n_cells)
        batches = list(loader.batches(cells, batch_size, shuffle=True, rng=np.random.default_rng(n_cells)))
        sizes = [len(mb.cell_index) for mb in batches]
        assert len(batches) == -(-n_cells // batch_size)
        assert set(sizes[:-1]) == {batch_size} and sizes[-1] == n_cells - batch_size * (len(batches) - 1)
        for mb in batches:
            np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        assert sorted(np.concatenate([mb.cell_index for mb in batches])) == list(cells)


@pytest.mark.parametrize("kind", ["memory", "csr", "csc", "dense"])
def test_a_repeated_cell_is_read_with_its_counts_each_time(counts, tmp_path_factory, kind):
    # A data-parallel shard shorter than the others is padded by repeating some of its cells.
    adata = counts if kind == "memory" else stored(counts, tmp_path_factory, kind)
    cells = np.r_[np.arange(0, 600, 2), [4, 10]]
    batches = list(loader_for(adata).batches(cells, 64, shuffle=True, rng=np.random.default_rng(0)))
    expected = counts.X.toarray()
    for mb in batches:
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
    assert sorted(np.concatenate([mb.cell_index for mb in batches])) == sorted(cells)


@pytest.mark.parametrize("kind", ["memory", "csr"])
def test_shuffling_differs_between_epochs_and_repeats_with_the_seed(counts, tmp_path_factory, kind):
    adata = counts if kind == "memory" else stored(counts, tmp_path_factory, kind)
    loader = loader_for(adata)
    cells = np.arange(counts.n_obs)

    def epochs(seed):
        rng = np.random.default_rng(seed)
        return [np.concatenate([mb.cell_index for mb in loader.batches(cells, 64, shuffle=True, rng=rng)]) for _ in range(2)]

    first, second = epochs(0)
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, cells)
    # not just rotated blocks: neighbours in a minibatch come from many places of the file
    assert len(np.unique(first[:64] // BACKED_BLOCK_ROWS)) > 1
    again = epochs(0)
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])


def test_unshuffled_batches_keep_the_given_order(counts):
    loader = loader_for(counts)
    cells = np.arange(counts.n_obs)[::-3]
    order = np.concatenate([mb.cell_index for mb in loader.batches(cells, 50)])
    np.testing.assert_array_equal(order, cells)


def test_in_memory_rows_are_gathered_one_minibatch_at_a_time(counts, monkeypatch):
    """An in-memory matrix is never copied many rows at once (that copy once held the whole matrix)."""
    reads, read_rows = [], CellLoader._read_rows
    monkeypatch.setattr(CellLoader, "_read_rows", lambda self, rows: reads.append(len(rows)) or read_rows(self, rows))
    loader = loader_for(counts)
    seen = list(loader.batches(np.arange(counts.n_obs), 100, shuffle=True, rng=np.random.default_rng(0)))
    assert max(reads) == 100 and sum(reads) == counts.n_obs
    assert sorted(np.concatenate([mb.cell_index for mb in seen])) == list(range(counts.n_obs))
    for mb in seen[:3]:
        np.testing.assert_array_equal(mb.counts.numpy(), counts.X[mb.cell_index].toarray())


def test_a_view_of_some_cells_and_genes_in_memory_is_copied_without_the_cells_other_genes(monkeypatch):
    """anndata copies such a view's cells with all their genes before it picks the genes (11x the view's
    size for 90% of the cells and 10% of the genes): cellvae copies it a block of cells at a time."""
    import tracemalloc

    monkeypatch.setattr(cellvae.data, "VALUES_PER_PASS", 2**14)  # many blocks of cells
    monkeypatch.setattr(cellvae.data, "VALUES_PER_CHECK_OF_COLUMNS", 999)
    adata = cellvae.datasets.simulate(n_cells=3000, n_genes=2000, random_state=5)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.layers["counts"] = adata.X.astype(np.int64)
    rng = np.random.default_rng(0)
    cells, genes = rng.random(adata.n_obs) < 0.9, rng.permutation(adata.n_vars)[:200]
    for view in (adata[cells, genes], adata[cells][:, np.sort(genes)], adata[[7, 3, 3, 2999], 5:9]):
        for layer in (None, "counts"):
            expected = view.X if layer is None else view.layers[layer]
            matrix = cellvae.data.count_matrix(view, layer)
            assert matrix.shape == expected.shape and matrix.dtype == expected.dtype
            np.testing.assert_array_equal(matrix.toarray(), expected.toarray())
    view = adata[cells, genes]
    tracemalloc.start()
    matrix = cellvae.data.count_matrix(view, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.5 * (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes)
    assert view.is_view and view.X.shape == matrix.shape  # the view is left as it was


def test_a_view_of_a_few_cells_and_some_genes_costs_what_those_cells_hold_not_the_viewed_matrix():
    """Each cell of the viewed AnnData had its values among the view's genes counted (the whole matrix's column
    indices read, in blocks) before the view's few cells were kept; and a model built on a view of some genes
    (``adata[:, hvg]``, the README's route) copied every cell with all its genes on each output called without an
    AnnData (``get_latent()``: +1.7 GB for a 1.2 GB matrix of 200,000 cells, whose view held 0.55 GB)."""
    import tracemalloc

    adata = cellvae.datasets.simulate(n_cells=3000, n_genes=2000, random_state=5)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    whole = adata.X.data.nbytes + adata.X.indices.nbytes
    genes = np.sort(np.random.default_rng(0).permutation(adata.n_vars)[:100])
    view = adata[[5, 2900, 17, 17, 40], genes]
    tracemalloc.start()
    matrix = cellvae.data.count_matrix(view, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(matrix.toarray(), view.X.toarray())
    assert peak < whole / 16  # (counting every cell's values: 2.5 MB, a fifth of the matrix)
    model = cellvae.CellVAE(adata[:, genes], n_hidden=16, n_latent=4)
    model.fit(max_epochs=1, progress=False)
    expected = model.get_latent(adata[:, genes].copy(), progress=False)
    tracemalloc.start()
    latent = model.get_latent(progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(latent, expected)
    assert peak < whole / 3  # (the view's counts, 0.65 MB, and a dense minibatch; copying every cell: over the whole)


def test_a_view_of_some_cells_in_memory_is_copied_without_converting_every_cells_column_indices():
    """Where indptr is int64 and the column indices int32 (as in many .h5ad files), anndata's copy of a view of
    some cells converts the column indices of the whole matrix to int64 first: cellvae copies just the rows."""
    import tracemalloc

    adata = cellvae.datasets.simulate(n_cells=3000, n_genes=2000, random_state=5)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.indices = adata.X.indices.astype(np.int32)
    adata.X.indptr = adata.X.indptr.astype(np.int64)  # set after construction: scipy's constructor would unify them
    rng = np.random.default_rng(0)
    dense = adata.X.toarray()
    for cells in (slice(0, 30), rng.random(adata.n_obs) < 0.01, [7, 3, 3, 2999], slice(None, None, -1)):
        matrix = cellvae.data.count_matrix(adata[cells], None)
        assert matrix.dtype == adata.X.dtype
        np.testing.assert_array_equal(matrix.toarray(), dense[cells])
        if not isinstance(cells, slice) or cells.step is None:  # (scipy fails on a reversed slice of such a matrix)
            expected = adata[cells].X
            np.testing.assert_array_equal(matrix.indptr, expected.indptr)
            np.testing.assert_array_equal(matrix.indices, expected.indices)
            np.testing.assert_array_equal(matrix.data, expected.data)
    view = adata[:30]
    tracemalloc.start()
    cellvae.data.count_matrix(view, None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < adata.X.indices.nbytes / 4  # anndata's copy: twice the int32 indices of every cell
    assert view.is_view  # the view is left as it was


def test_a_backed_model_trains_and_embeds_like_an_in_memory_one(counts, tmp_path_factory):
    backed = stored(counts, tmp_path_factory, "csr")
    model = cellvae.CellVAE(backed, batch_key="batch").fit(max_epochs=3, progress=False, device="cpu")
    assert np.isfinite(model.history["validation_elbo"]).all()
    latent = model.get_latent(backed)
    np.testing.assert_allclose(latent, model.get_latent(counts), rtol=1e-4, atol=1e-5)


def test_read_h5ad_lazy_streams_counts_in_a_layer_which_backed_mode_reads_into_memory(counts, tmp_path, monkeypatch):
    """Files whose X holds normalised values keep counts in a layer: anndata's backed mode reads layers into memory
    (warned about where large), read_h5ad_lazy leaves them on disk, and the model reads them alike."""
    normalised = counts.copy()
    normalised.layers["counts"] = normalised.X.copy()
    normalised.X = normalised.X.multiply(1e4 / normalised.X.sum(axis=1)).tocsr().log1p()
    normalised.write_h5ad(tmp_path / "norm.h5ad")
    lazy = cellvae.read_h5ad_lazy(tmp_path / "norm.h5ad")
    assert cellvae.data.is_backed_matrix(lazy.layers["counts"]) and cellvae.data.is_backed_matrix(lazy.X)
    # without layer=: told where the counts are, as for the same file in memory (the layers on disk were not read)
    with pytest.raises(ValueError, match=r"looks normalised or log-transformed. adata.layers\['counts'\] holds whole counts"):
        cellvae.CellVAE(lazy, batch_key="batch")
    with no_warnings():
        model = cellvae.CellVAE(lazy, layer="counts", batch_key="batch").fit(max_epochs=2, progress=False)
    np.testing.assert_allclose(model.get_latent(lazy), model.get_latent(normalised), rtol=1e-4, atol=1e-5)
    backed = ad.read_h5ad(tmp_path / "norm.h5ad", backed="r")
    assert sp.issparse(backed.layers["counts"])  # anndata's backed mode: in memory
    monkeypatch.setattr(cellvae.data, "IN_MEMORY_LAYER_WARNING_VALUES", 1)  # (a large layer, as an atlas's)
    told = r"anndata's backed mode reads every layer into memory.*cellvae.read_h5ad_lazy\('.*norm.h5ad'\)"
    with pytest.warns(UserWarning, match=told):
        cellvae.CellVAE(backed, layer="counts", batch_key="batch")
    with no_warnings():  # once per layer, views of its cells or genes too
        cellvae.CellVAE(backed, layer="counts", batch_key="batch")
        cellvae.CellVAE(backed[:300, :40], layer="counts", batch_key="batch")
    viewed = ad.read_h5ad(tmp_path / "norm.h5ad", backed="r")
    with pytest.warns(UserWarning, match=told):  # a view of some cells of a file opened anew
        cellvae.CellVAE(viewed[:300], layer="counts", batch_key="batch")
    dense = normalised.copy()  # a dense layer: a view's is a new array each time, told once all the same
    dense.layers["counts"] = dense.layers["counts"].toarray()
    dense.write_h5ad(tmp_path / "dense.h5ad")
    viewed = ad.read_h5ad(tmp_path / "dense.h5ad", backed="r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cellvae.CellVAE(viewed[:300], layer="counts", batch_key="batch")
        cellvae.CellVAE(viewed[:, :40], layer="counts", batch_key="batch")
    assert sum("backed mode reads every layer" in str(w.message) for w in caught) == 1
    reopened = ad.read_h5ad(tmp_path / "norm.h5ad", backed="r")  # read by a trained model: told too
    with pytest.warns(UserWarning, match=told):
        model.get_latent(reopened)
    counts.write_h5ad(tmp_path / "raw.h5ad")
    with no_warnings():  # X of a backed file streams
        cellvae.CellVAE(ad.read_h5ad(tmp_path / "raw.h5ad", backed="r"), batch_key="batch")
    with pytest.raises(FileNotFoundError, match="is not an .h5ad file; for a .zarr store use cellvae.read_zarr_lazy"):
        cellvae.read_h5ad_lazy(tmp_path)
    (tmp_path / "notes.txt").write_text("not HDF5")
    with pytest.raises(OSError, match="is not a readable .h5ad file"):
        cellvae.read_h5ad_lazy(tmp_path / "notes.txt")


def test_missing_batches_of_a_backed_file_are_told_to_be_dropped_by_a_view_which_streams(counts, tmp_path):
    with_missing = counts.copy()
    with_missing.obs["batch"] = with_missing.obs["batch"].astype(object)
    with_missing.obs.iloc[:3, with_missing.obs.columns.get_loc("batch")] = np.nan
    with_missing.write_h5ad(tmp_path / "missing.h5ad")
    adata = ad.read_h5ad(tmp_path / "missing.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"3 missing \(NaN\) values.*\.copy\(\); of an AnnData opened backed leave out"):
        cellvae.CellVAE(adata, batch_key="batch")
    adata = adata[adata.obs["batch"].notna()]  # the fix named, which anndata cannot .copy() when backed
    model = cellvae.CellVAE(adata, batch_key="batch").fit(max_epochs=1, progress=False)
    assert model.get_latent().shape == (counts.n_obs - 3, 10)


def test_the_gpu_memory_counts_on_is_within_the_processs_share(monkeypatch):
    """Counts kept on a GPU fit in what torch.cuda.set_per_process_memory_fraction leaves this process, not just in the
    device's free memory (a small share ran out of memory with an advice to lower batch_size); torch's cache counts as
    free."""
    # torch's own argument handling runs (it wants a device index: "cuda", as device="auto" gives, has none)
    monkeypatch.setattr(torch.cuda.memory, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 2**30)  # (none of it cached)
    for fraction, left in ((1.0, 10 * 2**30), (0.1, 6 * 2**30), (0.02, 0)):
        monkeypatch.setattr(torch._C, "_cuda_getMemoryFraction", lambda index, share=fraction: share, raising=False)
        for device in (torch.device("cuda"), torch.device("cuda", 0)):
            assert cellvae.data._device_memory_left(device) == left
    # memory torch has cached but holds no tensor in (an earlier fit's) is free for the next copy of the counts
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * 2**30)
    for fraction, left in ((1.0, 38 * 2**30), (0.25, 18 * 2**30)):  # 10 free + 28 cached; a quarter of 80, less 2 held
        monkeypatch.setattr(torch._C, "_cuda_getMemoryFraction", lambda index, share=fraction: share, raising=False)
        assert cellvae.data._device_memory_left(torch.device("cuda")) == left


def never_read_whole(monkeypatch) -> None:
    """Make reading a backed view's ``X`` through anndata (which loads the view's cells whole) fail."""
    original = ad.AnnData.X

    def guarded(adata):
        if adata.is_view and cellvae.data.is_backed_matrix(adata._adata_ref.X):
            raise AssertionError("a view of a backed AnnData was read whole through anndata")
        return original.fget(adata)

    monkeypatch.setattr(ad.AnnData, "X", property(guarded, original.fset, original.fdel))


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_a_view_of_a_backed_file_streams_its_own_cells_and_genes(counts, tmp_path_factory, kind, monkeypatch):
    never_read_whole(monkeypatch)
    backed = stored(counts, tmp_path_factory, kind)
    rows = np.r_[np.arange(2000, 100, -3), [5, 7]]  # out of file order, as adata[[...]] allows
    genes = np.array([5, 0, 59, 17, 33, 40, 41])
    view = backed[rows, genes]
    expected = counts.X.toarray()[rows][:, genes]
    matrix = cellvae.data.count_matrix(view, None)
    assert isinstance(matrix, cellvae.data.BackedView) and matrix.shape == expected.shape
    np.testing.assert_allclose(library_sizes(matrix, check_as="adata.X"), expected.sum(1))
    np.testing.assert_allclose(library_sizes(matrix, np.array([2, 0])), expected[:, [2, 0]].sum(1))
    np.testing.assert_allclose(library_sizes(matrix, rows=range(10, 50)), expected[10:50].sum(1))  # a rank's part
    n = len(rows)
    loader = CellLoader(matrix, np.zeros((n, 0), dtype=np.float32), library_sizes(matrix), np.zeros(n, dtype=np.int64))
    assert loader.n_genes == len(genes)
    seen = []
    for mb in loader.batches(np.arange(n), 64, shuffle=True, rng=np.random.default_rng(0), with_sparse=True):
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        dense = np.zeros_like(mb.counts.numpy())
        dense[mb.sparse.rows.numpy(), mb.sparse.columns.numpy()] = mb.sparse.values.numpy()
        np.testing.assert_array_equal(dense, expected[mb.cell_index])
        seen.append(mb.cell_index)
    assert sorted(np.concatenate(seen)) == list(range(n))
    # a model gene the view lacks (-1) reads as zero counts
    no_covariates, one_batch = np.zeros((n, 0), dtype=np.float32), np.zeros(n, dtype=np.int64)
    missing = CellLoader(matrix, no_covariates, np.ones(n), one_batch, gene_columns=np.array([3, -1, 0]))
    first = next(iter(missing.batches(np.arange(n), 50)))
    np.testing.assert_array_equal(first.counts.numpy(), np.c_[expected[:50, 3], np.zeros(50), expected[:50, 0]])


def test_a_model_trains_on_a_view_of_a_backed_file_and_embeds_like_those_cells_in_memory(counts, tmp_path_factory, monkeypatch):
    never_read_whole(monkeypatch)
    backed = stored(counts, tmp_path_factory, "csr")
    view = backed[backed.obs["batch"] == "batch0", 10:]
    in_memory = counts[counts.obs["batch"] == "batch0", 10:].copy()
    model = cellvae.CellVAE(view, batch_key="batch").fit(max_epochs=20, progress=False, device="cpu", random_state=0)
    assert model.config.gene_names == list(in_memory.var_names) and np.isfinite(model.history["validation_elbo"]).all()
    latent = model.get_latent()
    assert latent.shape == (in_memory.n_obs, 10)
    np.testing.assert_allclose(latent, model.get_latent(in_memory), rtol=1e-4, atol=1e-5)
    assert knn_accuracy(latent, in_memory.obs["cell_type"]) > 0.8
    expression = model.get_normalized_expression(view, library_size=1e4)
    np.testing.assert_allclose(expression, model.get_normalized_expression(in_memory, library_size=1e4), rtol=1e-4)


def test_a_view_of_a_backed_file_is_checked_on_its_own_cells_and_genes_only(counts, tmp_path):
    spoiled = counts.copy()
    spoiled.X = spoiled.X.astype(np.float32).toarray()
    spoiled.X[700, 3] = 2.5  # one fractional value
    spoiled.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    for view in (backed[:, 4:], backed[np.arange(counts.n_obs) != 700]):  # without its gene, without its cell
        cellvae.CellVAE(view, batch_key="batch")
    with pytest.raises(ValueError, match=r"adata\.X has non-integer values \(e\.g\. 2\.5\)"):
        cellvae.CellVAE(backed[600:800, :10], batch_key="batch")


IN_MEMORY = {"memory_csr": sp.csr_matrix, "memory_csc": sp.csc_matrix, "memory_coo": sp.coo_matrix, "memory_dense": np.asarray}


@pytest.mark.parametrize("kind", [*IN_MEMORY, "csr", "csc", "dense"])
def test_library_sizes_over_chosen_genes_in_memory_and_backed(counts, tmp_path_factory, kind):
    expected = counts.X.toarray()
    matrix = IN_MEMORY[kind](expected) if kind in IN_MEMORY else stored(counts, tmp_path_factory, kind).X
    columns = np.array([5, 0, 59, 17, 33])  # a reordered subset, as when a model's genes are a part of the file's
    np.testing.assert_allclose(library_sizes(matrix), expected.sum(1))
    np.testing.assert_allclose(library_sizes(matrix, columns, check_as="adata.X"), expected[:, columns].sum(1))


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_a_backed_file_is_checked_while_its_library_sizes_are_read(counts, tmp_path_factory, kind):
    spoiled = counts.copy()
    spoiled.X = spoiled.X.astype(np.float32).tocsr()
    spoiled.X.data[spoiled.X.indptr[700]] = 2.5  # one fractional value, mid-file
    matrix = {"csr": spoiled.X, "csc": spoiled.X.tocsc(), "dense": spoiled.X.toarray()}[kind]
    path = tmp_path_factory.mktemp("spoiled") / "cells.h5ad"
    ad.AnnData(matrix, obs=counts.obs, var=counts.var).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=r"adata\.X has non-integer values \(e\.g\. 2\.5\)"):
        library_sizes(backed.X, check_as="adata.X")
    np.testing.assert_allclose(library_sizes(backed.X), spoiled.X.toarray().sum(1))  # unchecked: just sums
    # a part of the cells (one rank's share in a data-parallel run) is read, checked and summed alone
    after = range(701, counts.n_obs)
    np.testing.assert_allclose(library_sizes(backed.X, check_as="adata.X", rows=after), spoiled.X.toarray().sum(1)[701:])
    with pytest.raises(ValueError, match="non-integer"):
        library_sizes(backed.X, check_as="adata.X", rows=range(650, 720))
    with pytest.raises(ValueError, match="part of a backed matrix"):
        library_sizes(spoiled.X, rows=after)


def test_counts_with_float_round_off_are_refused_as_such_with_the_rounding_that_fixes_them(counts, tmp_path):
    for dtype, value in (("float32", np.float32(1) - np.finfo(np.float32).eps / 2), ("float64", 3 + 1e-9)):
        matrix = counts.X.astype(dtype).toarray()
        matrix[2, 1] = value
        with pytest.raises(ValueError, match=r"adata\.X holds counts with round-off .*np\.rint\(adata\.X\)"):
            cellvae.CellVAE(ad.AnnData(matrix, obs=counts.obs, var=counts.var))
        matrix[3, 1] = 2.5  # and a real fraction beside them: normalised data, not round-off
        with pytest.raises(ValueError, match=r"non-integer values .*looks normalised or log-transformed"):
            cellvae.CellVAE(ad.AnnData(matrix, obs=counts.obs, var=counts.var))
    # a trained model (get_latent, map_query) takes no layer=: the advice is to round the counts where it reads them
    model = cellvae.CellVAE(counts, batch_key="batch", n_hidden=8).fit(max_epochs=1, progress=False)
    query = ad.AnnData(counts.X.astype(np.float64).toarray() + 1e-9, obs=counts.obs, var=counts.var)
    for call, batch in ((model.get_latent, "batch0"), (model.map_query, "new")):
        query.obs["batch"] = batch
        with pytest.raises(ValueError, match=r"round-off .*where the model reads them, adata\.X = np\.rint\(adata\.X\)"):
            call(query)
    query.write_h5ad(tmp_path / "round_off.h5ad")  # on disk: rounded once read into memory
    backed = ad.read_h5ad(tmp_path / "round_off.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"adata\.X = np\.rint\(adata\.X\) \(in memory: first adata = adata\.to_memory\(\)"):
        model.map_query(backed)
    # backed with the counts in a layer, which anndata reads into memory: still no .copy() of a backed AnnData
    dense = counts.X.toarray().astype(np.float64)
    layered = ad.AnnData(np.log1p(dense), obs=counts.obs, var=counts.var, layers={"counts": dense})
    layer_model = cellvae.CellVAE(layered, layer="counts", n_hidden=8).fit(max_epochs=1, progress=False)
    layered.layers["counts"] = dense + 1e-4
    layered.write_h5ad(tmp_path / "layered.h5ad")
    with pytest.raises(
        ValueError, match=r"round them where the model reads them, .* \(in memory: first adata = adata\.to_memory"
    ):
        layer_model.get_latent(ad.read_h5ad(tmp_path / "layered.h5ad", backed="r"))
    query.X = np.rint(query.X)  # the advice, which works
    assert model.map_query(query, max_epochs=1, progress=False).get_latent().shape == (counts.n_obs, 10)
    estimated = counts.X.astype(np.float32).toarray() * 500.25  # e.g. RSEM's expected counts of deep reads
    with pytest.raises(ValueError, match=r"looks normalised \(normalize_total, CPM or TPM\) or like estimated counts \(salmon"):
        cellvae.CellVAE(ad.AnnData(estimated, obs=counts.obs, var=counts.var))


@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_rounding_advice_for_a_backed_file_says_to_round_in_memory(counts, tmp_path, storage):
    """The advice np.rint(adata.X) fails on a backed AnnData (a TypeError on anndata's _CSRDataset): the error says
    to round the counts in memory, and that works."""
    matrix = counts.X.astype(np.float64).toarray()
    matrix[matrix > 0] += 1e-7
    ad.AnnData(sp.csr_matrix(matrix) if storage == "csr" else matrix, obs=counts.obs, var=counts.var).write_h5ad(
        tmp_path / "r.h5ad"
    )
    backed = ad.read_h5ad(tmp_path / "r.h5ad", backed="r")
    advice = r"np\.rint\(adata\.X\), .*layer='counts'\. These counts are read from disk .*adata = adata\.to_memory\(\) first"
    with pytest.raises(ValueError, match=advice):
        cellvae.CellVAE(backed)
    with pytest.raises(ValueError, match=advice):
        cellvae.CellVAE(backed[:50])  # a view of the file
    adata = backed.to_memory()
    adata.layers["counts"] = np.rint(adata.X)
    assert cellvae.CellVAE(adata, layer="counts").config.n_genes == counts.n_vars


def test_counts_beyond_any_real_count_are_refused_before_they_overflow_the_likelihood(counts, tmp_path):
    # above 2**63 the count would wrap to a wrong integer, above float32's range to inf: refused at the model's build
    for dtype, value in (("float32", 1e13), ("float64", 1e39), ("int64", 2**62)):
        matrix = counts.X.astype(dtype).toarray()
        matrix[5, 3] = value
        adata = ad.AnnData(matrix, obs=counts.obs, var=counts.var)
        with pytest.raises(ValueError, match=r"adata\.X has a value of .*above the 1e\+12 cellvae accepts as a count"):
            cellvae.CellVAE(adata)
    matrix[5, 3] = 10**12  # the largest count accepted trains
    model = cellvae.CellVAE(ad.AnnData(matrix, obs=counts.obs, var=counts.var), n_hidden=16).fit(max_epochs=1, progress=False)
    assert np.isfinite(model.get_latent()).all()
    # a backed file whose sparse counts are float16 (scipy cannot hold them): refused with the way out
    path = tmp_path / "half.h5ad"
    ad.AnnData(counts.X.astype(np.float32), obs=counts.obs, var=counts.var).write_h5ad(path)
    with h5py.File(path, "r+") as file:
        data = file["X/data"][:]
        del file["X/data"]
        file["X/data"] = data.astype(np.float16)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(TypeError, match="stored as sparse float16.*integers or float32"):
        cellvae.CellVAE(backed)
    backed.file.close()


def test_backed_csc_is_read_by_bands_of_columns_never_whole(counts, tmp_path_factory, monkeypatch):
    """anndata loads a whole CSC matrix into memory for any selection of rows; cellvae reads bands."""
    from anndata._core.sparse_dataset import _CSCDataset

    from cellvae import data

    backed = stored(counts, tmp_path_factory, "csc")
    monkeypatch.setattr(data, "VALUES_PER_CHECK", backed.X.group["data"].shape[0] // 7)  # ~8 bands of columns
    monkeypatch.setattr(data, "BACKED_CSC_BUFFER_VALUES", backed.X.group["data"].shape[0] // 5)  # 5 buffers
    assert len(data._csc_bands(backed.X)) >= 7

    def whole(self):
        raise AssertionError("the whole CSC matrix was loaded into memory")

    monkeypatch.setattr(_CSCDataset, "to_memory", whole)
    expected = counts.X.toarray()
    columns = np.array([5, 0, 59, 17, 33])
    np.testing.assert_allclose(library_sizes(backed.X, columns, check_as="adata.X"), expected[:, columns].sum(1))
    np.testing.assert_allclose(library_sizes(backed.X, rows=range(100, 900)), expected[100:900].sum(1))
    with pytest.warns(UserWarning, match="column-major .CSC.*Store it as CSR"):
        loader = loader_for(backed)
    cells = np.arange(counts.n_obs)[1::2]
    seen = []
    for mb in loader.batches(cells, 100, shuffle=True, rng=np.random.default_rng(1), with_sparse=True):
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        seen.append(mb.cell_index)
    seen = np.concatenate(seen)
    assert len(seen) == len(cells) and set(seen) == set(cells)


def test_the_backed_csc_warnings_advice_runs_as_written_and_gives_a_file_that_streams_without_it(
    counts, tmp_path_factory, tmp_path, monkeypatch
):
    import scipy

    from cellvae import data

    backed = stored(counts, tmp_path_factory, "csc")
    monkeypatch.setattr(data, "BACKED_CSC_BUFFER_VALUES", backed.X.group["data"].shape[0] // 5)
    with pytest.warns(UserWarning, match="column-major") as caught:
        loader_for(backed)
    advice = re.search(r"e\.g\. (adata = .*write_h5ad\(path\))", str(caught[0].message)).group(1)
    exec(advice, {"adata": ad.read_h5ad(backed.filename, backed="r"), "scipy": scipy, "path": tmp_path / "csr.h5ad"})
    rewritten = ad.read_h5ad(tmp_path / "csr.h5ad", backed="r")
    assert rewritten.X.format == "csr"
    with no_warnings():
        loader = loader_for(rewritten)
    rows = np.concatenate([mb.cell_index for mb in loader.batches(np.arange(counts.n_obs), 100, with_sparse=True)])
    np.testing.assert_array_equal(rows, np.arange(counts.n_obs))
    rewritten.file.close()


def test_backed_csc_with_unsorted_rows_in_its_columns_is_read_right(counts, tmp_path):
    """Row indices within a column are usually increasing (scipy sorts them) and are then found by binary
    search; a file whose columns are not sorted is detected and read by looking up every row index."""
    from cellvae import data

    path = tmp_path / "unsorted.h5ad"
    ad.AnnData(sp.csc_matrix(counts.X), obs=counts.obs, var=counts.var).write_h5ad(path)
    rng = np.random.default_rng(3)
    with h5py.File(path, "r+") as file:
        indptr, indices, values = file["X/indptr"][:], file["X/indices"][:], file["X/data"][:]
        order = np.concatenate([a + rng.permutation(b - a) for a, b in zip(indptr[:-1], indptr[1:])])
        file["X/indices"][:], file["X/data"][:] = indices[order], values[order]
    backed = ad.read_h5ad(path, backed="r")
    assert not data._csc_layout(backed.X)[1]
    loader = loader_for(backed)
    expected = counts.X.toarray()
    cells = np.arange(counts.n_obs)[::3]
    seen = []
    for mb in loader.batches(cells, 64, shuffle=True, rng=np.random.default_rng(0), with_sparse=True):
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        seen.append(mb.cell_index)
    assert np.array_equal(np.sort(np.concatenate(seen)), cells)
    assert loader._csc_columns is not None and not loader._csc_columns[1]
    backed.file.close()


def test_a_failing_read_reaches_the_caller(counts, tmp_path_factory):
    backed = stored(counts, tmp_path_factory, "csr")
    loader = loader_for(backed)
    backed.file.close()
    with pytest.raises(RuntimeError) as caught:  # h5py's own error for a closed file, raised in the reading thread
        list(loader.batches(np.arange(counts.n_obs), 64, shuffle=True, rng=np.random.default_rng(0)))
    assert any("h5py" in str(entry.path) for entry in caught.traceback), "the reader's own error, with its traceback"


def test_shuffle_needs_a_generator(counts):
    with pytest.raises(ValueError, match="rng"):
        loader_for(counts).batches(np.arange(10), 5, shuffle=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_gpu_keeps_fitting_data_on_the_device_for_training_only(counts):
    """Training (``resident``) keeps counts that fit on the GPU; a call that reads cells once streams just them."""
    loader = loader_for(counts, device="cuda")
    few = list(loader.batches(np.arange(20), 128))
    assert loader._on_device is None and few[0].counts.is_cuda  # streamed: no copy of all cells for 20 of them
    np.testing.assert_array_equal(few[0].counts.cpu().numpy(), counts.X[:20].toarray())
    assert loader.resident() is not None
    rng = np.random.default_rng(0)
    seen = [mb for mb in loader.batches(np.arange(counts.n_obs), 128, shuffle=True, rng=rng)]
    assert all(mb.counts.is_cuda for mb in seen)
    assert sorted(np.concatenate([mb.cell_index for mb in seen])) == list(range(counts.n_obs))
    np.testing.assert_array_equal(seen[0].counts.cpu().numpy(), counts.X.toarray()[seen[0].cell_index])
    loader.release_device()
    assert loader._on_device is None


def test_counts_copied_to_the_device_in_chunks_equal_the_matrix(counts, monkeypatch):
    """The device copy is built 150 rows at a time (here 18 chunks), so the host never densifies it all."""
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * counts.n_vars * 150)
    reads, read_rows = [], CellLoader._read_rows
    monkeypatch.setattr(CellLoader, "_read_rows", lambda self, rows: reads.append(len(rows)) or read_rows(self, rows))
    resident, covariates, library, batch_index = loader_for(counts)._resident_tensors()
    assert max(reads) == 150 and sum(reads) == counts.n_obs
    assert resident.dtype == torch.int16  # whole counts below 32,768: half the memory of float32
    np.testing.assert_array_equal(resident.numpy(), counts.X.toarray())
    np.testing.assert_allclose(library.numpy()[:, 0], np.asarray(counts.X.sum(1)).ravel())
    assert covariates.shape == (counts.n_obs, 0) and batch_index.shape == (counts.n_obs,)


def test_resident_counts_that_int16_cannot_hold_stay_float32_and_too_many_stay_on_the_host(counts, monkeypatch):
    """A count above 32,767 in the last chunk sends the whole copy back to float32, values intact; counts
    larger than the memory budget are not copied at all (the loader then streams them)."""
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * counts.n_vars * 150)
    matrix = counts.X.toarray()
    matrix[-1, 0] = 40_000
    loader = loader_for(ad.AnnData(sp.csr_matrix(matrix)))
    resident = loader._resident_tensors()[0]
    assert resident.dtype == torch.float32
    np.testing.assert_array_equal(resident.numpy(), matrix)
    dense_bytes = 2 * matrix.size  # as int16
    assert loader_for(counts)._resident_tensors(max_bytes=dense_bytes - 1) is None
    assert loader_for(counts)._resident_tensors(max_bytes=dense_bytes)[0].dtype == torch.int16
    assert loader._resident_tensors(max_bytes=dense_bytes) is None  # it needs float32: twice that
    one_hot = np.eye(7, dtype=np.float32)[np.arange(counts.n_obs) % 7]  # e.g. 7 batches: counted in the budget too
    with_batches = CellLoader(counts.X, one_hot, library_sizes(counts.X), np.arange(counts.n_obs) % 7)
    assert with_batches._resident_tensors(max_bytes=dense_bytes + one_hot.nbytes - 1) is None
    np.testing.assert_array_equal(with_batches._resident_tensors(max_bytes=dense_bytes + one_hot.nbytes)[1].numpy(), one_hot)
    int16_loader = loader_for(counts)
    int16_loader._on_device = int16_loader._resident_tensors()
    batch = next(int16_loader._device_batches(np.arange(counts.n_obs), 64, False, None))
    assert batch.counts.dtype == torch.float32  # minibatches are float32 whatever the storage
    np.testing.assert_array_equal(batch.counts.numpy(), counts.X[:64].toarray())


def resident_on_the_cpu(patch) -> None:
    """Make loaders behave on the CPU as on a GPU that holds all counts: minibatches gathered from
    resident dense tensors (no sparse counts, so the dense likelihood) and training in ResidentSteps."""

    def resident(self):
        if self._on_device is None:
            self._on_device = self._resident_tensors()
        return self._on_device

    def resident_batches(self, cells, batch_size, shuffle=False, rng=None, with_sparse=False):
        resident(self)
        return self._device_batches(np.asarray(cells, dtype=np.int64), batch_size, shuffle, rng)

    patch.setattr(CellLoader, "resident", resident)
    patch.setattr(CellLoader, "batches", resident_batches)


def test_the_gpu_path_run_on_the_cpu_trains_like_the_cpu_path(pbmc, monkeypatch):
    """The GPU's way of training (all counts resident, steps summed on the device and read once an
    epoch, the dense likelihood) run on the CPU, where CI can run it: same epochs, held-out ELBO within
    0.5%, the same cell-type kNN accuracy within 0.03."""
    settings = {"max_epochs": 60, "random_state": 0, "progress": False, "device": "cpu"}
    usual = cellvae.CellVAE(pbmc).fit(**settings)
    with monkeypatch.context() as patch:
        resident_on_the_cpu(patch)
        resident = cellvae.CellVAE(pbmc).fit(**settings)
        assert resident.history["validation_elbo"].notna().all()
        resident_accuracy = knn_accuracy(resident.get_latent(), pbmc.obs["cell_type"])
    assert len(resident.history) == len(usual.history)
    usual_elbo, resident_elbo = usual.history["validation_elbo"].iloc[-1], resident.history["validation_elbo"].iloc[-1]
    assert abs(resident_elbo - usual_elbo) < 0.005 * abs(usual_elbo), (resident_elbo, usual_elbo)
    train_loss = usual.history["train_loss"].iloc[-1]
    assert abs(resident.history["train_loss"].iloc[-1] - train_loss) < 0.01 * abs(train_loss)
    assert abs(resident_accuracy - knn_accuracy(usual.get_latent(), pbmc.obs["cell_type"])) < 0.03


def buffered_loader(adata) -> CellLoader:
    """The loader a model trains from, with real covariates: one-hot batches and their codes."""
    return cellvae.CellVAE(adata, batch_key="batch")._loader(adata, torch.device("cpu"))[0]


@pytest.mark.parametrize("kind", ["memory", "csr", "csc", "dense", "zarr"])
def test_a_device_buffer_holds_each_cell_once_an_epoch_with_its_own_counts_and_covariates(
    counts, tmp_path_factory, kind, monkeypatch
):
    """Counts that do not all fit on a GPU are refilled into fixed device tensors a buffer at a time (here on the
    CPU: 448 cells, so three buffers an epoch). Each minibatch's positions hold its cells' counts, batch one-hots,
    library sizes and batch codes; the cells come in the order that ``batches`` gives them, from the same reads
    of a file (a device buffer takes pieces of the read buffers, not its own mix of them; in-memory counts are
    gathered a device buffer at a time); every minibatch is full but the last; shuffles differ between epochs
    and repeat with the seed."""
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * counts.n_vars * 500)
    if kind == "zarr":
        path = tmp_path_factory.mktemp("zarr") / "cells.zarr"
        with ad.settings.override(zarr_write_format=3):
            counts.write_zarr(path)
        adata = cellvae.read_zarr_lazy(path)
    else:
        adata = counts if kind == "memory" else stored(counts, tmp_path_factory, kind)
    loader = buffered_loader(adata)
    cells = np.arange(counts.n_obs)[::2]  # a subset, like a training split: 1,299 cells
    buffer = DeviceBuffer(loader, 64, len(cells))
    assert buffer.rows == 448  # 500 cells' counts in whole minibatches
    assert DeviceBuffer(loader, 64, 100).rows == 128  # no more than the epoch's cells, in whole minibatches
    expected, codes = counts.X.toarray(), counts.obs["batch"].cat.codes.to_numpy()
    reads, read_rows = [], CellLoader._read_rows
    monkeypatch.setattr(CellLoader, "_read_rows", lambda self, rows: reads.append(rows.copy()) or read_rows(self, rows))

    def epochs(seed):
        rng, orders = np.random.default_rng(seed), []
        for _ in range(2):
            seen, sizes = [], []
            for positions in buffer.epoch(cells, rng):
                here = buffer.cells[positions.numpy()]
                np.testing.assert_array_equal(buffer.counts[positions].numpy(), expected[here])
                np.testing.assert_array_equal(buffer.covariates[positions].numpy(), np.eye(2)[codes[here]])
                np.testing.assert_allclose(buffer.library[positions, 0].numpy(), expected[here].sum(1), rtol=1e-6)
                np.testing.assert_array_equal(buffer.batch_index[positions].numpy(), codes[here])
                seen.append(here)
                sizes.append(len(positions))
            assert set(sizes[:-1]) == {64} and sum(sizes) == len(cells)
            orders.append(np.concatenate(seen))
        return orders

    first, second = epochs(0)
    buffer_reads, reads[:] = reads[:], []
    rng = np.random.default_rng(0)
    for order in (first, second):
        np.testing.assert_array_equal(order, np.concatenate([mb.cell_index for mb in loader.batches(cells, 64, True, rng)]))
    if kind == "memory":  # gathered a device buffer at a time, not a minibatch at a time
        assert [len(rows) for rows in buffer_reads] == [448, 448, len(cells) - 896] * 2
    else:
        assert len(buffer_reads) == len(reads) and all(map(np.array_equal, buffer_reads, reads))
    assert sorted(first) == list(cells) and not np.array_equal(first, second)
    again = epochs(0)
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])


def test_a_device_buffer_sums_a_cells_repeated_entries_and_keeps_the_models_genes(counts):
    """A CSR block with a cell's gene stored twice is densified on the device as scipy sums it; a loader that
    reads some genes of the file (a model's genes, in its order) fills the buffer with those columns only."""
    scrambled = scrambled_csr(counts.X, seed=0)
    assert not scrambled.has_canonical_format
    genes = np.array([5, 2, 40, 7])
    n = counts.n_obs
    loader = CellLoader(scrambled, np.zeros((n, 0), np.float32), library_sizes(counts.X), np.zeros(n, np.int64), genes)
    buffer = DeviceBuffer(loader, 100, n)
    for positions in buffer.epoch(np.arange(n), np.random.default_rng(0)):
        here = buffer.cells[positions.numpy()]
        np.testing.assert_array_equal(buffer.counts[positions].numpy(), counts.X.toarray()[here][:, genes])


def test_a_backed_file_trained_through_a_device_buffer_on_the_cpu_trains_like_the_cpu_path(pbmc, tmp_path, monkeypatch):
    """The way a GPU trains on a backed file (buffers of cells refilled into fixed tensors, steps summed on the
    device, the dense likelihood) run on the CPU: same epochs, held-out ELBO within 0.5%, the same cell-type kNN
    accuracy within 0.03; a failing step leaves no thread reading the file."""
    pbmc.write_h5ad(tmp_path / "pbmc.h5ad")
    backed = ad.read_h5ad(tmp_path / "pbmc.h5ad", backed="r")
    settings = {"max_epochs": 60, "random_state": 0, "progress": False, "device": "cpu"}
    usual = cellvae.CellVAE(backed).fit(**settings)
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * pbmc.n_vars * 256)  # buffers of 256 cells: 3 an epoch
    buffers = []
    monkeypatch.setattr(CellLoader, "device_buffer", lambda self, *args: buffers.append(DeviceBuffer(self, *args)) or buffers[-1])
    buffered = cellvae.CellVAE(backed).fit(**settings)
    assert len(buffers) == 1 and buffers[0].rows == 256
    assert buffered.history["validation_elbo"].notna().all()
    assert len(buffered.history) == len(usual.history)
    usual_elbo, buffered_elbo = usual.history["validation_elbo"].iloc[-1], buffered.history["validation_elbo"].iloc[-1]
    assert abs(buffered_elbo - usual_elbo) < 0.005 * abs(usual_elbo), (buffered_elbo, usual_elbo)
    accuracy = knn_accuracy(buffered.get_latent(backed), pbmc.obs["cell_type"])
    assert abs(accuracy - knn_accuracy(usual.get_latent(backed), pbmc.obs["cell_type"])) < 0.03
    fail_at_call(monkeypatch, "forward", 5, "failed mid-epoch")
    with pytest.raises(RuntimeError, match="failed mid-epoch") as kept:
        cellvae.CellVAE(backed).fit(**settings)
    assert kept.value is not None and reading_threads() == []
    backed.file.close()


@pytest.mark.parametrize("resident", [False, True])
def test_a_nan_gradient_on_the_last_step_of_an_epoch_is_recovered_from_once_on_either_path(resident, monkeypatch):
    """A NaN gradient whose loss is finite shows only in the parameters at the epoch's end: both ways of
    training restore the last good parameters, halve the learning rate once and train on with the new
    optimizer (the resident steps too, not the optimizer their graphs were built with)."""
    n_cells, n_genes = 120, 20
    counts = cellvae.datasets.simulate(n_cells=n_cells, n_genes=n_genes, random_state=1, sparse=False).X.astype(np.float32)
    loader = CellLoader(counts, np.zeros((n_cells, 0), np.float32), counts.sum(1), np.zeros(n_cells, np.int64))
    if resident:
        tensors = loader._resident_tensors()
        monkeypatch.setattr(loader, "resident", lambda: tensors)
    torch.manual_seed(0)
    vae = VAE(Config(gene_names=[f"g{i}" for i in range(n_genes)], n_hidden=8, n_latent=2))
    steps = []

    def nan_on_the_last_step_of_the_first_epoch(grad):  # 120 cells in minibatches of 16: 8 steps an epoch
        steps.append(1)
        return torch.full_like(grad, float("nan")) if len(steps) == 8 else grad

    vae.encoder.mean.weight.register_hook(nan_on_the_last_step_of_the_first_epoch)
    settings = TrainSettings(
        max_epochs=4, batch_size=16, lr=1e-2, weight_decay=0.0, kl_warmup_epochs=1, beta=1.0,
        early_stopping=False, patience=10, random_state=0, progress=False,
    )  # fmt: skip
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        history = train(vae, loader, np.arange(n_cells), np.arange(0), settings)
    assert sum("non-finite" in str(warning.message) for warning in caught) == 1
    np.testing.assert_allclose(history["lr"], 5e-3)
    assert np.isfinite(history["train_loss"]).all() and all(torch.isfinite(p).all() for p in vae.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("posterior", ["diagonal", "full"])
def test_gpu_training_replays_cuda_graphs_and_trains_like_step_by_step(pbmc, monkeypatch, posterior):
    """On a GPU each training step is replayed from a CUDA graph (one per minibatch size); the model
    is as good as one trained step by step (graphs turned off) and as reproducible."""
    from cellvae.train import ResidentSteps

    settings = {"max_epochs": 40, "random_state": 0, "progress": False, "device": "cuda"}
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns
        graphs = cellvae.CellVAE(pbmc, posterior=posterior).fit(**settings)
        again = cellvae.CellVAE(pbmc, posterior=posterior).fit(**settings)
    steps_per_epoch = -(-(pbmc.n_obs - round(0.1 * pbmc.n_obs)) // 128)  # the last one smaller
    # Every step but the first of each size (run as usual, then captured) is a replay.
    assert len(replays) == sum(len(model.history) * steps_per_epoch - 2 for model in (graphs, again))
    np.testing.assert_array_equal(graphs.get_latent(), again.get_latent())
    init = ResidentSteps.__init__

    def without_graphs(self, *args):
        init(self, *args)
        self.graphs = None

    monkeypatch.setattr(ResidentSteps, "__init__", without_graphs)
    stepwise = cellvae.CellVAE(pbmc, posterior=posterior).fit(**settings)
    elbo, stepwise_elbo = graphs.history["validation_elbo"].iloc[-1], stepwise.history["validation_elbo"].iloc[-1]
    assert abs(elbo - stepwise_elbo) < 0.005 * abs(stepwise_elbo), (elbo, stepwise_elbo)
    accuracy = knn_accuracy(graphs.get_latent(), pbmc.obs["cell_type"])
    assert abs(accuracy - knn_accuracy(stepwise.get_latent(), pbmc.obs["cell_type"])) < 0.03


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_gpu_training_on_a_backed_file_replays_cuda_graphs_over_a_device_buffer(pbmc, tmp_path, monkeypatch):
    """A backed file on a GPU trains through a device buffer refilled in place (3 buffers an epoch here) with
    every step but the first of each size replayed from a CUDA graph: reproducible, and as good as the
    minibatch-by-minibatch way (no buffer, no graphs)."""
    pbmc.write_h5ad(tmp_path / "pbmc.h5ad")
    backed = ad.read_h5ad(tmp_path / "pbmc.h5ad", backed="r")
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * pbmc.n_vars * 256)
    settings = {"max_epochs": 40, "random_state": 0, "progress": False, "device": "cuda"}
    buffers, made = [], CellLoader.device_buffer
    monkeypatch.setattr(CellLoader, "device_buffer", lambda self, *args: buffers.append(made(self, *args)) or buffers[-1])
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: replays.append(1) or replay(graph))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns
        graphs = cellvae.CellVAE(backed).fit(**settings)
        again = cellvae.CellVAE(backed).fit(**settings)
    assert [buffer.rows for buffer in buffers] == [256, 256]
    steps_per_epoch = -(-(pbmc.n_obs - round(0.1 * pbmc.n_obs)) // 128)  # the last one smaller
    assert len(replays) == sum(len(model.history) * steps_per_epoch - 2 for model in (graphs, again))
    np.testing.assert_array_equal(graphs.get_latent(backed), again.get_latent(backed))
    monkeypatch.setattr(CellLoader, "device_buffer", lambda self, *args: None)
    stepwise = cellvae.CellVAE(backed).fit(**settings)
    elbo, stepwise_elbo = graphs.history["validation_elbo"].iloc[-1], stepwise.history["validation_elbo"].iloc[-1]
    assert abs(elbo - stepwise_elbo) < 0.005 * abs(stepwise_elbo), (elbo, stepwise_elbo)
    accuracy = knn_accuracy(graphs.get_latent(backed), pbmc.obs["cell_type"])
    assert abs(accuracy - knn_accuracy(stepwise.get_latent(backed), pbmc.obs["cell_type"])) < 0.03
    backed.file.close()


def test_evaluation_passes_densify_a_bounded_number_of_counts(counts, monkeypatch):
    loader = loader_for(counts)
    assert loader.evaluation_batch_size(100) == 100
    monkeypatch.setattr(cellvae.data, "EVALUATION_VALUES", 60 * 37)  # 37 cells of 60 genes
    assert loader.evaluation_batch_size(4096) == 37
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        loader.evaluation_batch_size(0)
    model = cellvae.CellVAE(counts, batch_key="batch").fit(max_epochs=2, progress=False, device="cpu")
    bounded = model.get_latent()
    monkeypatch.setattr(cellvae.data, "EVALUATION_VALUES", 2**23)  # larger batches give the same codes
    np.testing.assert_allclose(bounded, model.get_latent(), rtol=1e-5, atol=1e-6)


def test_a_damaged_backed_file_names_the_cells_that_could_not_be_read(tmp_path):
    import h5py

    from cellvae.cli import main

    path = tmp_path / "damaged.h5ad"
    cellvae.datasets.simulate(n_cells=2000, n_genes=200, random_state=0).write_h5ad(path, compression="gzip")
    with h5py.File(path, "r") as handle:
        data = handle["X/data"]
        last = data.id.get_chunk_info(data.id.get_num_chunks() - 1)
    with open(path, "r+b") as handle:  # scramble the last compressed chunk of the stored counts
        handle.seek(last.byte_offset + 10)
        handle.write(b"\xff" * 64)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(OSError, match=r"reading cells 0–1999 of adata.X from disk failed .*damaged or truncated"):
        cellvae.CellVAE(backed)
    backed.file.close()
    with pytest.raises(SystemExit, match=r"^error: reading cells 0–1999 of adata.X from disk failed"):
        main(["fit", str(path), "--backed", "--out", str(tmp_path / "o.h5ad"), "--model-dir", str(tmp_path / "m")])


def test_covariates_are_held_as_codes_and_made_one_hot_for_the_rows_asked_for():
    # An atlas of many samples: one-hot rows for every cell would take 4 bytes × 1,000 batches per cell.
    adata = cellvae.datasets.simulate(n_cells=3000, n_genes=20, random_state=3)
    rng = np.random.default_rng(0)
    adata.obs["sample"] = pd.Categorical([f"s{i}" for i in rng.integers(0, 1000, adata.n_obs)])
    adata.obs["donor"] = rng.choice(["d1", "d2", "d3"], adata.n_obs)
    adata.obs["percent_mito"] = rng.uniform(0, 10, adata.n_obs)
    model = cellvae.CellVAE(
        adata, batch_key="sample", categorical_covariate_keys=["donor"], continuous_covariate_keys=["percent_mito"]
    )
    covariates = cellvae.data.covariate_matrix(adata.obs, model.layout)
    samples = list(model.config.batch_categories)
    expected = np.concatenate(
        [
            np.eye(len(samples), dtype=np.float32)[[samples.index(s) for s in adata.obs["sample"].astype(str)]],
            np.eye(3, dtype=np.float32)[[["d1", "d2", "d3"].index(d) for d in adata.obs["donor"]]],
            (
                (adata.obs["percent_mito"].to_numpy() - model.config.continuous_covariate_mean[0])
                / model.config.continuous_covariate_std[0]
            ).astype(np.float32)[:, None],
        ],  # fmt: skip
        axis=1,
    )
    assert covariates.shape == expected.shape
    rows = rng.permutation(adata.n_obs)[:128]
    np.testing.assert_array_equal(covariates[rows], expected[rows])
    np.testing.assert_array_equal(covariates[10:20], expected[10:20])
    np.testing.assert_array_equal(covariates[7], expected[7])
    held = sum(codes.nbytes for codes in covariates.codes) + covariates.continuous.nbytes
    assert held <= 12 * adata.n_obs < expected.nbytes / 300


def test_training_that_fails_mid_epoch_leaves_no_prefetch_thread(tmp_path, monkeypatch):
    """The thread that reads the next block of a backed file is joined when fit fails, not kept alive by the
    traceback the caller (pytest.raises, a logger, IPython) keeps."""
    cellvae.datasets.simulate(n_cells=900, n_genes=80, random_state=1).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * 80 * 100)  # blocks of about 100 cells: several per epoch
    fail_at_call(monkeypatch, "forward", 5, "failed mid-epoch")  # e.g. out of memory
    with pytest.raises(RuntimeError, match="failed mid-epoch") as kept:
        cellvae.CellVAE(backed, n_latent=5, n_hidden=32).fit(max_epochs=2, batch_size=32, progress=False)
    assert kept.value is not None  # the traceback is still held here
    assert reading_threads() == []
    backed.file.close()


def fail_at_call(monkeypatch, method: str, call: int, message: str) -> None:
    """Make ``VAE.<method>`` raise a RuntimeError(``message``) at its ``call``-th call (earlier calls run as usual)."""
    original, calls = getattr(VAE, method), []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(message)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VAE, method, failing)


def reading_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "cellvae-loader"]


@pytest.mark.parametrize("output", ["get_latent", "get_normalized_expression", "sample_counts"])
def test_an_output_that_fails_midway_through_a_backed_file_leaves_no_reading_thread(tmp_path, monkeypatch, output):
    """Outputs hold their minibatches in a local variable, which the traceback of an error (or of Ctrl-C in a
    notebook) keeps alive: the pass must still stop the thread that reads ahead in the file."""
    adata = cellvae.datasets.simulate(n_cells=900, n_genes=80, random_state=1)
    model = cellvae.CellVAE(adata, n_latent=5, n_hidden=32).fit(max_epochs=1, progress=False, device="cpu")
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * 80 * 100)  # blocks of about 100 cells: several per pass
    fail_at_call(monkeypatch, "inference", 3, "failed midway")
    with pytest.raises(RuntimeError, match="failed midway") as kept:
        getattr(model, output)(backed, batch_size=50)
    assert kept.value is not None  # the traceback, with the output's frame, is still held here
    assert reading_threads() == []
    backed.file.close()


# ----------------------------------------------------------------------------- reading and checking, case by case


@pytest.fixture(scope="module")
def small_counts():
    return cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=7)


def test_a_view_that_repeats_a_gene_reads_as_anndata_reads_it(small_counts):
    """A view whose genes repeat one (adata[:, [g, g, ...]]) is left to anndata; its columns are each gene's counts."""
    adata = small_counts.copy()
    adata.X = sp.csr_matrix(adata.X)
    view = adata[np.arange(0, 300, 2), [3, 3, 0, 7]]
    matrix = cellvae.data.count_matrix(view, None)
    assert matrix.shape == view.shape
    np.testing.assert_array_equal(sp.csr_matrix(matrix).toarray(), view.X.toarray())


def test_the_share_of_ones_of_a_view_of_a_backed_file_is_taken_from_the_views_own_cells(small_counts, tmp_path):
    """count_profile samples the whole file for a backed view but must count only the view's cells, each in its batch."""
    counts = small_counts.X.toarray()
    counts[150:] *= 7  # the second half: read counts (no 1s); the first half: UMI-like (many 1s)
    counts[150, 0] = 500_000  # the largest count, in a cell outside the view
    ad.AnnData(sp.csr_matrix(counts)).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    rows = np.r_[np.arange(299, 200, -1), np.arange(0, 40)]  # mostly second-half cells, out of file order
    codes = (rows < 150).astype(np.int64)  # batch 0: second-half cells, batch 1: first-half cells
    view = cellvae.data.count_matrix(backed[rows], None)
    assert isinstance(view, cellvae.data.BackedView)
    share, non_zero, largest = cellvae.data.count_profile(view, codes)
    expected_share, expected_non_zero, expected_largest = cellvae.data.count_profile(sp.csr_matrix(counts[rows]), codes)
    np.testing.assert_allclose(share, expected_share)
    np.testing.assert_array_equal(non_zero, expected_non_zero)
    assert largest == expected_largest == counts[rows].max() < 500_000  # (the view's own cells only)
    assert share[0] == 0 and share[1] > 0.05
    backed.file.close()


def test_genes_without_counts_of_a_dense_matrix_read_in_several_blocks(small_counts, monkeypatch):
    """Dense counts are scanned a block of rows at a time: a gene seen only in an early block still has counts."""
    monkeypatch.setattr(cellvae.data, "VALUES_PER_CHECK", 40 * 50)  # blocks of 50 cells
    counts = np.zeros((300, 40), dtype=np.float32)
    counts[3, :10] = 1  # genes 0-9: only in the first block
    counts[297, 10:20] = 2  # genes 10-19: only in the last block
    assert cellvae.data.genes_without_counts(counts) == 20
    assert cellvae.data.genes_without_counts(sp.csr_matrix(counts)) == 20


@pytest.mark.parametrize("layout", ["csr_int", "csr_float"])
def test_library_sizes_of_cells_without_counts_are_zero(layout):
    """Empty cells (no stored value) between full ones sum to 0, in every chunk of rows."""
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, size=(400, 30)).astype(np.float32 if layout == "csr_float" else np.int64)
    dense[::3] = 0  # every third cell empty, including the first
    dense[-1] = 0  # and the last
    _ = np.full(10_000, 7.0)  # leave non-zero garbage where a fresh uninitialised array may be placed
    del _
    np.testing.assert_array_equal(library_sizes(sp.csr_matrix(dense)), dense.sum(1))


@pytest.mark.parametrize("kind", ["csr", "dense", "csc"])
def test_library_sizes_of_a_range_of_backed_rows_has_just_those_rows(small_counts, tmp_path, kind):
    """rows=range(a, b) (one data-parallel rank's part) reads, checks and sums only those cells."""
    dense = small_counts.X.toarray()
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[kind](dense)
    ad.AnnData(matrix).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    part = library_sizes(backed.X, check_as="adata.X", rows=range(100, 200))
    np.testing.assert_array_equal(part, dense[100:200].sum(1))
    backed.file.close()


@pytest.mark.parametrize("values_per_band", [1, 3, 50])
def test_backed_csc_read_in_bands_of_any_width_keeps_every_gene(small_counts, tmp_path, monkeypatch, values_per_band):
    """However the columns fall into bands (down to one gene per band), no gene, the last one included, is left out."""
    dense = small_counts.X.toarray()
    dense[:, -1] = 5  # the last gene: counts in every cell
    ad.AnnData(sp.csc_matrix(dense)).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    monkeypatch.setattr(cellvae.data, "VALUES_PER_CHECK", values_per_band)
    bands = cellvae.data._csc_bands(backed.X)
    assert bands[0][0] == 0 and bands[-1][1] == dense.shape[1]
    assert all(stop == start for (_, stop), (start, _) in zip(bands[:-1], bands[1:]))
    np.testing.assert_array_equal(library_sizes(backed.X, check_as="adata.X"), dense.sum(1))
    n = dense.shape[0]
    loader = CellLoader(backed.X, np.zeros((n, 0), np.float32), dense.sum(1), np.zeros(n, np.int64))
    for mb in loader.batches(np.arange(n), 128):
        np.testing.assert_array_equal(mb.counts.numpy(), dense[mb.cell_index])
    backed.file.close()


def test_a_backed_file_larger_than_a_read_buffer_starts_each_epoch_in_a_different_part_of_it(small_counts, tmp_path, monkeypatch):
    """Buffers hold a few blocks of rows; the blocks are dealt out in a shuffled order, so an epoch does not always
    begin with the first rows of the file (a file sorted by batch would start every epoch on one batch)."""
    adata = cellvae.datasets.simulate(n_cells=8 * BACKED_BLOCK_ROWS, n_genes=20, random_state=2)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * 20 * 2 * BACKED_BLOCK_ROWS)  # a buffer: 2 of the 8 blocks
    n = adata.n_obs
    loader = CellLoader(backed.X, np.zeros((n, 0), np.float32), np.ones(n), np.zeros(n, np.int64))
    rng = np.random.default_rng(0)
    first_blocks = []
    for _ in range(4):
        order = np.concatenate([mb.cell_index for mb in loader.batches(np.arange(n), 64, shuffle=True, rng=rng)])
        assert sorted(order) == list(range(n))
        first_blocks.append(frozenset(np.unique(order[: 2 * BACKED_BLOCK_ROWS] // BACKED_BLOCK_ROWS).tolist()))
    assert len(set(first_blocks)) > 1  # the first buffer's blocks change from epoch to epoch
    assert any(blocks != {0, 1} for blocks in first_blocks)
    backed.file.close()


@pytest.mark.parametrize("dtype", ["int16", "int32", "int64"])
@pytest.mark.parametrize("value", [-1, -3])
def test_negative_integer_counts_are_refused_however_small(small_counts, dtype, value):
    """Integer counts below 0 (e.g. -1, a common 'missing' sentinel) are refused as such."""
    matrix = small_counts.X.toarray().astype(dtype)
    matrix[4, 2] = value
    with pytest.raises(ValueError, match=rf"adata\.X has negative values \(min {value}\)"):
        cellvae.CellVAE(ad.AnnData(matrix, obs=small_counts.obs, var=small_counts.var))


def test_counts_held_in_memory_as_csc_are_told_to_be_converted_once(small_counts, monkeypatch):
    """Each loader copies CSC counts into CSR (1.08x the matrix at 100,000 cells, on every call): a large one is warned
    about, with the one conversion that ends it."""
    adata = small_counts.copy()
    adata.X = sp.csc_matrix(adata.X)
    model = cellvae.CellVAE(adata, n_hidden=8).fit(max_epochs=1, progress=False)
    monkeypatch.setattr(cellvae.data, "CONVERTED_WARNING_VALUES", adata.X.nnz - 1)
    with pytest.warns(UserWarning, match=r"the counts are a CSC matrix in memory: each call .* adata.X = adata.X.tocsr\(\)"):
        latent = model.get_latent()
    adata.X = adata.X.tocsr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(model.get_latent(), latent)


def test_counts_too_large_for_a_narrow_type_are_told_to_need_a_wider_one(small_counts):
    """Counts cast to int8/int16 wrap round to negative values, and to float16 overflow to infinity: the error
    names the type, not only the values it made."""
    counts = small_counts.X.toarray()
    assert counts.max() > 300
    for dtype, told in (("int8", r"an int8 matrix holds at most 127: larger counts wrap round"), ("float16", None)):
        with np.errstate(over="ignore"):
            narrow = (counts * (1 if dtype == "int8" else 300)).astype(dtype)
        told = told or r"infinite values in a float16 matrix, which holds at most 65,504.*float32"
        with pytest.raises(ValueError, match=told):
            cellvae.CellVAE(ad.AnnData(narrow, obs=small_counts.obs, var=small_counts.var))
    with pytest.raises(ValueError, match=r"negative values \(min -1\); cellvae needs raw counts >= 0$"):
        cellvae.CellVAE(ad.AnnData(np.where(counts > 0, counts, -1).astype("int32"), obs=small_counts.obs))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_counts_off_whole_numbers_by_less_than_a_thousandth_are_told_as_round_off(small_counts, dtype):
    """The documented bound: values within 0.001 of whole numbers are round-off (fixed by np.rint), not normalised data."""
    matrix = small_counts.X.toarray().astype(dtype)
    matrix[2, 1] = 4.0004  # off by 4e-4: float arithmetic on counts (e.g. a sum of float32 parts)
    with pytest.raises(ValueError, match=r"adata\.X holds counts with round-off .*within 0\.001.*np\.rint"):
        cellvae.CellVAE(ad.AnnData(matrix, obs=small_counts.obs, var=small_counts.var))
    matrix[2, 1] = 4.002  # beyond it: not round-off
    with pytest.raises(ValueError, match=r"non-integer values"):
        cellvae.CellVAE(ad.AnnData(matrix, obs=small_counts.obs, var=small_counts.var))


def test_cell_positions_accepts_every_position_and_refuses_the_rest(small_counts):
    """Positions run 0..n_obs-1, negative ones count from the end (as in numpy); n_obs and a mask of another
    length are refused rather than wrapped round or read short."""
    n = small_counts.n_obs
    np.testing.assert_array_equal(cell_positions(small_counts, [0, n - 1, -1, -n], "cells"), [0, n - 1, n - 1, 0])
    for outside in ([n], [-n - 1], [0, n + 5]):
        with pytest.raises(ValueError, match=rf"cells has positions outside 0\.\.{n - 1} \(or -{n}\.\.-1, counted from the end"):
            cell_positions(small_counts, outside, "cells")
    mask = np.zeros(n, dtype=bool)
    mask[[3, 9]] = True
    np.testing.assert_array_equal(cell_positions(small_counts, mask, "cells"), [3, 9])
    for wrong in (mask[:-1], np.r_[mask, True]):
        with pytest.raises(ValueError, match=rf"cells as a boolean mask must have length adata\.n_obs \({n}\)"):
            cell_positions(small_counts, wrong, "cells")
    np.testing.assert_array_equal(cell_positions(small_counts, small_counts.obs_names[[5, 2]], "cells"), [5, 2])


@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_a_view_of_a_few_scattered_cells_of_a_large_backed_file_reads_those_cells_not_their_blocks(tmp_path, kind, monkeypatch):
    """A view of 40 cells scattered over 400,000 read 250,000 rows to sum and check its counts (whole blocks of
    10,000 rows around each of its cells): on a large file, as long as a pass over all of it."""
    n_cells, rng = 60_000, np.random.default_rng(0)
    matrix = sp.random(n_cells, 20, density=0.2, format="csr", dtype=np.float32, random_state=0)
    matrix.data[:] = rng.integers(1, 5, matrix.nnz)
    ad.AnnData(matrix if kind == "csr" else matrix.toarray()).write_h5ad(tmp_path / "large.h5ad")
    backed = ad.read_h5ad(tmp_path / "large.h5ad", backed="r")
    rows = np.sort(rng.choice(n_cells, 40, replace=False))
    rows_read = []
    if kind == "csr":
        stored_class = type(backed.X)
        original = stored_class.__getitem__
        monkeypatch.setattr(
            stored_class, "__getitem__", lambda self, key: rows_read.append(original(self, key).shape[0]) or original(self, key)
        )
    view = backed[rows, [3, 0, 7]]
    totals = library_sizes(cellvae.data.count_matrix(view, None), check_as="adata.X")
    np.testing.assert_array_equal(totals, matrix[rows][:, [3, 0, 7]].toarray().sum(1))
    assert sum(rows_read) <= 40 * 16  # the cells (or short runs about them), not blocks of 10,000
