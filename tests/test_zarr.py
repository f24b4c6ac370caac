"""Zarr stores read out of core: the streaming loader, training, embedding, and the CLI on a `.zarr` input."""

import re
import shlex
import threading
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import cellvae
from cellvae.cli import main
from cellvae.data import (
    BACKED_BLOCK_ROWS,
    CellLoader,
    _csc_layout,
    _read_csc_rows,
    _read_csr_rows,
    _read_slices,
    _read_sorted_rows,
    is_backed_matrix,
    library_sizes,
)

FORMATS = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": lambda m: m.toarray()}


@pytest.fixture(scope="module")
def simulated():
    return cellvae.datasets.simulate(n_cells=1200, n_genes=120, n_batches=2, n_cell_types=4, random_state=11)


@pytest.fixture(scope="module")
def stores(simulated, tmp_path_factory):
    """The simulated counts written as Zarr stores with X as CSR, CSC and dense."""
    folder = tmp_path_factory.mktemp("zarr")
    paths = {}
    with ad.settings.override(zarr_write_format=3):  # the coming default; "csr_v2" checks the current one
        for kind, convert in FORMATS.items():
            paths[kind] = folder / f"{kind}.zarr"
            ad.AnnData(convert(simulated.X), obs=simulated.obs, var=simulated.var).write_zarr(paths[kind])
    with ad.settings.override(zarr_write_format=2):
        paths["csr_v2"] = folder / "csr_v2.zarr"
        ad.AnnData(simulated.X, obs=simulated.obs, var=simulated.var).write_zarr(paths["csr_v2"])
    return paths


def knn_accuracy(latent: np.ndarray, labels) -> float:
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(15), latent, np.asarray(labels), cv=folds).mean())


@pytest.mark.parametrize("kind", [*FORMATS, "csr_v2"])
def test_read_zarr_lazy_keeps_the_counts_on_disk(stores, simulated, kind):
    adata = cellvae.read_zarr_lazy(stores[kind])
    assert not isinstance(adata.X, (np.ndarray, sp.spmatrix, sp.sparray))
    assert isinstance(adata.X, zarr.Array) == (kind == "dense")
    assert adata.shape == simulated.shape
    pd.testing.assert_frame_equal(adata.obs, simulated.obs)
    rows = np.array([5, 700, 3])
    block = adata.X[np.sort(rows)]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    np.testing.assert_array_equal(block, simulated.X[np.sort(rows)].toarray())


@pytest.mark.parametrize("kind", [*FORMATS, "csr_v2"])
def test_every_cell_once_per_epoch_in_a_new_order_with_its_own_counts(stores, simulated, kind):
    adata = cellvae.read_zarr_lazy(stores[kind])
    n = adata.n_obs
    loader = CellLoader(adata.X, np.zeros((n, 0), np.float32), library_sizes(adata.X), np.zeros(n, np.int64))
    assert loader.backed
    expected = simulated.X.toarray()
    cells = np.arange(n)[1:]  # a training split leaves some cells out
    rng = np.random.default_rng(0)
    orders = []
    for _ in range(2):
        seen = []
        for mb in loader.batches(cells, 64, shuffle=True, rng=rng):
            np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
            seen.append(mb.cell_index)
        order = np.concatenate(seen)
        assert len(order) == len(cells) and np.array_equal(np.sort(order), cells)
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    assert len(np.unique(orders[0][: BACKED_BLOCK_ROWS // 4] // BACKED_BLOCK_ROWS)) > 1  # blocks are mixed, not read in turn


@pytest.mark.parametrize("kind", list(FORMATS))
def test_blocks_of_nearby_rows_and_scattered_rows_read_from_a_store_match_memory(stores, simulated, kind):
    matrix = cellvae.read_zarr_lazy(stores[kind]).X
    rng = np.random.default_rng(1)
    blocks = np.sort(rng.choice(simulated.n_obs // 100, 4, replace=False))
    nearby = np.concatenate([np.arange(b * 100, b * 100 + 100)[rng.random(100) < 0.9] for b in blocks])  # read as slices
    scattered = np.sort(rng.choice(simulated.n_obs, 50, replace=False))  # read by one fancy index
    for rows in (nearby, scattered, np.arange(200, 260)):
        block = _read_sorted_rows(matrix, rows)
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        np.testing.assert_array_equal(block, simulated.X[rows].toarray())
        if kind.startswith("csr"):  # the training read: rows in any order (repeats too), taken from the block read
            shuffled = np.append(rng.permutation(rows), rows[0])
            block, positions = _read_csr_rows(matrix, shuffled, matrix.group["indptr"][:])
            np.testing.assert_array_equal(block[positions].toarray(), simulated.X[shuffled].toarray())
        if kind == "csc":  # binary search in each column for runs of rows, or a lookup of every row index
            indptr, sorted_rows = _csc_layout(matrix)
            assert sorted_rows
            shuffled = np.append(rng.permutation(rows), rows[0])
            for search in (True, False):
                block, positions = _read_csc_rows(matrix, shuffled, indptr, search)
                np.testing.assert_array_equal(block[positions].toarray(), simulated.X[shuffled].toarray())


def test_the_zarr_slices_of_a_shuffled_buffer_are_read_by_several_threads_and_kept_in_order(stores):
    data = cellvae.read_zarr_lazy(stores["csr"]).X.group["data"]
    reads = []  # (thread, first value) of every read begun

    class SlowArray:  # the store's array, each read taking 20 ms
        def __init__(self, fail_at: int | None = None):
            self.fail_at = fail_at

        def __getitem__(self, key):
            reads.append((threading.get_ident(), key.start))
            time.sleep(0.02)
            if key.start == self.fail_at:
                raise OSError("a chunk could not be read")
            return data[key]

    bounds = [(start, start + 40) for start in range(600, 0, -50)]  # 12 slices, not in the store's order
    parts = _read_slices(SlowArray(), bounds)
    assert [len(part) for part in parts] == [40] * 12
    for part, (lo, hi) in zip(parts, bounds):
        np.testing.assert_array_equal(part, data[lo:hi])
    readers = {thread for thread, _ in reads}
    assert len(readers) > 1 and threading.get_ident() not in readers
    before = threading.active_count()
    reads.clear()
    with pytest.raises(OSError, match="could not be read"):
        _read_slices(SlowArray(fail_at=550), bounds)  # the second slice fails
    assert threading.active_count() == before  # the reading threads end with the failed read
    assert len(reads) < len(bounds)  # and the slices not yet begun are not read


class RecordingArray:
    """A dense Zarr array that records the rows each read asks for (it reads them from the real store)."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.chunks = array, array.shape, array.dtype, array.chunks
        self.reads: list[np.ndarray] = []

    def __getitem__(self, key):
        rows = np.arange(self.shape[0])[key[0] if isinstance(key, tuple) else key]
        self.reads.append(np.atleast_1d(rows))
        return self.array[key]


def test_a_dense_store_chunked_by_many_rows_is_decompressed_once_per_chunk_per_epoch(simulated, tmp_path, monkeypatch):
    # anndata's default chunks for dense X span thousands of rows; reading 256-row blocks from them
    # decompressed each chunk once per block. Now blocks follow the store's chunks.
    path = tmp_path / "row_chunks_of_300.zarr"
    ad.AnnData(simulated.X.toarray(), obs=simulated.obs, var=simulated.var).write_zarr(path, chunks=(300, 40))
    matrix = RecordingArray(cellvae.read_zarr_lazy(path).X)
    assert matrix.chunks == (300, 40)
    # buffers of 150 cells, or of at most 600 when reading whole chunks: 2 chunks of 300 (640 cells: 10 minibatches)
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * simulated.n_vars * 150)
    monkeypatch.setattr(cellvae.data, "CHUNKED_BUFFER_BYTES", 4 * simulated.n_vars * 600)
    n = simulated.n_obs
    loader = CellLoader(matrix, np.zeros((n, 0), np.float32), library_sizes(simulated.X), np.zeros(n, np.int64))
    cells = np.flatnonzero(np.random.default_rng(0).random(n) < 0.9)  # a training split
    expected = simulated.X.toarray()
    seen = []
    for mb in loader.batches(cells, 64, shuffle=True, rng=np.random.default_rng(1)):
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        seen.append(mb.cell_index)
    assert np.array_equal(np.sort(np.concatenate(seen)), cells)
    assert all(len(np.unique(index // 300)) == 2 for index in seen[:5])  # each minibatch mixes its buffer's 2 chunks
    chunks_read = np.concatenate([np.unique(rows // 300) for rows in matrix.reads])
    assert np.array_equal(np.sort(chunks_read), np.arange(n // 300))  # every chunk read exactly once


def test_a_csr_store_is_read_in_blocks_that_follow_the_chunks_of_its_values(simulated, tmp_path, monkeypatch):
    # anndata's default chunks for a CSR X's values hold ~1,000 rows of 2,000 genes: 256-row blocks read each
    # chunk in ~4 buffers of an epoch, decompressing it each time. Blocks now follow the chunks (as here,
    # scaled down: chunks of 3,000 values, ~35 rows, against blocks of 16 rows).
    path = tmp_path / "csr_value_chunks.zarr"
    ad.AnnData(obs=simulated.obs, var=simulated.var).write_zarr(path)
    group = zarr.open_group(path, mode="a", use_consolidated=False)
    ad.io.write_elem(group, "X", simulated.X, dataset_kwargs={"chunks": (3000,)})
    zarr.consolidate_metadata(path)
    matrix = cellvae.read_zarr_lazy(path).X
    monkeypatch.setattr(cellvae.data, "BACKED_BLOCK_ROWS", 16)
    monkeypatch.setattr(cellvae.data, "CHUNK_BYTES", 4 * simulated.n_vars * 150)
    reads = []
    read_csr_rows = cellvae.data._read_csr_rows
    monkeypatch.setattr(cellvae.data, "_read_csr_rows", lambda m, rows, ptr: reads.append(rows) or read_csr_rows(m, rows, ptr))
    n = simulated.n_obs
    loader = CellLoader(matrix, np.zeros((n, 0), np.float32), library_sizes(simulated.X), np.zeros(n, np.int64))
    assert loader._rows_per_storage_chunk() == round(3000 * n / simulated.X.nnz)
    expected = simulated.X.toarray()
    seen = []
    for mb in loader.batches(np.arange(n), 64, shuffle=True, rng=np.random.default_rng(1), with_sparse=True):
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        seen.append(mb.cell_index)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))
    chunk_of_row = simulated.X.indptr[:-1] // 3000  # the chunk holding each row's first value
    chunks_per_buffer = [np.unique(chunk_of_row[rows]) for rows in reads]
    assert len(reads) > 3 and all(len(chunks) > 1 for chunks in chunks_per_buffer)  # buffers mix chunks
    chunks_read = np.concatenate(chunks_per_buffer)
    assert np.array_equal(np.sort(chunks_read), np.unique(chunk_of_row))  # each chunk's rows read in one buffer


def test_a_dense_store_chunked_by_more_rows_than_a_buffer_warns_and_still_streams(simulated, tmp_path, monkeypatch):
    path = tmp_path / "tall_chunks.zarr"
    ad.AnnData(simulated.X.toarray(), obs=simulated.obs, var=simulated.var).write_zarr(path, chunks=(1200, 10))
    monkeypatch.setattr(cellvae.data, "CHUNKED_BUFFER_BYTES", 4 * simulated.n_vars * 600)
    adata = cellvae.read_zarr_lazy(path)
    n = adata.n_obs
    with pytest.warns(UserWarning, match=r"chunks of 1,200 rows.*chunks=\(256, adata.n_vars\)"):
        loader = CellLoader(adata.X, np.zeros((n, 0), np.float32), library_sizes(adata.X), np.zeros(n, np.int64))
    order = np.concatenate([mb.cell_index for mb in loader.batches(np.arange(n), 64, shuffle=True, rng=np.random.default_rng(0))])
    assert np.array_equal(np.sort(order), np.arange(n))


@pytest.mark.parametrize("kind", list(FORMATS))
def test_model_trained_from_a_zarr_store_embeds_cell_types_and_leaves_the_anndata_alone(stores, simulated, kind):
    adata = cellvae.read_zarr_lazy(stores[kind])
    obs_before, matrix = adata.obs.copy(), adata.X
    model = cellvae.CellVAE(adata, batch_key="batch").fit(max_epochs=15, progress=False, device="cpu", random_state=0)
    latent = model.get_latent()
    assert latent.shape == (adata.n_obs, 10) and np.isfinite(latent).all()
    assert knn_accuracy(latent, adata.obs["cell_type"]) > 0.9
    assert adata.X is matrix and not adata.obsm and not adata.layers
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    # the same model embeds the in-memory copy of the same cells identically
    np.testing.assert_allclose(model.get_latent(simulated), latent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", FORMATS)
def test_a_view_of_a_lazy_zarr_anndata_streams_its_own_cells_and_genes(stores, simulated, kind):
    adata = cellvae.read_zarr_lazy(stores[kind])
    cells, genes = np.flatnonzero(simulated.obs["batch"] == "batch1"), np.arange(100, 0, -1)
    view = adata[cells, genes]
    matrix = cellvae.data.count_matrix(view, None)
    assert isinstance(matrix, cellvae.data.BackedView)
    expected = simulated.X.toarray()[cells][:, genes]
    np.testing.assert_allclose(library_sizes(matrix, check_as="adata.X"), expected.sum(1))
    model = cellvae.CellVAE(view, batch_key="batch").fit(max_epochs=2, progress=False, device="cpu", random_state=0)
    loader, order = model._loader(view, model.device)
    seen = []
    for mb in loader.batches(order, 100, shuffle=True, rng=np.random.default_rng(1)):
        np.testing.assert_array_equal(mb.counts.numpy(), expected[mb.cell_index])
        seen.append(mb.cell_index)
    assert sorted(np.concatenate(seen)) == list(range(len(cells)))
    np.testing.assert_allclose(model.get_latent(), model.get_latent(simulated[cells, genes].copy()), rtol=1e-4, atol=1e-5)


def test_tl_embed_writes_only_obsm_on_a_lazy_anndata(stores):
    adata = cellvae.read_zarr_lazy(stores["csr"])
    counts, obs, var, layers = adata.X, adata.obs.copy(), adata.var.copy(), set(adata.layers)
    cellvae.tl.embed(adata, batch_key="batch", max_epochs=3, progress=False, random_state=0)
    assert adata.obsm["X_cellvae"].shape == (adata.n_obs, 10)
    assert set(adata.obsm) == {"X_cellvae"} and set(adata.uns) == {"cellvae"}  # its two documented keys
    assert adata.X is counts and not isinstance(adata.X, sp.spmatrix)  # the counts stay on disk, not read in
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert set(adata.layers) == layers


def test_a_view_of_a_lazy_anndata_is_refused_by_the_tools_that_write_into_it(stores, tmp_path):
    view = cellvae.read_zarr_lazy(stores["csr"])[:200]
    with pytest.raises(ValueError, match=r"adata is a view of an AnnData whose counts are on disk .*to_memory\(\)"):
        cellvae.tl.embed(view, batch_key="batch", max_epochs=1, progress=False)
    assert view.is_view and not view.obsm  # refused before any work: still a view, counts still on disk
    with pytest.raises(FileNotFoundError, match=r"is not a Zarr store .* cellvae.read_h5ad_lazy\(path\)"):
        cellvae.read_zarr_lazy(__file__)
    with pytest.raises(FileNotFoundError, match="is not a Zarr store"):
        cellvae.read_zarr_lazy(tmp_path / "missing.zarr")
    (tmp_path / "model").mkdir()  # a folder of something else, e.g. a saved model
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model' is a folder but not a Zarr store \(written by AnnData.write_zarr\)"):
        cellvae.read_zarr_lazy(tmp_path / "model")
    with pytest.raises(TypeError, match="read_zarr_lazy takes the path of a .zarr store, got None"):
        cellvae.read_zarr_lazy(None)


def test_cli_fit_reads_a_zarr_store(stores, tmp_path):
    out, model_dir = tmp_path / "out.h5ad", tmp_path / "model"
    code = main(
        ["fit", str(stores["csr"]), "--out", str(out), "--model-dir", str(model_dir)]
        + "--batch-key batch --epochs 3 --device cpu --quiet".split()
    )
    assert code == 0
    written = ad.read_h5ad(out)
    assert written.obsm["X_cellvae"].shape == (written.n_obs, 10)
    assert (written.X != ad.read_zarr(stores["csr"]).X).nnz == 0  # the counts are written out unchanged
    assert cellvae.CellVAE.load(model_dir).is_trained


def test_an_annbatch_collection_is_refused_naming_a_store_inside_it_and_other_groups_are_refused(simulated, tmp_path):
    path = tmp_path / "collection.zarr"  # as annbatch's DatasetCollection writes it: AnnData stores in a marked group
    group = zarr.open_group(path, mode="w")
    group.attrs.update({"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"})
    for name, cells in (("dataset_0", slice(0, 600)), ("dataset_1", slice(600, None))):
        ad.io.write_elem(group, name, simulated[cells].copy())
    pattern = r"annbatch collection of 2 AnnData stores.*\(dataset_0, dataset_1\), "
    pattern += r"cellvae.read_zarr_lazy\('.*collection.zarr/dataset_0'\)"
    with pytest.raises(ValueError, match=pattern):
        cellvae.read_zarr_lazy(path)
    with pytest.raises(ValueError, match=r"read_zarr_lazy\(group\['dataset_0'\]\)"):
        cellvae.read_zarr_lazy(zarr.open_group(path, mode="r"))
    adata = cellvae.read_zarr_lazy(path / "dataset_0")
    assert adata.shape == (600, simulated.n_vars) and is_backed_matrix(adata.X)
    with pytest.raises(ValueError, match="holds Zarr encoding 'dataframe', not an AnnData store"):
        cellvae.read_zarr_lazy(path / "dataset_0" / "obs")
    with pytest.raises(SystemExit, match=r"2 AnnData stores.*give cellvae .*collection.zarr/dataset_0 as its input"):
        main(["fit", str(path), "--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")])
    awkward = tmp_path / "it's my" / "collection.zarr"  # a quote and a space: the command line gets it quoted for the shell
    awkward.parent.mkdir()
    path.rename(awkward)
    with pytest.raises(SystemExit) as refused:
        main(["fit", str(awkward), "--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")])
    advice = re.search(r"give cellvae (.+) as its input", str(refused.value))[1]
    assert shlex.split(advice) == [str(awkward / "dataset_0")]
    empty = tmp_path / "empty.zarr"
    zarr.open_group(empty, mode="w").attrs.update({"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"})
    with pytest.raises(ValueError, match="annbatch collection with no AnnData stores in it"):
        cellvae.read_zarr_lazy(empty)


def test_cli_fit_names_a_missing_zarr_store(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["fit", str(tmp_path / "absent.zarr"), "--out", str(tmp_path / "o.h5ad"), "--model-dir", str(tmp_path / "m")])


@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_read_zarr_lazy_keeps_layers_and_raw_on_disk_and_sums_a_layer(tmp_path, kind):
    """read_zarr_lazy documents X, layers and raw.X as left in the store; a layer is read like X."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=3)
    counts = adata.X.copy()
    layer = sp.csr_matrix(counts) if kind == "csr" else counts.toarray()
    adata.X = sp.csr_matrix(counts, dtype=np.float32) * 0.5  # not counts: the model must read the layer
    adata.layers["counts"] = layer
    adata.raw = ad.AnnData(sp.csr_matrix(counts), var=adata.var)
    with ad.settings.override(zarr_write_format=3):
        adata.write_zarr(tmp_path / "cells.zarr")
    lazy = cellvae.read_zarr_lazy(tmp_path / "cells.zarr")
    assert is_backed_matrix(lazy.X)
    assert is_backed_matrix(lazy.layers["counts"])
    assert is_backed_matrix(lazy.raw.X)
    assert lazy.obsm is not None and list(lazy.obs.columns) == list(adata.obs.columns)  # the rest is in memory
    np.testing.assert_array_equal(library_sizes(lazy.layers["counts"]), np.asarray(counts.sum(1)).ravel())
